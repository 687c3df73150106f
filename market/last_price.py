"""The last price visible at an `as_of`: where an outcome's return is measured from.

A replay `as_of` sits just after a close, so the last visible price is that close. A live block
runs during a session (10:00 New York), when the previous close is stale: the overnight gap and
the first half hour of trading are already known to the agent (the news that moved them is in
its search results), and a return measured from the previous close would score that known move
as skill. So inside a session the base price is the latest price of that session visible before
`as_of`:

- a source that can tell (`IntradayPrices.price_at`, e.g. minute bars) gives it directly;
- a daily-bar source gives the session's open (printed at 09:30, the latest price a daily bar
  carries that was public before 10:00), put on the bar's adjustment basis so it compares with
  the adjusted close the outcome resolves at.

Between sessions (evening, weekend, holiday, before the open) the last visible price is the
previous close, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal, Protocol, runtime_checkable

from market.calendar import TradingCalendar, require_utc
from market.protocols import NoDataError, PriceSource


@runtime_checkable
class IntradayPrices(Protocol):
    """Optional: a price source that knows prices inside a session."""

    def price_at(self, ticker: str, as_of: datetime) -> float:
        """The last traded price strictly before `as_of`, on the adjustment basis of `close_on`."""
        ...


@dataclass(frozen=True)
class VisiblePrice:
    price: float
    session: date  # the session the price belongs to
    kind: Literal["close", "open", "intraday"]


def last_price(prices: PriceSource, calendar: TradingCalendar, ticker: str, as_of: datetime) -> VisiblePrice:
    """The last price of `ticker` visible strictly before `as_of` (read after the fact, by the resolver)."""
    as_of = require_utc(as_of)
    base = calendar.base_session(as_of)
    session = calendar.add_sessions(base, 1)
    if as_of <= calendar.open_of(session):  # between sessions: the previous close is the latest price
        return VisiblePrice(prices.close_on(ticker, base), base, "close")
    inner = getattr(prices, "inner", prices)  # a store cache wraps the network source
    if isinstance(inner, IntradayPrices):
        return VisiblePrice(inner.price_at(ticker, as_of), session, "intraday")
    # The session's own bar, asked for once it is complete (one minute after its close).
    bars = prices.bars(ticker, calendar.close_of(session) + timedelta(minutes=1), 1).items
    bar = next((b for b in bars if b.date == session), None)
    if bar is None or not bar.close > 0 or not bar.open > 0:
        raise NoDataError(f"no {session} bar for {ticker} to read the open visible at {as_of.isoformat()}")
    return VisiblePrice(bar.open * bar.adj_close / bar.close, session, "open")

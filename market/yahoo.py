"""Daily bars from Yahoo Finance via `yfinance`, with typed errors, timeouts and rate-limit backoff.

Bars come from `Ticker.history(auto_adjust=False)`: `Close` is Yahoo's split-adjusted close and
`Adj Close` is also dividend-adjusted; outcomes use `Adj Close`, so a split inside a window does not
look like a crash. A frame without `Adj Close` (an auto-adjusted frame) uses `Close` instead.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta

import pandas as pd

from market.calendar import TradingCalendar, require_utc
from market.guard import guard_bars
from market.protocols import Bar, Fetched, NoDataError, SourceUnavailableError, UnknownTickerError
from market.retry import backoff

# (ticker, start, end exclusive, timeout seconds) -> the frame yfinance returns.
Fetch = Callable[[str, date, date, float], pd.DataFrame]

_TICKER_RE = re.compile(r"^[A-Z0-9][A-Z0-9.\-=^]{0,14}$")
_COLUMNS = ["Open", "High", "Low", "Close", "Volume"]
# Extra sessions asked for beyond the lookback: today's partial bar and missing bars eat into it.
_MARGIN_SESSIONS = 3


def yf_history(ticker: str, start: date, end: date, timeout: float) -> pd.DataFrame:
    """The real call: one ticker's unadjusted-plus-adjusted daily history."""
    import yfinance as yf

    # Raise instead of logging and returning an empty frame, so network failures stay distinguishable.
    yf.config.debug.hide_exceptions = False
    return yf.Ticker(ticker).history(start=start.isoformat(), end=end.isoformat(), interval="1d",
                                     auto_adjust=False, actions=True, timeout=timeout)


def frame_to_bars(frame: pd.DataFrame, ticker: str) -> tuple[list[Bar], int]:
    """Bars from a yfinance frame (Ticker.history or single-ticker yf.download); NaN rows dropped and counted."""
    if isinstance(frame.columns, pd.MultiIndex):  # yf.download: (field, ticker) columns
        frame = frame.xs(ticker, axis=1, level=-1) if ticker in frame.columns.get_level_values(-1) else frame.droplevel(-1, axis=1)
    missing = [c for c in _COLUMNS if c not in frame.columns]
    if missing:
        raise SourceUnavailableError(f"Yahoo returned an unexpected frame for {ticker}: no {', '.join(missing)} columns")
    adj = frame["Adj Close"] if "Adj Close" in frame.columns else frame["Close"]
    bars, dropped = [], 0
    for ts, o, h, lo, c, a, v in zip(frame.index, frame["Open"], frame["High"], frame["Low"], frame["Close"], adj,
                                    frame["Volume"], strict=True):
        values = [float(x) for x in (o, h, lo, c, a)]
        if any(math.isnan(x) or x <= 0 for x in values):
            dropped += 1
            continue
        day = pd.Timestamp(ts).date()  # the index is the session date at midnight, exchange time
        bars.append(Bar(ticker, day, *values, 0.0 if pd.isna(v) else float(v)))
    bars.sort(key=lambda b: b.date)
    return bars, dropped


class YahooPrices:
    """PriceSource over yfinance; `fetch` is the library boundary (tests pass recorded frames)."""

    name = "yahoo"

    def __init__(self, calendar: TradingCalendar, *, timeout_s: float = 15.0, retries: int = 3,
                 backoff_s: float = 1.0, fetch: Fetch | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.calendar, self.timeout_s, self.retries, self.backoff_s = calendar, timeout_s, retries, backoff_s
        self.fetch = fetch or yf_history
        self.sleep = sleep

    def _download(self, ticker: str, start: date, end: date) -> tuple[list[Bar], int]:
        from yfinance.exceptions import YFException, YFRateLimitError, YFTickerMissingError

        symbol = ticker.strip().upper()
        if not _TICKER_RE.match(symbol):
            raise UnknownTickerError(f"{ticker!r} is not a ticker symbol")
        retrying = backoff(YFRateLimitError, retries=self.retries, backoff_s=self.backoff_s, sleep=self.sleep)
        try:
            frame = retrying(self.fetch, symbol, start, end, self.timeout_s)
        except YFRateLimitError:
            raise SourceUnavailableError(
                f"Yahoo Finance rate-limited {symbol} after {self.retries + 1} attempts; try again later"
            ) from None
        except YFTickerMissingError as err:
            raise UnknownTickerError(f"Yahoo has no bars for {symbol} (unknown or delisted): {err}") from None
        except YFException as err:
            raise SourceUnavailableError(f"Yahoo Finance failed for {symbol}: {err}") from None
        except (OSError, TimeoutError) as err:  # curl_cffi/requests errors are OSErrors
            first = str(err).splitlines()[0][:200]
            raise SourceUnavailableError(f"Yahoo Finance unreachable ({type(err).__name__}: {first})") from None
        if frame is None or frame.empty:
            raise UnknownTickerError(f"Yahoo returned no bars for {symbol} from {start} to {end}: unknown or delisted")
        return frame_to_bars(frame, symbol)

    def bars(self, ticker: str, as_of: datetime, lookback_days: int) -> Fetched[Bar]:
        as_of = require_utc(as_of)
        base = self.calendar.base_session(as_of)
        start = self.calendar.add_sessions(base, -(max(lookback_days, 1) - 1 + _MARGIN_SESSIONS))
        # Up to as_of's calendar day: Yahoo may include today's unfinished bar, which the guard drops.
        bars, nan_dropped = self._download(ticker, start, as_of.date() + timedelta(days=1))
        fetched = guard_bars(bars, as_of, self.calendar)
        fetched.items = fetched.items[-lookback_days:] if lookback_days > 0 else []
        fetched.meta["nan_dropped"] = nan_dropped
        if not fetched.items:
            raise NoDataError(f"no Yahoo bars for {ticker.upper()} before {as_of.isoformat()}")
        return fetched

    def close_on(self, ticker: str, day: date) -> float:
        if not self.calendar.is_session(day):
            raise NoDataError(f"no bar for {ticker} on {day}: not a {self.calendar.exchange} trading session")
        bars, _ = self._download(ticker, day, day + timedelta(days=1))
        for bar in bars:
            if bar.date == day:
                return bar.adj_close
        raise NoDataError(f"Yahoo has no bar for {ticker.upper()} on {day} (missing or NaN bar)")

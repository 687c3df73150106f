"""The two small protocols every market source implements, and the data they return.

Every call takes `as_of` (timezone-aware UTC). A source returns only data strictly before
`as_of`; the point-in-time guard (market/guard.py) enforces it and counts what it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Generic, Protocol, TypeVar, runtime_checkable

from store.errors import ScoreloopError

T = TypeVar("T")


class MarketError(ScoreloopError, RuntimeError):
    """Base of market errors: the message is shown to the user or to the agent as a tool error."""


class UnknownTickerError(MarketError):
    """The source has never heard of this ticker (or it has no bars at all: delisted)."""


class NoDataError(MarketError):
    """The ticker exists but there are no bars for the dates asked (holiday, missing bars)."""


class SourceUnavailableError(MarketError):
    """The network source failed (timeout, rate limit after retries, connection refused)."""


class CalendarError(MarketError):
    """A date or time the trading calendar cannot place (naive datetime, not a session, out of range)."""


class CsvFormatError(MarketError):
    """A replay CSV file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Bar:
    """One daily bar; `date` is the trading session, available from its close (16:00 New York)."""

    ticker: str
    date: date
    open: float
    high: float
    low: float
    close: float
    adj_close: float
    volume: float


@dataclass(frozen=True)
class NewsItem:
    published_at: datetime
    title: str
    snippet: str
    url: str
    source: str
    tickers: tuple[str, ...] = ()


@dataclass
class Fetched(Generic[T]):
    """Items a guarded call returned plus how many were dropped for being at or after as_of."""

    items: list[T]
    dropped_future: int = 0
    cache_hit: bool = False
    meta: dict = field(default_factory=dict)


@runtime_checkable
class PriceSource(Protocol):
    name: str

    def bars(self, ticker: str, as_of: datetime, lookback_days: int) -> Fetched[Bar]:
        """Daily bars for the last `lookback_days` trading days strictly before as_of."""
        ...

    def close_on(self, ticker: str, day: date) -> float:
        """Adjusted close of `day` (used by the outcome resolver, after the fact)."""
        ...


@runtime_checkable
class NewsSource(Protocol):
    name: str

    def search(
        self, query: str, as_of: datetime, ticker: str | None = None, max_results: int = 8
    ) -> Fetched[NewsItem]:
        """News matching the query, published strictly before as_of, newest first."""
        ...

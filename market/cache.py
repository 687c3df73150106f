"""Store-backed wrappers: every fetched bar and news item is kept, repeated queries never hit the network.

A live block can then be replayed exactly: the same (query, ticker, max_results, as_of) search returns
the same snippets, and bars already fetched come from `price_bars`.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Engine

from market.calendar import TradingCalendar, require_utc
from market.guard import guard_bars, guard_news
from market.protocols import Bar, Fetched, NewsItem, NewsSource, NoDataError, PriceSource
from store.db import session_scope
from store.market_cache import (
    load_bars,
    load_news_query,
    save_bars,
    save_news_query,
    save_snippets,
    snippets_by_ids,
)

# Bars fetched around a close asked for by the resolver: enough to overlap the cached base close,
# so a split or dividend since then back-adjusts the cached series.
CLOSE_WINDOW_SESSIONS = 30


class CachedPrices:
    """A PriceSource that answers from `price_bars` when it holds every session asked for."""

    def __init__(self, inner: PriceSource, engine: Engine, calendar: TradingCalendar) -> None:
        self.inner, self.engine, self.calendar = inner, engine, calendar
        self.name = inner.name

    def bars(self, ticker: str, as_of: datetime, lookback_days: int) -> Fetched[Bar]:
        as_of = require_utc(as_of)
        base = self.calendar.base_session(as_of)
        wanted = self.calendar.sessions(self.calendar.add_sessions(base, -(max(lookback_days, 1) - 1)), base)
        with session_scope(self.engine) as s:
            rows = load_bars(s, self.name, ticker, wanted[0], base)
            cached = [_bar(r) for r in rows]
        if [b.date for b in cached] == wanted:
            hit = guard_bars(cached, as_of, self.calendar)
            hit.cache_hit = True
            return hit
        fetched = self.inner.bars(ticker, as_of, lookback_days)
        with session_scope(self.engine) as s:
            save_bars(s, self.name, fetched.items)
        return fetched

    def close_on(self, ticker: str, day: date) -> float:
        with session_scope(self.engine) as s:
            rows = load_bars(s, self.name, ticker, day, day)
            if rows:
                return rows[0].adj_close
        if not self.calendar.is_session(day):
            raise NoDataError(f"no bar for {ticker} on {day}: not a {self.calendar.exchange} trading session")
        fetched = self.inner.bars(ticker, self.calendar.replay_as_of(day), CLOSE_WINDOW_SESSIONS)
        with session_scope(self.engine) as s:
            save_bars(s, self.name, fetched.items)
        for bar in fetched.items:
            if bar.date == day:
                return bar.adj_close
        raise NoDataError(f"no bar for {ticker} on {day} from {self.name} (missing bar or delisted)")


def _bar(row) -> Bar:
    return Bar(row.ticker, row.date, row.open, row.high, row.low, row.close, row.adj_close, row.volume)


class CachedNews:
    """A NewsSource that stores every item as a snippet and replays a repeated search from the store.

    `Fetched.meta["snippet_ids"]` holds the snippet id of each returned item, in order.
    """

    def __init__(self, inner: NewsSource, engine: Engine) -> None:
        self.inner, self.engine = inner, engine
        self.name = inner.name

    def search(self, query: str, as_of: datetime, ticker: str | None = None, max_results: int = 8
               ) -> Fetched[NewsItem]:
        as_of = require_utc(as_of)
        with session_scope(self.engine) as s:
            row = load_news_query(s, self.name, query, ticker, max_results, as_of)
            if row is not None:
                snippets = snippets_by_ids(s, row.snippet_ids)
                items = [NewsItem(sn.published_at, sn.title, sn.text, sn.url or "", sn.source,
                                  (sn.ticker,) if sn.ticker else ()) for sn in snippets]
                hit = guard_news(items, as_of)
                hit.dropped_future += row.dropped_future
                hit.cache_hit = True
                hit.meta["snippet_ids"] = [sn.id for sn in snippets]
                return hit
        fetched = self.inner.search(query, as_of, ticker=ticker, max_results=max_results)
        with session_scope(self.engine) as s:
            ids = save_snippets(s, fetched.items, self.name)
            save_news_query(s, self.name, query, ticker, max_results, as_of, ids, fetched.dropped_future)
        fetched.meta["snippet_ids"] = ids
        return fetched

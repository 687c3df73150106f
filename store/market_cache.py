"""Repository functions for fetched market data: price bars, news snippets, and which query returned which.

Takes plain objects with the fields of market.protocols.Bar / NewsItem (duck-typed: store imports
nothing of ours). Writes are idempotent (unique keys + insert-or-ignore), so two processes caching
the same data, or a retried block, never duplicate rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import insert
from store.models import NewsQuery, PriceBar, Snippet

# Relative change in adj_close above which a re-fetched bar means the series was re-adjusted.
_READJUST_TOL = 1e-6


class BarLike(Protocol):
    ticker: str
    date: date
    open: float
    high: float
    low: float
    close: float
    adj_close: float
    volume: float


class NewsLike(Protocol):
    published_at: datetime
    title: str
    snippet: str
    url: str
    source: str
    tickers: tuple[str, ...]


def content_hash(item: NewsLike, source: str = "") -> str:
    """Identity of a news item as stored; the same formula as store.traces.snippet_hash, so the agent's
    tool layer and the cache land on the same snippet row."""
    key = "\x1f".join([item.source or source, item.url or "", item.title, item.snippet,
                        item.published_at.isoformat()])
    return hashlib.sha256(key.encode()).hexdigest()


def save_snippets(session: Session, items: Sequence[NewsLike], source: str) -> list[int]:
    """Store news items as snippets (deduplicated) and return their ids in the items' order.

    These ids are what the agent cites. `source` (the market source, e.g. "ddg") is recorded when
    the item names no publisher of its own.
    """
    if not items:
        return []
    hashes = [content_hash(it, source) for it in items]
    rows = [
        {
            "content_hash": h, "source": (it.source or source)[:64], "url": it.url or None, "title": it.title,
            "text": it.snippet, "ticker": it.tickers[0] if it.tickers else None, "published_at": it.published_at,
        }
        for h, it in zip(hashes, items, strict=True)
    ]
    unique = list({r["content_hash"]: r for r in rows}.values())
    session.execute(insert(session, Snippet).values(unique).on_conflict_do_nothing(index_elements=["content_hash"]))
    ids = dict(session.execute(select(Snippet.content_hash, Snippet.id).where(Snippet.content_hash.in_(hashes))).all())
    return [ids[h] for h in hashes]


def snippets_by_ids(session: Session, ids: Sequence[int]) -> list[Snippet]:
    """Snippets in the order of `ids` (unknown ids are left out)."""
    if not ids:
        return []
    found = {s.id: s for s in session.scalars(select(Snippet).where(Snippet.id.in_(list(ids))))}
    return [found[i] for i in ids if i in found]


def save_bars(session: Session, source: str, bars: Iterable[BarLike]) -> int:
    """Insert new bars; when a re-fetch shows the series was re-adjusted (split, dividend), back-adjust.

    Yahoo-style adjusted prices are relative to the fetch date, so a bar cached before a split no
    longer matches one fetched after. The newer fetch wins on the dates it covers, and older cached
    bars of that ticker are rescaled by the ratio at the earliest overlap, keeping the cached series
    consistent for returns. Returns the number of bars inserted or changed.
    """
    by_ticker: dict[str, list[BarLike]] = {}
    for bar in bars:
        by_ticker.setdefault(bar.ticker, []).append(bar)
    changed = 0
    for ticker, series in by_ticker.items():
        series.sort(key=lambda b: b.date)
        existing = {
            row.date: row
            for row in session.scalars(select(PriceBar).where(
                PriceBar.source == source, PriceBar.ticker == ticker,
                PriceBar.date >= series[0].date, PriceBar.date <= series[-1].date))
        }
        overlap = [b for b in series if b.date in existing]
        if overlap:
            first = overlap[0]
            old = existing[first.date]
            if abs(first.adj_close / old.adj_close - 1) > _READJUST_TOL or abs(first.close / old.close - 1) > _READJUST_TOL:
                adj_f, close_f = first.adj_close / old.adj_close, first.close / old.close
                for row in session.scalars(select(PriceBar).where(
                        PriceBar.source == source, PriceBar.ticker == ticker, PriceBar.date < series[0].date)):
                    row.open, row.high, row.low, row.close = (v * close_f for v in (row.open, row.high, row.low,
                                                                                     row.close))
                    row.volume = row.volume / close_f
                    row.adj_close *= adj_f
                    changed += 1
            for bar in overlap:
                row = existing[bar.date]
                if (row.adj_close, row.close) != (bar.adj_close, bar.close):
                    row.open, row.high, row.low, row.close = bar.open, bar.high, bar.low, bar.close
                    row.adj_close, row.volume = bar.adj_close, bar.volume
                    changed += 1
        new = [
            {"source": source, "ticker": ticker, "date": b.date, "open": b.open, "high": b.high, "low": b.low,
             "close": b.close, "adj_close": b.adj_close, "volume": b.volume}
            for b in series if b.date not in existing
        ]
        if new:
            session.execute(insert(session, PriceBar).values(new).on_conflict_do_nothing(
                index_elements=["source", "ticker", "date"]))
            changed += len(new)
    session.flush()
    return changed


def load_bars(session: Session, source: str, ticker: str, start: date, end: date) -> list[PriceBar]:
    """Cached bars of `ticker` from `start` to `end` inclusive, oldest first."""
    return list(session.scalars(select(PriceBar).where(
        PriceBar.source == source, PriceBar.ticker == ticker, PriceBar.date >= start, PriceBar.date <= end,
    ).order_by(PriceBar.date)))


def query_key(query: str, ticker: str | None, max_results: int, as_of: datetime) -> str:
    return hashlib.sha256(json.dumps([query, ticker, max_results, as_of.isoformat()]).encode()).hexdigest()


def load_news_query(
    session: Session, source: str, query: str, ticker: str | None, max_results: int, as_of: datetime
) -> NewsQuery | None:
    """The stored answer to exactly this search, if one was cached."""
    key = query_key(query, ticker, max_results, as_of)
    return session.scalars(select(NewsQuery).where(NewsQuery.source == source, NewsQuery.query_key == key)).first()


def save_news_query(
    session: Session, source: str, query: str, ticker: str | None, max_results: int, as_of: datetime,
    snippet_ids: Sequence[int], dropped_future: int,
) -> None:
    """Remember which snippets a search returned (first answer wins on a race)."""
    session.execute(insert(session, NewsQuery).values(
        source=source, query_key=query_key(query, ticker, max_results, as_of), query=query, ticker=ticker,
        as_of=as_of, snippet_ids=list(snippet_ids), dropped_future=dropped_future,
    ).on_conflict_do_nothing(index_elements=["source", "query_key"]))

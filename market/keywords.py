"""Keyword matching for the offline news sources (synthetic, CSV): any query word in the item."""

from __future__ import annotations

import bisect
import re
from datetime import UTC, datetime, timedelta

from market.calendar import require_utc
from market.guard import guard_news
from market.protocols import Fetched, NewsItem

_STOP = {"the", "a", "an", "of", "on", "and", "or", "for", "to", "in", "news", "stock", "shares"}


def query_terms(query: str) -> set[str]:
    """Lower-case words of a search query, without stop words (an empty set matches everything)."""
    return {w for w in re.findall(r"[a-z0-9]+", query.lower()) if w not in _STOP}


def matches(item: NewsItem, terms: set[str]) -> bool:
    if not terms:
        return True
    words = set(re.findall(r"[a-z0-9]+", f"{item.title} {item.snippet} {' '.join(item.tickers)}".lower()))
    return bool(terms & words)


def keyword_search(
    items: list[NewsItem], times: list[datetime], query: str, as_of: datetime, max_results: int
) -> Fetched[NewsItem]:
    """Newest-first matches among `items` (sorted by `times`), guarded at `as_of`.

    Selects by calendar day the way a dated news index would (all of as_of's UTC day), so the
    guard is what removes the part of that day at or after `as_of`, and counts it.
    """
    as_of = require_utc(as_of)
    terms = query_terms(query)
    end = datetime.combine(as_of.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    hi = bisect.bisect_left(times, end)
    picked: list[NewsItem] = []
    visible = 0
    for item in reversed(items[:hi]):
        if visible >= max_results:
            break
        if matches(item, terms):
            picked.append(item)
            visible += item.published_at < as_of
    return guard_news(picked, as_of)

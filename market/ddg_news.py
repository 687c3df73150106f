"""News from DuckDuckGo via `ddgs` (`DDGS().news`), dated, guarded, with typed errors and backoff.

DuckDuckGo searches the recent web, not an archive: it suits live blocks (as_of = now). Items
whose date cannot be parsed are dropped (they cannot be placed before as_of) and counted in
`Fetched.meta["undated"]`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from market.calendar import require_utc
from market.guard import guard_news
from market.protocols import Fetched, NewsItem, SourceUnavailableError
from market.retry import backoff


def parse_date(value: Any) -> datetime | None:
    """ddgs gives ISO 8601 strings (DuckDuckGo's epoch seconds already converted); None if unusable."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())  # 3.11 reads a trailing Z
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def results_to_items(results: list[dict[str, Any]], ticker: str | None) -> tuple[list[NewsItem], int]:
    """NewsItems from the list of dicts `DDGS.news` returns, newest first, plus how many had no usable date."""
    items, undated = [], 0
    for r in results:
        published = parse_date(r.get("date"))
        if published is None or not r.get("title"):
            undated += 1
            continue
        items.append(NewsItem(published, str(r["title"]), str(r.get("body") or ""), str(r.get("url") or ""),
                              str(r.get("source") or "duckduckgo"), (ticker.upper(),) if ticker else ()))
    items.sort(key=lambda it: it.published_at, reverse=True)
    return items, undated


class DdgNews:
    """NewsSource over `ddgs`; `ddgs_class` is the library boundary (tests pass a recorded stand-in)."""

    name = "ddg"

    def __init__(self, *, timeout_s: float = 15.0, retries: int = 3, backoff_s: float = 1.0,
                 timelimit: str | None = "m", region: str = "us-en", ddgs_class: Callable[..., Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.timelimit, self.region, self.sleep = timelimit, region, sleep
        if ddgs_class is None:
            from ddgs import DDGS

            ddgs_class = DDGS
        self.ddgs_class = ddgs_class

    def _news(self, query: str, max_results: int) -> list[dict[str, Any]]:
        from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException

        def once() -> list[dict[str, Any]]:
            return self.ddgs_class(timeout=self.timeout_s).news(
                query, region=self.region, max_results=max_results, timelimit=self.timelimit)

        try:
            return backoff(RatelimitException, retries=self.retries, backoff_s=self.backoff_s, sleep=self.sleep)(once)
        except RatelimitException:
            raise SourceUnavailableError(
                f"DuckDuckGo rate-limited the news search after {self.retries + 1} attempts; try again later"
            ) from None
        except TimeoutException as err:
            raise SourceUnavailableError(f"DuckDuckGo news timed out after {self.timeout_s}s: {err}") from None
        except DDGSException as err:
            if str(err).strip() == "No results found.":  # ddgs's way of saying "empty"
                return []
            first = str(err).splitlines()[0][:200]
            raise SourceUnavailableError(f"DuckDuckGo news failed: {first}") from None

    def search(self, query: str, as_of: datetime, ticker: str | None = None, max_results: int = 8
               ) -> Fetched[NewsItem]:
        as_of = require_utc(as_of)
        q = query.strip()
        if ticker and ticker.lower() not in q.lower().split():
            q = f"{ticker.upper()} {q}".strip()
        if not q:
            return Fetched(items=[])
        # Ask for extra: items at or after as_of are dropped by the guard.
        items, undated = results_to_items(self._news(q, max_results * 2), ticker)
        fetched = guard_news(items, as_of)
        fetched.items = fetched.items[:max_results]
        fetched.meta["undated"] = undated
        return fetched

"""The point-in-time guard: every source's output passes here before anyone sees it.

An item is kept only if it was available strictly before `as_of`: a daily bar from its session's
close, a news item from its `published_at`. What is dropped is counted, never silently lost, and
the count travels in `Fetched.dropped_future` to `tool_calls.dropped_future`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TypeVar

from market.calendar import TradingCalendar, require_utc
from market.protocols import Bar, Fetched, NewsItem

T = TypeVar("T")


def guard(items: Iterable[T], as_of: datetime, available_at: Callable[[T], datetime]) -> Fetched[T]:
    """Keep items available strictly before `as_of`, in their order; count the rest."""
    as_of = require_utc(as_of)
    kept: list[T] = []
    dropped = 0
    for item in items:
        if require_utc(available_at(item)) < as_of:
            kept.append(item)
        else:
            dropped += 1
    return Fetched(items=kept, dropped_future=dropped)


def guard_bars(bars: Iterable[Bar], as_of: datetime, calendar: TradingCalendar) -> Fetched[Bar]:
    """Bars whose session closed before `as_of`; a bar on a non-session day counts as not yet available."""

    def available(bar: Bar) -> datetime:
        if not calendar.is_session(bar.date):
            # A bar the calendar does not know cannot be placed in time; treat it as future.
            return datetime.max.replace(tzinfo=UTC)
        return calendar.close_of(bar.date)

    return guard(bars, as_of, available)


def guard_news(items: Iterable[NewsItem], as_of: datetime) -> Fetched[NewsItem]:
    """News published strictly before `as_of`."""
    return guard(items, as_of, lambda item: item.published_at)

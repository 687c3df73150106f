"""Trading days and closes from `exchange_calendars`: where an `as_of` falls and when a horizon resolves.

Roll rule: an `as_of` on a weekend, a holiday, or during a session (before its close) rolls back to
the previous session whose close is strictly before it. That session is the base: its close is the
last one the agent could see, and the outcome is measured from it. Early closes (e.g. 13:00 New
York on 2024-07-03) come from the exchange calendar, not a fixed 16:00.
"""

from __future__ import annotations

import bisect
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache

import exchange_calendars as xc
import pandas as pd

from market.protocols import CalendarError

# exchange_calendars builds ~20 years back by default; older replay data asks for more.
_DEFAULT_YEARS_BACK = 20


def require_utc(as_of: datetime) -> datetime:
    """`as_of` as aware UTC; a naive datetime is refused because its meaning is ambiguous."""
    if not isinstance(as_of, datetime):
        raise CalendarError(f"as_of must be a datetime, got {type(as_of).__name__}")
    if as_of.tzinfo is None or as_of.utcoffset() is None:
        raise CalendarError(f"as_of {as_of.isoformat()} is naive; give a timezone-aware UTC datetime")
    return as_of.astimezone(UTC)


@lru_cache(maxsize=8)
def _load(exchange: str, start: date | None) -> tuple[list[date], list[datetime], list[datetime]]:
    try:
        cal = xc.get_calendar(exchange, start=pd.Timestamp(start) if start else None)
    except xc.errors.InvalidCalendarName:
        raise CalendarError(f"unknown exchange calendar {exchange!r} (e.g. XNYS, XNAS, XLON)") from None
    sessions = [ts.date() for ts in cal.sessions]
    closes = [ts.to_pydatetime().astimezone(UTC) for ts in cal.closes]
    opens = [ts.to_pydatetime().astimezone(UTC) for ts in cal.opens]
    return sessions, opens, closes


class TradingCalendar:
    """Sessions, opens and closes of one exchange (XNYS by default), all closes in aware UTC."""

    def __init__(self, exchange: str = "XNYS", start: date | None = None) -> None:
        default_start = date(date.today().year - _DEFAULT_YEARS_BACK, 1, 1)
        # Only widen the range when asked: the default keeps calendar construction fast and cached.
        wanted = start if start is not None and start < default_start else None
        self.exchange = exchange
        self._sessions, self._opens, self._closes = _load(exchange, wanted)
        self._index = {d: i for i, d in enumerate(self._sessions)}

    @property
    def first_session(self) -> date:
        return self._sessions[0]

    @property
    def last_session(self) -> date:
        return self._sessions[-1]

    def is_session(self, day: date) -> bool:
        return day in self._index

    def _idx(self, day: date) -> int:
        try:
            return self._index[day]
        except KeyError:
            if not (self.first_session <= day <= self.last_session):
                raise CalendarError(
                    f"{day} is outside the {self.exchange} calendar ({self.first_session}..{self.last_session})"
                ) from None
            raise CalendarError(f"{day} is not a {self.exchange} trading session (weekend or holiday)") from None

    def close_of(self, day: date) -> datetime:
        """The session's close in UTC (the moment its daily bar becomes available)."""
        return self._closes[self._idx(day)]

    def open_of(self, day: date) -> datetime:
        return self._opens[self._idx(day)]

    def base_session(self, as_of: datetime) -> date:
        """Last session whose close is strictly before `as_of` (weekends/holidays roll back)."""
        as_of = require_utc(as_of)
        i = bisect.bisect_left(self._closes, as_of) - 1
        if i < 0:
            raise CalendarError(f"as_of {as_of.isoformat()} is before the {self.exchange} calendar starts")
        if i == len(self._closes) - 1 and as_of - self._closes[i] > timedelta(days=7):
            raise CalendarError(f"as_of {as_of.isoformat()} is beyond the {self.exchange} calendar's last session")
        return self._sessions[i]

    def resolve_session(self, as_of: datetime, horizon: int) -> date:
        """The session `horizon` trading days after the base session: the outcome's closing date."""
        if horizon < 1:
            raise CalendarError(f"horizon must be >= 1 trading day, got {horizon}")
        return self.add_sessions(self.base_session(as_of), horizon)

    def replay_as_of(self, day: date) -> datetime:
        """One minute after `day`'s close, so the agent sees `day`'s bar and its base session is `day`."""
        return self.close_of(day) + timedelta(minutes=1)

    def sessions(self, start: date, end: date) -> list[date]:
        """Sessions from `start` to `end`, both inclusive."""
        lo = bisect.bisect_left(self._sessions, start)
        hi = bisect.bisect_right(self._sessions, end)
        return self._sessions[lo:hi]

    def add_sessions(self, day: date, n: int) -> date:
        """The session `n` trading days after (n < 0: before) the session `day`."""
        j = self._idx(day) + n
        if not 0 <= j < len(self._sessions):
            raise CalendarError(f"{day} {n:+d} sessions is outside the {self.exchange} calendar")
        return self._sessions[j]

    def previous_session(self, day: date) -> date:
        """The last session on or before `day` (a weekend/holiday rolls back)."""
        i = bisect.bisect_right(self._sessions, day) - 1
        if i < 0:
            raise CalendarError(f"{day} is before the {self.exchange} calendar starts")
        return self._sessions[i]

"""Trading calendar: roll rules, early closes, holidays, and the outcome dates for a horizon."""

from datetime import UTC, date, datetime, timedelta

import exchange_calendars as xc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.calendar import TradingCalendar
from market.protocols import CalendarError

CAL = TradingCalendar("XNYS")
XNYS = xc.get_calendar("XNYS")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_independence_day_week():
    # 2024-07-03 closes early (13:00 New York = 17:00 UTC); 2024-07-04 is a holiday.
    assert CAL.close_of(date(2024, 7, 3)) == utc(2024, 7, 3, 17)
    assert CAL.replay_as_of(date(2024, 7, 3)) == utc(2024, 7, 3, 17, 1)
    assert CAL.base_session(utc(2024, 7, 4, 15)) == date(2024, 7, 3)  # holiday rolls back
    assert CAL.base_session(utc(2024, 7, 3, 17)) == date(2024, 7, 2)  # the close itself is not "before"
    assert CAL.base_session(utc(2024, 7, 3, 17, 0, 1)) == date(2024, 7, 3)
    assert CAL.resolve_session(utc(2024, 7, 4, 15), 1) == date(2024, 7, 5)
    assert CAL.resolve_session(utc(2024, 7, 2, 21, 1), 5) == date(2024, 7, 10)  # skips 07-04 and the weekend
    assert CAL.sessions(date(2024, 7, 1), date(2024, 7, 8)) == [
        date(2024, 7, 1), date(2024, 7, 2), date(2024, 7, 3), date(2024, 7, 5), date(2024, 7, 8)]


def test_weekend_and_intraday_roll_back():
    assert CAL.base_session(utc(2024, 7, 6, 12)) == date(2024, 7, 5)  # Saturday
    assert CAL.base_session(utc(2024, 7, 8, 15)) == date(2024, 7, 5)  # Monday before the close
    assert CAL.resolve_session(utc(2024, 7, 6, 12), 5) == date(2024, 7, 12)
    assert CAL.add_sessions(date(2024, 7, 5), -2) == date(2024, 7, 2)
    assert CAL.previous_session(date(2024, 7, 7)) == date(2024, 7, 5)


def test_bad_input_is_a_calendar_error():
    with pytest.raises(CalendarError, match="naive"):
        CAL.base_session(datetime(2024, 7, 5, 12))
    with pytest.raises(CalendarError, match="not a XNYS trading session"):
        CAL.replay_as_of(date(2024, 7, 4))
    with pytest.raises(CalendarError, match="horizon"):
        CAL.resolve_session(utc(2024, 7, 5, 12), 0)
    with pytest.raises(CalendarError, match="unknown exchange"):
        TradingCalendar("NOPE")
    with pytest.raises(CalendarError, match="outside"):
        CAL.add_sessions(CAL.last_session, 1)


as_of_times = st.datetimes(min_value=datetime(2008, 1, 1), max_value=datetime(2026, 6, 30), timezones=st.just(UTC))


@settings(max_examples=200, deadline=None)
@given(as_of=as_of_times, horizon=st.integers(1, 30))
def test_base_and_resolve_sessions_match_the_exchange(as_of, horizon):
    base = CAL.base_session(as_of)
    resolve = CAL.resolve_session(as_of, horizon)
    # base: the last close strictly before as_of, computed independently from exchange_calendars.
    closes = XNYS.closes
    expected_base = closes[closes < as_of].index[-1].date()
    assert base == expected_base
    assert CAL.close_of(base) < as_of <= CAL.close_of(CAL.add_sessions(base, 1))
    # resolve: exactly `horizon` exchange sessions after base, none skipped, none invented.
    window = XNYS.sessions_in_range(base.isoformat(), resolve.isoformat())
    assert len(window) == horizon + 1 and window[-1].date() == resolve
    assert CAL.is_session(resolve) and resolve.weekday() < 5
    # A replay as_of of a session sees exactly that session's close.
    assert CAL.base_session(CAL.replay_as_of(base)) == base
    assert CAL.base_session(CAL.replay_as_of(base) - timedelta(minutes=1)) == CAL.add_sessions(base, -1)

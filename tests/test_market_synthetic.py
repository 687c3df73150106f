"""Synthetic market: deterministic, point-in-time, and its p* matches an oracle that reads the news."""

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.config import MarketConfig, SyntheticConfig
from market.protocols import CalendarError, NewsSource, NoDataError, PriceSource, UnknownTickerError
from market.sources import build_market
from market.synthetic import SyntheticMarket

SMALL = SyntheticConfig(n_tickers=4, n_days=300)


@pytest.fixture(scope="module")
def market() -> SyntheticMarket:
    return SyntheticMarket()


@pytest.fixture(scope="module")
def small() -> SyntheticMarket:
    return SyntheticMarket(SMALL)


def test_same_seed_same_market_other_seed_other_market(small):
    again = SyntheticMarket(SMALL)
    other = SyntheticMarket(SMALL.model_copy(update={"seed": 8}))
    day = small.days[150]
    as_of = small.calendar.replay_as_of(day)
    assert small.bars("SYN01", as_of, 20).items == again.bars("SYN01", as_of, 20).items
    assert small.search("SYN01", as_of, "SYN01").items == again.search("SYN01", as_of, "SYN01").items
    assert small.close_on("SYN01", day) != other.close_on("SYN01", day)


def test_implements_both_protocols_and_build_market(market):
    assert isinstance(market, PriceSource) and isinstance(market, NewsSource)
    m = build_market(MarketConfig())
    assert m.name == "synthetic" and m.tickers[:2] == ["SYN00", "SYN01"] and len(m.tickers) == 12
    assert m.bayes_accuracy(5) == pytest.approx(market.bayes_accuracy(5))
    assert m.span == (date(2020, 1, 2), market.days[-1])


def test_bad_input_gets_typed_errors_or_empty_results(small):
    as_of = small.calendar.replay_as_of(small.days[100])
    with pytest.raises(UnknownTickerError, match="unknown ticker 'AAPL'"):
        small.bars("AAPL", as_of, 10)
    with pytest.raises(UnknownTickerError):
        small.search("news", as_of, ticker="ZZZZ")
    with pytest.raises(NoDataError, match="synthetic history starts"):
        small.bars("SYN00", datetime(2019, 6, 1, tzinfo=UTC), 10)
    with pytest.raises(NoDataError, match="not a session"):
        small.close_on("SYN00", date(2020, 7, 4))
    with pytest.raises(CalendarError, match="naive"):
        small.bars("SYN00", datetime(2020, 6, 1), 10)
    empty = small.search("xyzzy quantum", as_of, ticker="SYN00")
    assert empty.items == [] and empty.dropped_future == 0
    assert small.search("SYN00", datetime(2019, 6, 1, tzinfo=UTC)).items == []


def test_intraday_as_of_drops_todays_bar_and_later_news(small):
    day = small.days[120]
    noon = small.calendar.open_of(day) + timedelta(hours=3)
    got = small.bars("SYN02", noon, 5)
    assert got.dropped_future == 1  # today's bar was selected by date, then dropped by the guard
    assert got.items[-1].date == small.calendar.add_sessions(day, -1)
    news = small.search("", noon, max_results=500)
    assert all(item.published_at < noon for item in news.items)
    assert news.dropped_future == sum(1 for it in small._all if noon <= it.published_at < noon + timedelta(hours=12)
                                      and it.published_at.date() == noon.date())


@settings(max_examples=60, deadline=None)
@given(
    offset=st.floats(0, 1),
    ticker=st.sampled_from(["SYN00", "SYN03"]),
    lookback=st.integers(1, 40),
    query=st.sampled_from(["", "SYN03", "estimates", "guidance outlook", "board"]),
)
def test_point_in_time_for_random_as_of(small, offset, ticker, lookback, query):
    start = datetime.combine(small.days[0], datetime.min.time(), tzinfo=UTC)
    span = datetime.combine(small.days[-1], datetime.min.time(), tzinfo=UTC) - start
    as_of = start + span * offset + timedelta(days=2)
    bars = small.bars(ticker, as_of, lookback)
    base = small.calendar.base_session(as_of)
    assert all(small.calendar.close_of(b.date) < as_of for b in bars.items)
    # Complete as well as safe: the last bar is the base session, the close the outcome starts from.
    last = min(base, small.days[-1])  # past the end of the history the last bar is the last day
    assert bars.items[-1].date == last and len(bars.items) == min(lookback, small.days.index(last) + 1)
    assert bars.items[-1].adj_close == small.close_on(ticker, last)
    news = small.search(query, as_of, ticker=ticker if query != "board" else None, max_results=6)
    assert all(item.published_at < as_of for item in news.items)
    times = [item.published_at for item in news.items]
    assert times == sorted(times, reverse=True)


def test_outcome_uses_base_close_and_close_horizon_sessions_later(small):
    cal = small.calendar
    as_of = datetime(2020, 7, 4, 15, tzinfo=UTC)  # a holiday Saturday: rolls back to Thursday 2020-07-02
    base, resolve = cal.base_session(as_of), cal.resolve_session(as_of, 5)
    assert (base, resolve) == (date(2020, 7, 2), date(2020, 7, 10))
    seen_then = small.bars("SYN01", as_of, 1).items[-1]
    seen_later = small.bars("SYN01", cal.replay_as_of(resolve), 6).items
    assert seen_then.date == base and seen_later[0] == seen_then and seen_later[-1].date == resolve
    assert [b.date for b in seen_later] == cal.sessions(base, resolve)


def test_p_star_with_defaults_is_well_above_a_coin_flip(market):
    p5 = market.bayes_accuracy(5)
    assert 0.6 < p5 < 0.75
    flat = SyntheticMarket(SMALL.model_copy(update={"signal_strength": 0.0}))
    assert flat.bayes_accuracy(5) == 0.5


SIGN_WORDS = {"beats": 1, "wins": 1, "record": 1, "misses": -1, "loses": -1, "recalls": -1}


def oracle_accuracy(m: SyntheticMarket, horizon: int) -> tuple[float, int]:
    """Predict the sign of the drift implied by headlines before as_of, via the public API only."""
    cal, k, hits, n = m.calendar, m.cfg.signal_days, 0.0, 0
    for ticker in m.tickers:
        for b in range(len(m.days) - horizon):
            base = m.days[b]
            as_of = cal.replay_as_of(base)
            score = 0
            for item in m.search(ticker, as_of, ticker=ticker, max_results=12).items:
                sign = next((v for w, v in SIGN_WORDS.items() if w in item.title.split()), 0)
                if not sign:
                    continue
                j = cal.add_sessions(cal.base_session(item.published_at), 1)  # session it was published in
                age = b - m.day_index(j)
                if age < k:
                    score += sign * min(k - age, horizon)
            up = m.close_on(ticker, cal.add_sessions(base, horizon)) > m.close_on(ticker, base)
            hits += 0.5 if score == 0 else float((score > 0) == up)
            n += 1
    return hits / n, n


def test_p_star_matches_an_oracle_reading_the_news(market):
    acc, n = oracle_accuracy(market, 5)
    assert n > 10_000
    # ~12k overlapping items with a shared market factor: a couple of points of sampling noise.
    assert acc == pytest.approx(market.bayes_accuracy(5), abs=0.02)


def test_band_aware_p_star_is_exact_and_reduces_to_p_star_without_a_band(market):
    assert market.bayes_accuracy_band(5, 0.0) == pytest.approx(market.bayes_accuracy(5), abs=1e-12)
    with_band = market.bayes_accuracy_band(5, 0.5)
    # Moves inside +-0.5% score `flat`, so an up/down call on them is wrong: p* drops.
    assert 0.55 < with_band < market.bayes_accuracy(5)
    # A band wider than almost every 5-day move makes `flat` the answer nearly always.
    assert market.bayes_accuracy_band(5, 40.0) > 0.99
    with pytest.raises(ValueError, match="band_pct"):
        market.bayes_accuracy_band(5, -1.0)


def test_band_aware_p_star_matches_a_three_class_oracle_on_realized_closes(market):
    """Pick the likeliest of up/flat/down from the visible drift; score it as the rewards do."""
    from rewards.outcomes import realized_direction, realized_return_pct

    horizon, band = 5, 0.5
    hits = n = 0
    for t, ticker in enumerate(market.tickers):
        for b in range(len(market.days) - horizon):
            up, flat, down = market.item_class_probs(market.visible_drift(t, b, horizon), horizon, band)
            call = max((up, "up"), (flat, "flat"), (down, "down"))[1]
            ret = realized_return_pct(market.close_on(ticker, market.days[b]),
                                      market.close_on(ticker, market.days[b + horizon]))
            hits += call == realized_direction(ret, band)
            n += 1
    assert n > 10_000
    assert hits / n == pytest.approx(market.bayes_accuracy_band(horizon, band), abs=0.02)

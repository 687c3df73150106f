"""The timeline split: train, gate and eval items never share a session or an outcome window."""

from __future__ import annotations

import itertools
from datetime import date

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.calendar import TradingCalendar
from market.config import SplitConfig
from market.split import SplitError, draw_items, live_split, split_sessions, train_days

CAL = TradingCalendar("XNYS")
ALL = CAL.sessions(date(2015, 1, 2), date(2024, 12, 31))
TICKERS = [f"T{i:02d}" for i in range(20)]


def windows(split, days):
    """Every session covered by the outcome windows (as_of .. resolve) of items on `days`."""
    idx = {d: i for i, d in enumerate(split.timeline)}
    return {split.timeline[j] for d in days for j in range(idx[d], idx[d] + split.horizon + 1)}


configs = st.builds(
    SplitConfig,
    gate_fraction=st.floats(0.02, 0.45), eval_fraction=st.floats(0.02, 0.45),
    embargo_sessions=st.one_of(st.none(), st.integers(1, 30)),
    warmup_sessions=st.integers(0, 40), live_sessions=st.integers(2, 80),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(cfg=configs, n_sessions=st.integers(40, 1500), horizon=st.integers(1, 20), n_tickers=st.integers(1, 20),
       block_sizes=st.lists(st.integers(1, 90), min_size=1, max_size=25), resume_at=st.sets(st.integers(0, 24)),
       n_gate=st.integers(1, 150), n_eval=st.integers(1, 400), seed=st.integers(0, 10**6))
def test_replay_regions_items_and_outcome_windows_never_meet(cfg, n_sessions, horizon, n_tickers, block_sizes,
                                                             resume_at, n_gate, n_eval, seed):
    if cfg.embargo_sessions is not None and cfg.embargo_sessions < horizon:
        with pytest.raises(SplitError, match="shorter than the horizon"):
            split_sessions(ALL[:n_sessions], horizon=horizon, cfg=cfg)
        return
    try:
        split = split_sessions(ALL[:n_sessions], horizon=horizon, cfg=cfg)
    except SplitError as err:
        assert "too short" in str(err)
        return
    tickers = TICKERS[:n_tickers]
    # Train blocks walk forward the way the runner plans them; a "resume" forgets everything but the
    # stored items (the latest train as_of), as a restarted process does.
    stored: list[tuple[str, date]] = []
    after = None
    for k, size in enumerate(block_sizes):
        if k in resume_at:
            after = max((d for _, d in stored), default=None)
        n_days = -(-size // len(tickers))
        try:
            days = train_days(split, after=after, n_days=n_days)
        except SplitError as err:
            assert "train region" in str(err)
            break
        stored += [(tickers[i % len(tickers)], days[i // len(tickers)]) for i in range(size)]
        after = days[-1]
    items = {"train": stored}
    for kind, n in (("gate", n_gate), ("eval", n_eval)):
        try:
            items[kind] = draw_items(split.region(kind), tickers, n, seed)
        except SplitError as err:
            assert n > len(split.region(kind)) * len(tickers), err
            items[kind] = []
            continue
        assert len(set(items[kind])) == n  # distinct (ticker, session) draws
        assert draw_items(split.region(kind), tickers, n, seed) == items[kind]  # a seed replays them
    assert len(set(items["train"])) == len(items["train"])  # resumes never re-plan a train item
    for kind, its in items.items():
        split.check(kind, [d for _, d in its])  # every item in its own region
    kinds = list(items)
    for a in range(3):
        for b in range(a + 1, 3):
            ka, kb = kinds[a], kinds[b]
            assert not set(items[ka]) & set(items[kb])
            assert not windows(split, [d for _, d in items[ka]]) & windows(split, [d for _, d in items[kb]])
    # The regions themselves: whole-region windows are disjoint and the last outcome is inside the history.
    regions = [split.train, split.gate, split.eval]
    for a, b in itertools.pairwise(regions):
        assert split.window(a.last)[1] < b.first
    assert split.window(split.eval.last)[1] <= ALL[n_sessions - 1]


@settings(max_examples=100, deadline=None)
@given(cfg=configs, horizon=st.integers(1, 10), today_i=st.integers(300, 2400),
       trained_offsets=st.lists(st.integers(0, 200), max_size=60))
def test_live_gate_and_eval_are_resolved_and_never_near_a_trained_session(cfg, horizon, today_i, trained_offsets):
    if cfg.embargo_sessions is not None and cfg.embargo_sessions < horizon:
        return
    today = ALL[today_i]
    trained = [ALL[today_i - k] for k in trained_offsets]
    try:
        split = live_split(ALL, today=today, trained=trained, horizon=horizon, cfg=cfg)
    except SplitError as err:
        assert "nothing held out" in str(err)
        return
    train_w = windows(split, [*trained, today])
    gate_w, eval_w = windows(split, split.gate.sessions), windows(split, split.eval.sessions)
    assert not gate_w & train_w and not eval_w & train_w and not gate_w & eval_w
    assert split.window(split.eval.last)[1] < today  # resolved: outcomes are known before today's session
    assert len(split.gate) + len(split.eval) <= cfg.live_sessions


def test_default_synthetic_history_has_room_for_300_eval_items():
    split = split_sessions(ALL[:1000], horizon=5)
    assert len(split.train) > 600 and len(split.gate) * 12 >= 1000 and len(split.eval) * 12 >= 300
    items = draw_items(split.eval, TICKERS[:12], 300, seed=0)
    assert len({d for _, d in items}) > 100  # spread across the region, not a few consecutive days


def test_items_outside_their_region_are_refused_with_the_region_named():
    split = split_sessions(ALL[:500], horizon=5)
    with pytest.raises(SplitError, match=r"gate item on .* lies outside the gate region .* is in the train region"):
        split.check("gate", [split.train.last])
    with pytest.raises(SplitError, match="embargo"):
        split.check("train", [ALL[ALL.index(split.train.last) + 1]])
    with pytest.raises(SplitError, match="train region .* sessions left"):
        train_days(split, after=split.train.sessions[-2], n_days=3)
    with pytest.raises(SplitError, match="holds"):
        draw_items(split.gate, ["A"], len(split.gate) + 1, seed=0)
    with pytest.raises(SplitError, match="too short"):
        split_sessions(ALL[:30], horizon=5)


# ---- through the runner and a real store ----------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from store.db import open_store

    return open_store(f"sqlite:///{tmp_path_factory.mktemp('split') / 'split.db'}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_days=st.integers(120, 700), n_tickers=st.integers(1, 12), horizon=st.integers(1, 10),
       embargo_extra=st.one_of(st.none(), st.integers(0, 5)), fractions=st.tuples(st.floats(0.05, 0.3),
                                                                                   st.floats(0.05, 0.3)),
       block_sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), n_gate=st.integers(1, 60),
       n_eval=st.integers(1, 60), seed=st.integers(0, 1000))
def test_runner_plans_train_blocks_and_draws_gate_eval_items_in_their_regions(
        store, n_days, n_tickers, horizon, embargo_extra, fractions, block_sizes, n_gate, n_eval, seed):
    """plan_items + the store, as a daemon runs them: each train block is planned in a new session from
    what the store holds (a resume after a restart looks exactly the same), then gate and eval draws."""
    import uuid
    from dataclasses import replace

    from agent.runner import BlockError, plan_items
    from market.config import MarketConfig, SyntheticConfig
    from market.sources import build_market
    from market.split import timeline_split
    from store import traces
    from store.db import session_scope

    split_cfg = SplitConfig(gate_fraction=fractions[0], eval_fraction=fractions[1],
                            embargo_sessions=None if embargo_extra is None else horizon + embargo_extra)
    market = build_market(MarketConfig(synthetic=SyntheticConfig(n_days=n_days, n_tickers=n_tickers),
                                       split=split_cfg))
    market = replace(market, name=f"syn-{uuid.uuid4().hex[:8]}")  # one store, a fresh timeline per example
    split = timeline_split(market, horizon)
    cal = market.calendar
    planned: dict[str, list[tuple[str, date]]] = {"train": [], "gate": [], "eval": []}
    for size in block_sizes:
        with session_scope(store) as s:
            try:
                items = plan_items(s, market, mode="replay", size=size, horizon=horizon, kind="train")
            except BlockError as err:
                assert "train region" in str(err)
                break
            traces.create_block_with_items(s, items=items, market=market.name, mode="replay", kind="train",
                                           horizon=horizon, adapter_version=None, target_score=1.0,
                                           conditioning="Score: 1.00")
        planned["train"] += [(it.ticker, cal.base_session(it.as_of)) for it in items]
    for kind, n in (("gate", n_gate), ("eval", n_eval)):
        with session_scope(store) as s:
            try:
                items = plan_items(s, market, mode="replay", size=n, horizon=horizon, kind=kind, seed=seed)
            except BlockError as err:
                assert "holds" in str(err)
                continue
        planned[kind] = [(it.ticker, cal.base_session(it.as_of)) for it in items]
        assert len(set(planned[kind])) == n
    assert len(set(planned["train"])) == len(planned["train"])
    for kind, its in planned.items():
        split.check(kind, [d for _, d in its])
    for ka, kb in itertools.combinations(planned, 2):
        assert not set(planned[ka]) & set(planned[kb])
        assert not windows(split, [d for _, d in planned[ka]]) & windows(split, [d for _, d in planned[kb]])


def test_the_gate_step_draws_from_the_gate_region_in_replay_and_live(store):
    """scheduler.steps.gate_items: replay draws from the replay gate region; live keeps clear of every
    session a train item sits on (here: a live train block planned today and one 20 sessions ago)."""
    from datetime import UTC, datetime

    from market.sources import build_market
    from market.split import timeline_split
    from scheduler.runtime import Runtime
    from scheduler.settings import load_settings
    from scheduler.steps import gate_items
    from store import traces
    from store.db import session_scope

    settings = load_settings(None, scheduler={"mode": "replay"})
    market = build_market(settings.market)
    rt = Runtime(settings=settings, engine=store, market=market)
    region, items = gate_items(rt, 40, seed=3)
    replay = timeline_split(market, settings.market.horizon_days)
    assert region == replay.gate and len(set(items)) == 40
    replay.check("gate", [market.calendar.base_session(a) for _, a in items])

    live = Runtime(settings=load_settings(None, scheduler={"mode": "live"}), engine=store, market=market)
    cal, now = market.calendar, datetime.now(UTC)
    today = cal.base_session(now)
    trained = [cal.replay_as_of(cal.add_sessions(today, -20)), now]
    with session_scope(store) as s:
        traces.create_block_with_items(s, items=[traces.PlannedItem(market.tickers[0], a) for a in trained],
                                       market=market.name, mode="live", kind="train", horizon=5,
                                       adapter_version=None, target_score=1.0, conditioning="Score: 1.00")
    region, items = gate_items(live, 30, seed=3)
    days = sorted({cal.base_session(a) for _, a in items})
    sessions = cal.sessions(cal.add_sessions(today, -400), today)
    for d in days:
        assert d in region
        for t in (cal.add_sessions(today, -20), today):  # more than the embargo (= horizon) away
            assert abs(sessions.index(d) - sessions.index(t)) > 5
    assert days[-1] < cal.add_sessions(today, -5)  # resolved before today

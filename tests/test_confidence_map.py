"""Confidence maps: fitted on a candidate's resolved gate block, published by the runner while that
adapter serves; the stated confidence stays in the trace. Bad maps are refused before a block starts."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from sqlalchemy import func, select

from agent.config import AgentConfig
from agent.runner import BlockError, run_block
from market.config import MarketConfig
from market.sources import build_market
from market.split import draw_items, timeline_split
from policy.scripted import ScriptedPolicy
from rewards.calibration import ConfidenceMap, fit_confidence_map
from rewards.config import RewardsConfig
from scoring.resolve import resolve_pending
from store.db import session_scope
from store.models import Adapter, Block, Outcome, Prediction
from store.training import add_adapter
from trainer.gate import fit_candidate_confidence_map


def pred(confidence: float, direction: str = "up") -> str:
    return json.dumps({"prediction": {"direction": direction, "magnitude_pct": 1.0, "confidence": confidence,
                                      "rationale": "news", "citations": []}})


@pytest.fixture(scope="module")
def market():
    return build_market(MarketConfig())


def cfg() -> AgentConfig:
    return AgentConfig(concurrency=3, research_plan=[])


def region_items(market, region: str, n: int, seed: str):
    split = timeline_split(market, market.horizon_days)
    return [(t, market.calendar.replay_as_of(d)) for t, d in draw_items(getattr(split, region), market.tickers, n,
                                                                         seed)]


# ---- the map itself (pure) -------------------------------------------------------------------------


def test_an_adapter_that_always_says_095_is_mapped_to_its_hit_rate():
    cmap = fit_confidence_map([0.95] * 40, [True] * 22 + [False] * 18)
    assert cmap is not None and cmap.n == 40 and cmap.accuracy == pytest.approx(0.55)
    assert cmap.apply(0.95) == pytest.approx(0.55) and cmap.apply(0.2) == pytest.approx(0.55)


def test_the_map_is_monotone_and_bounded_away_from_certainty():
    conf = [0.3] * 20 + [0.6] * 20 + [0.9] * 20
    correct = [True] * 2 + [False] * 18 + [True] * 12 + [False] * 8 + [True] * 20
    cmap = fit_confidence_map(conf, correct)
    assert cmap.apply(0.3) == pytest.approx(0.1) and cmap.apply(0.6) == pytest.approx(0.6)
    assert cmap.apply(0.9) == pytest.approx(0.98)  # 20/20 right still publishes 0.98, not 1.0
    assert cmap.apply(0.45) == pytest.approx(0.35)  # linear between knots
    xs = [i / 100 for i in range(101)]
    assert all(cmap.apply(a) <= cmap.apply(b) for a, b in pairwise(xs))
    # an inverted relation (confident calls wrong more often) is pooled into one flat level
    flat = fit_confidence_map([0.3] * 20 + [0.9] * 20, [True] * 15 + [False] * 5 + [True] * 5 + [False] * 15)
    assert flat.apply(0.3) == pytest.approx(0.5) == flat.apply(0.9)


def test_too_few_outcomes_give_no_map_and_bad_input_is_refused():
    assert fit_confidence_map([0.8] * 19, [True] * 19) is None
    with pytest.raises(ValueError, match="19 confidences but 18 outcomes"):
        fit_confidence_map([0.8] * 19, [True] * 18)
    with pytest.raises(ValueError, match="sorted"):
        ConfidenceMap(stated=[0.9, 0.1], calibrated=[0.5, 0.6], n=30, accuracy=0.5)
    with pytest.raises(ValueError, match="as many"):
        ConfidenceMap(stated=[0.1], calibrated=[], n=30, accuracy=0.5)


# ---- fitted at the gate, published by the runner (real store, real synthetic market) -------------------


def test_the_gate_block_fits_the_map_and_the_next_block_publishes_mapped_confidence(fresh_db, market):
    with session_scope(fresh_db) as s:
        add_adapter(s, version=1, parent_version=None, path="/nowhere", base_model="m", training_run_id=None)
    low = {t: [pred(0.3, "down")] for t in market.tickers[:4]}
    policy = ScriptedPolicy([pred(0.9)], per_ticker=low, adapter_version=1)
    items = region_items(market, "gate", 30, "cmap-gate")
    gate_block = run_block(fresh_db, policy, market, cfg(), RewardsConfig(), kind="gate", items=items,
                           size=len(items), progress=False)
    resolve_pending(fresh_db, market, RewardsConfig())

    cmap = fit_candidate_confidence_map(fresh_db, 1, gate_block)

    with session_scope(fresh_db) as s:
        hits = s.scalar(select(func.sum(Outcome.correct)).join(Prediction, Prediction.id == Outcome.prediction_id)
                        .where(Prediction.block_id == gate_block))
        stored = s.scalar(select(Adapter.metrics).where(Adapter.version == 1))["confidence_map"]
    assert cmap.n == 30 and cmap.accuracy == pytest.approx(hits / 30)
    assert ConfidenceMap.model_validate(stored) == cmap
    assert set(cmap.stated) <= {0.3, 0.9}

    later = run_block(fresh_db, policy, market, cfg(), RewardsConfig(), kind="eval",
                      items=region_items(market, "eval", 12, "cmap-eval"), size=12, progress=False)
    with session_scope(fresh_db) as s:
        rows = s.execute(select(Prediction.stated_confidence, Prediction.confidence)
                         .where(Prediction.block_id == later)).all()
    assert len(rows) == 12 and {st for st, _ in rows} == {0.3, 0.9}
    assert all(pub == pytest.approx(cmap.apply(st)) for st, pub in rows)
    # an adapter without a map publishes what the model stated
    plain = run_block(fresh_db, ScriptedPolicy([pred(0.9)]), market, cfg(), RewardsConfig(), kind="eval",
                      items=region_items(market, "eval", 3, "cmap-plain"), size=3, progress=False)
    with session_scope(fresh_db) as s:
        assert set(s.execute(select(Prediction.stated_confidence, Prediction.confidence)
                             .where(Prediction.block_id == plain)).all()) == {(0.9, 0.9)}


def test_a_small_gate_fits_no_map(sqlite_db, market):
    with session_scope(sqlite_db) as s:
        add_adapter(s, version=2, parent_version=None, path="/nowhere", base_model="m", training_run_id=None)
    items = region_items(market, "gate", 6, "cmap-small")
    bid = run_block(sqlite_db, ScriptedPolicy([pred(0.9)], adapter_version=2), market, cfg(), RewardsConfig(),
                    kind="gate", items=items, size=6, progress=False)
    resolve_pending(sqlite_db, market, RewardsConfig())
    assert fit_candidate_confidence_map(sqlite_db, 2, bid) is None
    with session_scope(sqlite_db) as s:
        assert "confidence_map" not in (s.scalar(select(Adapter.metrics).where(Adapter.version == 2)) or {})


def test_a_corrupt_map_is_refused_before_the_block_is_planned(sqlite_db, market):
    with session_scope(sqlite_db) as s:
        add_adapter(s, version=3, parent_version=None, path="/nowhere", base_model="m", training_run_id=None,
                    metrics={"confidence_map": {"stated": [0.9, 0.1], "calibrated": [0.5, 0.6], "n": 30,
                                                "accuracy": 0.5}})
    with pytest.raises(BlockError, match=r"adapter v3's confidence map .* not valid .* sorted"):
        run_block(sqlite_db, ScriptedPolicy([pred(0.9)], adapter_version=3), market, cfg(), RewardsConfig(),
                  kind="eval", items=region_items(market, "eval", 2, "cmap-bad"), size=2, progress=False)
    with session_scope(sqlite_db) as s:
        assert s.scalar(select(func.count()).select_from(Block)) == 0  # nothing planned, nothing half-written

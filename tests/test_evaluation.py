"""Evaluation: rank correlation and reliability bins (table-tested), and eval runs on held-out items."""

from __future__ import annotations

import json
import re
from datetime import UTC

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from agent.config import AgentConfig
from evaluation.heldout import EvalError, held_out_plan, parse_targets, run_eval
from market.config import MarketConfig, SyntheticConfig
from market.sources import build_market
from policy.protocol import Completion
from rewards.config import RewardsConfig
from rewards.evaluation import (
    TargetResult,
    average_ranks,
    controllability,
    ece_from_bins,
    reliability_bins,
    spearman,
)
from rewards.metrics import expected_calibration_error
from store.db import session_scope
from store.models import Block, EvalRun

# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("xs, expected", [
    ([3.0, 1.0, 2.0], [3.0, 1.0, 2.0]),
    ([1.0, 1.0, 2.0], [1.5, 1.5, 3.0]),
    ([5.0, 5.0, 5.0], [2.0, 2.0, 2.0]),
    ([], []),
    ([0.2, 0.9, 0.2, 0.1], [2.5, 4.0, 2.5, 1.0]),
])
def test_average_ranks(xs, expected):
    assert average_ranks(xs) == expected


@pytest.mark.parametrize("xs, ys, expected", [
    ([0.2, 0.4, 0.6, 0.8, 1.0], [0.1, 0.2, 0.3, 0.5, 0.9], 1.0),      # monotone, not linear: still 1
    ([0.2, 0.4, 0.6, 0.8, 1.0], [0.9, 0.5, 0.3, 0.2, 0.1], -1.0),
    ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 0.8),                         # 1 - 6*4/(5*24)
    ([1, 2, 3, 4], [1, 1, 2, 2], 0.894427191),                       # ties: Pearson on average ranks
    ([1, 2, 3], [0.5, 0.5, 0.5], None),                              # constant realized reward: undefined
    ([1], [2], None),
    ([1, 2, float("nan"), 3], [1, 2, 5, 3], 1.0),                    # non-finite pairs are dropped
])
def test_spearman_table(xs, ys, expected):
    got = spearman(xs, ys)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_controllability_ignores_targets_without_a_realized_mean():
    rs = [TargetResult(0.2, 10, 10, 0.3, 0.5, 0.2), TargetResult(0.6, 10, 0, None, None, None),
          TargetResult(1.0, 10, 10, 0.5, 0.6, 0.2)]
    assert controllability(rs) == pytest.approx(1.0)
    assert controllability(rs[:2]) is None


@pytest.mark.parametrize("conf, correct, bins, expected", [
    # (lo, n, mean confidence, accuracy) of the non-empty bins
    ([0.55, 0.58, 0.9, 1.0], [1, 0, 1, 1], 10, [(0.5, 2, 0.565, 0.5), (0.9, 2, 0.95, 1.0)]),
    ([0.0, 0.49, 0.5], [0, 1, 1], 2, [(0.0, 2, 0.245, 0.5), (0.5, 1, 0.5, 1.0)]),
    ([1.2, -0.1], [1, 0], 4, [(0.0, 1, 0.0, 0.0), (0.75, 1, 1.0, 1.0)]),  # clipped into [0, 1]
    ([], [], 10, []),
])
def test_reliability_bins_table(conf, correct, bins, expected):
    bs = reliability_bins(conf, correct, bins)
    assert len(bs) == bins and sum(b.n for b in bs) == len(conf)
    got = [(b.lo, b.n, b.mean_confidence, b.accuracy) for b in bs if b.n]
    assert got == [pytest.approx(e) for e in expected]
    assert all(b.mean_confidence is None and b.accuracy is None for b in bs if not b.n)


def test_ece_from_bins_matches_the_block_metric():
    conf = [0.55, 0.62, 0.71, 0.8, 0.93, 0.99, 0.51, 0.66]
    correct = [1, 0, 1, 1, 0, 1, 1, 0]
    assert ece_from_bins(reliability_bins(conf, correct)) == pytest.approx(
        expected_calibration_error(conf, [bool(c) for c in correct]))
    assert ece_from_bins(reliability_bins([], [])) is None


@pytest.mark.parametrize("text, error", [
    ("0.2,0.4,1.0", None), ("0.5", "at least two"), ("0.2,1.3", "outside"), ("a,b", "comma-separated"),
    ("0.2,0.2", "repeated"),
])
def test_parse_targets(text, error):
    if error is None:
        assert parse_targets(text) == [0.2, 0.4, 1.0]
    else:
        with pytest.raises(EvalError, match=error):
            parse_targets(text)


# -- eval runs ----------------------------------------------------------------------------------

PRED = {"direction": "up", "magnitude_pct": 1.0, "confidence": 0.6, "rationale": "trend", "citations": []}
_SCORE = re.compile(r"Score: ([0-9.]+)")
_STOCK = re.compile(r"Stock: SYN(\d+)")


class TargetFollowingPolicy:
    """An offline policy whose answers depend on the conditioning target: it answers validly only for
    tickers whose index is below target * n_tickers and returns unparseable text otherwise, so its
    realized reward rises with the target (a known-controllable model to check the measurement)."""

    adapter_version = None

    def __init__(self, n_tickers: int) -> None:
        self.n = n_tickers

    def complete(self, messages, *, json_schema=None, max_new_tokens=160, temperature=0.7, seed=None):
        # The label may sit in the system prompt or next to the decision (#13): take the last one shown.
        target = float(_SCORE.findall(" ".join(m["content"] for m in messages))[-1])
        ticker = int(_STOCK.search(next(m["content"] for m in messages if m["role"] == "user")).group(1))
        text = json.dumps({"prediction": PRED}) if ticker < target * self.n else "I am not sure."
        return Completion(text, 10, 5, 1.0)

    def load_adapter(self, path, version):
        self.adapter_version = version

    def close(self):
        pass


@pytest.fixture(scope="module")
def small_market():
    return build_market(MarketConfig(synthetic=SyntheticConfig(n_days=120, n_tickers=6)))


def test_held_out_plan_draws_from_the_eval_region(small_market):
    from market.split import timeline_split

    split = timeline_split(small_market, 5)
    cal = small_market.calendar
    plan = held_out_plan(small_market, 30, horizon=5, seed=3)
    days = [cal.base_session(a) for _, a in plan.items]
    assert len(set(plan.items)) == 30 and all(d in split.eval for d in days)
    assert len(set(days)) > 30 // len(small_market.tickers)  # spread over the region, not consecutive days
    assert (plan.first_day, plan.last_day) == (split.eval.first, split.eval.last)
    assert held_out_plan(small_market, 30, horizon=5, seed=3).items == plan.items
    assert held_out_plan(small_market, 30, horizon=5, seed=4).items != plan.items
    with pytest.raises(EvalError, match="holds"):
        held_out_plan(small_market, 6 * 100, horizon=5)
    live = build_market(MarketConfig(source="yahoo"))
    with pytest.raises(EvalError, match="no bounded history"):
        held_out_plan(live, 10, horizon=5)


def test_eval_run_measures_a_controllable_policy(fresh_db, small_market):
    targets = [0.2, 0.5, 1.0]
    res = run_eval(fresh_db, TargetFollowingPolicy(6), small_market, AgentConfig(concurrency=2, max_repairs=0),
                   RewardsConfig(), targets=targets, n_items=6, progress=False)
    assert res.status == "done" and len(res.block_ids) == 3
    drawn = [int(t[3:]) for t, _ in held_out_plan(small_market, 6, horizon=5).items]
    valid = [r.n_valid for r in res.per_target]
    assert valid == [sum(i < t * 6 for i in drawn) for t in targets]  # answers only below target * 6 tickers
    assert valid[-1] == 6 and valid[0] < 6
    assert [r.n for r in res.per_target] == [6, 6, 6]
    means = [r.mean_reward for r in res.per_target]
    assert means[0] < means[1] < means[2]
    assert res.spearman == pytest.approx(1.0)
    with session_scope(fresh_db) as s:
        run = s.get(EvalRun, res.eval_run_id)
        assert run.status == "done" and run.finished_at is not None
        assert [t["target"] for t in run.results["per_target"]] == targets
        assert run.results["spearman"] == pytest.approx(1.0)
        assert run.results["held_out"]["n_items"] == 6
        blocks = s.scalars(select(Block).where(Block.eval_run_id == res.eval_run_id).order_by(Block.id)).all()
        assert [b.kind for b in blocks] == ["eval"] * 3
        assert [b.target_score for b in blocks] == targets
        items = [sorted((e.ticker, e.as_of) for e in b.episodes) for b in blocks]
        assert items[0] == items[1] == items[2]  # every target runs the same items


def test_eval_decodes_greedily_and_splits_accuracy_by_visible_signal(fresh_db, small_market):
    class Recording(TargetFollowingPolicy):
        def __init__(self, n_tickers: int) -> None:
            super().__init__(n_tickers)
            self.temperatures: list[float] = []

        def complete(self, messages, **kw):
            self.temperatures.append(kw["temperature"])
            return super().complete(messages, **kw)

    policy = Recording(6)
    cfg = AgentConfig(concurrency=2, max_repairs=0, temperature=0.9, explore_rate=1.0)
    res = run_eval(fresh_db, policy, small_market, cfg, RewardsConfig(), targets=[0.5, 1.0], n_items=12,
                   progress=False)
    assert set(policy.temperatures) == {0.0}  # the configured 0.9 is for train blocks, not measurement
    with session_scope(fresh_db) as s:
        run = s.get(EvalRun, res.eval_run_id)
        assert run.results["decoding"] == "greedy"
        assert run.results["p_star_band"] == pytest.approx(small_market.prices.bayes_accuracy_band(5, 0.5))
        split = run.results["accuracy_by_signal"]
        blocks = s.scalars(select(Block).where(Block.eval_run_id == res.eval_run_id).order_by(Block.id)).all()
        assert all(e.explore_direction is None for b in blocks for e in b.episodes)
    items = held_out_plan(small_market, 12, horizon=5).items
    visible = sum(small_market.prices.signal_visible(t, a.date(), 5) for t, a in items)
    assert [row["target"] for row in split] == [0.5, 1.0]
    top = split[1]  # at target 1.0 every item is answered, so both groups are complete
    assert (top["signal_n"], top["no_signal_n"]) == (visible, 12 - visible)
    assert 0 < visible < 12


def test_eval_refuses_when_a_train_item_reaches_the_eval_region(sqlite_db, small_market):
    from agent.runner import BlockError, run_block
    from policy.scripted import ScriptedPolicy
    from store import traces

    plan = held_out_plan(small_market, 6, horizon=5)
    with pytest.raises(BlockError, match="outside the train region"):  # the runner never plans one there
        run_block(sqlite_db, ScriptedPolicy([json.dumps({"prediction": PRED})]), small_market, AgentConfig(),
                  RewardsConfig(), size=6, as_of=plan.items[0][1], kind="train", progress=False)
    # ... but a database from before the split, or a block written by hand, may hold one: eval refuses.
    with session_scope(sqlite_db) as s:
        traces.create_block_with_items(s, items=[traces.PlannedItem("SYN01", plan.leak_since)], market="synthetic",
                                       mode="replay", kind="train", horizon=5, adapter_version=None,
                                       target_score=1.0, conditioning="Score: 1.00")
    with pytest.raises(EvalError, match="would not be held out"):
        run_eval(sqlite_db, TargetFollowingPolicy(6), small_market, AgentConfig(), RewardsConfig(),
                 targets=[0.2, 1.0], n_items=6, progress=False)
    with session_scope(sqlite_db) as s:
        assert s.scalars(select(EvalRun)).all() == []


def test_cli_eval_with_a_tiny_local_model_stores_a_result_per_target(sqlite_url, tiny_model_dir, monkeypatch):
    """`scoreloop eval` end to end: build_policy -> LocalPolicy (tiny random model) -> blocks -> resolve."""
    from scheduler.cli import app

    for key, value in {"AGENT__MODEL": tiny_model_dir, "AGENT__DEVICE": "cpu", "AGENT__MAX_STEPS": "1",
                       "AGENT__MAX_NEW_TOKENS": "24", "AGENT__MAX_REPAIRS": "0", "AGENT__CONCURRENCY": "2",
                       "MARKET__SYNTHETIC__N_DAYS": "120", "MARKET__SYNTHETIC__N_TICKERS": "6"}.items():
        monkeypatch.setenv(f"SCORELOOP_{key}", value)
    res = CliRunner().invoke(app, ["--db", sqlite_url, "eval", "--adapter", "base", "--targets", "0.2,0.8",
                                   "--items", "2", "--seed", "5"])
    assert res.exit_code == 0, res.output
    assert "controllability" in res.output
    from store.db import open_store

    engine = open_store(sqlite_url)
    with session_scope(engine) as s:
        run = s.scalars(select(EvalRun)).one()
        assert run.status == "done", run.results.get("error")
        assert run.adapter_version is None and run.n_items == 2 and run.results["held_out"]["seed"] == 5
        per = run.results["per_target"]
        blocks = s.scalars(select(Block).where(Block.eval_run_id == run.id)).all()
    engine.dispose()
    assert [p["target"] for p in per] == [0.2, 0.8]
    assert all(p["n"] == 2 and p["mean_reward"] is not None for p in per)
    assert sorted(b.target_score for b in blocks) == [0.2, 0.8] and {b.kind for b in blocks} == {"eval"}


def test_cli_eval_rejects_bad_targets_and_unknown_adapter(sqlite_url):
    from scheduler.cli import app

    bad = CliRunner().invoke(app, ["--db", sqlite_url, "eval", "--targets", "0.5"])
    assert bad.exit_code == 1 and "at least two" in bad.output
    missing = CliRunner().invoke(app, ["--db", sqlite_url, "eval", "--adapter", "7"])
    assert missing.exit_code == 1 and "no adapter version 7" in missing.output


# -- knobs for the learning-curve arms --------------------------------------------------------


def test_label_format_none_is_one_fixed_line_at_training_and_inference():
    from rewards.labels import NO_LABEL, target_label, training_label

    cfg = RewardsConfig(label_format="none")
    assert {training_label(s, cfg) for s in (0.0, 0.37, 1.0)} == {NO_LABEL}
    assert target_label(0.95, cfg) == NO_LABEL and "\n" not in NO_LABEL


def test_filter_top_fraction_keeps_each_blocks_best_episodes():
    from datetime import datetime

    from store.training import ScoredEpisode
    from trainer.dataset import top_fraction

    def ep(eid, block, score):
        return ScoredEpisode(eid, block, "train", eid, "SYN00", datetime(2021, 1, 4, tzinfo=UTC), 0,
                             None, "Score: 0.95", score is not None, score, "r1")

    eps = [ep(1, 1, 0.9), ep(2, 1, 0.1), ep(3, 1, None), ep(4, 1, 0.5), ep(5, 1, 0.5),
           ep(6, 2, 0.2), ep(7, 2, 0.3)]
    assert [e.episode_id for e in top_fraction(eps, 0.2)] == [1, 7]      # ceil(0.2 * n) per block: 1 and 1
    assert [e.episode_id for e in top_fraction(eps, 0.25)] == [1, 4, 7]  # 2 of block 1; tie 4/5 -> lower id
    assert top_fraction(eps, 1.0) == eps

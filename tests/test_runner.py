"""Block runner: planning, crash/stop and resume without duplicates, bad input, both databases, CLI."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from agent.config import AgentConfig
from agent.runner import BlockError, BlockInterrupted, resume_block, run_block
from market.config import MarketConfig
from market.sources import build_market
from policy.protocol import PolicyError
from policy.scripted import ScriptedPolicy
from rewards.config import RewardsConfig
from store import traces
from store.db import session_scope
from store.models import Block, Episode, Prediction, Step

NEWS = '{"tool": "search_news", "args": {"query": "estimates"}}'
PRED = json.dumps({"prediction": {"direction": "up", "magnitude_pct": 1.0, "confidence": 0.6,
                                  "rationale": "news", "citations": []}})


@pytest.fixture(scope="module")
def market():
    return build_market(MarketConfig())


def cfg(**kw) -> AgentConfig:
    # research_plan=[]: the scripts below write every tool call themselves
    return AgentConfig(**{"concurrency": 3, "research_plan": [], **kw})


def counts(engine, block_id):
    with session_scope(engine) as s:
        preds = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.block_id == block_id))
        steps = s.execute(select(Step.episode_id, Step.attempt, Step.idx).join(Episode)
                          .where(Episode.block_id == block_id)).all()
        status = s.get(Block, block_id).status
    return preds, steps, status


def test_replay_items_cycle_tickers_and_continue_after_the_last_block(sqlite_db, market):
    policy = ScriptedPolicy([PRED])
    b1 = run_block(sqlite_db, policy, market, cfg(), RewardsConfig(), size=14, progress=False)
    b2 = run_block(sqlite_db, policy, market, cfg(), RewardsConfig(), size=3, progress=False)
    with session_scope(sqlite_db) as s:
        e1 = s.scalars(select(Episode).where(Episode.block_id == b1).order_by(Episode.idx)).all()
        e2 = s.scalars(select(Episode).where(Episode.block_id == b2).order_by(Episode.idx)).all()
    cal = market.calendar
    assert [e.ticker for e in e1[:12]] == market.tickers and e1[12].ticker == market.tickers[0]
    day0 = cal.base_session(e1[0].as_of)
    assert e1[0].as_of == cal.replay_as_of(day0) and cal.base_session(e1[12].as_of) == cal.add_sessions(day0, 1)
    assert cal.base_session(e2[0].as_of) == cal.add_sessions(day0, 2)
    assert all(e.status == "done" for e in e1 + e2)


def test_policy_crash_mid_block_then_resume_gives_exactly_n_predictions(fresh_db, market):
    n = 8
    broken = ScriptedPolicy([NEWS, PRED], per_ticker={"SYN04": [NEWS, PolicyError("backend went away")]})
    with pytest.raises(BlockInterrupted, match="episode .* failed .*backend went away") as info:
        run_block(fresh_db, broken, market, cfg(concurrency=2), RewardsConfig(), size=n, progress=False)
    block_id = info.value.block_id
    preds, steps, status = counts(fresh_db, block_id)
    assert status == "running" and preds < n
    with session_scope(fresh_db) as s:
        assert traces.unfinished_block_ids(s) == [block_id]
        crashed = s.scalars(select(Episode).where(Episode.block_id == block_id, Episode.ticker == "SYN04")).one()
        assert crashed.status == "pending" and crashed.attempt == 1 and "backend went away" in crashed.error
        done_before = {e.id for e in s.scalars(select(Episode).where(Episode.block_id == block_id,
                                                                      Episode.status == "done"))}
    resume_block(fresh_db, block_id, ScriptedPolicy([NEWS, PRED]), market, cfg(), RewardsConfig(), progress=False)
    preds, steps, status = counts(fresh_db, block_id)
    assert status == "complete" and preds == n
    assert len(steps) == len(set(steps))  # no duplicate (episode, attempt, idx)
    with session_scope(fresh_db) as s:
        eps = s.scalars(select(Episode).where(Episode.block_id == block_id)).all()
        assert all(e.status == "done" for e in eps)
        # finished episodes were not re-run; the crashed one is on attempt 2 and kept attempt 1's steps
        assert all(e.attempt == 1 for e in eps if e.id in done_before)
        crashed = next(e for e in eps if e.ticker == "SYN04")
        assert crashed.attempt == 2
        old = traces.episode_trace(s, crashed.id, attempt=1)
        # the plan's call and its result, then the label turn before the decision the crash interrupted
        assert [st.role for st in old.steps] == ["system", "user", "assistant", "tool", "user"]
        assert traces.unfinished_block_ids(s) == []
    # resuming a complete block is a no-op, never a second prediction
    resume_block(fresh_db, block_id, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), progress=False)
    assert counts(fresh_db, block_id)[0] == n


class StopAfter(ScriptedPolicy):
    """Sets the block's stop event once `k` model calls have been answered."""

    def __init__(self, k: int, stop: threading.Event, *a, **kw):
        super().__init__(*a, **kw)
        self.k, self.stop = k, stop

    def complete(self, messages, **kw):
        out = super().complete(messages, **kw)
        if len(self.calls) >= self.k:
            self.stop.set()
        return out


def test_stop_event_returns_cleanly_and_the_block_resumes(sqlite_db, market):
    stop = threading.Event()
    n = 10
    policy = StopAfter(5, stop, [NEWS, PRED])
    block_id = run_block(sqlite_db, policy, market, cfg(concurrency=2), RewardsConfig(), size=n, progress=False,
                         stop=stop)
    preds, steps, status = counts(sqlite_db, block_id)
    assert status == "running" and 0 < preds < n
    with session_scope(sqlite_db) as s:
        running = s.scalar(select(func.count()).select_from(Episode).where(Episode.status == "running"))
    assert running == 0  # in-flight episodes finished their step and were released
    resume_block(sqlite_db, block_id, ScriptedPolicy([NEWS, PRED]), market, cfg(), RewardsConfig(), progress=False)
    preds, steps, status = counts(sqlite_db, block_id)
    assert status == "complete" and preds == n and len(steps) == len(set(steps))


def test_crash_that_kills_the_process_leaves_running_episodes_that_resume(sqlite_db, market):
    """A hard kill leaves an episode `running` with some steps: resume restarts it as attempt 2."""
    block_id = run_block(sqlite_db, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), size=3,
                         progress=False)
    with session_scope(sqlite_db) as s:  # simulate: episode 2 was mid-run when the process died
        ep = s.scalars(select(Episode).where(Episode.block_id == block_id, Episode.idx == 2)).one()
        s.execute(Prediction.__table__.delete().where(Prediction.episode_id == ep.id))
        ep.status = "running"
        s.get(Block, block_id).status = "running"
    resume_block(sqlite_db, block_id, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), progress=False)
    preds, steps, status = counts(sqlite_db, block_id)
    assert (preds, status) == (3, "complete") and len(steps) == len(set(steps))


def test_empty_universe_and_unknown_tickers_fail_before_anything_is_written(sqlite_db, market):
    with pytest.raises(BlockError, match="universe is empty"):
        run_block(sqlite_db, ScriptedPolicy([PRED]), replace(market, tickers=[]), cfg(), RewardsConfig(),
                  size=2, progress=False)
    with pytest.raises(BlockError, match="unknown tickers NOPE, ZZZ"):
        run_block(sqlite_db, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), size=2,
                  tickers=["SYN01", "nope", "ZZZ"], progress=False)
    with pytest.raises(BlockError, match="outside the train region .* the last sessions of the history"):
        run_block(sqlite_db, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), size=2,
                  as_of=datetime.combine(market.span[1], datetime.min.time(), tzinfo=UTC), progress=False)
    with session_scope(sqlite_db) as s:
        assert s.scalar(select(func.count()).select_from(Block)) == 0


def test_explicit_tickers_and_live_mode(sqlite_db, market):
    as_of = datetime(2021, 6, 1, 20, 30, tzinfo=UTC)
    block_id = run_block(sqlite_db, ScriptedPolicy([PRED]), market, cfg(), RewardsConfig(), mode="live",
                         as_of=as_of, size=3, tickers=["syn02", "SYN05"], target_score=0.8, progress=False)
    with session_scope(sqlite_db) as s:
        eps = s.scalars(select(Episode).where(Episode.block_id == block_id).order_by(Episode.idx)).all()
        preds = s.scalars(select(Prediction).where(Prediction.block_id == block_id)).all()
    assert [e.ticker for e in eps] == ["SYN02", "SYN05", "SYN02"] and {e.as_of for e in eps} == {as_of}
    assert all(p.conditioning == "Score: 0.80" and p.target_score == 0.8 for p in preds)


def test_v_episode_trace_shows_the_episode_in_order(fresh_db, market):
    block_id = run_block(fresh_db, ScriptedPolicy([NEWS, PRED]), market, cfg(), RewardsConfig(), size=2,
                         progress=False)
    with fresh_db.connect() as conn:
        rows = conn.execute(text(
            "SELECT step, role, tool_name, tool_error, content FROM v_episode_trace "
            "WHERE block_id = :b AND current_attempt = 1 AND episode_id = "
            "(SELECT MIN(id) FROM episodes WHERE block_id = :b) ORDER BY step"), {"b": block_id}).all()
    assert [(r.step, r.role, r.tool_name) for r in rows] == [
        (0, "system", None), (1, "user", None), (2, "assistant", None), (3, "tool", "search_news"),
        (4, "user", None), (5, "assistant", None)]
    assert rows[3].tool_error is None and rows[3].content.startswith("[")


def test_cli_block_run_and_trace(sqlite_url, tmp_path):
    from scheduler.cli import app

    script = tmp_path / "outputs.jsonl"
    script.write_text("\n".join(json.dumps({"ticker": None, "turn": i, "text": t}) for i, t in enumerate([NEWS, PRED])))
    runner = CliRunner()
    bad = runner.invoke(app, ["--db", sqlite_url, "block", "run", "--size", "2", "--tickers", "SYN01,BOGUS",
                              "--replay-outputs", str(script)])
    assert bad.exit_code == 1 and "unknown ticker BOGUS" in bad.output
    ok = runner.invoke(app, ["--db", sqlite_url, "block", "run", "--size", "2", "--replay-outputs", str(script)])
    assert ok.exit_code == 0, ok.output
    assert "block 1 complete: 2/2 predictions, 2 valid" in ok.output
    shown = runner.invoke(app, ["--db", sqlite_url, "trace", "1"])
    assert shown.exit_code == 0, shown.output
    for part in ("episode 1", "0 system", "Score: 0.95", "2 assistant", "search_news(query='syn00')",  # the plan's call
                 "prediction up 1.00%"):
        assert part in shown.output
    missing = runner.invoke(app, ["--db", sqlite_url, "trace", "99"])
    assert missing.exit_code == 1 and "no episode with id 99" in missing.output


def test_quantile_target_is_binned_with_the_serving_adapters_edges(sqlite_db, market):
    """`Quantile: k/B` means bin k of the offline set the adapter learned from, not of a uniform grid."""
    from store.training import add_adapter, create_training_run

    with session_scope(sqlite_db) as s:
        run = create_training_run(s, objective="sft", parent_version=None, block_ids=[], replay_episode_ids=[],
                                  n_examples=0, hyperparams={"label_edges": [0.1, 0.15, 0.2, 0.25]})
        add_adapter(s, version=7, parent_version=None, path="/nowhere", base_model="m", training_run_id=run.id)
    rewards = RewardsConfig(label_format="quantile", quantile_bins=5)
    with_edges = run_block(sqlite_db, ScriptedPolicy([PRED], adapter_version=7), market, cfg(), rewards, size=1,
                           target_score=0.3, progress=False)
    uniform = run_block(sqlite_db, ScriptedPolicy([PRED]), market, cfg(), rewards, size=1, target_score=0.3,
                        progress=False)
    with session_scope(sqlite_db) as s:
        assert s.get(Block, with_edges).conditioning == "Quantile: 5/5"  # above the adapter's top edge 0.25
        assert s.get(Block, uniform).conditioning == "Quantile: 2/5"  # uniform edges 0.2, 0.4, 0.6, 0.8


def test_exploration_marks_train_items_only_and_is_reproducible(sqlite_db, market):
    """explore_rate draws a direction for about that share of train items, the same way every time."""
    from agent.runner import explore, plan_items

    with session_scope(sqlite_db) as s:
        items = plan_items(s, market, mode="replay", size=200, horizon=5, kind="train")
    marked = explore(items, 0.3)
    drawn = [it.explore_direction for it in marked if it.explore_direction]
    assert 40 <= len(drawn) <= 80 and set(drawn) == {"up", "down", "flat"}
    assert explore(items, 0.3) == marked and explore(items, 0.0) == items
    policy = ScriptedPolicy([NEWS, PRED])
    train = run_block(sqlite_db, policy, market, cfg(explore_rate=1.0, max_steps=1), RewardsConfig(), size=3,
                      progress=False)
    gate = run_block(sqlite_db, policy, market, cfg(explore_rate=1.0, max_steps=1), RewardsConfig(), size=3,
                     kind="gate", progress=False)
    with session_scope(sqlite_db) as s:
        directions = {b: [e.explore_direction for e in s.scalars(select(Episode).where(Episode.block_id == b).order_by(Episode.id))]
                      for b in (train, gate)}
    assert all(d in ("up", "down", "flat") for d in directions[train])
    assert directions[gate] == [None, None, None]  # gate and eval blocks measure the policy, never explore
    with sqlite_db.connect() as c:  # users see which predictions were explored without a join
        shown = {b: [r for (r,) in c.execute(text("SELECT explored_direction FROM v_predictions WHERE block_id = :b "
                                                  "ORDER BY episode_id"), {"b": b})] for b in (train, gate)}
    assert shown == directions


def test_gate_blocks_decode_greedily_and_record_it(sqlite_db, market):
    """The gate compares decisions, not sampling noise: its blocks run at temperature 0 whatever
    agent.temperature says (train blocks keep it), and the block's recorded config says so."""
    temps = {}
    for kind in ("train", "gate"):
        policy = ScriptedPolicy([NEWS, PRED])
        bid = run_block(sqlite_db, policy, market, cfg(temperature=0.7, max_steps=1), RewardsConfig(), size=2,
                        kind=kind, progress=False)
        temps[kind] = {c["temperature"] for c in policy.calls}
        with session_scope(sqlite_db) as s:
            assert s.get(Block, bid).config["agent"]["temperature"] == (0.0 if kind == "gate" else 0.7)
    assert temps == {"train": {0.7}, "gate": {0.0}}

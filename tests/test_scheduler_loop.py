"""`scoreloop loop`: block -> resolve -> train -> gate -> publish, round after round, on the tiny
model and the synthetic market; and the recovery pass that a daemon runs at start."""

from __future__ import annotations

import json
import threading

from daemon_process import db_url, write_config
from rich.console import Console
from sqlalchemy import func, select
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.recovery import recover, triggers_step
from scheduler.runtime import Runtime, Stopped
from scheduler.settings import load_settings
from scheduler.status import render_status
from scheduler.steps import resolve_step, run_block_step, train_step
from store.db import open_store, session_scope
from store.lock import read_lock
from store.models import Adapter, Block, Episode, Prediction, TrainingRun
from store.triggers import claim_next_trigger, enqueue_trigger, get_trigger

LOOP_EXTRA = ""


GATE_ITEMS = 6  # enough pairs (>= trainer.gate.MIN_PAIRS) for the rule to compute its interval


def _loop_config(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, block_size=4)
    text = cfg.read_text().replace("min_new_episodes = 100000", "min_new_episodes = 4").replace(
        "gate_items = 0", f"gate_items = {GATE_ITEMS}")
    cfg.write_text(text)
    return cfg


def test_loop_runs_rounds_with_a_paired_gate_on_gate_region_items(tmp_path, tiny_model_dir):
    from market.sources import build_market
    from market.split import timeline_split
    from store.models import GateDecision

    cfg = _loop_config(tmp_path, tiny_model_dir)
    res = CliRunner().invoke(app, ["--config", str(cfg), "loop", "--rounds", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "round 1/2 block 1" in out and "round 2/2 block 4" in out
    assert "mean reward" in out and "Brier" in out and "ECE" in out
    settings = load_settings(cfg)
    market = build_market(settings.market)
    split = timeline_split(market, settings.market.horizon_days)
    engine = open_store(db_url(cfg))
    with session_scope(engine) as s:
        blocks = list(s.scalars(select(Block).order_by(Block.id)))
        gates = list(s.scalars(select(GateDecision).order_by(GateDecision.id)))
        adapters = {a.version: a for a in s.scalars(select(Adapter))}
        # round k: train block, then two gate blocks (serving side, candidate side) on the same items
        served_2 = 1 if adapters[1].status != "rejected" else None
        assert [(b.kind, b.adapter_version) for b in blocks] == [
            ("train", None), ("gate", None), ("gate", 1), ("train", served_2), ("gate", served_2), ("gate", 2)]
        for a, b in ((2, 3), (5, 6)):
            items = [list(s.execute(select(Episode.ticker, Episode.as_of).where(Episode.block_id == x)
                                    .order_by(Episode.idx))) for x in (a, b)]
            assert items[0] == items[1] and len(items[0]) == GATE_ITEMS
            split.check("gate", [market.calendar.base_session(t) for _, t in items[0]])  # the gate region only
        for b in (1, 4):
            split.check("train", [market.calendar.base_session(e.as_of) for e in blocks[b - 1].episodes])
        assert s.scalar(select(func.count()).select_from(Prediction)) == 2 * (4 + 2 * GATE_ITEMS)
        assert [(g.candidate_version, g.serving_block_id, g.candidate_block_id) for g in gates] == [
            (1, 2, 3), (2, 5, 6)]
        for g in gates:
            assert g.n_pairs == GATE_ITEMS == len(g.items) and g.rule == "paired_bootstrap_mean"
            assert g.region["region"] == "gate" and g.region["first"] == split.gate.first.isoformat()
            assert adapters[g.candidate_version].status == ("rejected" if g.decision != "accept" else
                                                            adapters[g.candidate_version].status)
            assert (g.decision == "accept") == g.passed
    assert read_lock(engine) is None  # the loop released the daemon lock
    status = " ".join(CliRunner().invoke(app, ["--config", str(cfg), "status"], catch_exceptions=False).output.split())
    assert "#4 train complete" in status and "last gate" in status
    assert "last training" in status
    full = json.loads(CliRunner().invoke(app, ["--config", str(cfg), "status", "--json"]).output)
    console = Console(record=True, width=250)
    render_status(full, console)
    wide = console.export_text()
    assert "run 2 sft done, adapter v2:" in wide and "nats about the first tool call" in wide
    shown = full["last_gate"]
    assert (shown["candidate_version"], shown["serving_version"], shown["decision"], shown["n_pairs"]) == (
        2, served_2, gates[-1].decision, GATE_ITEMS)
    # what the round's labels said about its research: one count per trained example, copies included
    trained = full["last_training"]
    assert trained["status"] == "done" and trained["adapter_version"] == 2
    counts = trained["label_research"]["first_tool"]
    assert sum(n for tools in counts.values() for n in tools.values()) == trained["n_examples"]
    assert trained["label_research"]["nats"] >= 0.0


def test_loop_size_8_trains_on_what_its_rounds_produce_or_says_why_not(tmp_path, tiny_model_dir):
    """#18: with min_new_episodes unset, a round's training threshold is its own block size."""
    cfg = write_config(tmp_path, tiny_model_dir, block_size=100)
    cfg.write_text(cfg.read_text().replace("min_new_episodes = 100000\n", ""))
    res = CliRunner().invoke(app, ["--config", str(cfg), "loop", "--rounds", "2", "--size", "8"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "round 1/2 block 1 n 8" in out and "serving v1" in out and "serving v2" in out
    assert "no training" not in out
    with session_scope(open_store(db_url(cfg))) as s:
        assert [r.block_ids for r in s.scalars(select(TrainingRun).order_by(TrainingRun.id))] == [[1], [2]]

    # An explicit threshold larger than what a round produces: the round line says so.
    cfg.write_text(cfg.read_text().replace("[trainer]\n", "[trainer]\nmin_new_episodes = 100\n"))
    res = CliRunner().invoke(app, ["--config", str(cfg), "loop", "--rounds", "1", "--size", "8"],
                             catch_exceptions=False)
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and "round 1/1 block 3" in out and "serving v2" in out
    assert "no training: 8 new scored episodes, 100 needed (trainer.min_new_episodes)" in out


def test_recovery_requeues_an_unstarted_trigger_and_closes_a_finished_one(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, block_size=2)
    settings = load_settings(cfg)
    engine = open_store(settings.database_url)
    rt = Runtime(settings=settings, engine=engine, stop=threading.Event()).open()
    try:
        first = enqueue_trigger(engine, "block", {"size": 2})
        second = enqueue_trigger(engine, "block", {"size": 2})
        claim_next_trigger(engine)  # a daemon claimed it and died before planning the block
        recover(rt)
        assert get_trigger(engine, first).status == "queued"
        assert triggers_step(rt) == 2  # both run now, oldest first, each once
        t1, t2 = get_trigger(engine, first), get_trigger(engine, second)
        assert (t1.status, t2.status) == ("done", "done")
        assert t1.result["block_id"] < t2.result["block_id"]
        # a trigger whose block completed but which the killed daemon never marked done
        third = enqueue_trigger(engine, "block", {"size": 2})
        claim_next_trigger(engine)
        bid = run_block_step(rt, size=2, trigger_id=third).block_id
        assert get_trigger(engine, third).status == "running"
        assert rt.blocks_run == 0  # manual blocks do not count toward scheduler.max_blocks
        recover(rt)
        assert get_trigger(engine, third).status == "done" and get_trigger(engine, third).result == {"block_id": bid}
        with session_scope(engine) as s:
            assert s.scalar(select(func.count()).select_from(Block).where(Block.trigger_id.is_not(None))) == 3
    finally:
        rt.close()
        engine.dispose()


def test_stop_during_training_checkpoints_and_the_next_start_resumes(tmp_path, tiny_model_dir):
    """SIGTERM while a round trains: the daemon stops after one optimizer step, not after the round."""
    cfg = write_config(tmp_path, tiny_model_dir, block_size=4)
    cfg.write_text(cfg.read_text().replace("min_new_episodes = 100000", "min_new_episodes = 4\nbatch_size = 1"))
    settings = load_settings(cfg)
    engine = open_store(settings.database_url)
    rt = Runtime(settings=settings, engine=engine, stop=threading.Event()).open()
    try:
        run_block_step(rt, size=4)
        assert rt.blocks_run == 1  # counted now: the stop below, mid-round, must not lose it
        resolve_step(rt)

        def stop_when_training() -> None:
            while rt.current_job != "train":
                threading.Event().wait(0.005)
            rt.stop.set()

        watcher = threading.Thread(target=stop_when_training)
        watcher.start()
        try:
            train_step(rt)
            raise AssertionError("train_step returned although the stop flag was set mid-round")
        except Stopped:
            pass
        watcher.join()
        with session_scope(engine) as s:
            (run,) = s.scalars(select(TrainingRun)).all()
            assert run.status == "running" and "stopped at step 1 of " in run.error
            total = int(run.error.split("stopped at step 1 of ")[1].split(";")[0])  # the recipe's step count
            assert s.scalar(select(func.count()).select_from(Adapter)) == 0
    finally:
        rt.close()
    rt = Runtime(settings=settings, engine=engine, stop=threading.Event()).open()
    try:
        recover(rt)  # what the next daemon start does: finish the round from its checkpoint
        with session_scope(engine) as s:
            (run,) = s.scalars(select(TrainingRun)).all()
            assert run.status == "done" and [p["step"] for p in run.loss_curve] == list(range(1, total + 1))
            assert s.scalar(select(func.count()).select_from(Adapter)) == 1
    finally:
        rt.close()
        engine.dispose()

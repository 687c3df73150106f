"""Fault injection: SIGKILL the daemon at random points of its blocks, restart it, repeat.

After every kill the next start must finish the interrupted block: in the end every block has
exactly N predictions, no episode or step is duplicated, and every step that was committed
before a kill is still there. Real parts throughout: daemon subprocess, SQLite store, synthetic
market, tiny random model behind LocalPolicy.

Outside blocks (resolve, adapter save, gate, publish) the windows are milliseconds wide, so the
daemon kills itself at named points (daemon_process.KILL_POINTS) instead of at a random time.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from daemon_process import FAULT_MARK, db_url, kill, start_daemon, stop, tail, wait_for, write_config
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from store.db import make_engine, session_scope
from store.models import Block, Episode, Prediction, Step, ToolCall

N = 6  # items per block
# Ten kills keep the suite short on a 2-core box (each one starts a daemon: ~15 s of imports here);
# SCORELOOP_FAULT_KILLS=40 makes a longer soak of the same test.
KILLS = int(os.environ.get("SCORELOOP_FAULT_KILLS", "10"))
MIN_BLOCKS = 3  # blocks completed by the end (the kills fall across them)


def _count_steps(engine) -> int:
    try:
        with session_scope(engine) as s:
            return s.scalar(select(func.count()).select_from(Step)) or 0
    except OperationalError:  # schema not created yet by the first daemon
        return 0


def _step_ids(engine) -> set[int]:
    try:
        with session_scope(engine) as s:
            return set(s.scalars(select(Step.id)))
    except OperationalError:
        return set()


@pytest.mark.slow
def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path, tiny_model_dir):
    rng = random.Random(20240607)
    # Two episodes in flight: each restart re-opens at most two as new attempts, so kills that land
    # mid-episode still leave the block room to progress across the kills.
    cfg = write_config(tmp_path, tiny_model_dir, block_size=N, concurrency=2)
    engine = make_engine(db_url(cfg))
    log = tmp_path / "daemon.log"
    committed_before_kills: set[int] = set()
    kill_points: list[tuple[int, int, int]] = []  # (kill no, steps in store at the kill, new steps since start)
    t_start = time.monotonic()
    for k in range(1, KILLS + 1):
        base = _count_steps(engine)
        proc = start_daemon(cfg, log)
        want = rng.randint(0, 20)  # kill after this many new steps: 0 = during start-up / recovery
        try:
            wait_for(lambda base=base, want=want: _count_steps(engine) >= base + want, 300, f"{want} new steps before kill {k}",
                     proc, log, interval=0.05)
            time.sleep(rng.uniform(0, 0.4))
            snapshot = _step_ids(engine)  # committed now, so it must survive the kill
        finally:
            kill(proc)
        committed_before_kills |= snapshot
        kill_points.append((k, len(snapshot), len(snapshot) - base))

    # A last, undisturbed run finishes the interrupted block and completes at least MIN_BLOCKS.
    log_offset = log.stat().st_size if log.exists() else 0
    proc = start_daemon(cfg, log)

    def final_daemon_ready():
        # The blocks may already be complete; wait for this daemon's own recovery to finish so the
        # clean-stop check below is not a SIGTERM during its interpreter start-up.
        return "event=daemon_ready" in log.read_text(errors="replace")[log_offset:]

    def enough_complete():
        try:
            with session_scope(engine) as s:
                done = s.scalar(select(func.count()).select_from(Block).where(Block.status == "complete")) or 0
                running = s.scalar(select(func.count()).select_from(Block).where(Block.status == "running")) or 0
            return done >= MIN_BLOCKS and running == 0
        except OperationalError:
            return False

    try:
        wait_for(final_daemon_ready, 300, "the final daemon to finish recovery", proc, log, interval=0.2)
        wait_for(enough_complete, 600, f"{MIN_BLOCKS} complete blocks", proc, log, interval=0.2)
    finally:
        assert stop(proc) == 0, tail(log)
    elapsed = time.monotonic() - t_start

    with session_scope(engine) as s:
        blocks = list(s.scalars(select(Block).order_by(Block.id)))
        per_block = {
            b.id: (
                s.scalar(select(func.count()).select_from(Episode).where(Episode.block_id == b.id)),
                s.scalar(select(func.count()).select_from(Prediction).where(Prediction.block_id == b.id)),
                s.scalar(select(func.count(func.distinct(Prediction.episode_id))).where(Prediction.block_id == b.id)),
            )
            for b in blocks
        }
        dup_steps = s.execute(
            select(Step.episode_id, Step.attempt, Step.idx, func.count()).group_by(Step.episode_id, Step.attempt,
                                                                                   Step.idx).having(func.count() > 1)
        ).all()
        dup_tool_calls = s.execute(
            select(ToolCall.step_id, func.count()).where(ToolCall.step_id.is_not(None)).group_by(ToolCall.step_id)
            .having(func.count() > 1)
        ).all()
        final_ids = set(s.scalars(select(Step.id)))
        n_steps = len(final_ids)
        retried = s.scalar(select(func.count()).select_from(Episode).where(Episode.attempt > 1)) or 0
        max_attempt = s.scalar(select(func.max(Episode.attempt))) or 0
        kinds = {b.kind for b in blocks}
        statuses = {b.status for b in blocks}
        resumes = log.read_text().count("event=block_resume ")

    print(f"\nfault test: {KILLS} SIGKILLs in {elapsed:.0f}s; kill points (kill, steps in store, new steps): "
          f"{kill_points}")
    print(f"blocks {len(blocks)} (episodes, predictions, distinct predicted episodes per block): {per_block}")
    print(f"steps {n_steps}, committed before kills {len(committed_before_kills)}, lost 0 = "
          f"{len(committed_before_kills - final_ids) == 0}, duplicate steps {len(dup_steps)}, duplicate tool calls "
          f"{len(dup_tool_calls)}, episodes retried after a kill {retried} (max attempt {max_attempt}), "
          f"block resumes {resumes}")

    assert kinds == {"train"} and statuses == {"complete"}
    assert len(blocks) >= MIN_BLOCKS
    for bid, (n_ep, n_pred, n_distinct) in per_block.items():
        assert (n_ep, n_pred, n_distinct) == (N, N, N), f"block {bid}"
    assert dup_steps == [] and dup_tool_calls == []
    assert committed_before_kills <= final_ids, f"lost steps: {sorted(committed_before_kills - final_ids)[:20]}"
    assert retried > 0 and resumes > 0  # the kills really interrupted episodes and blocks


@pytest.mark.slow
def test_sigkill_mid_training_resumes_the_same_round_once(tmp_path, tiny_model_dir):
    """Killed while a training round runs: the next start resumes that round from its checkpoint,
    finishes it into exactly one adapter, gates it, and never starts a duplicate round."""
    from store.models import Adapter, TrainingRun

    cfg = write_config(tmp_path, tiny_model_dir, block_size=4)
    cfg.write_text(cfg.read_text()
                   .replace("min_new_episodes = 100000", "min_new_episodes = 4\nepochs = 40\nbatch_size = 1\n"
                            "save_steps = 2")
                   .replace("gate_items = 0", "gate_items = 2"))
    engine = make_engine(db_url(cfg))
    log = tmp_path / "daemon.log"
    runs_dir = tmp_path / "runs"

    def checkpointed():
        return any(runs_dir.glob("run-1/checkpoint-*"))

    proc = start_daemon(cfg, log)
    try:
        wait_for(checkpointed, 400, "a checkpoint of training run 1", proc, log, interval=0.2)
        time.sleep(random.Random(7).uniform(0, 1.0))
    finally:
        kill(proc)
    with session_scope(engine) as s:
        run = s.get(TrainingRun, 1)
        assert run.status == "running" and s.scalar(select(func.count()).select_from(Adapter)) == 0

    proc = start_daemon(cfg, log)

    def gated():
        with session_scope(engine) as s:
            a = s.scalar(select(Adapter).where(Adapter.training_run_id == 1))
            return a is not None and a.status in ("serving", "rejected", "retired")

    try:
        wait_for(gated, 600, "run 1's adapter to be trained and gated", proc, log, interval=0.5)
    finally:
        assert stop(proc) == 0, tail(log)
    text = log.read_text()
    with session_scope(engine) as s:
        run = s.get(TrainingRun, 1)
        adapters = list(s.scalars(select(Adapter).where(Adapter.training_run_id == 1)))
        runs_for_block = [r.id for r in s.scalars(select(TrainingRun)) if set(r.block_ids) & set(run.block_ids)]
    resumed = [ln for ln in text.splitlines() if "event=train_done" in ln and "run=1 " in ln]
    print(f"\nmid-training kill: run 1 {run.status}, adapters from it {len(adapters)} "
          f"({adapters[0].status}), runs over its blocks {runs_for_block}, {resumed[0].split('event=')[1]}")
    assert run.status == "done" and len(adapters) == 1 and runs_for_block == [1]
    assert "event=train_resume" in text
    assert resumed and "resumed_from_step=" in resumed[0]


def _killed_at(cfg, log, point: str, timeout: float = 600) -> float:
    """Start the daemon with a kill point and wait for it to die there; returns the seconds it ran."""
    offset = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    proc = start_daemon(cfg, log, kill_at=point)
    try:
        wait_for(lambda: proc.poll() is not None, timeout, f"the kill at {point}", None, log, interval=0.2)
    finally:
        kill(proc)
    text = log.read_text(errors="replace")[offset:]
    assert proc.returncode == -9 and f"{FAULT_MARK} kill_at={point} " in text, \
        f"daemon exited {proc.returncode} without reaching {point}\n{tail(log)}"
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.timeout(2400)  # six daemon starts; on a loaded 2-core CPU each start alone can take minutes
def test_sigkill_in_resolve_adapter_save_gate_and_publish_loses_and_doubles_nothing(tmp_path, tiny_model_dir):
    """One store, six daemon starts: killed mid-resolve, mid adapter save (temp folder written),
    after the save (folder there, no row), mid-gate, mid-publish (v2 flipped, not committed), then
    a clean start. After each kill: nothing half-published, the serving adapter intact and
    loadable, every reward written once; in the end two rounds, two adapters, v2 serving."""
    from sqlalchemy import func

    from store.models import Adapter, GateDecision, Reward, TrainingRun
    from trainer.errors import TrainerError
    from trainer.registry import check_adapter

    cfg = write_config(tmp_path, tiny_model_dir, block_size=4)
    cfg.write_text(cfg.read_text().replace("min_new_episodes = 100000", "min_new_episodes = 4\nepochs = 1\n"
                                           "batch_size = 2\nsave_steps = 1").replace("gate_items = 0", "gate_items = 2"))
    engine = make_engine(db_url(cfg))
    log = tmp_path / "daemon.log"
    adapters_dir = tmp_path / "adapters"
    seconds: dict[str, float] = {}

    def state():
        with session_scope(engine) as s:
            ads = {a.version: (a.status, a.path) for a in s.scalars(select(Adapter))}
            runs = [(r.id, r.status, r.adapter_version) for r in s.scalars(select(TrainingRun).order_by(TrainingRun.id))]
            rewards = s.scalar(select(func.count()).select_from(Reward)) or 0
            per_pred = s.execute(select(Reward.prediction_id, Reward.reward_version, func.count())
                                 .group_by(Reward.prediction_id, Reward.reward_version).having(func.count() > 1)).all()
            complete = list(s.scalars(select(Block.id).where(Block.status == "complete")))
            unscored = s.scalar(select(func.count()).select_from(Prediction).where(
                Prediction.block_id.in_(complete), ~Prediction.id.in_(select(Reward.prediction_id)))) or 0
            decisions = s.scalar(select(func.count()).select_from(GateDecision)) or 0
            gate_blocks = list(s.scalars(select(Block.status).where(Block.kind == "gate")))
        return ads, runs, rewards, per_pred, unscored, decisions, gate_blocks

    def loadable(path) -> bool:
        try:
            check_adapter(path)
            return True
        except TrainerError:
            return False

    # 1. Mid-resolve: block 1 ran, 2 of its 4 rewards committed.
    seconds["resolve"] = _killed_at(cfg, log, "resolve")
    ads, runs, rewards, dup, _, _, _ = state()
    assert (rewards, dup, ads, runs) == (2, [], {}, [])

    # 2. Mid adapter save: the next start resolves the other 2 (once each), trains round 1, and dies
    #    with the files in a temp folder: no v1 folder, no row.
    seconds["adapter_save"] = _killed_at(cfg, log, "adapter_save")
    ads, runs, rewards, dup, unscored, _, _ = state()
    assert (rewards, dup, unscored, ads, runs) == (4, [], 0, {}, [(1, "running", None)])
    assert not (adapters_dir / "v1").exists() and list(adapters_dir.glob(".v1-*"))

    # 3. After the save: folder v1 complete, no registry row points at it, the round still running.
    seconds["adapter_saved"] = _killed_at(cfg, log, "adapter_saved")
    ads, runs, *_ = state()
    assert (ads, runs) == ({}, [(1, "running", None)]) and loadable(adapters_dir / "v1")

    # 4. Mid-gate: round 1 resumed into exactly one candidate (the leftover folder replaced), the
    #    serving side's gate block ran, then the kill: no decision, nothing serves.
    seconds["gate"] = _killed_at(cfg, log, "gate")
    ads, runs, _, dup, _, decisions, gate_blocks = state()
    assert ads == {1: ("candidate", str(adapters_dir / "v1"))} and runs == [(1, "done", 1)]
    assert (dup, decisions, gate_blocks) == ([], 0, ["complete"]) and loadable(adapters_dir / "v1")

    # 5. Mid-publish of v2: the next start finishes v1's gate (ungated now) and publishes it, runs
    #    block 2, trains round 2 and dies inside the transaction that would make v2 serve.
    cfg.write_text(cfg.read_text().replace("gate_items = 2", "gate_items = 0"))
    seconds["publish"] = _killed_at(cfg, log, "publish:2")
    ads, runs, _, dup, unscored, _, _ = state()
    assert ads[1][0] == "serving" and ads[2][0] == "candidate", ads  # the flip never committed
    assert loadable(ads[1][1]) and loadable(ads[2][1]) and dup == [] and unscored == 0
    assert runs == [(1, "done", 1), (2, "done", 2)]

    # 6. A clean start publishes v2 (recovery) and stops on SIGTERM.
    offset = log.stat().st_size
    t0 = time.monotonic()
    proc = start_daemon(cfg, log)

    def v2_serving():
        try:
            with session_scope(engine) as s:
                return s.scalar(select(Adapter.status).where(Adapter.version == 2)) == "serving"
        except OperationalError:
            return False

    try:
        wait_for(v2_serving, 600, "v2 to serve", proc, log, interval=0.2)
    finally:
        assert stop(proc) == 0, tail(log)
    seconds["clean"] = time.monotonic() - t0
    text = log.read_text(errors="replace")
    ads, runs, rewards, dup, unscored, decisions, _ = state()
    serving = [v for v, (st, _) in ads.items() if st == "serving"]
    leftovers = sorted(p.name for p in adapters_dir.iterdir() if p.name.startswith("."))
    print(f"\nkill points (seconds to the kill): {seconds}; adapters {ads}; runs {runs}; rewards {rewards}, "
          f"duplicated 0 = {not dup}, unscored in complete blocks {unscored}; hidden leftovers {leftovers}; "
          f"train_resume {text.count('event=train_resume')}, gate_resume {text[offset:].count('event=gate_resume')}")
    assert serving == [2] and ads[1][0] == "retired"
    assert all(loadable(path) for _, path in ads.values())
    assert runs == [(1, "done", 1), (2, "done", 2)]  # no round ran twice, none was lost
    assert dup == [] and unscored == 0
    assert {p.name for p in adapters_dir.iterdir() if not p.name.startswith(".")} == {"v1", "v2"}

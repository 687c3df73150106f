"""The real daemon process: one per database (a second exits with a clear message or waits), clean
stop on SIGTERM, and a trigger inserted during a block runs exactly once, after it."""

from __future__ import annotations

import json
import socket

import pytest
from daemon_process import cli, db_url, start_daemon, stop, tail, wait_for, write_config
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from store.db import make_engine, session_scope
from store.lock import read_lock
from store.models import Block, Prediction, Step, Trigger
from store.triggers import enqueue_trigger, get_trigger


def _safe(fn):
    """A poll that tolerates the daemon still creating the schema."""
    def run():
        try:
            return fn()
        except OperationalError:
            return None
    return run


def test_second_daemon_exits_with_who_holds_the_lock_then_waits_and_takes_over(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, block_size=2)
    engine = make_engine(db_url(cfg))
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_daemon(cfg, log_a)
    try:
        wait_for(_safe(lambda: (h := read_lock(engine)) is not None and h.pid == a.pid), 120, "daemon A's lock",
                 a, log_a)
        second = cli(cfg, "daemon")
        assert second.returncode == 1, second.stdout + second.stderr
        msg = " ".join(second.stderr.split())
        assert "another scoreloop daemon is running on this database" in msg
        assert f"pid {a.pid} on {socket.gethostname()}" in msg and "last heartbeat" in msg and "--wait" in msg
        assert read_lock(engine).pid == a.pid  # the refused one changed nothing

        b = start_daemon(cfg, log_b, "--wait")
        try:
            wait_for(lambda: "event=lock_wait" in log_b.read_text(), 120, "B waiting", b, log_b)
            wait_for(lambda: "event=daemon_ready" in log_a.read_text(), 180, "daemon A ready", a, log_a)
            assert stop(a) == 0, tail(log_a)  # SIGTERM: clean exit after the step in flight
            assert "event=daemon_stopped" in log_a.read_text()
            wait_for(_safe(lambda: (h := read_lock(engine)) is not None and h.pid == b.pid), 60,
                     "B taking the lock", b, log_b)
            assert "event=lock_acquired" in log_b.read_text()
        finally:
            assert stop(b) == 0, tail(log_b)
        assert read_lock(engine) is None  # released on a clean stop
    finally:
        stop(a)
        engine.dispose()


def test_trigger_inserted_while_a_block_runs_is_executed_once_after_it(tmp_path, tiny_model_dir):
    # Episodes one at a time, so the first block is surely still running when the trigger lands.
    cfg = write_config(tmp_path, tiny_model_dir, block_size=8, concurrency=1)
    engine = make_engine(db_url(cfg))
    log = tmp_path / "daemon.log"
    proc = start_daemon(cfg, log)
    try:
        def block_in_flight():
            with session_scope(engine) as s:
                b = s.scalar(select(Block).where(Block.status == "running"))
                return b is not None and (s.scalar(select(func.count()).select_from(Step)) or 0) > 0
        wait_for(_safe(block_in_flight), 240, "the first block to be running", proc, log)
        assert enqueue_trigger(engine, "block", {"size": 2}) == 1  # what `scoreloop block trigger` does
        with session_scope(engine) as s:
            first = s.scalar(select(Block).order_by(Block.id))
            assert first.status == "running" and first.trigger_id is None
        st_during = json.loads(cli(cfg, "status", "--json").stdout)
        assert st_during["daemon"]["alive"] and st_during["triggers"][0]["id"] == 1
        wait_for(lambda: get_trigger(engine, 1).status in ("done", "failed"), 400, "the trigger to finish", proc, log)
        # give the daemon a few more polls: a second run of the same trigger would show up now
        st = json.loads(cli(cfg, "status", "--json").stdout)
        assert stop(proc) == 0, tail(log)
        t = get_trigger(engine, 1)
        assert t.status == "done", (t, tail(log))
        with session_scope(engine) as s:
            first = s.get(Block, 1)
            triggered = list(s.scalars(select(Block).where(Block.trigger_id == 1)))
            assert len(triggered) == 1  # exactly once
            tb = triggered[0]
            assert t.result == {"block_id": tb.id} and tb.id > first.id
            assert tb.size == 2 and tb.status == "complete"
            assert s.scalar(select(func.count()).select_from(Prediction).where(Prediction.block_id == tb.id)) == 2
            assert first.status == "complete"
            assert t.started_at >= first.finished_at  # after the block that was running, not interleaved
            assert s.scalar(select(func.count()).select_from(Trigger)) == 1
        assert [x["status"] for x in st["triggers"]] == ["done"]
        text = log.read_text()
        assert text.count("event=trigger_claimed trigger=1") == 1 and "event=trigger_done trigger=1" in text
    finally:
        stop(proc)
        engine.dispose()


@pytest.mark.parametrize("flag", ["--mode"])
def test_daemon_rejects_a_bad_mode_in_one_line(tmp_path, tiny_model_dir, flag):
    cfg = write_config(tmp_path, tiny_model_dir)
    out = cli(cfg, "daemon", flag, "weekly")
    assert out.returncode == 1
    assert "scheduler.mode" in out.stderr and "Traceback" not in out.stderr

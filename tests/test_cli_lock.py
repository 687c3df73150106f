"""CLI commands that write (train, resolve, block run, block run --resume, eval) hold the daemon lock
while they run, and refuse with one clear line while a daemon holds it, writing nothing."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select
from trainer_fixtures import add_block
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.daemon import LockKeeper
from store.db import open_store, session_scope
from store.lock import read_lock
from store.models import Block, Episode, EvalRun, LockEpoch, Reward, TrainingRun

runner = CliRunner()

COMMANDS = {
    "train": ["train"],
    "resolve": ["resolve"],
    "block run": ["block", "run", "--size", "2"],
    "block run --resume": ["block", "run", "--resume", "{running}"],
    "eval": ["eval", "--adapter", "base", "--items", "2", "--targets", "0.2,0.8"],
}


def _counts(engine) -> dict[str, int]:
    with session_scope(engine) as s:
        return {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (Block, Episode, Reward, TrainingRun, EvalRun)}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_writing_command_refuses_while_a_daemon_holds_the_lock(sqlite_url, command):
    engine = open_store(sqlite_url)
    add_block(engine, [0.2, 0.6, 0.9, 0.4])  # scored: something to train on
    add_block(engine, [0.5, 0.5], unscored=[0, 1])  # pending: something to resolve
    running, _ = add_block(engine, [0.3, 0.7], status="running")  # interrupted: something to resume
    before = _counts(engine)
    # A live daemon: its heartbeat thread keeps the lock fresh however slowly the command starts.
    daemon = LockKeeper(open_store(sqlite_url), heartbeat_s=0.5, ttl_s=30, stop=threading.Event())
    daemon.acquire()
    try:
        args = [a.format(running=running) for a in COMMANDS[command]]
        res = runner.invoke(app, ["--db", sqlite_url, *args])

        assert res.exit_code == 1, res.output
        line = " ".join(res.output.split())
        assert f"error: `scoreloop {command}` writes to this database, and {daemon.owner} (pid" in line
        assert "holds the daemon lock" in line and "Stop that process first" in line
        assert _counts(engine) == before  # nothing written
        with session_scope(engine) as s:
            assert s.get(Block, running).status == "running"
        holder = read_lock(engine)
        assert (holder.owner, holder.epoch) == (daemon.owner, 1)  # the daemon's lock untouched
    finally:
        daemon.release()


def test_a_writing_command_takes_the_lock_and_gives_it_back(sqlite_url):
    engine = open_store(sqlite_url)
    add_block(engine, [0.5, 0.5], unscored=[0, 1])
    res = runner.invoke(app, ["--db", sqlite_url, "resolve"])
    assert res.exit_code == 0, res.output
    assert read_lock(engine) is None  # released
    with session_scope(engine) as s:
        assert s.get(LockEpoch, "daemon").epoch == 1  # it was taken once, fenced at epoch 1

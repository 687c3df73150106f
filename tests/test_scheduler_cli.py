"""`scoreloop block trigger` and `scoreloop status` against a real store, with and without a live daemon."""

from __future__ import annotations

import json
import os

from typer.testing import CliRunner

from scheduler.cli import app
from store.db import open_store
from store.lock import age_lock, heartbeat, try_acquire_lock
from store.triggers import get_trigger

runner = CliRunner()


def _cli(url: str, *args: str):
    return runner.invoke(app, ["--db", url, *args], catch_exceptions=False)


def test_trigger_without_daemon_is_queued_and_says_so(sqlite_url):
    res = _cli(sqlite_url, "block", "trigger", "--size", "3")
    assert res.exit_code == 0, res.output
    assert "trigger 1 queued" in res.output
    assert "no daemon is running" in res.output and "scoreloop block run --size 3" in res.output
    engine = open_store(sqlite_url)
    t = get_trigger(engine, 1)
    assert t.status == "queued" and t.params == {"size": 3}
    st = json.loads(_cli(sqlite_url, "status", "--json").output)
    assert st["daemon"] is None
    assert [(x["id"], x["status"], x["params"]) for x in st["triggers"]] == [(1, "queued", {"size": 3})]
    assert st["pending_predictions"] == 0 and st["last_block"] is None and st["serving_adapter"] is None


def test_status_shows_a_live_daemon_and_its_job_then_a_dead_one(sqlite_url):
    engine = open_store(sqlite_url)
    assert try_acquire_lock(engine, "daemon-test", ttl_s=30) is None
    heartbeat(engine, "daemon-test", current_job="block (train, 5 items)")
    st = json.loads(_cli(sqlite_url, "status", "--json").output)
    assert st["daemon"]["alive"] is True and st["daemon"]["pid"] == os.getpid()
    assert st["daemon"]["current_job"] == "block (train, 5 items)"
    res = _cli(sqlite_url, "block", "trigger")
    assert "will run it next" in res.output and "no daemon" not in res.output
    table = _cli(sqlite_url, "status").output
    assert "running" in table and "block (train, 5 items)" in table and "queued" in table
    age_lock(engine, 3600)  # killed an hour ago
    st = json.loads(_cli(sqlite_url, "status", "--json").output)
    assert st["daemon"]["alive"] is False and st["daemon"]["heartbeat_age_s"] >= 3600
    assert "not running" in _cli(sqlite_url, "status").output


def test_status_on_an_uninitialised_database_says_to_init(tmp_path):
    res = runner.invoke(app, ["--db", f"sqlite:///{tmp_path / 'none.db'}", "status"])
    assert res.exit_code == 1
    assert "scoreloop init" in res.output


def test_status_shows_a_failed_round_without_a_loss_curve_or_label_figures(sqlite_url):
    """A round that failed before its first step (or one written before runs recorded `label_research`) has no
    loss and no label figures: status shows its state and error, with `-` for the loss, and no labels line."""
    from rich.console import Console

    from scheduler.status import collect_status, render_status
    from store.db import session_scope
    from store.training import create_training_run, fail_training_run

    engine = open_store(sqlite_url)
    with session_scope(engine) as s:
        run = create_training_run(s, objective="sft", parent_version=None, block_ids=[1], replay_episode_ids=[],
                                  n_examples=12, hyperparams={"label_format": "score"})
        fail_training_run(s, run.id, "out of memory while training; lower trainer.batch_size")
    st = collect_status(engine, ttl_s=30)
    assert st["last_training"]["status"] == "failed" and st["last_training"]["label_research"] is None
    console = Console(record=True, width=250)
    render_status(st, console)
    text = console.export_text()
    assert ("run 1 sft failed: 12 examples, 0 logged steps, final loss - (out of memory while training; lower "
            "trainer.batch_size)") in text
    assert "nats about the first tool call" not in text


def test_counts_read_singular_for_one():
    """The default round trains a small block's top quartile, so one example is a common count: the CLI and the
    status say "1 example" and "12 examples"."""
    from scheduler.status import counted

    assert [counted(n, "example") for n in (0, 1, 12)] == ["0 examples", "1 example", "12 examples"]

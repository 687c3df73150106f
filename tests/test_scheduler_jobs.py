"""APScheduler wiring: jobs persist in the store's own database, keep their schedule across restarts,
live mode fires on New York cron times, and the executor never runs two jobs at once."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC
from zoneinfo import ZoneInfo

from sqlalchemy import inspect, text

from scheduler import jobs
from scheduler.daemon import build_scheduler, drain
from scheduler.logs import format_event
from scheduler.runtime import Runtime
from scheduler.settings import load_settings

_SPANS: list[tuple[str, float, float]] = []
_LOCK = threading.Lock()


def _record(name: str) -> None:
    t0 = time.monotonic()
    time.sleep(0.2)
    with _LOCK:
        _SPANS.append((name, t0, time.monotonic()))


def _settings(url: str, **scheduler):
    return load_settings(None, database_url=url, scheduler=scheduler)


def test_jobs_persist_in_the_same_database_and_survive_a_restart(fresh_db):
    url = fresh_db.url.render_as_string(hide_password=False)
    rt = Runtime(settings=_settings(url, mode="live"), engine=fresh_db)
    sched = build_scheduler(rt, "k")
    try:
        assert {j.id for j in sched.get_jobs()} == {"block", "resolve", "triggers"}
        block = sched.get_job("block")
        nxt = block.next_run_time.astimezone(ZoneInfo("America/New_York"))
        assert (nxt.hour, nxt.minute) == (10, 0) and nxt.weekday() < 5  # "0 10 * * mon-fri" in New York
        resolve = sched.get_job("resolve").next_run_time.astimezone(ZoneInfo("America/New_York"))
        assert (resolve.hour, resolve.minute) == (16, 30)
        first_next = block.next_run_time
    finally:
        sched.shutdown(wait=False)
    assert "apscheduler_jobs" in inspect(fresh_db).get_table_names()
    with fresh_db.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM apscheduler_jobs")).scalar() == 3
    # a restart with the same settings keeps the stored schedule (a missed live run still fires once)
    sched = build_scheduler(rt, "k")
    try:
        assert sched.get_job("block").next_run_time == first_next
    finally:
        sched.shutdown(wait=False)
    # changed settings replace the stored job
    rt2 = Runtime(settings=_settings(url, mode="live", block_cron="15 11 * * mon-fri"), engine=fresh_db)
    sched = build_scheduler(rt2, "k")
    try:
        nxt = sched.get_job("block").next_run_time.astimezone(ZoneInfo("America/New_York"))
        assert (nxt.hour, nxt.minute) == (11, 15)
    finally:
        sched.shutdown(wait=False)


def test_replay_block_job_starts_at_once_and_jobs_never_overlap(sqlite_db):
    url = sqlite_db.url.render_as_string(hide_password=False)
    rt = Runtime(settings=_settings(url, mode="replay", block_interval_s=3600, trigger_poll_s=0.05),
                      engine=sqlite_db)
    sched = build_scheduler(rt, "k")
    try:
        nxt = sched.get_job("block").next_run_time
        assert abs((nxt - nxt.now(UTC)).total_seconds()) < 5
        # swap in a module-level recorder (jobs must stay serialisable): the single worker serialises them
        for job_id in ("block", "resolve", "triggers"):
            sched.modify_job(job_id, func=_record, args=(job_id,))
        sched.modify_job("resolve", next_run_time=nxt)
        sched.resume()
        time.sleep(1.5)
    finally:
        sched.shutdown(wait=True)
    names = {s[0] for s in _SPANS}
    assert {"block", "resolve", "triggers"} <= names
    ordered = sorted(_SPANS, key=lambda s: s[1])
    for (_, _, end), (_, start, _) in itertools.pairwise(ordered):
        assert start >= end - 1e-3  # one job at a time


def _job_in_flight(key: str) -> None:
    rt = jobs._RUNTIMES[key]
    with rt.job_lock:  # like jobs._run_job: a block step that takes a while to return after stop
        time.sleep(0.8)


def _poll(key: str) -> None:
    pass


def test_stopping_during_a_job_drains_it_without_a_scheduler_error(sqlite_db, caplog):
    """Ctrl-C while a block runs: the block returns, no due job is submitted to the closed executor."""
    url = sqlite_db.url.render_as_string(hide_password=False)
    rt = Runtime(settings=_settings(url, mode="replay", block_interval_s=3600, trigger_poll_s=0.02),
                      engine=sqlite_db, stop=threading.Event())
    jobs.register_runtime("drain", rt)
    sched = build_scheduler(rt, "drain")
    try:
        sched.modify_job("block", func=_job_in_flight, args=("drain",))
        sched.modify_job("triggers", func=_poll, args=("drain",))
        sched.resume()
        time.sleep(0.3)  # the block job holds the only worker; triggers keep coming due every 20 ms
        assert rt.job_lock.locked()
        rt.stop.set()
        with caplog.at_level("DEBUG", logger="apscheduler"):
            drain(sched, rt)
    finally:
        jobs.unregister_runtime("drain")
    assert not rt.job_lock.locked()  # the job in flight finished before shutdown returned
    assert "Scheduler has been shut down" in caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == []


def test_log_lines_are_single_line_key_value():
    line = format_event("block_done", block=3, accuracy=0.53125, note='two words "quoted"\nnext', empty=None)
    assert line == 'event=block_done block=3 accuracy=0.5312 note="two words \\"quoted\\"\\nnext"'
    assert "\n" not in line

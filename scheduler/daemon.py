"""`scoreloop daemon`: one per database, holding a heartbeat lock, running jobs one at a time.

Start-up order: take the lock, finish what a killed daemon left (recover), then let APScheduler
fire the block / resolve / trigger jobs from its persistent job store in the same database. The
executor has a single worker, so jobs queue instead of overlapping. SIGTERM/SIGINT set a stop
flag that the block runner checks between steps; a second signal exits at once (the store is
crash-safe, so the next start resumes).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import Engine

from scheduler import jobs
from scheduler.logs import log_event, setup_daemon_output
from scheduler.recovery import recover
from scheduler.runtime import Runtime, Stopped, scheduled_block_size
from scheduler.settings import Settings
from store.db import open_store
from store.errors import ScoreloopError
from store.lock import (
    EpochFence,
    LockHolder,
    LockLost,
    fence_engine,
    new_owner_id,
    release_lock,
    take_over,
    try_acquire_lock,
    unfence_engine,
)
from store.lock import heartbeat as write_heartbeat

NEW_YORK = ZoneInfo("America/New_York")
JOBSTORE_TABLE = "apscheduler_jobs"

EXIT_OK = 0
EXIT_LOCK_LOST = 4


class DaemonLockHeld(ScoreloopError, RuntimeError):
    """Another live daemon (or `scoreloop loop`) owns this database."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM  # exists but belongs to someone else
    return True


def holder_is_dead_here(holder: LockHolder) -> bool:
    """A holder on this host whose process is gone can be replaced without waiting for the TTL."""
    return holder.host == socket.gethostname() and holder.pid != os.getpid() and not pid_alive(holder.pid)


class LockKeeper:
    """Takes the daemon lock and keeps its heartbeat fresh from a thread of its own (so a long
    block or training round never lets it go stale); sets `stop` if the lock is lost.

    While it holds the lock its engine is fenced with the lock's epoch (store.lock.EpochFence):
    once another process has taken over, every write on the engine is refused, not only noticed
    at the next heartbeat."""

    def __init__(self, engine: Engine, *, heartbeat_s: float, ttl_s: float, stop: threading.Event,
                 role: str = "daemon") -> None:
        self.engine, self.heartbeat_s, self.ttl_s, self.stop = engine, heartbeat_s, ttl_s, stop
        self.owner = new_owner_id(role)
        self.lost = False
        self.fence: EpochFence | None = None
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            log_event("lock_lost", logging.ERROR, owner=self.owner, hint=why)
        self.stop.set()

    def try_acquire(self) -> LockHolder | None:
        holder = try_acquire_lock(self.engine, self.owner, ttl_s=self.ttl_s)
        if holder is not None and holder_is_dead_here(holder):
            if take_over(self.engine, self.owner, from_owner=holder.owner):
                log_event("lock_taken_over", previous=holder.owner, previous_pid=holder.pid, reason="process gone")
                return None
            holder = try_acquire_lock(self.engine, self.owner, ttl_s=self.ttl_s)
        return holder

    def acquire(self, *, wait: bool = False, refusal: Callable[[LockHolder], str] | None = None) -> None:
        """Take the lock or raise DaemonLockHeld (its message from `refusal(holder)` if given); with
        `wait`, poll until it is free (or stop is set)."""
        announced = False
        while True:
            holder = self.try_acquire()
            if holder is None:
                try:
                    self.fence = fence_engine(self.engine, self.owner, on_lost=self._lose)
                except LockLost:  # taken over between our claim and our read: try again
                    continue
                log_event("lock_acquired", owner=self.owner, pid=os.getpid(), host=socket.gethostname(),
                          epoch=self.fence.epoch)
                self._start()
                return
            if not wait:
                if refusal is not None:
                    raise DaemonLockHeld(refusal(holder))
                raise DaemonLockHeld(
                    f"another scoreloop daemon is running on this database: {holder.describe()}. "
                    f"Stop it first, use `scoreloop daemon --wait` to take over when it stops, or "
                    f"`scoreloop block trigger` to ask it for a block."
                )
            if not announced:
                log_event("lock_wait", holder=holder.owner, holder_pid=holder.pid, holder_host=holder.host,
                          heartbeat_age_s=round(holder.age_s(), 1))
                announced = True
            if self.stop.wait(min(self.heartbeat_s, 2.0)):
                raise DaemonLockHeld("stopped while waiting for the daemon lock")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="scoreloop-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        last_ok = time.monotonic()
        while not self._quit.wait(self.heartbeat_s):
            try:
                ok = write_heartbeat(self.engine, self.owner)
            except Exception as err:  # noqa: BLE001 - a busy or briefly unreachable database: retry next beat
                log_event("heartbeat_failed", logging.WARNING, error=f"{type(err).__name__}: {err}",
                          since_ok_s=round(time.monotonic() - last_ok, 1))
                continue
            if not ok:
                self._lose("another daemon took over after our heartbeat went stale; stopping")
                return
            last_ok = time.monotonic()

    def release(self) -> None:
        self._quit.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        unfence_engine(self.engine, self.fence)
        if not self.lost:
            try:
                release_lock(self.engine, self.owner)
            except Exception as err:  # noqa: BLE001 - best effort; the lock goes stale anyway
                log_event("lock_release_failed", logging.WARNING, error=str(err))


@contextmanager
def command_lock(engine: Engine, settings: Settings, command: str, hint: str = "") -> Iterator[LockKeeper]:
    """Hold the daemon lock while a CLI command writes, fenced like a daemon, so the command and a
    daemon never write at once; while a daemon (or another writing command) holds it, refuse with
    DaemonLockHeld naming the holder. Released on return, error or Ctrl-C."""
    sc = settings.scheduler
    keeper = LockKeeper(engine, heartbeat_s=sc.heartbeat_s, ttl_s=sc.lock_ttl_s, stop=threading.Event(),
                        role=command.split()[0])

    def refusal(holder: LockHolder) -> str:
        return (f"`scoreloop {command}` writes to this database, and {holder.describe()} holds the daemon "
                f"lock: running both would race on the same rows. Stop that process first (SIGTERM or Ctrl-C; "
                f"it finishes the step in flight){'; ' + hint if hint else ''}.")

    keeper.acquire(wait=False, refusal=refusal)
    try:
        write_heartbeat(engine, keeper.owner, current_job=f"scoreloop {command}")
        yield keeper
    finally:
        keeper.release()


def _progress_lines(engine: Engine, every_s: float, quit: threading.Event) -> None:
    """While a block runs, log `block_progress` every `every_s` so a long block is visibly alive."""
    from store.db import session_scope
    from store.status import running_block_progress

    while not quit.wait(every_s):
        try:
            with session_scope(engine) as s:
                p = running_block_progress(s)
        except Exception:  # noqa: BLE001, S112 - progress lines are a courtesy; the heartbeat reports trouble
            continue
        if p is None:
            continue
        age = (datetime.now(UTC) - p.created_at).total_seconds()
        log_event("block_progress", block=p.id, kind=p.kind, episodes_done=f"{p.done}/{p.size}",
                  steps=p.steps, elapsed_s=round(age))


def _triggers(settings: Settings) -> dict[str, object]:
    """APScheduler triggers for each job id, from [scheduler]."""
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    sc = settings.scheduler
    if sc.mode == "live":
        block = CronTrigger.from_crontab(sc.block_cron, timezone=NEW_YORK)
        resolve = CronTrigger.from_crontab(sc.resolve_cron, timezone=NEW_YORK)
    else:
        block = IntervalTrigger(seconds=sc.block_interval_s, timezone=UTC)
        resolve = IntervalTrigger(seconds=sc.resolve_interval_s, timezone=UTC)
    return {"block": block, "resolve": resolve,
            "triggers": IntervalTrigger(seconds=sc.trigger_poll_s, timezone=UTC)}


JOB_FUNCS = {"block": jobs.scheduled_block, "resolve": jobs.scheduled_resolve, "triggers": jobs.poll_triggers}


def _scheduler_class():
    """BackgroundScheduler that does not process jobs once shutdown has begun.

    APScheduler's `shutdown()` sets the state to stopped and only then waits for the executor; a
    scheduler thread woken in that window is no longer paused, so it submits a due job to the
    closed executor and logs `Error submitting job` on every Ctrl-C that lands during a job.
    """
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.base import STATE_STOPPED

    class DrainingScheduler(BackgroundScheduler):
        def _process_jobs(self):
            if self.state == STATE_STOPPED:
                return None
            return super()._process_jobs()

    return DrainingScheduler


def build_scheduler(rt: Runtime, key: str):
    """A BackgroundScheduler with its jobs in the store's own database and one worker thread."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    sched = _scheduler_class()(
        jobstores={"default": SQLAlchemyJobStore(engine=rt.engine, tablename=JOBSTORE_TABLE)},
        executors={"default": ThreadPoolExecutor(max_workers=1)},
        # A run missed while a long block held the only worker (or while the daemon was down) runs
        # once, late, instead of being dropped or piling up.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=UTC,
    )
    sched.start(paused=True)
    now = datetime.now(UTC)
    for job_id, trigger in _triggers(rt.settings).items():
        func = JOB_FUNCS[job_id]
        existing = sched.get_job(job_id)
        same = (existing is not None and str(existing.trigger) == str(trigger) and existing.args == (key,)
                and existing.func is func)
        if not same:  # new database or changed [scheduler] settings
            sched.add_job(func, trigger, args=(key,), id=job_id, name=job_id, replace_existing=True)
        if job_id == "block" and rt.settings.scheduler.mode == "replay":
            sched.modify_job(job_id, next_run_time=now)  # a replay daemon starts working at once
        job = sched.get_job(job_id)
        log_event("job_scheduled", job=job_id, trigger=str(trigger), kept=same,
                  next_run=job.next_run_time.isoformat(timespec="seconds") if job and job.next_run_time else None)
    return sched


def drain(sched, rt: Runtime) -> None:
    """Stop the scheduler after the job in flight returns (see _scheduler_class for the race).

    Pause, wake the thread once so it parks without a timer, wait for the running job (jobs hold
    rt.job_lock; rt.stop is set, so it returns after its step in flight), then shut down.
    """
    sched.pause()
    sched.wakeup()
    with rt.job_lock:  # released at once: holding it would block a queued job that shutdown waits for
        pass
    sched.shutdown(wait=True)  # queued jobs see rt.stop and return at once


def _install_signals(stop: threading.Event) -> None:
    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if stop.is_set():
            log_event("daemon_exit_now", signal=name)
            logging.shutdown()
            os._exit(130)
        log_event("daemon_stopping", signal=name, hint="finishing the step in flight; signal again to exit now")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run_daemon(settings: Settings, *, wait: bool = False, progress: bool = False,
               stop: threading.Event | None = None) -> int:
    """Run until a signal (or max_blocks); returns the process exit code. Raises DaemonLockHeld."""
    setup_daemon_output()
    stop = stop or threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        _install_signals(stop)
    sc = settings.scheduler
    engine = open_store(settings.database_url, settings.store)
    key = engine.url.render_as_string(hide_password=True)
    keeper = LockKeeper(engine, heartbeat_s=sc.heartbeat_s, ttl_s=sc.lock_ttl_s, stop=stop)
    keeper.acquire(wait=wait)
    rt = Runtime(settings=settings, engine=engine, stop=stop, owner=keeper.owner, progress=progress)
    sched = None
    log_event("daemon_start", db=key, mode=sc.mode, pid=os.getpid(), block_size=scheduled_block_size(settings),
              model=settings.agent.model, market=settings.market.source)
    if sc.progress_log_s > 0:
        threading.Thread(target=_progress_lines, args=(engine, sc.progress_log_s, stop), daemon=True,
                         name="scoreloop-progress").start()
    try:
        rt.set_job("loading model")
        rt.open()
        jobs.register_runtime(key, rt)
        rt.set_job("recovering")
        try:
            recover(rt)
        except Stopped:
            log_event("recover_stopped", hint="the interrupted work resumes at the next start")
        except Exception as err:  # noqa: BLE001 - keep serving; the interrupted work is retried next start
            log_event("recover_failed", logging.ERROR, error=f"{type(err).__name__}: {err}")
        rt.set_job(None)
        if not stop.is_set():
            sched = build_scheduler(rt, key)
            sched.resume()
            log_event("daemon_ready", hint="scoreloop status / scoreloop block trigger from another shell")
        while not stop.wait(0.5):
            pass
    finally:
        if sched is not None:
            drain(sched, rt)
        jobs.unregister_runtime(key)
        rt.close()
        keeper.release()
        engine.dispose()
        log_event("daemon_stopped", blocks=rt.blocks_run, lock_lost=keeper.lost or None)
    return EXIT_LOCK_LOST if keeper.lost else EXIT_OK

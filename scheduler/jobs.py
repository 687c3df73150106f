"""The job callables APScheduler stores: module-level functions that take one string key.

A key is serialisable into the persistent job store; the live process state (policy, market,
stop flag) is found through it in a registry the daemon fills at start. The work itself is in
scheduler/steps.py and scheduler/recovery.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from scheduler.logs import log_event
from scheduler.recovery import triggers_step
from scheduler.runtime import Runtime, Stopped
from scheduler.steps import cycle, resolve_step, run_block_step, train_and_publish

_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(key: str, rt: Runtime) -> None:
    _RUNTIMES[key] = rt


def unregister_runtime(key: str) -> None:
    _RUNTIMES.pop(key, None)


def _run_job(key: str, name: str, fn: Callable[[Runtime], object], *, quiet: bool = False) -> None:
    rt = _RUNTIMES.get(key)
    if rt is None or rt.stop.is_set():
        return
    with rt.job_lock:  # belt and braces: the executor has one worker, so jobs never overlap anyway
        if rt.stop.is_set():
            return
        t0 = time.monotonic()
        if not quiet:
            log_event("job_start", job=name)
        try:
            fn(rt)
        except Stopped:
            log_event("job_stopped", job=name)
        except Exception as err:
            log_event("job_failed", logging.ERROR, job=name, error=f"{type(err).__name__}: {err}",
                      seconds=round(time.monotonic() - t0, 1))
            logging.getLogger("scoreloop").debug("job traceback", exc_info=True)
        else:
            if not quiet:
                log_event("job_end", job=name, seconds=round(time.monotonic() - t0, 1))
        finally:
            rt.set_job(None)


def _block(rt: Runtime) -> None:
    if rt.settings.scheduler.mode == "replay":
        res = cycle(rt)  # outcomes are known at once in replay: resolve and train right after the block
        log_event("round_done", block=res.block.block_id, trained=res.trained, serving=res.serving_version,
                  skipped="; ".join(res.skipped) or None)
    else:
        run_block_step(rt)  # counts the block in rt.blocks_run once it is complete
    limit = rt.settings.scheduler.max_blocks
    if limit and rt.blocks_run >= limit and not rt.stop.is_set():
        log_event("max_blocks_reached", blocks=rt.blocks_run)
        rt.stop.set()


def _resolve(rt: Runtime) -> None:
    """Live mode: resolve after the close, then train, gate and publish if enough is new."""
    if resolve_step(rt).scored and not rt.stop.is_set():
        train_and_publish(rt)


def scheduled_block(key: str) -> None:
    """APScheduler job: one scheduled block (replay: with its resolve and training round)."""
    _run_job(key, "block", _block)


def scheduled_resolve(key: str) -> None:
    """APScheduler job: resolve due outcomes, then train if enough new episodes are scored."""
    _run_job(key, "resolve", _resolve)


def poll_triggers(key: str) -> None:
    """APScheduler job: run queued manual triggers (silent when there are none)."""
    _run_job(key, "triggers", triggers_step, quiet=True)

"""Manual triggers and recovery: run queued `scoreloop block trigger` requests exactly once, and
finish what a killed process left (interrupted blocks, claimed triggers, training, gate)."""

from __future__ import annotations

import logging
import time

from scheduler.logs import log_event
from scheduler.runtime import Runtime, Stopped, version_label
from scheduler.steps import (
    finished_block,
    gate_step,
    publish_step,
    resolve_step,
    run_block_step,
    train_and_publish,
)
from store.db import session_scope
from store.status import BlockRow, block_row, candidate_adapters
from store.triggers import claim_next_trigger, fail_trigger, finish_trigger, list_triggers, requeue_trigger


def triggers_step(rt: Runtime) -> int:
    """Run queued manual triggers, oldest first, each exactly once; returns how many ran."""
    ran = 0
    while not rt.stop.is_set():
        t = claim_next_trigger(rt.engine)
        if t is None:
            return ran
        ran += 1
        log_event("trigger_claimed", trigger=t.id, kind=t.kind, params=t.params)
        if t.kind != "block":
            fail_trigger(rt.engine, t.id, f"unknown trigger kind {t.kind!r}")
            log_event("trigger_failed", logging.WARNING, trigger=t.id, error="unknown kind")
            continue
        try:
            size = t.params.get("size")
            block = run_block_step(rt, size=int(size) if size else None, trigger_id=t.id)
        except Stopped:
            requeue_trigger(rt.engine, t.id)
            log_event("trigger_requeued", trigger=t.id, reason="stopping")
            return ran - 1
        except Exception as err:  # noqa: BLE001 - recorded on the trigger; the daemon goes on
            fail_trigger(rt.engine, t.id, f"{type(err).__name__}: {err}")
            log_event("trigger_failed", logging.ERROR, trigger=t.id, error=f"{type(err).__name__}: {err}")
            continue
        _finish_trigger(rt, t.id, block.block_id, block.complete)
    return ran


def _finish_trigger(rt: Runtime, trigger_id: int, block_id: int, complete: bool, *, recovered: bool = False) -> None:
    if complete:
        finish_trigger(rt.engine, trigger_id, {"block_id": block_id})
        log_event("trigger_done", trigger=trigger_id, block=block_id, recovered=recovered or None)
    else:  # stopped mid-block: the trigger stays running and the next start resumes its block
        log_event("trigger_interrupted", trigger=trigger_id, block=block_id)


def resume_unfinished(rt: Runtime) -> list[int]:
    """Finish blocks left `running` (killed or failed mid-block), oldest first, each with the adapter
    it started with. A block that fails again is skipped for the rest of this process's life."""
    from agent.runner import resume_block
    from store.traces import unfinished_block_ids

    s = rt.settings
    with session_scope(rt.engine) as sess:
        pending: list[BlockRow] = [block_row(sess, b) for b in unfinished_block_ids(sess)
                                   if b not in rt.failed_blocks]
    if not pending:
        return []
    done: list[int] = []
    for row in pending:
        if rt.stop.is_set():
            break
        rt.set_job(f"resume block {row.id}")
        rt.serve_version(row.adapter_version)
        log_event("block_resume", block=row.id, kind=row.kind, adapter=version_label(row.adapter_version))
        t0 = time.monotonic()
        try:
            resume_block(rt.engine, row.id, rt.policy, rt.market, s.agent, s.rewards, progress=rt.progress,
                         stop=rt.stop)
        except Exception as err:  # noqa: BLE001 - one bad block must not stop the recovery of others
            rt.failed_blocks.add(row.id)
            log_event("block_failed", logging.ERROR, block=row.id, error=f"{type(err).__name__}: {err}")
            finished_block(rt, row.id, time.monotonic() - t0)
            continue
        block = finished_block(rt, row.id, time.monotonic() - t0)
        done.append(row.id)
        if row.trigger_id is not None:
            _finish_trigger(rt, row.trigger_id, row.id, block.complete)
    rt.serve_published()
    return done


def recover(rt: Runtime) -> None:
    """Finish what a killed process left: interrupted blocks, claimed triggers, training, gate, resolve."""
    from store.status import block_for_trigger
    from store.training import running_training_run

    s = rt.settings
    resume_unfinished(rt)
    if rt.stop.is_set():
        return
    with session_scope(rt.engine) as sess:
        claimed = list_triggers(sess, ("running",), limit=1000)
        blocks = {t.id: block_for_trigger(sess, t.id) for t in claimed}
        interrupted_training = running_training_run(sess, s.trainer.objective) is not None
        ungated = candidate_adapters(sess)
    for t in claimed:
        b = blocks[t.id]
        if b is None:
            requeue_trigger(rt.engine, t.id)  # died before its block existed: it runs again, once
            log_event("trigger_requeued", trigger=t.id)
        elif b.complete:
            _finish_trigger(rt, t.id, b.id, True, recovered=True)
    rt.serve_published()
    if interrupted_training and not rt.stop.is_set():
        log_event("train_resume")
        train_and_publish(rt)
    for path, version in ungated:
        if rt.stop.is_set():
            return
        log_event("gate_resume", candidate=version_label(version))
        gate = gate_step(rt, version, path)
        if gate is not None:
            publish_step(rt, gate)
    if not rt.stop.is_set():
        resolve_step(rt)
    if not rt.stop.is_set():
        train_and_publish(rt)

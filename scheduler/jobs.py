"""The steps the daemon and `scoreloop loop` run (block, resolve, train + gate, triggers, recovery)
and the module-level job callables APScheduler stores.

Thin on purpose: each step calls into agent / scoring.resolve / trainer and logs one line.
Jobs take only a string key (serialisable into the persistent job store) and find the live
process state (policy, market, stop flag) in a registry the daemon fills at start.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from sqlalchemy import Engine

from scheduler.logs import log_event
from scheduler.settings import Settings
from store.db import session_scope
from store.lock import heartbeat
from store.status import block_for_trigger, block_row, block_summary, candidate_adapters, scored_block_ids
from store.triggers import claim_next_trigger, fail_trigger, finish_trigger, list_triggers, requeue_trigger


@dataclass
class Runtime:
    """What a running daemon or loop holds for its whole life: one policy, one market, one stop flag."""

    settings: Settings
    engine: Engine
    stop: threading.Event = field(default_factory=threading.Event)
    owner: str | None = None  # lock owner id; current_job is written to the lock row under it
    progress: bool = False
    market: Any = None
    policy: Any = None
    base_model_dir: str | None = None
    blocks_run: int = 0
    current_job: str | None = None
    failed_blocks: set[int] = field(default_factory=set)
    job_lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self) -> Runtime:
        """Build the market and the policy once (the policy starts on the serving adapter)."""
        from market.sources import build_market
        from policy.backends import build_policy
        from policy.model_files import resolve_model
        from trainer.registry import serving_adapter

        s = self.settings
        self.market = build_market(s.market, self.engine)
        with session_scope(self.engine) as sess:
            serving = serving_adapter(sess)
        if s.agent.backend == "local":
            self.base_model_dir = resolve_model(s.agent.model, s.agent.model_cache_dir)
        else:
            self.base_model_dir = s.agent.model
        t0 = time.monotonic()
        self.policy = build_policy(s.agent, serving)
        log_event("policy_ready", backend=s.agent.backend, model=s.agent.model,
                  adapter=_version_label(self.policy.adapter_version), load_s=round(time.monotonic() - t0, 2))
        return self

    def close(self) -> None:
        if self.policy is not None:
            self.policy.close()
            self.policy = None

    def set_job(self, name: str | None) -> None:
        """Show what we are doing in daemon_lock.current_job (also refreshes the heartbeat)."""
        if name == self.current_job:
            return
        self.current_job = name
        if self.owner is not None:
            try:
                heartbeat(self.engine, self.owner, current_job=name)
            except Exception as err:  # noqa: BLE001 - status display only; the heartbeat reports trouble
                log_event("current_job_not_saved", logging.WARNING, job=name, error=str(err))


class Stopped(Exception):
    """The stop flag was set before a step could start."""


def _version_label(version: int | None) -> str:
    return "base" if version is None else f"v{version}"


def scheduled_block_size(settings: Settings) -> int:
    """Items per daemon/loop block: [scheduler].block_size if set, else [agent].block_size."""
    return settings.scheduler.block_size or settings.agent.block_size


# ---- adapters ----------------------------------------------------------------------------------


def sync_adapter(rt: Runtime) -> None:
    """Load the serving adapter into the policy if another version serves now (between blocks only)."""
    from trainer.registry import serving_adapter

    with session_scope(rt.engine) as s:
        serving = serving_adapter(s)
    path, version = serving if serving is not None else (None, None)
    if rt.policy.adapter_version != version:
        _load(rt, path, version)


def _load(rt: Runtime, path: str | None, version: int | None) -> None:
    if rt.policy.adapter_version == version:
        return
    t0 = time.monotonic()
    rt.policy.load_adapter(path, version)
    log_event("adapter_loaded", adapter=_version_label(version), path=path, load_s=round(time.monotonic() - t0, 2))


def _load_version(rt: Runtime, version: int | None) -> None:
    """Load a specific adapter version (the one an interrupted block started with)."""
    from store.training import adapter_row

    if version is None:
        _load(rt, None, None)
        return
    with session_scope(rt.engine) as s:
        row = adapter_row(s, version)
        path = row.path if row is not None else None
    if path is None:
        log_event("adapter_missing", logging.WARNING, adapter=_version_label(version))
        return
    _load(rt, path, version)


# ---- steps -------------------------------------------------------------------------------------


def block_step(rt: Runtime, *, size: int | None = None, kind: str = "train", trigger_id: int | None = None,
               as_of: Any = None, tickers: list[str] | None = None) -> int:
    """Run one block with the serving adapter; returns its id (it may be unfinished if stop was set)."""
    from agent.runner import run_block

    s = rt.settings
    if kind == "train":
        sync_adapter(rt)
        resume_unfinished(rt)  # one thing at a time, in order: an interrupted block finishes first
        if rt.stop.is_set():
            raise Stopped("stopped before the block started")
    n = size or scheduled_block_size(s)
    rt.set_job(f"block ({kind}, {n} items{f', trigger {trigger_id}' if trigger_id else ''})")
    log_event("block_start", kind=kind, size=n, trigger=trigger_id, adapter=_version_label(rt.policy.adapter_version))
    t0 = time.monotonic()
    # Gate blocks replay past items even in live mode: their outcomes must be known at once.
    mode = "replay" if kind == "gate" else s.scheduler.mode
    if kind == "gate" and mode != s.scheduler.mode and as_of is None:
        as_of = _live_gate_as_of(rt, n)
    bid = run_block(rt.engine, rt.policy, rt.market, s.agent, s.rewards, mode=mode, size=n,
                    as_of=as_of, tickers=tickers, kind=kind, trigger_id=trigger_id, progress=rt.progress,
                    stop=rt.stop, horizon=s.market.horizon_days)
    _log_block_end(rt, bid, time.monotonic() - t0)
    return bid


def _live_gate_as_of(rt: Runtime, size: int) -> Any:
    """A past as_of whose replay block (consecutive sessions) resolves before today's close."""
    import math
    from datetime import datetime

    cal = rt.market.calendar
    names = rt.market.tickers or ["?"]
    days_needed = math.ceil(size / len(names)) + rt.settings.market.horizon_days + 1
    start = cal.add_sessions(cal.base_session(datetime.now(UTC)), -days_needed)
    return cal.replay_as_of(start)


def _log_block_end(rt: Runtime, bid: int, seconds: float) -> None:
    from store.traces import block_prediction_counts

    with session_scope(rt.engine) as sess:
        row = block_row(sess, bid)
        n_pred, n_valid = block_prediction_counts(sess, bid)
    status = row["status"] if row else "missing"
    event = "block_done" if status == "complete" else "block_interrupted"
    log_event(event, block=bid, kind=row["kind"] if row else None, status=status, size=row["size"] if row else None,
              predictions=n_pred, valid=n_valid, seconds=round(seconds, 1))


def resolve_step(rt: Runtime) -> list[int]:
    """Resolve and score what can be; returns the blocks whose metrics were newly computed."""
    from scoring.resolve import resolve_pending

    rt.set_job("resolve")
    with session_scope(rt.engine) as s:
        before = scored_block_ids(s)
    t0 = time.monotonic()
    report = resolve_pending(rt.engine, rt.market, rt.settings.rewards)
    with session_scope(rt.engine) as s:
        newly = sorted(scored_block_ids(s) - before)
        summaries = {b: block_summary(s, b) or {} for b in newly}
    log_event("resolve_done", seconds=round(time.monotonic() - t0, 1), **_report_fields(report))
    for b, m in summaries.items():
        log_event("block_scored", block=b, kind=m.get("kind"), n=m.get("n"), valid=m.get("n_valid"),
                  accuracy=m.get("accuracy"), mean_reward=m.get("mean_composite"), brier=m.get("brier"),
                  ece=m.get("ece"), always_up_accuracy=m.get("always_up_accuracy"),
                  adapter=_version_label(m.get("adapter_version")))
    return newly


def _report_fields(report: Any) -> dict[str, Any]:
    """The scalar fields of a ResolveReport (dataclass or pydantic), for one log line."""
    if report is None:
        return {}
    if hasattr(report, "model_dump"):
        data = report.model_dump()
    elif hasattr(report, "__dataclass_fields__"):
        data = {k: getattr(report, k) for k in report.__dataclass_fields__}
    else:
        data = dict(vars(report))
    return {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool))}


def train_step(rt: Runtime) -> int | None:
    """One training round if enough new scored episodes exist (or one was interrupted), then the gate.

    Returns the adapter version serving afterwards if a candidate was trained, else None.
    """
    from store.training import running_training_run
    from trainer.errors import TrainerError, TrainingStopped
    from trainer.round import train_round
    from trainer.sft import StopOnEvent

    s = rt.settings
    with session_scope(rt.engine) as sess:
        if not scored_block_ids(sess, kind="train") and running_training_run(sess, s.trainer.objective) is None:
            log_event("train_skipped", reason="no scored train blocks yet")
            return None
    rt.set_job("train")
    t0 = time.monotonic()
    try:
        result = train_round(rt.engine, s.trainer, s.rewards, s.agent, base_model_dir=rt.base_model_dir,
                             callbacks=[StopOnEvent(rt.stop)])
    except TrainingStopped as err:
        log_event("train_stopped", detail=str(err), seconds=round(time.monotonic() - t0, 1))
        raise Stopped() from None
    except TrainerError as err:  # recorded on the run row by the trainer; the loop goes on serving
        log_event("train_failed", logging.ERROR, error=str(err), seconds=round(time.monotonic() - t0, 1))
        return None
    if result is None:
        log_event("train_skipped", reason="too few new scored episodes", min_new_episodes=s.trainer.min_new_episodes)
        return None
    version = _result_version(result)
    curve = getattr(result, "loss_curve", None) or []
    losses = [p["loss"] for p in curve if isinstance(p, dict) and "loss" in p]
    log_event("train_done", candidate=_version_label(version), run=getattr(result, "run_id", None),
              examples=getattr(result, "n_examples", None), blocks=getattr(result, "block_ids", None),
              first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
              resumed_from_step=getattr(result, "resumed_from_step", None),
              seconds=round(time.monotonic() - t0, 1))
    return gate_step(rt, version)


def _result_version(result: Any) -> int:
    for name in ("version", "adapter_version", "candidate_version"):
        v = getattr(result, name, None)
        if isinstance(v, int):
            return v
    raise TypeError(f"train_round returned {result!r} without an adapter version")


def gate_step(rt: Runtime, version: int) -> int | None:
    """Compare candidate `version` with the serving adapter on the same held-out items, then publish
    or reject it; returns the version serving afterwards (None = base model, or gate interrupted)."""
    from trainer import registry
    from trainer.gate import promote_or_reject

    s = rt.settings
    with session_scope(rt.engine) as sess:
        serving = registry.serving_adapter(sess)
    if s.trainer.gate_items == 0:
        registry.publish(rt.engine, version)
        log_event("adapter_published", adapter=_version_label(version), gate="off")
        sync_adapter(rt)
        return version
    rt.set_job(f"gate v{version}")
    serving_path, serving_version = serving if serving is not None else (None, None)
    from store.training import adapter_row

    with session_scope(rt.engine) as sess:
        cand = adapter_row(sess, version)
        cand_path = cand.path if cand is not None else None
    # Same held-out items for both: the serving side plans them, the candidate replays that plan.
    _load(rt, serving_path, serving_version)
    serving_block = block_step(rt, size=s.trainer.gate_items, kind="gate")
    if rt.stop.is_set():
        return None
    with session_scope(rt.engine) as sess:
        items = _block_items(sess, serving_block)
    _load(rt, cand_path, version)
    cand_block = _replay_items(rt, items)
    if rt.stop.is_set():
        return None
    resolve_step(rt)
    with session_scope(rt.engine) as sess:
        serving_m = block_summary(sess, serving_block) or {}
        cand_m = block_summary(sess, cand_block) or {}
    keep = ("block_id", "n", "n_valid", "accuracy", "mean_composite", "brier", "ece")
    cand_fig = {k: cand_m.get(k) for k in keep}
    serving_fig = {k: serving_m.get(k) for k in keep} | {"adapter_version": serving_version}
    passed = promote_or_reject(rt.engine, version, cand_fig, serving_fig, s.trainer.gate_margin)
    log_event("gate_passed" if passed else "gate_rejected", candidate=_version_label(version),
              candidate_reward=cand_fig.get("mean_composite"), serving=_version_label(serving_version),
              serving_reward=serving_fig.get("mean_composite"), margin=s.trainer.gate_margin)
    if passed:
        log_event("adapter_published", adapter=_version_label(version))
    sync_adapter(rt)
    return rt.policy.adapter_version


def _block_items(sess, block_id: int) -> list[tuple[str, Any]]:
    from store.traces import get_block

    block = get_block(sess, block_id)
    return [(e.ticker, e.as_of) for e in sorted(block.episodes, key=lambda e: e.idx)]


def _replay_items(rt: Runtime, items: list[tuple[str, Any]]) -> int:
    """Run a gate block on exactly these (ticker, as_of) items: the runner plans consecutive days
    from the first as_of over the same ticker order, so the first day's tickers reproduce the plan."""
    first_as_of = items[0][1]
    tickers = [t for t, a in items if a == first_as_of]
    bid = block_step(rt, size=len(items), kind="gate", as_of=first_as_of, tickers=tickers)
    with session_scope(rt.engine) as sess:
        again = _block_items(sess, bid)
    if again != items:  # the comparison would be meaningless on different items
        raise RuntimeError(f"gate block {bid} did not reproduce the serving side's items")
    return bid


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
            bid = block_step(rt, size=int(size) if size else None, trigger_id=t.id)
        except Stopped:
            requeue_trigger(rt.engine, t.id)
            log_event("trigger_requeued", trigger=t.id, reason="stopping")
            return ran - 1
        except Exception as err:  # noqa: BLE001 - recorded on the trigger; the daemon goes on
            fail_trigger(rt.engine, t.id, f"{type(err).__name__}: {err}")
            log_event("trigger_failed", logging.ERROR, trigger=t.id, error=f"{type(err).__name__}: {err}")
            continue
        _finish_trigger_if_complete(rt, t.id, bid)
    return ran


def _finish_trigger_if_complete(rt: Runtime, trigger_id: int, bid: int) -> None:
    with session_scope(rt.engine) as sess:
        row = block_row(sess, bid)
    if row is not None and row["status"] == "complete":
        finish_trigger(rt.engine, trigger_id, {"block_id": bid})
        log_event("trigger_done", trigger=trigger_id, block=bid)
    else:  # stopped mid-block: the trigger stays running and the next start resumes its block
        log_event("trigger_interrupted", trigger=trigger_id, block=bid)


def resume_unfinished(rt: Runtime) -> list[int]:
    """Finish blocks left `running` (killed or failed mid-block), oldest first, each with the adapter
    it started with. A block that fails again is skipped for the rest of this process's life."""
    from agent.runner import resume_block
    from store.traces import unfinished_block_ids

    s = rt.settings
    with session_scope(rt.engine) as sess:
        pending = [b for b in unfinished_block_ids(sess) if b not in rt.failed_blocks]
    done: list[int] = []
    for bid in pending:
        if rt.stop.is_set():
            break
        with session_scope(rt.engine) as sess:
            row = block_row(sess, bid)
        rt.set_job(f"resume block {bid}")
        _load_version(rt, row["adapter_version"])
        log_event("block_resume", block=bid, kind=row["kind"], adapter=_version_label(row["adapter_version"]))
        t0 = time.monotonic()
        try:
            resume_block(rt.engine, bid, rt.policy, rt.market, s.agent, s.rewards, progress=rt.progress,
                         stop=rt.stop)
        except Exception as err:  # noqa: BLE001 - one bad block must not stop the recovery of others
            rt.failed_blocks.add(bid)
            log_event("block_failed", logging.ERROR, block=bid, error=f"{type(err).__name__}: {err}")
            continue
        finally:
            _log_block_end(rt, bid, time.monotonic() - t0)
        done.append(bid)
        if row["trigger_id"] is not None:
            _finish_trigger_if_complete(rt, row["trigger_id"], bid)
    sync_adapter(rt)
    return done


def recover(rt: Runtime) -> None:
    """Finish what a killed process left: interrupted blocks, claimed triggers, training, gate, resolve."""
    from store.training import running_training_run

    s = rt.settings
    resume_unfinished(rt)
    if rt.stop.is_set():
        return
    with session_scope(rt.engine) as sess:
        claimed = list_triggers(sess, ("running",), limit=1000)
    for t in claimed:
        with session_scope(rt.engine) as sess:
            b = block_for_trigger(sess, t.id)
        if b is None:
            requeue_trigger(rt.engine, t.id)  # died before its block existed: it runs again, once
            log_event("trigger_requeued", trigger=t.id)
        elif b["status"] == "complete":
            finish_trigger(rt.engine, t.id, {"block_id": b["id"]})
            log_event("trigger_done", trigger=t.id, block=b["id"], recovered=True)
    sync_adapter(rt)
    with session_scope(rt.engine) as sess:
        interrupted_training = running_training_run(sess, s.trainer.objective) is not None
    if interrupted_training and not rt.stop.is_set():
        log_event("train_resume")
        train_step(rt)
    with session_scope(rt.engine) as sess:
        ungated = candidate_adapters(sess)
    for _path, version in ungated:
        if rt.stop.is_set():
            return
        log_event("gate_resume", candidate=_version_label(version))
        gate_step(rt, version)
    if not rt.stop.is_set():
        resolve_step(rt)
    if not rt.stop.is_set():
        train_step(rt)


def cycle_step(rt: Runtime, *, size: int | None = None) -> dict[str, Any]:
    """Replay mode's round: block -> resolve -> train (+ gate, publish). Returns the round's figures."""
    bid = block_step(rt, size=size)
    out: dict[str, Any] = {"block_id": bid, "trained": None}
    if rt.stop.is_set():
        return out
    resolve_step(rt)
    if rt.stop.is_set():
        return out
    before = rt.policy.adapter_version
    out["trained"] = train_step(rt) is not None or rt.policy.adapter_version != before
    with session_scope(rt.engine) as sess:
        out["summary"] = block_summary(sess, bid) or {}
    out["adapter_version"] = rt.policy.adapter_version
    return out


# ---- APScheduler job callables (module level, string argument) ---------------------------------

_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(key: str, rt: Runtime) -> None:
    _RUNTIMES[key] = rt


def unregister_runtime(key: str) -> None:
    _RUNTIMES.pop(key, None)


def _run_job(key: str, name: str, fn, *, quiet: bool = False) -> None:
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


def _scheduled_block(rt: Runtime) -> None:
    if rt.settings.scheduler.mode == "replay":
        cycle_step(rt)  # outcomes are known at once in replay: resolve and train right after the block
    else:
        block_step(rt)
    rt.blocks_run += 1
    limit = rt.settings.scheduler.max_blocks
    if limit and rt.blocks_run >= limit and not rt.stop.is_set():
        log_event("max_blocks_reached", blocks=rt.blocks_run)
        rt.stop.set()


def _scheduled_resolve(rt: Runtime) -> None:
    if resolve_step(rt) and not rt.stop.is_set():
        train_step(rt)


def scheduled_block(key: str) -> None:
    """APScheduler job: one scheduled block (replay: with its resolve and training round)."""
    _run_job(key, "block", _scheduled_block)


def scheduled_resolve(key: str) -> None:
    """APScheduler job: resolve due outcomes, then train if enough new episodes are scored."""
    _run_job(key, "resolve", _scheduled_resolve)


def poll_triggers(key: str) -> None:
    """APScheduler job: run queued manual triggers (silent when there are none)."""
    _run_job(key, "triggers", triggers_step, quiet=True)

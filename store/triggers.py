"""The manual trigger queue: `block trigger` enqueues, the daemon claims each row exactly once with a
conditional UPDATE, so a trigger runs once even when two processes race."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from store.db import session_scope
from store.models import Trigger, utcnow


@dataclass(frozen=True)
class TriggerRow:
    id: int
    kind: str
    params: dict
    status: str
    result: dict | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _trow(t: Trigger) -> TriggerRow:
    return TriggerRow(id=t.id, kind=t.kind, params=dict(t.params or {}), status=t.status, result=t.result,
                      error=t.error, created_at=t.created_at, started_at=t.started_at, finished_at=t.finished_at)


def enqueue_trigger(engine: Engine, kind: str = "block", params: dict | None = None) -> int:
    """Queue a manual request; returns its id."""
    with session_scope(engine) as s:
        t = Trigger(kind=kind, params=params or {}, status="queued", created_at=utcnow())
        s.add(t)
        s.flush()
        return t.id


def claim_next_trigger(engine: Engine) -> TriggerRow | None:
    """Move the oldest queued trigger to running; exactly one claimer wins each trigger."""
    while True:
        with session_scope(engine) as s:
            tid = s.scalar(select(Trigger.id).where(Trigger.status == "queued").order_by(Trigger.id).limit(1))
            if tid is None:
                return None
            res = s.execute(update(Trigger).where(Trigger.id == tid, Trigger.status == "queued")
                            .values(status="running", started_at=utcnow()))
            if res.rowcount == 1:
                s.flush()
                return _trow(s.get(Trigger, tid, populate_existing=True))
        # Someone else claimed it between our SELECT and UPDATE: look again.


def finish_trigger(engine: Engine, trigger_id: int, result: dict | None = None) -> bool:
    """running -> done; False if it was not running (already finished by someone)."""
    with session_scope(engine) as s:
        res = s.execute(update(Trigger).where(Trigger.id == trigger_id, Trigger.status == "running")
                        .values(status="done", result=result, error=None, finished_at=utcnow()))
        return res.rowcount == 1


def fail_trigger(engine: Engine, trigger_id: int, error: str) -> bool:
    with session_scope(engine) as s:
        res = s.execute(update(Trigger).where(Trigger.id == trigger_id, Trigger.status == "running")
                        .values(status="failed", error=error[:2000], finished_at=utcnow()))
        return res.rowcount == 1


def requeue_trigger(engine: Engine, trigger_id: int) -> bool:
    """running -> queued, for a trigger whose daemon died before it started any work."""
    with session_scope(engine) as s:
        res = s.execute(update(Trigger).where(Trigger.id == trigger_id, Trigger.status == "running")
                        .values(status="queued", started_at=None))
        return res.rowcount == 1


def get_trigger(engine: Engine, trigger_id: int) -> TriggerRow | None:
    with session_scope(engine) as s:
        t = s.get(Trigger, trigger_id)
        return _trow(t) if t is not None else None


def list_triggers(session: Session, statuses: tuple[str, ...] | None = None, limit: int = 20) -> list[TriggerRow]:
    """Triggers, oldest first, optionally only those in `statuses`."""
    q = select(Trigger).order_by(Trigger.id)
    if statuses:
        q = q.where(Trigger.status.in_(statuses))
    return [_trow(t) for t in session.scalars(q.limit(limit))]


def count_triggers(session: Session, status: str) -> int:
    return int(session.scalar(select(func.count()).select_from(Trigger).where(Trigger.status == status)) or 0)

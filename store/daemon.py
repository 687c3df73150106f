"""The single-daemon lock and the manual trigger queue.

Both are claimed with conditional writes (INSERT on a unique key, UPDATE ... WHERE <still free>)
so that two processes racing on SQLite or PostgreSQL can never both win.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.db import session_scope
from store.models import DaemonLock, Trigger

LOCK_NAME = "daemon"


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class LockHolder:
    """Who holds the daemon lock, as read from its row."""

    owner: str
    pid: int
    host: str
    current_job: str | None
    acquired_at: datetime
    heartbeat_at: datetime

    def age_s(self, now: datetime | None = None) -> float:
        """Seconds since the last heartbeat."""
        return ((now or _now()) - self.heartbeat_at).total_seconds()

    def alive(self, ttl_s: float, now: datetime | None = None) -> bool:
        return self.age_s(now) < ttl_s

    def describe(self, now: datetime | None = None) -> str:
        return (f"{self.owner} (pid {self.pid} on {self.host}), last heartbeat "
                f"{self.age_s(now):.1f}s ago, doing: {self.current_job or 'idle'}")


def new_owner_id(role: str = "daemon") -> str:
    """A lock owner id unique to this process and this run (pid alone repeats across hosts/restarts)."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _holder(row: DaemonLock) -> LockHolder:
    return LockHolder(owner=row.owner, pid=row.pid, host=row.host, current_job=row.current_job,
                      acquired_at=row.acquired_at, heartbeat_at=row.heartbeat_at)


def read_lock(engine: Engine, name: str = LOCK_NAME) -> LockHolder | None:
    with session_scope(engine) as s:
        row = s.get(DaemonLock, name)
        return _holder(row) if row is not None else None


def try_acquire_lock(
    engine: Engine, owner: str, *, ttl_s: float, name: str = LOCK_NAME, now: datetime | None = None
) -> LockHolder | None:
    """Take the lock if it is free or stale; returns None on success, else the live holder."""
    now = now or _now()
    pid, host = os.getpid(), socket.gethostname()
    try:
        # Its own transaction: on PostgreSQL a failed INSERT poisons the transaction it ran in.
        with session_scope(engine) as s:
            s.add(DaemonLock(name=name, owner=owner, pid=pid, host=host, current_job="starting",
                             acquired_at=now, heartbeat_at=now))
        return None
    except IntegrityError:
        pass
    cutoff = now - timedelta(seconds=ttl_s)
    with session_scope(engine) as s:
        # Steal only a stale lock (or re-take our own): the WHERE makes the check and the write one step.
        res = s.execute(
            update(DaemonLock)
            .where(DaemonLock.name == name)
            .where((DaemonLock.heartbeat_at < cutoff) | (DaemonLock.owner == owner))
            .values(owner=owner, pid=pid, host=host, current_job="starting", acquired_at=now, heartbeat_at=now)
        )
        if res.rowcount == 1:
            return None
        row = s.get(DaemonLock, name)
        if row is None:  # released between our INSERT and UPDATE: try once more from the top
            return try_acquire_lock(engine, owner, ttl_s=ttl_s, name=name, now=now)
        return _holder(row)


def take_over(engine: Engine, owner: str, *, from_owner: str, name: str = LOCK_NAME,
              now: datetime | None = None) -> bool:
    """Take the lock from `from_owner` (known dead) only if it still holds it: one conditional UPDATE."""
    now = now or _now()
    with session_scope(engine) as s:
        res = s.execute(
            update(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == from_owner)
            .values(owner=owner, pid=os.getpid(), host=socket.gethostname(), current_job="starting",
                    acquired_at=now, heartbeat_at=now)
        )
        return res.rowcount == 1


def heartbeat(engine: Engine, owner: str, *, current_job: Any = ..., name: str = LOCK_NAME) -> bool:
    """Refresh the heartbeat (and optionally the current job); False means the lock is no longer ours."""
    values: dict[str, Any] = {"heartbeat_at": _now()}
    if current_job is not ...:
        values["current_job"] = current_job
    with session_scope(engine) as s:
        res = s.execute(update(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == owner).values(**values))
        return res.rowcount == 1


def release_lock(engine: Engine, owner: str, name: str = LOCK_NAME) -> bool:
    """Delete the lock row if we still own it."""
    with session_scope(engine) as s:
        res = s.execute(delete(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == owner))
        return res.rowcount == 1


def age_lock(engine: Engine, seconds: float, name: str = LOCK_NAME) -> None:
    """Push the heartbeat into the past (tests and `--force` style recovery of a dead host)."""
    with session_scope(engine) as s:
        row = s.get(DaemonLock, name)
        if row is not None:
            row.heartbeat_at = row.heartbeat_at - timedelta(seconds=seconds)


# ---- triggers ---------------------------------------------------------------------------------


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
        t = Trigger(kind=kind, params=params or {}, status="queued", created_at=_now())
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
                            .values(status="running", started_at=_now()))
            if res.rowcount == 1:
                s.flush()
                return _trow(s.get(Trigger, tid, populate_existing=True))
        # Someone else claimed it between our SELECT and UPDATE: look again.


def finish_trigger(engine: Engine, trigger_id: int, result: dict | None = None) -> bool:
    """running -> done; False if it was not running (already finished by someone)."""
    with session_scope(engine) as s:
        res = s.execute(update(Trigger).where(Trigger.id == trigger_id, Trigger.status == "running")
                        .values(status="done", result=result, error=None, finished_at=_now()))
        return res.rowcount == 1


def fail_trigger(engine: Engine, trigger_id: int, error: str) -> bool:
    with session_scope(engine) as s:
        res = s.execute(update(Trigger).where(Trigger.id == trigger_id, Trigger.status == "running")
                        .values(status="failed", error=error[:2000], finished_at=_now()))
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

"""The single-daemon lock: one row claimed with conditional writes (INSERT on a unique key,
UPDATE ... WHERE <still free>), so two processes racing on SQLite or PostgreSQL can never both win."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, update
from sqlalchemy.exc import IntegrityError

from store.db import session_scope
from store.models import DaemonLock

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

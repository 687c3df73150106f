"""The single-daemon lock: one row claimed with conditional writes (INSERT on a unique key,
UPDATE ... WHERE <still free>), so two processes racing on SQLite or PostgreSQL can never both win.

A lease alone is not enough: a holder paused past its TTL (SIGSTOP, a suspended VM) or whose clock
jumped is taken over while it still believes it holds the lock. So every acquisition and take-over
also increments a fencing token (lock_epochs.epoch, stamped on the lock row), and a holder fences
its engine with an EpochFence: each transaction that writes re-reads the lock row's epoch before it
commits and is refused (LockLost, rolled back whole) once the epoch is no longer its own.

Ordering, per backend: on SQLite every transaction holds the database write lock from BEGIN
IMMEDIATE to COMMIT, so check and write are one step. On PostgreSQL the check reads the lock row
FOR KEY SHARE and acquisitions lock it FOR UPDATE first, so a take-over waits for the fenced
transactions in flight and every later one sees the new epoch; the holder's own heartbeat (a plain
UPDATE of non-key columns) does not conflict with KEY SHARE and never waits on a job's transaction.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.db import insert, session_scope, set_write_fence, write_fence
from store.errors import ScoreloopError
from store.models import DaemonLock, LockEpoch, utcnow

LOCK_NAME = "daemon"



@dataclass(frozen=True)
class LockHolder:
    """Who holds the daemon lock, as read from its row."""

    owner: str
    pid: int
    host: str
    current_job: str | None
    acquired_at: datetime
    heartbeat_at: datetime
    epoch: int = 0

    def age_s(self, now: datetime | None = None) -> float:
        """Seconds since the last heartbeat."""
        return ((now or utcnow()) - self.heartbeat_at).total_seconds()

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
                      acquired_at=row.acquired_at, heartbeat_at=row.heartbeat_at, epoch=row.epoch or 0)


def read_lock(engine: Engine, name: str = LOCK_NAME) -> LockHolder | None:
    with session_scope(engine, fenced=False) as s:
        row = s.get(DaemonLock, name)
        return _holder(row) if row is not None else None


def _next_epoch(s: Session, name: str) -> int:
    """Increment and return the lock's fencing token, inside the caller's (acquiring) transaction."""
    stmt = insert(s, LockEpoch).values(name=name, epoch=1)
    s.execute(stmt.on_conflict_do_update(index_elements=[LockEpoch.name], set_={"epoch": LockEpoch.epoch + 1}))
    return int(s.scalar(select(LockEpoch.epoch).where(LockEpoch.name == name)))


def _lock_row_for_update(s: Session, name: str) -> None:
    """PostgreSQL: wait for fenced transactions in flight (they hold KEY SHARE) before changing hands."""
    s.execute(select(DaemonLock.name).where(DaemonLock.name == name).with_for_update())


def try_acquire_lock(
    engine: Engine, owner: str, *, ttl_s: float, name: str = LOCK_NAME, now: datetime | None = None
) -> LockHolder | None:
    """Take the lock if it is free or stale; returns None on success, else the live holder."""
    now = now or utcnow()
    pid, host = os.getpid(), socket.gethostname()
    try:
        # Its own transaction: on PostgreSQL a failed INSERT poisons the transaction it ran in (and
        # rolls the epoch increment back with it).
        with session_scope(engine, fenced=False) as s:
            row = DaemonLock(name=name, owner=owner, pid=pid, host=host, current_job="starting",
                             acquired_at=now, heartbeat_at=now)
            s.add(row)
            s.flush()  # the lock row first, then the counter: the order every path takes (no deadlock)
            row.epoch = _next_epoch(s, name)
        return None
    except IntegrityError:
        pass
    cutoff = now - timedelta(seconds=ttl_s)
    with session_scope(engine, fenced=False) as s:
        _lock_row_for_update(s, name)
        # Steal only a stale lock (or re-take our own): the WHERE makes the check and the write one step.
        res = s.execute(
            update(DaemonLock)
            .where(DaemonLock.name == name)
            .where((DaemonLock.heartbeat_at < cutoff) | (DaemonLock.owner == owner))
            .values(owner=owner, pid=pid, host=host, current_job="starting", acquired_at=now, heartbeat_at=now)
        )
        if res.rowcount == 1:
            s.execute(update(DaemonLock).where(DaemonLock.name == name).values(epoch=_next_epoch(s, name)))
            return None
        row = s.get(DaemonLock, name)
        holder = _holder(row) if row is not None else None
    # Released between our INSERT and UPDATE: try again from the top, after this transaction has
    # closed. Retrying inside it would wait on our own write lock (SQLite: BEGIN IMMEDIATE until the
    # busy timeout, then "database is locked").
    if holder is None:
        return try_acquire_lock(engine, owner, ttl_s=ttl_s, name=name, now=now)
    return holder


def take_over(engine: Engine, owner: str, *, from_owner: str, name: str = LOCK_NAME,
              now: datetime | None = None) -> bool:
    """Take the lock from `from_owner` (known dead) only if it still holds it: one conditional UPDATE."""
    now = now or utcnow()
    with session_scope(engine, fenced=False) as s:
        _lock_row_for_update(s, name)
        res = s.execute(
            update(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == from_owner)
            .values(owner=owner, pid=os.getpid(), host=socket.gethostname(), current_job="starting",
                    acquired_at=now, heartbeat_at=now)
        )
        if res.rowcount != 1:
            return False
        s.execute(update(DaemonLock).where(DaemonLock.name == name).values(epoch=_next_epoch(s, name)))
        return True


def heartbeat(engine: Engine, owner: str, *, current_job: Any = ..., name: str = LOCK_NAME) -> bool:
    """Refresh the heartbeat (and optionally the current job); False means the lock is no longer ours."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if current_job is not ...:
        values["current_job"] = current_job
    with session_scope(engine, fenced=False) as s:
        res = s.execute(update(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == owner).values(**values))
        return res.rowcount == 1


def release_lock(engine: Engine, owner: str, name: str = LOCK_NAME) -> bool:
    """Delete the lock row if we still own it (lock_epochs keeps the counter)."""
    with session_scope(engine, fenced=False) as s:
        res = s.execute(delete(DaemonLock).where(DaemonLock.name == name, DaemonLock.owner == owner))
        return res.rowcount == 1


def age_lock(engine: Engine, seconds: float, name: str = LOCK_NAME) -> None:
    """Push the heartbeat into the past (tests and `--force` style recovery of a dead host)."""
    with session_scope(engine, fenced=False) as s:
        row = s.get(DaemonLock, name)
        if row is not None:
            row.heartbeat_at = row.heartbeat_at - timedelta(seconds=seconds)


class LockLost(ScoreloopError, RuntimeError):
    """This process's lock epoch is no longer the current one: another process took the lock over
    (ours went stale: paused, or a clock jump). The write was refused and rolled back; stop."""


class EpochFence:
    """The write fence of a lock holder (store.db.set_write_fence): refuses every transaction once
    the lock row's epoch is no longer `epoch`. Sticky: after the first refusal it refuses without
    asking the database, and calls `on_lost` once so the holder can stop."""

    def __init__(self, owner: str, epoch: int, *, name: str = LOCK_NAME,
                 on_lost: Callable[[str], None] | None = None) -> None:
        self.owner, self.epoch, self.name, self.on_lost = owner, epoch, name, on_lost
        self.lost: str | None = None

    def __call__(self, session: Session) -> None:
        if self.lost is None:
            row = session.execute(
                select(DaemonLock.owner, DaemonLock.epoch).where(DaemonLock.name == self.name)
                .with_for_update(read=True, key_share=True)
            ).first()
            if row is None or row.epoch != self.epoch or row.owner != self.owner:
                now = f"{row.owner} holds it at epoch {row.epoch}" if row is not None else "nobody holds it"
                self.lost = (f"write refused: this process ({self.owner}) held the {self.name} lock at epoch "
                             f"{self.epoch}, but {now}; its lease ran out (paused, or a clock jump) and another "
                             f"process took over, so this one must stop")
                if self.on_lost is not None:
                    self.on_lost(self.lost)
        if self.lost is not None:
            raise LockLost(self.lost)


def lock_epoch(engine: Engine, owner: str, name: str = LOCK_NAME) -> int | None:
    """The epoch `owner` holds the lock at, or None if it does not hold it."""
    holder = read_lock(engine, name)
    return holder.epoch if holder is not None and holder.owner == owner else None


def fence_engine(engine: Engine, owner: str, *, name: str = LOCK_NAME,
                 on_lost: Callable[[str], None] | None = None) -> EpochFence:
    """Fence `engine` with the epoch `owner` holds now; raises LockLost if it does not hold the lock."""
    epoch = lock_epoch(engine, owner, name)
    if epoch is None:
        raise LockLost(f"{owner} does not hold the {name} lock, so it cannot fence its writes with it")
    fence = EpochFence(owner, epoch, name=name, on_lost=on_lost)
    set_write_fence(engine, fence)
    return fence


def unfence_engine(engine: Engine, fence: EpochFence | None) -> None:
    """Remove `fence` from `engine` (only that one: another holder may have fenced it since)."""
    if fence is not None and write_fence(engine) is fence:
        set_write_fence(engine, None)

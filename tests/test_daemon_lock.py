"""The single-daemon lock and the trigger queue on real SQLite and PostgreSQL: atomic claims,
stale-lock takeover, a lost lock noticed, the fencing epoch refusing a stale holder's writes,
exactly-once trigger claims under contention."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update

from scheduler.daemon import DaemonLockHeld, LockKeeper, holder_is_dead_here
from store.db import make_engine, session_scope
from store.lock import LockLost, age_lock, heartbeat, read_lock, release_lock, take_over, try_acquire_lock
from store.models import Block, DaemonLock, Episode, Trigger
from store.triggers import (
    claim_next_trigger,
    enqueue_trigger,
    fail_trigger,
    finish_trigger,
    get_trigger,
    requeue_trigger,
)


def test_first_takes_the_lock_second_sees_who_holds_it(fresh_db):
    assert try_acquire_lock(fresh_db, "a", ttl_s=30) is None
    holder = try_acquire_lock(fresh_db, "b", ttl_s=30)
    assert holder is not None and holder.owner == "a"
    assert holder.pid == os.getpid() and holder.alive(30)
    assert "pid" in holder.describe() and "last heartbeat" in holder.describe()
    # the owner may re-take its own lock (a restart of the same owner id)
    assert try_acquire_lock(fresh_db, "a", ttl_s=30) is None


def test_racing_processes_only_one_wins(fresh_db):
    """Eight threads, each with its own engine, try at the same instant: exactly one wins."""
    from store.db import make_engine

    url = fresh_db.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(8)]
    barrier = threading.Barrier(len(engines))

    def attempt(i: int):
        barrier.wait()
        return try_acquire_lock(engines[i], f"owner-{i}", ttl_s=30)

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(attempt, range(len(engines))))
    for e in engines:
        e.dispose()
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1
    assert {r.owner for r in results if r is not None} == {f"owner-{winners[0]}"}


def test_stale_lock_is_taken_over_and_old_owner_notices(fresh_db):
    assert try_acquire_lock(fresh_db, "old", ttl_s=30) is None
    assert try_acquire_lock(fresh_db, "new", ttl_s=30) is not None  # fresh: refused
    age_lock(fresh_db, 31)  # the old daemon stopped beating 31 s ago
    assert try_acquire_lock(fresh_db, "new", ttl_s=30) is None
    assert read_lock(fresh_db).owner == "new"
    assert heartbeat(fresh_db, "old") is False  # the old owner learns it lost the lock
    assert heartbeat(fresh_db, "new", current_job="block") is True
    assert read_lock(fresh_db).current_job == "block"
    assert release_lock(fresh_db, "old") is False
    assert release_lock(fresh_db, "new") is True
    assert read_lock(fresh_db) is None


def test_racing_takeover_of_a_stale_lock_has_one_winner(fresh_db):
    from store.db import make_engine

    assert try_acquire_lock(fresh_db, "dead", ttl_s=5) is None
    age_lock(fresh_db, 60)
    url = fresh_db.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(6)]
    barrier = threading.Barrier(len(engines))

    def attempt(i: int):
        barrier.wait()
        return try_acquire_lock(engines[i], f"heir-{i}", ttl_s=5)

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(attempt, range(len(engines))))
    for e in engines:
        e.dispose()
    assert sum(r is None for r in results) == 1
    assert read_lock(fresh_db).owner.startswith("heir-")


@pytest.mark.timeout(60)  # the old bug hung on PostgreSQL
def test_lock_released_between_insert_and_update_is_taken_without_waiting_on_itself(db_url, monkeypatch):
    """The holder releases right after our INSERT lost and before our UPDATE: we retry from the top
    once our own transaction has closed (a retry inside it waited on our own write lock: 'database is
    locked' after SQLite's busy timeout, a hang on PostgreSQL)."""
    from sqlalchemy import delete

    import store.lock as lock_mod
    from store.config import StoreConfig
    from store.db import open_store

    engine = open_store(db_url, StoreConfig(sqlite_busy_timeout_ms=2000))
    assert try_acquire_lock(engine, "holder", ttl_s=30) is None
    real, calls = lock_mod._lock_row_for_update, []

    def release_first(s, name):
        if not calls:  # the holder's release lands right here, once
            s.execute(delete(DaemonLock).where(DaemonLock.name == name))
        calls.append(name)
        real(s, name)

    monkeypatch.setattr(lock_mod, "_lock_row_for_update", release_first)
    try:
        assert try_acquire_lock(engine, "heir", ttl_s=30) is None
        assert read_lock(engine).owner == "heir"
    finally:
        engine.dispose()


def test_keeper_refuses_with_a_clear_message_then_waits(sqlite_db):
    stop = threading.Event()
    first = LockKeeper(sqlite_db, heartbeat_s=0.2, ttl_s=30, stop=stop)
    first.acquire()
    second = LockKeeper(sqlite_db, heartbeat_s=0.2, ttl_s=30, stop=threading.Event())
    with pytest.raises(DaemonLockHeld) as err:
        second.acquire()
    msg = str(err.value)
    assert first.owner in msg and f"pid {os.getpid()}" in msg and "last heartbeat" in msg
    # --wait: takes the lock as soon as the first one releases it
    waiter = threading.Thread(target=second.acquire, kwargs={"wait": True})
    waiter.start()
    first.release()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert read_lock(sqlite_db).owner == second.owner
    second.release()


def test_keeper_heartbeat_keeps_the_lock_fresh_and_stops_when_stolen(sqlite_db):
    stop = threading.Event()
    keeper = LockKeeper(sqlite_db, heartbeat_s=0.1, ttl_s=30, stop=stop)
    keeper.acquire()
    before = read_lock(sqlite_db).heartbeat_at
    threading.Event().wait(0.4)
    assert read_lock(sqlite_db).heartbeat_at > before
    other = make_engine(str(sqlite_db.url))  # another process (this engine is fenced by the keeper)
    with session_scope(other) as s:  # someone else took it (as after a long stall past the TTL)
        s.get(DaemonLock, "daemon").owner = "thief"
    other.dispose()
    assert stop.wait(5), "the keeper must stop the daemon when its lock is gone"
    assert keeper.lost
    keeper.release()
    assert read_lock(sqlite_db).owner == "thief"  # a lost lock is not deleted from under its new owner


def test_lock_of_a_dead_process_on_this_host_is_taken_at_once(sqlite_db):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    assert try_acquire_lock(sqlite_db, "ghost", ttl_s=3600) is None
    with session_scope(sqlite_db) as s:
        s.get(DaemonLock, "daemon").pid = dead_pid
    assert holder_is_dead_here(read_lock(sqlite_db))
    keeper = LockKeeper(sqlite_db, heartbeat_s=1, ttl_s=3600, stop=threading.Event())
    keeper.acquire()  # no waiting for the hour-long TTL
    assert read_lock(sqlite_db).owner == keeper.owner
    keeper.release()


def test_trigger_lifecycle(fresh_db):
    a = enqueue_trigger(fresh_db, "block", {"size": 3})
    b = enqueue_trigger(fresh_db, "block", {})
    t = claim_next_trigger(fresh_db)
    assert t.id == a and t.status == "running" and t.params == {"size": 3} and t.started_at is not None
    assert finish_trigger(fresh_db, a, {"block_id": 7})
    assert not finish_trigger(fresh_db, a, {"block_id": 8})  # already done: not overwritten
    assert get_trigger(fresh_db, a).result == {"block_id": 7}
    t2 = claim_next_trigger(fresh_db)
    assert t2.id == b
    assert requeue_trigger(fresh_db, b)
    assert claim_next_trigger(fresh_db).id == b
    assert fail_trigger(fresh_db, b, "boom")
    tb = get_trigger(fresh_db, b)
    assert tb.status == "failed" and tb.error == "boom" and tb.finished_at is not None
    assert claim_next_trigger(fresh_db) is None


def test_each_trigger_is_claimed_exactly_once_under_contention(fresh_db):
    from store.db import make_engine
    from store.models import Trigger

    ids = [enqueue_trigger(fresh_db, "block", {"i": i}) for i in range(20)]
    url = fresh_db.url.render_as_string(hide_password=False)
    engines = [make_engine(url) for _ in range(4)]

    def drain(i: int) -> list[int]:
        got = []
        while (t := claim_next_trigger(engines[i])) is not None:
            got.append(t.id)
        return got

    with ThreadPoolExecutor(4) as pool:
        claimed = [tid for part in pool.map(drain, range(4)) for tid in part]
    for e in engines:
        e.dispose()
    assert sorted(claimed) == ids  # every trigger once, none twice
    with session_scope(fresh_db) as s:
        assert set(s.scalars(select(Trigger.status))) == {"running"}


# ---- fencing -----------------------------------------------------------------------------------


def _other_process(engine):
    """A second engine on the same database: what another daemon process would hold."""
    return make_engine(engine.url.render_as_string(hide_password=False))


def _count(engine, model) -> int:
    from sqlalchemy import func

    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def test_every_acquisition_and_take_over_gets_a_new_epoch_never_reused(fresh_db):
    assert try_acquire_lock(fresh_db, "a", ttl_s=30) is None
    assert read_lock(fresh_db).epoch == 1
    assert try_acquire_lock(fresh_db, "b", ttl_s=30) is not None  # refused: no epoch spent
    assert release_lock(fresh_db, "a")
    assert try_acquire_lock(fresh_db, "b", ttl_s=30) is None
    assert read_lock(fresh_db).epoch == 2  # the row was deleted on release, the counter was not
    age_lock(fresh_db, 60)
    assert try_acquire_lock(fresh_db, "c", ttl_s=30) is None  # stale: taken over
    assert read_lock(fresh_db).epoch == 3
    assert take_over(fresh_db, "d", from_owner="c") and read_lock(fresh_db).epoch == 4
    assert not take_over(fresh_db, "e", from_owner="c") and read_lock(fresh_db).epoch == 4


def _blocks(engine) -> list[Block]:
    with session_scope(engine) as s:
        return list(s.scalars(select(Block)))


def _block_with_episodes(s, n: int) -> None:
    from datetime import UTC, datetime

    block = Block(kind="train", mode="replay", market="synthetic", size=n, as_of=datetime(2024, 3, 5, tzinfo=UTC))
    s.add(block)
    s.flush()
    for i in range(n):
        s.add(Episode(block_id=block.id, idx=i, ticker="AAPL", as_of=datetime(2024, 3, 5, tzinfo=UTC), horizon=5))


def test_a_stale_holder_is_refused_its_next_write_and_stops(fresh_db):
    """SIGSTOP past the TTL, simulated: another process takes the lock over while the first still
    runs. The first one's next transaction (a block with its episodes) is refused whole, it stops,
    and it leaves the new holder's lock alone."""
    stop = threading.Event()
    stale = LockKeeper(fresh_db, heartbeat_s=3600, ttl_s=5, stop=stop)  # its heartbeat never comes
    stale.acquire()
    with session_scope(fresh_db) as s:  # while it holds the lock, its writes go through
        _block_with_episodes(s, 3)
    assert (_count(fresh_db, Block), _count(fresh_db, Episode)) == (1, 3)

    heir = _other_process(fresh_db)
    age_lock(heir, 60)  # the stale one stopped beating a minute ago
    assert try_acquire_lock(heir, "heir", ttl_s=5) is None
    assert read_lock(heir).epoch == stale.fence.epoch + 1

    with pytest.raises(LockLost, match=r"epoch 1, but heir holds it at epoch 2"), session_scope(fresh_db) as s:
        _block_with_episodes(s, 4)
    assert (_count(heir, Block), _count(heir, Episode)) == (1, 3)  # nothing of it was written
    assert stop.is_set() and stale.lost  # the daemon's stop flag: it finishes nothing more
    # Every later write is refused as well, Core statements too.
    with pytest.raises(LockLost), session_scope(fresh_db) as s:
        s.execute(update(Block).values(status="failed"))
    with pytest.raises(LockLost), session_scope(fresh_db) as s:
        s.add(Trigger(kind="block", params={}))
    assert _count(heir, Trigger) == 0 and {b.status for b in _blocks(heir)} == {"running"}
    with session_scope(fresh_db) as s:  # reads are not fenced
        assert s.get(DaemonLock, "daemon").owner == "heir"
    with session_scope(heir) as s:  # the new holder writes freely
        _block_with_episodes(s, 2)
    stale.release()
    assert read_lock(heir).owner == "heir" and _count(heir, Block) == 2
    heir.dispose()


def test_a_take_over_waits_for_the_fenced_write_in_flight(fresh_db):
    """The epoch check and the write are one transaction: a take-over that starts while a fenced
    write is open waits for its commit (it is ordered before the take-over), and the holder's next
    write sees the new epoch."""
    from store.db import check_write_fence

    keeper = LockKeeper(fresh_db, heartbeat_s=3600, ttl_s=5, stop=threading.Event())
    keeper.acquire()
    heir = _other_process(fresh_db)
    took: list[bool] = []
    with session_scope(fresh_db) as s:
        _block_with_episodes(s, 2)
        check_write_fence(s)  # checked now; the commit comes after the heir has tried
        t = threading.Thread(target=lambda: took.append(take_over(heir, "heir", from_owner=keeper.owner)))
        t.start()
        t.join(timeout=1.0)
        assert t.is_alive(), "the take-over must wait for the open fenced transaction"
    t.join(timeout=30)
    assert took == [True] and read_lock(heir).epoch == keeper.fence.epoch + 1
    assert _count(heir, Episode) == 2  # the write in flight committed before the take-over
    with pytest.raises(LockLost), session_scope(fresh_db) as s:
        _block_with_episodes(s, 1)
    assert _count(heir, Episode) == 2
    keeper.release()
    heir.dispose()


def test_a_stale_daemon_cannot_claim_a_trigger(fresh_db):
    """A job's own write path (the trigger claim, a conditional UPDATE): refused after a take-over,
    so the trigger stays queued for the daemon that holds the lock now."""
    stale = LockKeeper(fresh_db, heartbeat_s=3600, ttl_s=5, stop=threading.Event())
    stale.acquire()
    heir = _other_process(fresh_db)
    tid = enqueue_trigger(heir, "block", {"size": 2})
    assert take_over(heir, "heir", from_owner=stale.owner)
    with pytest.raises(LockLost, match="heir holds it"):
        claim_next_trigger(fresh_db)
    assert get_trigger(heir, tid).status == "queued"
    assert claim_next_trigger(heir).id == tid  # the new holder claims it
    stale.release()
    heir.dispose()

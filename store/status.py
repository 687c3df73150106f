"""Read-only figures for `scoreloop status`, the loop's round summaries and daemon recovery."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from store.models import Adapter, Block, BlockMetric


def block_summary(session: Session, block_id: int) -> dict[str, Any] | None:
    """One row of v_block_summary as a dict (None if the block does not exist)."""
    row = session.execute(text("SELECT * FROM v_block_summary WHERE block_id = :b"), {"b": block_id}).mappings().first()
    return dict(row) if row is not None else None


def last_block_id(session: Session, kind: str | None = None) -> int | None:
    q = select(func.max(Block.id))
    if kind is not None:
        q = q.where(Block.kind == kind)
    return session.scalar(q)


def pending_predictions(session: Session) -> int:
    """Predictions without a reward yet (the `pending` state of v_predictions)."""
    return int(session.execute(text("SELECT COUNT(*) FROM v_predictions WHERE state = 'pending'")).scalar() or 0)


def candidate_adapters(session: Session) -> list[tuple[str, int]]:
    """Adapters trained but neither published nor rejected yet (a gate that never ran), oldest first."""
    rows = session.execute(select(Adapter.path, Adapter.version).where(Adapter.status == "candidate")
                           .order_by(Adapter.version)).all()
    return [(p, v) for p, v in rows]


def block_row(session: Session, block_id: int) -> dict[str, Any] | None:
    b = session.get(Block, block_id)
    if b is None:
        return None
    return {"id": b.id, "kind": b.kind, "status": b.status, "size": b.size, "trigger_id": b.trigger_id,
            "adapter_version": b.adapter_version, "as_of": b.as_of}


def block_for_trigger(session: Session, trigger_id: int) -> dict[str, Any] | None:
    bid = session.scalar(select(Block.id).where(Block.trigger_id == trigger_id).order_by(Block.id).limit(1))
    return block_row(session, bid) if bid is not None else None


def scored_block_ids(session: Session, kind: str | None = None) -> set[int]:
    """Blocks (of `kind`, if given) whose model metrics have been computed."""
    q = select(BlockMetric.block_id).where(BlockMetric.name == "model")
    if kind is not None:
        q = q.join(Block, Block.id == BlockMetric.block_id).where(Block.kind == kind)
    return set(session.scalars(q))


def running_block_progress(session: Session) -> dict[str, Any] | None:
    """The newest block still running: id, kind, size and episodes done (for progress lines)."""
    from store.models import Episode

    b = session.scalar(select(Block).where(Block.status == "running").order_by(Block.id.desc()).limit(1))
    if b is None:
        return None
    from store.models import Step

    done = session.scalar(select(func.count()).select_from(Episode)
                          .where(Episode.block_id == b.id, Episode.status == "done")) or 0
    steps = session.scalar(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                           .where(Episode.block_id == b.id)) or 0
    return {"id": b.id, "kind": b.kind, "size": b.size, "done": int(done), "steps": int(steps),
            "created_at": b.created_at}

"""Read-only figures for `scoreloop status`, the loop's round summaries and daemon recovery.

Each read returns a frozen dataclass, so callers use attributes a type checker can follow instead
of string keys into a row dict.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from store.models import Adapter, Block, BlockMetric, Episode, Step


@dataclass(frozen=True)
class BlockSummary:
    """One row of v_block_summary: the block and its model metrics (None until it is scored) with baselines."""

    block_id: int
    kind: str
    mode: str
    market: str
    status: str
    as_of: datetime | str | None
    size: int
    adapter_version: int | None
    target_score: float | None
    created_at: datetime | str | None
    finished_at: datetime | str | None
    n: int | None = None
    n_valid: int | None = None
    coverage: float | None = None
    accuracy: float | None = None
    mean_composite: float | None = None
    brier: float | None = None
    ece: float | None = None
    mean_abs_magnitude_error: float | None = None
    skill: float | None = None
    reward_version: str | None = None
    always_up_accuracy: float | None = None
    always_up_brier: float | None = None
    momentum_accuracy: float | None = None
    momentum_brier: float | None = None
    coin_flip_accuracy: float | None = None
    coin_flip_brier: float | None = None

    @property
    def scored(self) -> bool:
        return self.n is not None

    def pick(self, names: Iterable[str]) -> dict[str, Any]:
        """These fields as a plain dict (for JSON columns and `scoreloop status --json`)."""
        return {k: getattr(self, k) for k in names}


_SUMMARY_FIELDS = tuple(f.name for f in fields(BlockSummary))


@dataclass(frozen=True)
class BlockRow:
    """A block's identity and state, without its metrics."""

    id: int
    kind: str
    status: str
    size: int
    trigger_id: int | None
    adapter_version: int | None
    as_of: datetime

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass(frozen=True)
class BlockProgress:
    """The block still running: how far it got (for the daemon's progress lines)."""

    id: int
    kind: str
    size: int
    done: int
    steps: int
    created_at: datetime


def block_summaries(session: Session, block_ids: Iterable[int]) -> dict[int, BlockSummary]:
    """v_block_summary rows of these blocks, in one query (missing blocks are absent)."""
    ids = sorted(set(block_ids))
    if not ids:
        return {}
    q = text("SELECT * FROM v_block_summary WHERE block_id IN :ids").bindparams(bindparam("ids", expanding=True))
    rows = session.execute(q, {"ids": ids}).mappings()
    return {r["block_id"]: BlockSummary(**{k: r[k] for k in _SUMMARY_FIELDS}) for r in rows}


def block_summary(session: Session, block_id: int) -> BlockSummary | None:
    """One row of v_block_summary (None if the block does not exist)."""
    return block_summaries(session, [block_id]).get(block_id)


def last_block_id(session: Session, kind: str | None = None) -> int | None:
    q = select(func.max(Block.id))
    if kind is not None:
        q = q.where(Block.kind == kind)
    return session.scalar(q)


def pending_predictions(session: Session) -> int:
    """Predictions without a reward yet (the `pending` state of v_predictions)."""
    return int(session.execute(text("SELECT COUNT(*) FROM v_predictions WHERE state = 'pending'")).scalar() or 0)


def candidate_adapters(session: Session) -> list[tuple[str, int]]:
    """(path, version) of adapters trained but neither published nor rejected yet (a gate that never ran)."""
    rows = session.execute(select(Adapter.path, Adapter.version).where(Adapter.status == "candidate")
                           .order_by(Adapter.version)).all()
    return [(p, v) for p, v in rows]


def _row(b: Block) -> BlockRow:
    return BlockRow(id=b.id, kind=b.kind, status=b.status, size=b.size, trigger_id=b.trigger_id,
                    adapter_version=b.adapter_version, as_of=b.as_of)


def block_row(session: Session, block_id: int) -> BlockRow | None:
    b = session.get(Block, block_id)
    return None if b is None else _row(b)


def block_for_trigger(session: Session, trigger_id: int) -> BlockRow | None:
    """The block a manual trigger started (None if it died before planning one)."""
    b = session.scalar(select(Block).where(Block.trigger_id == trigger_id).order_by(Block.id).limit(1))
    return None if b is None else _row(b)


def block_items(session: Session, block_id: int) -> list[tuple[str, datetime]]:
    """The block's (ticker, as_of) items in episode order (what a gate's other side must replay)."""
    return [(t, a) for t, a in session.execute(select(Episode.ticker, Episode.as_of)
                                               .where(Episode.block_id == block_id).order_by(Episode.idx))]


def scored_block_ids(session: Session, kind: str | None = None) -> set[int]:
    """Blocks (of `kind`, if given) whose model metrics have been computed."""
    q = select(BlockMetric.block_id).where(BlockMetric.name == "model")
    if kind is not None:
        q = q.join(Block, Block.id == BlockMetric.block_id).where(Block.kind == kind)
    return set(session.scalars(q))


def running_block_progress(session: Session) -> BlockProgress | None:
    """The newest block still running: id, kind, size and episodes done (for progress lines)."""
    b = session.scalar(select(Block).where(Block.status == "running").order_by(Block.id.desc()).limit(1))
    if b is None:
        return None
    done = session.scalar(select(func.count()).select_from(Episode)
                          .where(Episode.block_id == b.id, Episode.status == "done")) or 0
    steps = session.scalar(select(func.count()).select_from(Step).join(Episode, Episode.id == Step.episode_id)
                           .where(Episode.block_id == b.id)) or 0
    return BlockProgress(id=b.id, kind=b.kind, size=b.size, done=int(done), steps=int(steps),
                         created_at=b.created_at)

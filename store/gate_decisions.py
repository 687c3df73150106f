"""Gate decisions: the paired rewards a gate compares, and the decision rows it leaves (table gate_decisions)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.models import Block, Episode, GateDecision, Prediction, Reward


@dataclass(frozen=True)
class PairedItem:
    """One gate item: the same (ticker, as_of) answered by the serving adapter and by the candidate."""

    ticker: str
    as_of: datetime
    serving: float
    candidate: float


def _rewards(session: Session, block_id: int, reward_version: str) -> dict[tuple[str, datetime], float]:
    rows = session.execute(
        select(Episode.ticker, Episode.as_of, Reward.composite)
        .join(Prediction, Prediction.episode_id == Episode.id)
        .join(Reward, Reward.prediction_id == Prediction.id)
        .where(Episode.block_id == block_id, Reward.reward_version == reward_version)
    )
    return {(t, a): float(r) for t, a, r in rows}


def paired_rewards(session: Session, serving_block_id: int, candidate_block_id: int,
                   reward_version: str) -> list[PairedItem]:
    """Items scored in both blocks (under `reward_version`), paired by (ticker, as_of), in as_of order.

    A parse failure is scored 0 like any other answer, so it counts against its side; an item
    still unscored on either side has no pair and is left out.
    """
    serving = _rewards(session, serving_block_id, reward_version)
    candidate = _rewards(session, candidate_block_id, reward_version)
    keys = sorted(serving.keys() & candidate.keys(), key=lambda k: (k[1], k[0]))
    return [PairedItem(t, a, serving[(t, a)], candidate[(t, a)]) for t, a in keys]


def add(session: Session, **fields: Any) -> int:
    """Insert one gate decision; returns its id."""
    row = GateDecision(**fields)
    session.add(row)
    session.flush()
    return row.id


def latest(session: Session, candidate_version: int | None = None) -> GateDecision | None:
    """The newest gate decision (for one candidate, if given)."""
    q = select(GateDecision).order_by(GateDecision.id.desc()).limit(1)
    if candidate_version is not None:
        q = q.where(GateDecision.candidate_version == candidate_version)
    return session.scalar(q)


def recent(session: Session, limit: int = 20) -> list[GateDecision]:
    """The newest gate decisions, newest first."""
    return list(session.scalars(select(GateDecision).order_by(GateDecision.id.desc()).limit(limit)))


def train_as_ofs(session: Session, market: str) -> list[datetime]:
    """Distinct as_of of every train item planned on this market (live gates keep clear of their windows)."""
    return list(session.scalars(
        select(Episode.as_of).distinct().join(Block, Block.id == Episode.block_id)
        .where(Block.market == market, Block.kind == "train")
    ))

"""Repository functions for outcome resolution and scoring: pending predictions, retrieved snippets,
outcomes, rewards and block metrics.

Each function works inside the caller's session and does not commit. Writes are idempotent
through the schema's unique constraints (one outcome per prediction, one reward per prediction and
reward version, one metrics row per block and name): a second resolver, or a retry after a crash,
inserts nothing twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from store.db import insert
from store.models import (
    Block,
    BlockMetric,
    Episode,
    Outcome,
    Prediction,
    Reward,
    Snippet,
    ToolCall,
    ToolCallSnippet,
    utcnow,
)

METRIC_FIELDS = ("n", "n_valid", "accuracy", "mean_composite", "brier", "ece", "mean_abs_magnitude_error",
                 "coverage", "skill")


@dataclass(frozen=True)
class OutcomeRow:
    close_as_of: float
    close_resolve: float
    as_of_date: date
    resolve_date: date
    realized_return_pct: float
    realized_direction: str
    typical_move_pct: float | None


@dataclass(frozen=True)
class PendingPrediction:
    """A prediction with no reward at the current reward version (its outcome may already exist)."""

    id: int
    episode_id: int
    block_id: int
    block_mode: str
    ticker: str
    as_of: datetime
    horizon: int
    resolve_at: date
    direction: str | None
    magnitude_pct: float | None
    confidence: float | None
    citations: Any
    valid: bool
    parse_error: str | None
    pending_reason: str | None
    outcome: OutcomeRow | None


@dataclass(frozen=True)
class ScoredPrediction:
    """A prediction scored at the current version, with its outcome (None if prices were missing)."""

    id: int
    ticker: str
    as_of: datetime
    horizon: int
    direction: str | None
    magnitude_pct: float | None
    confidence: float | None
    composite: float
    scored_valid: bool  # the reward row has no reason: it passed validation at the scoring boundary
    outcome: OutcomeRow | None


def _outcome_row(o: Outcome | None) -> OutcomeRow | None:
    if o is None:
        return None
    return OutcomeRow(o.close_as_of, o.close_resolve, o.as_of_date, o.resolve_date, o.realized_return_pct,
                      o.realized_direction, o.typical_move_pct)


def pending_predictions(session: Session, reward_version: str) -> list[PendingPrediction]:
    """Predictions without a reward at `reward_version`, oldest first (due-ness is the caller's call)."""
    scored = exists().where(Reward.prediction_id == Prediction.id, Reward.reward_version == reward_version)
    rows = session.execute(
        select(Prediction, Block.mode, Outcome)
        .join(Block, Block.id == Prediction.block_id)
        .outerjoin(Outcome, Outcome.prediction_id == Prediction.id)
        .where(~scored)
        .order_by(Prediction.id)
    ).all()
    return [
        PendingPrediction(
            p.id, p.episode_id, p.block_id, mode, p.ticker, p.as_of, p.horizon, p.resolve_at, p.direction,
            p.magnitude_pct, p.confidence, p.citations, p.valid, p.parse_error, p.pending_reason,
            _outcome_row(o),
        )
        for p, mode, o in rows
    ]


def retrieved_snippets(session: Session, episode_id: int) -> dict[int, datetime]:
    """snippet id -> published_at for every snippet a tool call of the episode's current attempt returned."""
    rows = session.execute(
        select(Snippet.id, Snippet.published_at)
        .join(ToolCallSnippet, ToolCallSnippet.snippet_id == Snippet.id)
        .join(ToolCall, ToolCall.id == ToolCallSnippet.tool_call_id)
        .join(Episode, (Episode.id == ToolCall.episode_id) & (Episode.attempt == ToolCall.attempt))
        .where(ToolCall.episode_id == episode_id)
    ).all()
    return {sid: published for sid, published in rows}


def write_outcome(
    session: Session, prediction_id: int, *, ticker: str, correct: bool | None, outcome: OutcomeRow
) -> bool:
    """Insert the outcome unless one exists; True when this call wrote it."""
    stmt = insert(session, Outcome).values(
        prediction_id=prediction_id, ticker=ticker, correct=None if correct is None else int(correct),
        close_as_of=outcome.close_as_of, close_resolve=outcome.close_resolve, as_of_date=outcome.as_of_date,
        resolve_date=outcome.resolve_date, realized_return_pct=outcome.realized_return_pct,
        realized_direction=outcome.realized_direction, typical_move_pct=outcome.typical_move_pct,
        resolved_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["prediction_id"])
    return bool(session.execute(stmt).rowcount)


def write_reward(
    session: Session,
    prediction_id: int,
    *,
    reward_version: str,
    direction: float,
    magnitude: float,
    calibration: float,
    data_use: float,
    composite: float,
    reason: str | None,
) -> bool:
    """Insert the reward unless this version already scored the prediction; True when this call wrote it."""
    stmt = insert(session, Reward).values(
        prediction_id=prediction_id, reward_version=reward_version, direction=direction, magnitude=magnitude,
        calibration=calibration, data_use=data_use, composite=composite, reason=reason, created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["prediction_id", "reward_version"])
    return bool(session.execute(stmt).rowcount)


def set_pending_reason(session: Session, prediction_id: int, reason: str | None) -> bool:
    """Record why a prediction is still pending (None clears it); writes only when it changes."""
    res = session.execute(
        update(Prediction)
        .where(Prediction.id == prediction_id)
        .where(func.coalesce(Prediction.pending_reason, "") != (reason or ""))
        .values(pending_reason=reason)
    )
    return bool(res.rowcount)


def blocks_needing_metrics(session: Session, reward_version: str) -> list[int]:
    """Finished blocks whose every prediction is scored at this version but whose metrics are not."""
    unscored = exists().where(
        Prediction.block_id == Block.id,
        ~exists().where(Reward.prediction_id == Prediction.id, Reward.reward_version == reward_version),
    )
    has_predictions = exists().where(Prediction.block_id == Block.id)
    has_metrics = exists().where(
        BlockMetric.block_id == Block.id, BlockMetric.name == "model", BlockMetric.reward_version == reward_version
    )
    q = (select(Block.id).where(Block.status != "running", has_predictions, ~unscored, ~has_metrics)
         .order_by(Block.id))
    return list(session.scalars(q))


def scored_predictions(session: Session, block_id: int, reward_version: str) -> list[ScoredPrediction]:
    """The block's predictions with their reward at this version and their outcome."""
    rows = session.execute(
        select(Prediction, Reward.composite, Reward.reason, Outcome)
        .join(Reward, (Reward.prediction_id == Prediction.id) & (Reward.reward_version == reward_version))
        .outerjoin(Outcome, Outcome.prediction_id == Prediction.id)
        .where(Prediction.block_id == block_id)
        .order_by(Prediction.id)
    ).all()
    return [
        ScoredPrediction(p.id, p.ticker, p.as_of, p.horizon, p.direction, p.magnitude_pct, p.confidence,
                         composite, reason is None, _outcome_row(o))
        for p, composite, reason, o in rows
    ]


def upsert_block_metric(
    session: Session, block_id: int, name: str, reward_version: str, metrics: Mapping[str, Any]
) -> None:
    """One row per (block, name): `model`, `always_up`, `momentum_20d`, `coin_flip` (read by v_block_summary)."""
    values = {k: metrics[k] for k in METRIC_FIELDS}
    stmt = insert(session, BlockMetric).values(
        block_id=block_id, name=name, reward_version=reward_version, computed_at=utcnow(), **values
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["block_id", "name"],
        set_={"reward_version": reward_version, "computed_at": stmt.excluded.computed_at,
              **{k: getattr(stmt.excluded, k) for k in METRIC_FIELDS}},
    )
    session.execute(stmt)

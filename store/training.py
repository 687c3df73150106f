"""Repository functions for training: the offline set (scored episodes), training runs and adapters.

The offline set is read in two passes so a round costs O(new + replay), not O(history): a light
index (ids, scores, labels) of every scored episode, then the messages of only the chosen ones.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.db import StoreError
from store.models import Adapter, Block, Episode, Outcome, Prediction, Reward, Step, TrainingRun, utcnow

CONFIDENCE_MAP_KEY = "confidence_map"  # in adapters.metrics: a rewards.calibration.ConfidenceMap fitted at the gate


@dataclass(frozen=True)
class ScoredEpisode:
    """One episode of the offline set: where it came from, what it was conditioned on, what it earned."""

    episode_id: int
    block_id: int
    block_kind: str
    prediction_id: int
    ticker: str
    as_of: datetime
    attempt: int
    adapter_version: int | None
    conditioning: str | None
    valid: bool
    # None = a parse failure that the reward module did not score; the trainer counts it as 0.
    score: float | None
    reward_version: str | None
    # The direction the prediction took (None for a parse failure): the trainer balances on it.
    direction: str | None = None
    # Whether that direction came true (the reward's direction component); None for a parse failure.
    correct: bool | None = None


def scored_episodes(session: Session, *, block_ids: Iterable[int] | None = None,
                    complete_only: bool = True) -> list[ScoredEpisode]:
    """Every episode with a final prediction that is scored (latest reward row) or is a parse failure.

    A valid prediction whose outcome is still pending is left out. `complete_only` keeps only
    blocks whose run finished, so a crashed block is not trained on half-done.
    """
    latest = (
        select(Reward.prediction_id, func.max(Reward.id).label("rid")).group_by(Reward.prediction_id).subquery()
    )
    stmt = (
        select(Episode, Block.kind, Prediction, Reward)
        .join(Block, Block.id == Episode.block_id)
        .join(Prediction, Prediction.episode_id == Episode.id)
        .outerjoin(latest, latest.c.prediction_id == Prediction.id)
        .outerjoin(Reward, Reward.id == latest.c.rid)
        .order_by(Episode.id)
    )
    if complete_only:
        stmt = stmt.where(Block.status == "complete")
    if block_ids is not None:
        stmt = stmt.where(Episode.block_id.in_(list(block_ids)))
    out = []
    for ep, kind, pred, rew in session.execute(stmt):
        if rew is None and pred.valid:
            continue  # outcome not known yet
        out.append(ScoredEpisode(
            episode_id=ep.id, block_id=ep.block_id, block_kind=kind, prediction_id=pred.id, ticker=ep.ticker,
            as_of=ep.as_of, attempt=ep.attempt, adapter_version=ep.adapter_version,
            conditioning=ep.conditioning, valid=bool(pred.valid),
            score=None if rew is None else float(rew.composite),
            reward_version=None if rew is None else rew.reward_version,
            direction=pred.direction if pred.valid else None,
            correct=None if rew is None or not pred.valid else rew.direction >= 1.0,
        ))
    return out


def episode_messages(session: Session, episodes: Sequence[ScoredEpisode]) -> dict[int, list[dict[str, str]]]:
    """Messages (role, content) of each episode's current attempt, in step order."""
    attempts = {e.episode_id: e.attempt for e in episodes}
    out: dict[int, list[dict[str, str]]] = defaultdict(list)
    ids = list(attempts)
    for chunk in range(0, len(ids), 500):  # keep IN lists short for both backends
        part = ids[chunk:chunk + 500]
        rows = session.execute(
            select(Step.episode_id, Step.attempt, Step.role, Step.content)
            .where(Step.episode_id.in_(part))
            .order_by(Step.episode_id, Step.idx)
        )
        for episode_id, attempt, role, content in rows:
            if attempt == attempts[episode_id]:
                out[episode_id].append({"role": role, "content": content})
    return dict(out)


def train_block_ids(session: Session) -> list[int]:
    """Ids of every `train`-kind block, oldest first (the held-out split is taken by position here)."""
    return list(session.scalars(select(Block.id).where(Block.kind == "train").order_by(Block.id)))


def used_block_ids(session: Session, objective: str | None = None) -> set[int]:
    """Blocks already consumed by a finished training run (their episodes become replay material)."""
    stmt = select(TrainingRun.block_ids).where(TrainingRun.status == "done")
    if objective is not None:
        stmt = stmt.where(TrainingRun.objective == objective)
    used: set[int] = set()
    for ids in session.scalars(stmt):
        used.update(int(i) for i in ids or [])
    return used


def running_training_run(session: Session, objective: str) -> TrainingRun | None:
    """The interrupted round to pick up, if any (the newest one still `running`)."""
    return session.scalars(
        select(TrainingRun).where(TrainingRun.status == "running", TrainingRun.objective == objective)
        .order_by(TrainingRun.id.desc()).limit(1)
    ).first()


def latest_training_run(session: Session) -> TrainingRun | None:
    """The newest training round, whatever its state (what `scoreloop status` shows)."""
    return session.scalar(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(1))


def create_training_run(session: Session, *, objective: str, parent_version: int | None, block_ids: list[int],
                        replay_episode_ids: list[int], n_examples: int, hyperparams: dict) -> TrainingRun:
    run = TrainingRun(objective=objective, status="running", parent_version=parent_version,
                      block_ids=sorted(block_ids), replay_episode_ids=sorted(replay_episode_ids),
                      n_examples=n_examples, hyperparams=hyperparams)
    session.add(run)
    session.flush()
    return run


def finish_training_run(session: Session, run_id: int, *, adapter_version: int, loss_curve: list[dict]) -> None:
    run = session.get(TrainingRun, run_id)
    run.status = "done"
    run.adapter_version = adapter_version
    run.loss_curve = loss_curve
    run.error = None
    run.finished_at = utcnow()


def fail_training_run(session: Session, run_id: int, error: str, loss_curve: list[dict] | None = None) -> None:
    run = session.get(TrainingRun, run_id)
    run.status = "failed"
    run.error = error
    if loss_curve is not None:
        run.loss_curve = loss_curve
    run.finished_at = utcnow()


def note_training_error(session: Session, run_id: int, error: str) -> None:
    """An interruption: the row stays `running` so the next round resumes it, with the reason kept."""
    session.get(TrainingRun, run_id).error = error


# --- adapters -------------------------------------------------------------------------------------

def serving_adapter_row(session: Session) -> Adapter | None:
    return session.scalars(select(Adapter).where(Adapter.status == "serving").order_by(Adapter.version.desc())
                           .limit(1)).first()


def adapter_row(session: Session, version: int) -> Adapter | None:
    return session.scalars(select(Adapter).where(Adapter.version == version)).first()


def adapter_label_edges(session: Session, version: int | None) -> list[float] | None:
    """The quantile edges the adapter was trained with, so inference bins a target the same way."""
    if version is None:
        return None
    edges = session.scalar(select(TrainingRun.hyperparams).join(Adapter, Adapter.training_run_id == TrainingRun.id)
                           .where(Adapter.version == version))
    found = (edges or {}).get("label_edges")
    return [float(e) for e in found] if found else None


def adapter_confidence_map(session: Session, version: int | None) -> dict | None:
    """The confidence map fitted for this adapter at its gate (adapters.metrics), or None."""
    if version is None:
        return None
    metrics = session.scalar(select(Adapter.metrics).where(Adapter.version == version))
    return (metrics or {}).get(CONFIDENCE_MAP_KEY)


def set_adapter_confidence_map(session: Session, version: int, confidence_map: dict) -> None:
    """Keep `confidence_map` (a rewards.calibration.ConfidenceMap dump) in the adapter's metrics."""
    row = session.scalar(select(Adapter).where(Adapter.version == version))
    if row is None:
        raise StoreError(f"no adapter v{version} to attach a confidence map to")
    row.metrics = {**(row.metrics or {}), CONFIDENCE_MAP_KEY: confidence_map}


def resolved_confidences(session: Session, block_id: int) -> tuple[list[float], list[bool]]:
    """(stated confidence, correct) of a block's valid, resolved predictions: what a confidence map is
    fitted on (stated, not published: the map reads what the model wrote)."""
    rows = session.execute(
        select(func.coalesce(Prediction.stated_confidence, Prediction.confidence), Outcome.correct)
        .join(Outcome, Outcome.prediction_id == Prediction.id)
        .where(Prediction.block_id == block_id, Prediction.valid.is_(True), Outcome.correct.is_not(None),
               Prediction.confidence.is_not(None))
        .order_by(Prediction.id)).all()
    return [float(c) for c, _ in rows], [bool(y) for _, y in rows]


def next_adapter_version(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(Adapter.version), 0)))) + 1


def add_adapter(session: Session, *, version: int, parent_version: int | None, path: str, base_model: str,
                training_run_id: int | None, metrics: dict | None = None) -> Adapter:
    row = Adapter(version=version, parent_version=parent_version, path=path, base_model=base_model,
                  status="candidate", training_run_id=training_run_id, metrics=metrics or {})
    session.add(row)
    session.flush()
    return row


def flip_serving(session: Session, version: int) -> None:
    """Within the caller's transaction: every serving row retires, `version` serves."""
    session.execute(update(Adapter).where(Adapter.status == "serving", Adapter.version != version)
                    .values(status="retired"))
    row = adapter_row(session, version)
    row.status = "serving"
    row.published_at = utcnow()


def set_adapter_status(session: Session, version: int, status: str) -> None:
    adapter_row(session, version).status = status


def merge_adapter_metrics(session: Session, version: int, metrics: dict) -> None:
    row = adapter_row(session, version)
    row.metrics = {**(row.metrics or {}), **metrics}  # new dict so the JSON column is marked dirty

"""Repository functions for controllability evaluations: eval_runs rows and the blocks they own.

Each function works inside the caller's session and does not commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from store.models import Block, Episode, EvalRun, utcnow


class EvalRunError(LookupError):
    """An eval run id that does not exist."""


def create_eval_run(session: Session, *, adapter_version: int | None, targets: list[float], market: str,
                    n_items: int, held_out: dict[str, Any]) -> int:
    run = EvalRun(adapter_version=adapter_version, targets=list(targets), market=market, n_items=n_items,
                  status="running", results={"held_out": held_out, "per_target": []})
    session.add(run)
    session.flush()
    return run.id


def link_block(session: Session, eval_run_id: int, block_id: int) -> None:
    session.execute(update(Block).where(Block.id == block_id).values(eval_run_id=eval_run_id))


def update_results(session: Session, eval_run_id: int, results: dict[str, Any], *, status: str | None = None) -> None:
    """Replace the results JSON (merged over the stored one); `status` done/failed also stamps finished_at."""
    run = session.get(EvalRun, eval_run_id)
    if run is None:
        raise EvalRunError(f"no eval run with id {eval_run_id}")
    run.results = {**(run.results or {}), **results}
    if status is not None:
        run.status = status
        if status in ("done", "failed"):
            run.finished_at = utcnow()


def get_eval_run(session: Session, eval_run_id: int) -> EvalRun:
    run = session.get(EvalRun, eval_run_id)
    if run is None:
        raise EvalRunError(f"no eval run with id {eval_run_id}")
    return run


def eval_block_ids(session: Session, eval_run_id: int) -> list[int]:
    return list(session.scalars(select(Block.id).where(Block.eval_run_id == eval_run_id).order_by(Block.id)))


def block_items(session: Session, block_id: int) -> list[tuple[str, datetime]]:
    """The block's planned (ticker, as_of) items in order."""
    rows = session.execute(select(Episode.ticker, Episode.as_of).where(Episode.block_id == block_id)
                           .order_by(Episode.idx)).all()
    return [(t, a) for t, a in rows]


def trained_items_from(session: Session, market: str, since: datetime) -> int:
    """Episodes of `train` blocks on this market with as_of at or after `since` (held-out leakage check)."""
    return int(session.scalar(
        select(func.count(Episode.id)).join(Block, Block.id == Episode.block_id)
        .where(Block.market == market, Block.kind == "train", Episode.as_of >= since)
    ) or 0)

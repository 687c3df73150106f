"""Repository functions for blocks, episodes and their traces (steps, tool calls, snippets, predictions).

Each function works inside the caller's session and does not commit; the runner wraps each call in
its own short `session_scope`, so every step is durable the moment it exists and SQLite's single
writer is never held across a model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from store.db import insert
from store.errors import ScoreloopError
from store.models import (
    Block,
    Episode,
    Prediction,
    Step,
    ToolCall,
    ToolCallSnippet,
    utcnow,
)


class TraceError(ScoreloopError, LookupError):
    """A block or episode asked for does not exist."""


@dataclass(frozen=True)
class PlannedItem:
    ticker: str
    as_of: datetime
    explore_direction: str | None = None
    explore_tool: str | None = None  # the one tool of an explored research plan, or "none"


@dataclass(frozen=True)
class ClaimedEpisode:
    """What a worker needs to run one attempt of an episode."""

    id: int
    block_id: int
    idx: int
    ticker: str
    as_of: datetime
    horizon: int
    attempt: int
    target_score: float | None
    conditioning: str | None
    seed: int
    explore_direction: str | None = None
    explore_tool: str | None = None


def create_block_with_items(
    session: Session,
    *,
    items: Sequence[PlannedItem],
    market: str,
    mode: str,
    kind: str,
    horizon: int,
    adapter_version: int | None,
    target_score: float | None,
    conditioning: str | None,
    seed: int = 0,
    trigger_id: int | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """A block and its N planned (pending) episodes, in one transaction."""
    block = Block(
        kind=kind, mode=mode, market=market, size=len(items),
        as_of=max((it.as_of for it in items), default=None), horizon=horizon, status="running",
        adapter_version=adapter_version, target_score=target_score, conditioning=conditioning,
        seed=seed, trigger_id=trigger_id, config=config,
    )
    session.add(block)
    session.flush()
    session.add_all(
        Episode(block_id=block.id, idx=i, ticker=it.ticker, as_of=it.as_of, horizon=horizon, status="pending",
                attempt=0, adapter_version=adapter_version, target_score=target_score, conditioning=conditioning,
                explore_direction=it.explore_direction, explore_tool=it.explore_tool)
        for i, it in enumerate(items)
    )
    session.flush()
    return block.id


def get_block(session: Session, block_id: int) -> Block:
    block = session.get(Block, block_id)
    if block is None:
        raise TraceError(f"no block with id {block_id}")
    return block


def unfinished_episode_ids(session: Session, block_id: int) -> list[int]:
    """Episodes of a block that still need a run (pending, or running when the process stopped)."""
    return list(session.scalars(
        select(Episode.id).where(Episode.block_id == block_id, Episode.status.in_(("pending", "running")))
        .order_by(Episode.idx)
    ))


def count_done(session: Session, block_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Episode).where(Episode.block_id == block_id, Episode.status == "done")
    ) or 0


def claim_episode(session: Session, episode_id: int, adapter_version: int | None) -> ClaimedEpisode | None:
    """Start a new attempt (attempt + 1, status running); None if the episode is already done."""
    ep = session.get(Episode, episode_id)
    if ep is None:
        raise TraceError(f"no episode with id {episode_id}")
    has_prediction = session.scalar(select(Prediction.id).where(Prediction.episode_id == episode_id))
    if ep.status == "done" or has_prediction is not None:
        return None
    ep.attempt += 1
    ep.status = "running"
    ep.started_at = utcnow()
    ep.adapter_version = adapter_version
    ep.error = None
    session.flush()
    block_seed = session.scalar(select(Block.seed).where(Block.id == ep.block_id)) or 0
    return ClaimedEpisode(
        id=ep.id, block_id=ep.block_id, idx=ep.idx, ticker=ep.ticker, as_of=ep.as_of, horizon=ep.horizon,
        attempt=ep.attempt, target_score=ep.target_score, conditioning=ep.conditioning, seed=block_seed,
        explore_direction=ep.explore_direction, explore_tool=ep.explore_tool,
    )


def release_episode(session: Session, episode_id: int, error: str | None = None) -> None:
    """A stopped or crashed attempt: back to pending so a resume restarts it (its steps stay)."""
    session.execute(update(Episode).where(Episode.id == episode_id, Episode.status == "running")
                    .values(status="pending", error=error))


def add_step(
    session: Session,
    *,
    episode_id: int,
    attempt: int,
    idx: int,
    role: str,
    content: str,
    tool_name: str | None = None,
    tool_args: dict[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    latency_ms: float | None = None,
) -> int:
    step = Step(episode_id=episode_id, attempt=attempt, idx=idx, role=role, content=content,
                tool_name=tool_name, tool_args=tool_args, prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens, latency_ms=latency_ms)
    session.add(step)
    session.flush()
    return step.id


def add_tool_call(
    session: Session,
    *,
    episode_id: int,
    attempt: int,
    step_id: int | None,
    name: str,
    args: dict[str, Any],
    as_of: datetime,
    result: str | None,
    error: str | None,
    latency_ms: float,
    cache_hit: bool = False,
    dropped_future: int = 0,
    snippet_ids: Sequence[int] = (),
) -> int:
    """A tool invocation and the snippets it returned, in rank order."""
    call = ToolCall(episode_id=episode_id, step_id=step_id, attempt=attempt, name=name, args=args, as_of=as_of,
                    result=result, error=error, latency_ms=latency_ms, cache_hit=cache_hit,
                    dropped_future=dropped_future)
    session.add(call)
    session.flush()
    seen: set[int] = set()
    for rank, sid in enumerate(snippet_ids):
        if sid not in seen:
            seen.add(sid)
            session.add(ToolCallSnippet(tool_call_id=call.id, snippet_id=sid, rank=rank))
    session.flush()
    return call.id


def save_prediction(session: Session, *, episode_id: int, resolve_at: date, valid: bool,
                    direction: str | None = None, magnitude_pct: float | None = None,
                    confidence: float | None = None, rationale: str | None = None,
                    citations: list[int] | None = None, parse_error: str | None = None,
                    raw_output: str | None = None, adapter_version: int | None = None,
                    stated_confidence: float | None = None) -> int:
    """The episode's one prediction (idempotent: a second call returns the first row's id).

    `confidence` is the published one (after the adapter's confidence map); `stated_confidence`
    what the model wrote (defaults to `confidence`: no map)."""
    existing = session.scalar(select(Prediction.id).where(Prediction.episode_id == episode_id))
    if existing is not None:
        return existing
    ep = session.get(Episode, episode_id)
    if ep is None:
        raise TraceError(f"no episode with id {episode_id}")
    stmt = insert(session, Prediction.__table__).values(
        episode_id=episode_id, block_id=ep.block_id, ticker=ep.ticker, as_of=ep.as_of, horizon=ep.horizon,
        resolve_at=resolve_at, direction=direction, magnitude_pct=magnitude_pct, confidence=confidence,
        stated_confidence=confidence if stated_confidence is None else stated_confidence, rationale=rationale, citations=citations, valid=valid, parse_error=parse_error, raw_output=raw_output,
        adapter_version=adapter_version, target_score=ep.target_score, conditioning=ep.conditioning,
        created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=["episode_id"])
    session.execute(stmt)
    return session.scalar(select(Prediction.id).where(Prediction.episode_id == episode_id))


def finish_episode(session: Session, episode_id: int, *, status: str = "done", error: str | None = None) -> None:
    session.execute(update(Episode).where(Episode.id == episode_id)
                    .values(status=status, error=error, finished_at=utcnow()))


def complete_block(session: Session, block_id: int) -> None:
    session.execute(update(Block).where(Block.id == block_id).values(status="complete", finished_at=utcnow()))


def unfinished_block_ids(session: Session) -> list[int]:
    """Blocks left `running` (interrupted or in progress), oldest first."""
    return list(session.scalars(select(Block.id).where(Block.status == "running").order_by(Block.id)))


def next_replay_start(session: Session, market: str, kind: str = "train") -> datetime | None:
    """The latest as_of of earlier replay blocks of this market and kind (the next block starts after it)."""
    return session.scalar(
        select(func.max(Episode.as_of)).join(Block, Block.id == Episode.block_id)
        .where(Block.market == market, Block.mode == "replay", Block.kind == kind)
    )


@dataclass
class TraceStep:
    idx: int
    role: str
    content: str
    tool_name: str | None
    tool_args: dict[str, Any] | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    tool_error: str | None = None
    cache_hit: bool | None = None
    dropped_future: int | None = None
    tool_latency_ms: float | None = None
    snippet_ids: list[int] = field(default_factory=list)


@dataclass
class EpisodeTrace:
    episode: Episode
    steps: list[TraceStep]
    prediction: Prediction | None
    attempts: int


def episode_trace(session: Session, episode_id: int, attempt: int | None = None) -> EpisodeTrace:
    """One episode's steps in order (current attempt unless given), with tool calls and the prediction."""
    ep = session.get(Episode, episode_id)
    if ep is None:
        raise TraceError(f"no episode with id {episode_id}")
    att = ep.attempt if attempt is None else attempt
    rows = session.execute(
        select(Step, ToolCall).outerjoin(ToolCall, ToolCall.step_id == Step.id)
        .where(Step.episode_id == episode_id, Step.attempt == att).order_by(Step.idx)
    ).all()
    call_ids = [c.id for _, c in rows if c is not None]
    snips: dict[int, list[int]] = {}
    if call_ids:
        for cid, sid in session.execute(
            select(ToolCallSnippet.tool_call_id, ToolCallSnippet.snippet_id)
            .where(ToolCallSnippet.tool_call_id.in_(call_ids)).order_by(ToolCallSnippet.rank)
        ):
            snips.setdefault(cid, []).append(sid)
    steps = [
        TraceStep(idx=s.idx, role=s.role, content=s.content, tool_name=s.tool_name, tool_args=s.tool_args,
                  prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, latency_ms=s.latency_ms,
                  tool_error=c.error if c else None, cache_hit=c.cache_hit if c else None,
                  dropped_future=c.dropped_future if c else None, tool_latency_ms=c.latency_ms if c else None,
                  snippet_ids=snips.get(c.id, []) if c else [])
        for s, c in rows
    ]
    pred = session.scalar(select(Prediction).where(Prediction.episode_id == episode_id))
    return EpisodeTrace(episode=ep, steps=steps, prediction=pred, attempts=ep.attempt)


def block_prediction_counts(session: Session, block_id: int) -> tuple[int, int]:
    """(predictions, valid predictions) of a block."""
    n, valid = session.execute(
        select(func.count(Prediction.id), func.coalesce(func.sum(case((Prediction.valid, 1), else_=0)), 0))
        .where(Prediction.block_id == block_id)
    ).one()
    return int(n), int(valid)

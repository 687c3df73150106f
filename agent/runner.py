"""The block runner: plan N (ticker, as_of) items as episodes, run them concurrently, trace everything.

Episodes run in a thread pool so a batching policy shares forward passes between them. Every
step is committed as it happens; a crashed or stopped block resumes with `resume_block`: done
episodes are kept, unfinished ones restart as a new attempt, and an episode never gets a second
prediction (unique per episode, and `claim_episode` skips episodes that already have one).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from agent.config import AgentConfig
from agent.graph import EpisodeStopped, run_episode
from agent.recorder import EpisodeRecorder, WriteClock
from agent.schema import TOOL_NAMES
from agent.tools import EpisodeTools
from market.protocols import MarketError, UnknownTickerError
from market.split import draw_items, timeline_split, train_days
from policy.protocol import Policy, PolicyError
from rewards.calibration import ConfidenceMap
from rewards.config import RewardsConfig
from rewards.labels import target_label
from store import traces
from store.db import session_factory, session_scope
from store.errors import ScoreloopError
from store.training import adapter_confidence_map, adapter_label_edges

if TYPE_CHECKING:
    from market.sources import Market

class BlockError(ScoreloopError, RuntimeError):
    """A block cannot be planned or run as asked; the message says what to change."""


class BlockInterrupted(BlockError):
    """An episode failed outside the graph (e.g. the model backend); the block is left resumable."""

    def __init__(self, message: str, block_id: int) -> None:
        super().__init__(message)
        self.block_id = block_id


class _Halt:
    """Stop when the caller asks (their event) or when a sibling episode failed (ours)."""

    def __init__(self, external: threading.Event | None) -> None:
        self.external = external
        self.failed = threading.Event()

    def is_set(self) -> bool:
        return self.failed.is_set() or (self.external is not None and self.external.is_set())


def _utc(dt: datetime) -> datetime:
    if dt.tzinfo is None:
        raise BlockError(f"as_of {dt.isoformat()} is naive; give a timezone-aware UTC datetime")
    return dt.astimezone(UTC)


def _check_tickers(market: Market, tickers: Sequence[str], probe_as_of: datetime) -> list[str]:
    """Upper-cased tickers, each known to the market (probed on the source when outside the universe)."""
    out = [t.strip().upper() for t in tickers if t.strip()]
    if not out:
        raise BlockError("no tickers given")
    universe = set(market.tickers)
    bad: list[str] = []
    for t in out:
        if t in universe:
            continue
        try:
            market.prices.bars(t, probe_as_of, 1)
        except UnknownTickerError:
            bad.append(t)
        except MarketError as err:
            raise BlockError(f"ticker {t}: {err}") from None
    if bad:
        known = ", ".join(market.tickers[:12]) + (" ..." if len(market.tickers) > 12 else "")
        raise BlockError(f"unknown ticker{'s' if len(bad) > 1 else ''} {', '.join(bad)} in the "
                         f"{market.name} market (known: {known or 'none'})")
    return out


def plan_items(session, market: Market, *, mode: str, size: int, horizon: int, kind: str,
               as_of: datetime | None = None, tickers: Sequence[str] | None = None,
               items: Sequence[tuple[str, datetime]] | None = None, seed: int | str = 0) -> list[traces.PlannedItem]:
    """The block's (ticker, as_of) items, inside the region market.split gives `kind` (replay of a bounded history).

    live = one as_of. replay: `items` as given; train = consecutive train-region sessions after the
    last train block; gate / eval = `size` (ticker, session) draws from their region with `seed`,
    or consecutive sessions from an explicit `as_of` (checked to lie in the region).
    """
    if items is not None:
        return _given_items(market, items, mode=mode, kind=kind, horizon=horizon)
    if size < 1:
        raise BlockError(f"block size must be >= 1, got {size}")
    if tickers is None and not market.tickers:
        raise BlockError(f"the {market.name} market's universe is empty: set market.universe or pass --tickers")
    cal = market.calendar
    if mode == "live":
        when = _utc(as_of) if as_of else datetime.now(UTC)
        names = _check_tickers(market, tickers, when) if tickers is not None else list(market.tickers)
        return [traces.PlannedItem(names[i % len(names)], when) for i in range(size)]
    if mode != "replay":
        raise BlockError(f"unknown mode {mode!r}: use replay or live")
    last = market.span[1] if market.span else None
    try:
        split = timeline_split(market, horizon) if market.span else None
        start = cal.previous_session(_utc(as_of).date()) if as_of is not None else None
        if split is None and start is None:
            raise BlockError(f"the {market.name} market has no bounded history: pass --as-of to replay it")
        probe = cal.replay_as_of(start or split.region(kind).first)
        names = _check_tickers(market, tickers, probe) if tickers is not None else list(market.tickers)
        n_days = math.ceil(size / len(names))
        if split is not None and kind == "train":
            latest = traces.next_replay_start(session, market.name, kind) if start is None else None
            days = train_days(split, after=cal.base_session(latest) if latest else None, n_days=n_days, start=start)
        elif split is not None and start is None:  # gate / eval: independent draws across the region
            drawn = draw_items(split.region(kind), names, size, seed)
            return [traces.PlannedItem(t, cal.replay_as_of(d)) for t, d in drawn]
        else:
            days = [start] + [cal.add_sessions(start, k) for k in range(1, n_days)]
            if split is not None:
                split.check(kind, days)
        day = days[0]
        end = cal.add_sessions(days[-1], horizon)
    except MarketError as err:
        raise BlockError(f"cannot plan a replay block: {err}") from None
    if last is not None and end > last:
        raise BlockError(f"replay reached the end of the {market.name} history ({last}): a block from {day} "
                         f"needs outcomes up to {end}; pass an earlier --as-of")
    return [traces.PlannedItem(names[i % len(names)], cal.replay_as_of(days[i // len(names)])) for i in range(size)]


def _given_items(market: Market, items: Sequence[tuple[str, datetime]], *, mode: str, kind: str,
                 horizon: int) -> list[traces.PlannedItem]:
    """Exactly these items (the other side of a paired gate, a drawn eval set), checked against the split."""
    if not items:
        raise BlockError("no items given")
    planned = [traces.PlannedItem(t.strip().upper(), _utc(a)) for t, a in items]
    _check_tickers(market, sorted({p.ticker for p in planned}), planned[0].as_of)
    if mode == "replay" and market.span is not None:
        cal = market.calendar
        try:
            timeline_split(market, horizon).check(kind, [cal.base_session(p.as_of) for p in planned])
        except MarketError as err:
            raise BlockError(f"cannot plan a replay block: {err}") from None
    return planned


def explore(items: Sequence[traces.PlannedItem], rate: float, flat_rate: float = 0.1) -> list[traces.PlannedItem]:
    """Mark about `rate` of the items for direction exploration, each with a drawn direction.

    Directions are drawn over the answers that can be right: `flat` with `flat_rate` (about how
    often flat is right), up and down evenly otherwise; a uniform draw over three made a third of
    the explored episodes `flat`, right about one time in ten, which taught only "flat is bad".
    Seeded by the item itself (ticker, as_of, position), so a resumed block and every arm of an
    experiment on the same dates explore the same items the same way.
    """
    out = []
    for i, it in enumerate(items):
        rng = random.Random(f"explore|{it.ticker}|{it.as_of.isoformat()}|{i}")
        if rng.random() >= rate:
            out.append(it)
            continue
        direction = "flat" if rng.random() < flat_rate else rng.choice(("up", "down"))
        out.append(replace(it, explore_direction=direction))
    return out


def explore_tools(items: Sequence[traces.PlannedItem], rate: float,
                  mode: str = "draw") -> list[traces.PlannedItem]:
    """Mark about `rate` of the items for tool exploration, so the offline set shows which research earns
    reward. `draw`: the research plan becomes one drawn tool, or `none` (the model chooses from the first turn).
    `each`: the item is run once per tool, each alone as the plan, keeping its explored direction: the research
    choices then differ on the same item only, and the round's filter or score label sees their gap per item.

    Seeded by the item and drawn apart from the direction draw, so the two explorations are independent.
    """
    out = []
    for i, it in enumerate(items):
        rng = random.Random(f"explore-tool|{it.ticker}|{it.as_of.isoformat()}|{i}")
        if rng.random() >= rate:
            out.append(it)
        elif mode == "each":
            out.extend(replace(it, explore_tool=tool) for tool in TOOL_NAMES)
        else:
            out.append(replace(it, explore_tool=rng.choice((*TOOL_NAMES, "none"))))
    return out


def episode_plan(explore_tool: str | None) -> list[str] | None:
    """The research plan of an episode: None = the configured plan; an explored tool alone; `none` = no call."""
    if explore_tool is None:
        return None
    return [] if explore_tool == "none" else [explore_tool]


def confidence_map(session: Session, version: int | None) -> ConfidenceMap | None:
    """The adapter's confidence map, or None; a corrupt one is a clear error before any episode runs."""
    found = adapter_confidence_map(session, version)
    try:
        return None if found is None else ConfidenceMap.model_validate(found)
    except ValidationError as err:
        raise BlockError(f"adapter v{version}'s confidence map (adapters.metrics -> confidence_map) is not valid "
                         f"({err.error_count()} error(s), first: {err.errors()[0]['msg']}); delete that key to publish "
                         "stated confidences, or run the gate again to refit it") from None


def block_config(cfg: AgentConfig, kind: str) -> AgentConfig:
    """The agent settings a block of this kind runs with. Only train blocks sample (at agent.temperature);
    gate and eval blocks decode greedily: they compare adapters' decisions on the same items, and sampling
    noise would only widen their intervals. (Exploration is already train-only, in `run_block`.)"""
    return cfg.model_copy(update={"temperature": 0.0}) if kind != "train" and cfg.temperature else cfg


def run_block(engine: Engine, policy: Policy, market: Market, agent_cfg: AgentConfig,
              rewards_cfg: RewardsConfig, *, mode: str = "replay", size: int | None = None,
              as_of: datetime | None = None, tickers: Sequence[str] | None = None,
              target_score: float | None = None, kind: str = "train", trigger_id: int | None = None,
              progress: bool = True, stop: threading.Event | None = None, horizon: int | None = None,
              clock: WriteClock | None = None, items: Sequence[tuple[str, datetime]] | None = None,
              seed: int | str = 0) -> int:
    """Plan a block (or take `items`), run it, return its id (complete, or left `running` if stopped)."""
    agent_cfg = block_config(agent_cfg, kind)  # what the block records is what it runs with
    target = agent_cfg.target_score if target_score is None else target_score
    horizon = market.horizon_days if horizon is None else horizon
    factory = session_factory(engine)
    with session_scope(factory) as s:
        # Quantile labels mean "bin k of the offline set when this adapter was trained": use its edges.
        edges = (adapter_label_edges(s, policy.adapter_version) if rewards_cfg.label_format == "quantile"
                 else None)
        label = target_label(target, rewards_cfg, edges)
        against = guidance_label(agent_cfg, rewards_cfg, edges, policy)
        confidence_map(s, policy.adapter_version)  # refuse a corrupt map before the block is planned
        planned = plan_items(s, market, mode=mode, size=size or agent_cfg.block_size, horizon=horizon, kind=kind,
                             as_of=as_of, tickers=tickers, items=items, seed=seed)
        if kind == "train" and agent_cfg.explore_rate > 0:
            planned = explore(planned, agent_cfg.explore_rate, agent_cfg.explore_flat_rate)
        if kind == "train" and agent_cfg.explore_tool_rate > 0:
            planned = explore_tools(planned, agent_cfg.explore_tool_rate, agent_cfg.explore_tool_mode)
        block_id = traces.create_block_with_items(
            s, items=planned, market=market.name, mode=mode, kind=kind, horizon=horizon,
            adapter_version=policy.adapter_version, target_score=target, conditioning=label,
            trigger_id=trigger_id, config={"agent": agent_cfg.model_dump(), "label_format": rewards_cfg.label_format},
        )
    _execute(engine, block_id, policy, market, agent_cfg, progress=progress, stop=stop, clock=clock,
             guidance_label=against)
    return block_id


def guidance_label(agent_cfg: AgentConfig, rewards_cfg: RewardsConfig, edges, policy: Policy) -> str | None:
    """The label agent.guidance steers away from (same format as the target's), or None when it is off.
    A backend that cannot score choices is refused here, before a block is planned."""
    if agent_cfg.guidance <= 0:
        return None
    if not callable(getattr(policy, "choice_logprobs", None)):
        raise PolicyError(f"agent.guidance = {agent_cfg.guidance} needs a backend that scores choices "
                          f"(choice_logprobs: the local backend); {type(policy).__name__} does not. "
                          "Set agent.guidance = 0 or serve with backend = 'local'")
    return target_label(agent_cfg.guidance_against, rewards_cfg, edges)


def resume_block(engine: Engine, block_id: int, policy: Policy, market: Market, agent_cfg: AgentConfig,
                 rewards_cfg: RewardsConfig, *, progress: bool = True, stop: threading.Event | None = None,
                 clock: WriteClock | None = None) -> int:
    """Continue an interrupted block: done episodes stay, the rest restart as a new attempt."""
    with session_scope(engine) as s:
        block = traces.get_block(s, block_id)
        if block.market != market.name:
            raise BlockError(f"block {block_id} ran on the {block.market} market, not {market.name}")
        edges = (adapter_label_edges(s, policy.adapter_version) if rewards_cfg.label_format == "quantile"
                 else None)
    _execute(engine, block_id, policy, market, agent_cfg, progress=progress, stop=stop, clock=clock,
             guidance_label=guidance_label(agent_cfg, rewards_cfg, edges, policy))
    return block_id


def _execute(engine: Engine, block_id: int, policy: Policy, market: Market, cfg: AgentConfig, *,
             progress: bool, stop: threading.Event | None, clock: WriteClock | None,
             guidance_label: str | None = None) -> None:
    factory = session_factory(engine)
    with session_scope(factory) as s:
        block = traces.get_block(s, block_id)
        size, status = block.size, block.status
        cfg = block_config(cfg, block.kind)  # a resumed gate block decodes greedily too
        todo = traces.unfinished_episode_ids(s, block_id)
        done = traces.count_done(s, block_id)
        # The serving adapter's confidence map (fitted at its gate): the published confidence is the
        # mapped one; the trace and predictions.stated_confidence keep what the model wrote.
        cmap = confidence_map(s, policy.adapter_version)
    if status == "complete":
        return
    halt = _Halt(stop)

    def work(episode_id: int) -> str:
        if halt.is_set():
            return "skipped"
        with session_scope(factory) as s:
            ep = traces.claim_episode(s, episode_id, policy.adapter_version)
        if ep is None:
            return "done"
        rec = EpisodeRecorder(factory, episode_id, ep.attempt, clock)
        tools = EpisodeTools(market, rec, ep, news_max_results=cfg.news_max_results, timeout_s=cfg.tool_timeout_s,
                             news_days=cfg.news_days)
        try:
            result = run_episode(policy, tools, rec, cfg, ticker=ep.ticker, as_of=ep.as_of, horizon=ep.horizon,
                                 label=ep.conditioning or "", seed=ep.seed, stop=halt,
                                 explore_direction=ep.explore_direction, plan=episode_plan(ep.explore_tool),
                                 guidance_label=guidance_label)
            resolve_at = market.calendar.resolve_session(ep.as_of, ep.horizon)
        except EpisodeStopped:
            rec.write(lambda s: traces.release_episode(s, episode_id))
            return "stopped"
        except BaseException as err:
            halt.failed.set()
            why = f"{type(err).__name__}: {err}"
            rec.write(lambda s: traces.release_episode(s, episode_id, error=why))
            raise
        p = result.prediction

        def finish(s) -> None:
            traces.save_prediction(
                s, episode_id=episode_id, resolve_at=resolve_at, valid=p is not None,
                direction=p.direction if p else None, magnitude_pct=p.magnitude_pct if p else None,
                confidence=(cmap.apply(p.confidence) if cmap else p.confidence) if p else None,
                stated_confidence=p.confidence if p else None, rationale=p.rationale if p else None,
                citations=list(p.citations) if p else None, parse_error=result.parse_error,
                raw_output=None if p else result.raw_output, adapter_version=policy.adapter_version)
            traces.finish_episode(s, episode_id)

        rec.write(finish)
        return "done"

    bar = Progress(TextColumn(f"block {block_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   disable=not progress, transient=False)
    first_error: tuple[int, BaseException] | None = None
    with bar if progress else nullcontext():
        task = bar.add_task("episodes", total=size, completed=done)
        with ThreadPoolExecutor(max_workers=max(1, min(cfg.concurrency, len(todo) or 1)),
                                thread_name_prefix=f"block{block_id}") as pool:
            futures = {pool.submit(work, eid): eid for eid in todo}
            for fut in as_completed(futures):
                try:
                    if fut.result() == "done":
                        bar.advance(task)
                except BaseException as err:  # noqa: BLE001 - reported once below, block stays resumable
                    if first_error is None:
                        first_error = (futures[fut], err)
    if first_error is not None:
        eid, err = first_error
        raise BlockInterrupted(
            f"block {block_id} stopped: episode {eid} failed ({type(err).__name__}: {err}); finished episodes "
            f"are kept, resume it with resume_block / `scoreloop block run --resume {block_id}`", block_id
        ) from err
    with session_scope(factory) as s:
        if traces.count_done(s, block_id) == size and not traces.unfinished_episode_ids(s, block_id):
            traces.complete_block(s, block_id)

"""`scoreloop eval`: held-out items run once per conditioning target, resolved, and summarised as an eval run.

Held-out rule: the eval items are `--items` independent (ticker, session) draws, seeded, from the
eval region of market.split (the last usable sessions of the replay history, an embargo of at least
the horizon after the gate region, which itself sits an embargo after the train region). Train
blocks never plan items outside the train region, and an eval still refuses to run if any `train`
item's outcome window reaches the eval region (a block planned by hand, an older database). Every
target runs the very same items (checked), in blocks of kind `eval` linked to the eval run through
blocks.eval_run_id; the trainer never reads eval blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from agent.config import AgentConfig
from market.split import SplitError, draw_items, timeline_split
from rewards.composite import reward_version
from rewards.config import RewardsConfig
from rewards.evaluation import TargetResult, controllability, pearson
from store import eval_runs
from store.db import session_scope
from store.errors import ScoreloopError
from store.scoring import scored_predictions
from store.status import block_summary

if TYPE_CHECKING:
    from market.sources import Market
    from policy.protocol import Policy

DEFAULT_TARGETS = (0.2, 0.4, 0.6, 0.8, 1.0)


class EvalError(ScoreloopError, RuntimeError):
    """An evaluation cannot run as asked; the message says what to change."""


def parse_targets(text: str) -> list[float]:
    """`0.2,0.4,1.0` -> [0.2, 0.4, 1.0]; each in [0, 1], at least two, no repeats."""
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EvalError(f"--targets {text!r}: expected comma-separated numbers such as 0.2,0.4,0.6,0.8,1.0") from None
    if len(targets) < 2:
        raise EvalError(f"--targets {text!r}: give at least two targets (controllability is a rank correlation)")
    bad = [t for t in targets if not 0.0 <= t <= 1.0]
    if bad:
        raise EvalError(f"--targets: {bad} outside [0, 1]")
    if len(set(targets)) != len(targets):
        raise EvalError(f"--targets {text!r}: repeated target")
    return targets


@dataclass(frozen=True)
class HeldOutPlan:
    """The eval items: seeded (ticker, session) draws from the eval region of the timeline split."""

    first_day: date  # the eval region's first and last sessions
    last_day: date
    items: list[tuple[str, datetime]]  # (ticker, replay as_of), in session order
    tickers: list[str]
    n_items: int
    seed: int
    leak_since: datetime  # a train item at or after this as_of would share an outcome window with an eval item

    def record(self) -> dict[str, Any]:
        return {"rule": "seeded draws from the eval region of market.split", "first_day": self.first_day.isoformat(),
                "last_day": self.last_day.isoformat(), "tickers": self.tickers, "n_items": self.n_items,
                "seed": self.seed, "sessions": len({a for _, a in self.items})}


def held_out_plan(market: Market, n_items: int, horizon: int, seed: int = 0) -> HeldOutPlan:
    if n_items < 1:
        raise EvalError(f"--items must be >= 1, got {n_items}")
    if market.span is None:
        raise EvalError(f"the {market.name} market has no bounded history to hold items out of: evaluate on a "
                        "replay market (--market synthetic or csv)")
    if not market.tickers:
        raise EvalError(f"the {market.name} market has no tickers")
    cal = market.calendar
    tickers = list(market.tickers)
    try:
        split = timeline_split(market, horizon)
        drawn = draw_items(split.eval, tickers, n_items, seed)
    except SplitError as err:
        raise EvalError(f"cannot hold {n_items} eval items out of the {market.name} history: {err}") from None
    first_bad = split.timeline[split.timeline.index(split.eval.first) - split.embargo]
    return HeldOutPlan(split.eval.first, split.eval.last, [(t, cal.replay_as_of(d)) for t, d in drawn], tickers,
                       n_items, seed, cal.close_of(first_bad) + timedelta(microseconds=1))


@dataclass(frozen=True)
class EvalResult:
    eval_run_id: int
    adapter_version: int | None
    per_target: list[TargetResult]
    spearman: float | None
    block_ids: list[int]
    status: str


def run_eval(engine: Engine, policy: Policy, market: Market, agent_cfg: AgentConfig, rewards_cfg: RewardsConfig,
             *, targets: Sequence[float] = DEFAULT_TARGETS, n_items: int = 24, horizon: int | None = None,
             progress: bool = True, stop: threading.Event | None = None, seed: int = 0) -> EvalResult:
    """Run the held-out items at each target with `policy`, resolve them, store and return the eval run."""
    from agent.runner import run_block
    from scoring.resolve import resolve_pending

    targets = list(targets)
    horizon = market.horizon_days if horizon is None else horizon
    # Greedy and no exploration: an evaluation measures the policy, not a sample of it, so two adapters
    # (or two targets) differ only through what they learned.
    agent_cfg = agent_cfg.model_copy(update={"temperature": 0.0, "explore_rate": 0.0, "explore_tool_rate": 0.0})
    plan = held_out_plan(market, n_items, horizon, seed)
    with session_scope(engine) as s:
        leaked = eval_runs.trained_items_from(s, market.name, plan.leak_since)
        if leaked:
            raise EvalError(
                f"{leaked} items of train blocks lie after {plan.leak_since.date()}, so their outcome windows reach "
                f"the eval region ({plan.first_day}..{plan.last_day}) of the {market.name} history and these eval "
                "items would not be held out: evaluate with a fresh database or a longer history "
                "(market.synthetic.n_days)")
        run_id = eval_runs.create_eval_run(s, adapter_version=policy.adapter_version, targets=targets,
                                           market=market.name, n_items=n_items, held_out=plan.record())
    block_ids: list[int] = []
    items: list | None = None
    try:
        for t in targets:
            if stop is not None and stop.is_set():
                raise EvalError("stopped before every target ran")
            bid = run_block(engine, policy, market, agent_cfg, rewards_cfg, mode="replay", size=n_items,
                            items=plan.items, target_score=t, kind="eval",
                            progress=progress, stop=stop, horizon=horizon)
            with session_scope(engine) as s:
                eval_runs.link_block(s, run_id, bid)
                these = eval_runs.block_items(s, bid)
            block_ids.append(bid)
            if items is None:
                items = these
            elif these != items:  # targets must be compared on the very same items
                raise EvalError(f"eval block {bid} planned different items from block {block_ids[0]}")
        resolve_pending(engine, market, rewards_cfg)
        per_target, baselines = _target_results(engine, targets, block_ids)
        by_signal = _accuracy_by_signal(engine, market, rewards_cfg, targets, block_ids, horizon)
    except BaseException as err:
        with session_scope(engine) as s:
            eval_runs.update_results(s, run_id, {"error": f"{type(err).__name__}: {err}", "block_ids": block_ids},
                                     status="failed")
        raise
    rho = controllability(per_target)
    pts = [(r.target, r.mean_reward) for r in per_target if r.mean_reward is not None]
    results = {
        "per_target": [r.__dict__ | {"block_id": b} for r, b in zip(per_target, block_ids, strict=True)],
        "spearman": rho,
        "pearson": pearson([t for t, _ in pts], [m for _, m in pts]) if len(pts) >= 2 else None,
        "baselines": baselines,
        "accuracy_by_signal": by_signal,
        "p_star_band": _p_star_band(market, horizon, rewards_cfg),
        "decoding": "greedy",
        "label_format": rewards_cfg.label_format,
        "block_ids": block_ids,
    }
    complete = all(r.mean_reward is not None for r in per_target)
    status = "done" if complete else "failed"
    if not complete:
        results["error"] = "some eval predictions are still unscored (see `scoreloop resolve`)"
    with session_scope(engine) as s:
        eval_runs.update_results(s, run_id, results, status=status)
    return EvalResult(run_id, policy.adapter_version, per_target, rho, block_ids, status)


def _target_results(engine: Engine, targets: Sequence[float], block_ids: Sequence[int]
                    ) -> tuple[list[TargetResult], dict[str, float | None]]:
    out: list[TargetResult] = []
    baselines: dict[str, float | None] = {}
    with session_scope(engine) as s:
        for t, bid in zip(targets, block_ids, strict=True):
            m = block_summary(s, bid)  # the block was just run, so its row exists
            out.append(TargetResult(target=t, n=m.n or 0, n_valid=m.n_valid or 0, mean_reward=m.mean_composite,
                                    accuracy=m.accuracy, brier=m.brier))
            if not baselines and m.always_up_accuracy is not None:
                # Baselines forecast from prices only; shown for the first target's valid items.
                baselines = m.pick(("always_up_accuracy", "momentum_accuracy", "coin_flip_accuracy"))
    return out, baselines


def _p_star_band(market: Market, horizon: int, rewards_cfg: RewardsConfig) -> float | None:
    """The Bayes accuracy with the rewards' flat band, where the market knows it (synthetic): the ceiling."""
    band = getattr(market.prices, "bayes_accuracy_band", None)
    return float(band(horizon, rewards_cfg.flat_band_pct)) if band is not None else None


def _accuracy_by_signal(engine: Engine, market: Market, rewards_cfg: RewardsConfig, targets: Sequence[float],
                        block_ids: Sequence[int], horizon: int) -> list[dict[str, Any]] | None:
    """Per target: accuracy on items with a visible signal headline and on the rest (synthetic market only).

    Reading the news can only beat a coin flip on the first kind, so a policy that learned to read shows
    its gain there; a gain spread evenly over both kinds points at something else (the flat band, a bias).
    """
    visible = getattr(market.prices, "signal_visible", None)
    if visible is None:
        return None
    version = reward_version(rewards_cfg)
    out = []
    with session_scope(engine) as s:
        for t, bid in zip(targets, block_ids, strict=True):
            groups: dict[bool, list[int]] = {True: [], False: []}
            for p in scored_predictions(s, bid, version):
                if p.outcome is not None and p.direction is not None:
                    right = int(p.direction == p.outcome.realized_direction)
                    groups[visible(p.ticker, p.as_of.date(), horizon)].append(right)
            out.append({"target": t, **{
                f"{name}_{k}": v for name, g in (("signal", groups[True]), ("no_signal", groups[False]))
                for k, v in (("n", len(g)), ("accuracy", sum(g) / len(g) if g else None))}})
    return out

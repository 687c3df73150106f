"""`scoreloop eval`: held-out items run once per conditioning target, resolved, and summarised as an eval run.

Held-out rule: the eval items are the LAST sessions of the replayable history whose outcomes are
still inside it (the tail ending `horizon` sessions before the history ends), every ticker of the
market on each of those days. Replay training blocks walk forward from the start of the history,
so they reach the tail only after (history length / days per block) blocks; an eval refuses to run
once any `train` block has an item on or after the tail's first day, so its items are never ones
the adapter was trained on. Every target runs the very same items (checked), in blocks of kind
`eval` linked to the eval run through blocks.eval_run_id; the trainer never reads eval blocks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine

from agent.config import AgentConfig
from rewards.config import RewardsConfig
from rewards.evaluation import TargetResult, controllability, pearson
from store import eval_runs
from store.db import session_scope
from store.status import block_summary

if TYPE_CHECKING:
    from market.sources import Market
    from policy.protocol import Policy

DEFAULT_TARGETS = (0.2, 0.4, 0.6, 0.8, 1.0)
MIN_HISTORY_SESSIONS = 30  # the agent's price tool needs some history before the first eval day


class EvalError(RuntimeError):
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
    """The eval items: every ticker on each of `days` consecutive sessions at the end of the history."""

    first_day: date
    last_day: date
    as_of: datetime  # replay as_of of first_day: what run_block plans from
    tickers: list[str]
    n_items: int

    def record(self) -> dict[str, Any]:
        return {"rule": "tail of the replay history", "first_day": self.first_day.isoformat(),
                "last_day": self.last_day.isoformat(), "tickers": self.tickers, "n_items": self.n_items}


def held_out_plan(market: Market, n_items: int, horizon: int) -> HeldOutPlan:
    if n_items < 1:
        raise EvalError(f"--items must be >= 1, got {n_items}")
    if market.span is None:
        raise EvalError(f"the {market.name} market has no bounded history to hold items out of: evaluate on a "
                        "replay market (--market synthetic or csv)")
    if not market.tickers:
        raise EvalError(f"the {market.name} market has no tickers")
    cal = market.calendar
    sessions = cal.sessions(*market.span)
    tickers = list(market.tickers)
    days = math.ceil(n_items / len(tickers))
    last_idx = len(sessions) - 1 - horizon  # the last day whose outcome is inside the history
    first_idx = last_idx - days + 1
    if first_idx < MIN_HISTORY_SESSIONS:
        raise EvalError(f"{n_items} eval items need {days} sessions plus {horizon} for outcomes and "
                        f"{MIN_HISTORY_SESSIONS} of history; the {market.name} history has {len(sessions)}")
    first = sessions[first_idx]
    return HeldOutPlan(first, sessions[last_idx], cal.replay_as_of(first), tickers, n_items)


@dataclass(frozen=True)
class EvalResult:
    eval_run_id: int
    adapter_version: int | None
    per_target: list[TargetResult]
    spearman: float | None
    block_ids: list[int]
    status: str


def run_eval(engine: Engine, policy: Policy, market: Market, agent_cfg: AgentConfig, rewards_cfg: RewardsConfig,
             *, targets: Sequence[float] = DEFAULT_TARGETS, n_items: int = 24, horizon: int = 5,
             progress: bool = True, stop: threading.Event | None = None) -> EvalResult:
    """Run the held-out items at each target with `policy`, resolve them, store and return the eval run."""
    from agent.runner import run_block
    from scoring.resolve import resolve_pending

    targets = list(targets)
    plan = held_out_plan(market, n_items, horizon)
    with session_scope(engine) as s:
        leaked = eval_runs.trained_items_from(s, market.name, plan.as_of.replace(hour=0, minute=0))
        if leaked:
            raise EvalError(
                f"{leaked} items of train blocks lie on or after {plan.first_day}, inside the held-out tail of the "
                f"{market.name} history, so these eval items would not be held out: evaluate with a fresh "
                "database, fewer --items, or a longer history (market.synthetic.n_days)")
        run_id = eval_runs.create_eval_run(s, adapter_version=policy.adapter_version, targets=targets,
                                           market=market.name, n_items=n_items, held_out=plan.record())
    block_ids: list[int] = []
    items: list | None = None
    try:
        for t in targets:
            if stop is not None and stop.is_set():
                raise EvalError("stopped before every target ran")
            bid = run_block(engine, policy, market, agent_cfg, rewards_cfg, mode="replay", size=n_items,
                            as_of=plan.as_of, tickers=plan.tickers, target_score=t, kind="eval",
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
            m = block_summary(s, bid) or {}
            out.append(TargetResult(target=t, n=m.get("n") or 0, n_valid=m.get("n_valid") or 0,
                                    mean_reward=m.get("mean_composite"), accuracy=m.get("accuracy"),
                                    brier=m.get("brier")))
            if not baselines and m.get("always_up_accuracy") is not None:
                # Baselines forecast from prices only; shown for the first target's valid items.
                baselines = {k: m.get(k) for k in ("always_up_accuracy", "momentum_accuracy", "coin_flip_accuracy")}
    return out, baselines

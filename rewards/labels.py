"""Conditioning labels: the one place that turns a score into the text the model is conditioned on.

The agent writes the target's label into the system prompt at inference; the trainer writes the
achieved score's label at training time. Both call these functions, so the formats always match.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

from rewards.config import RewardsConfig

# label_format "none": the same line at training and inference, so the label carries no score.
NO_LABEL = "Forecast the move as well as you can."


def score_label(score: float) -> str:
    """Numeric reward-conditioned label, e.g. `Score: 0.83`."""
    return f"Score: {_clip(score):.2f}"


def goal_label(score: float, threshold: float) -> str:
    """Natural-language threshold goal: met goals read `above`, missed ones `below`."""
    side = "above" if _clip(score) >= threshold else "below"
    return f"Goal: earn a reward {side} {threshold:.2f}"


def quantile_edges(scores: Sequence[float], bins: int) -> list[float]:
    """Inner bin edges (bins-1 of them) from the offline set's score distribution (Quark-style)."""
    xs = sorted(_clip(s) for s in scores)
    if not xs:
        return [i / bins for i in range(1, bins)]
    # Edge q is the first score of bin q+1, so bisect_right gives equally filled bins (ties aside).
    return [xs[min(len(xs) - 1, math.ceil(q * len(xs) / bins))] for q in range(1, bins)]


def quantile_label(score: float, edges: Sequence[float]) -> str:
    """`Quantile: 5/5` is the best bin."""
    bins = len(edges) + 1
    return f"Quantile: {bisect.bisect_right(list(edges), _clip(score)) + 1}/{bins}"


def rank_label(lower: int, size: int, bins: int) -> str:
    """`Rank: k/bins` for an episode that earned more than `lower` of the `size` episodes run on the same item
    in its block (ties share the lower rank); an item run once has nothing to be ranked against and gets the
    middle label.

    Why: a block-wide label is mostly the item's luck (its direction right or wrong whatever was read), so it
    says little about the choices that differ between episodes. Ranking each episode among its own item's
    (`agent.explore_tool_mode = "each"`: one episode per tool) cancels that luck, as GRPO's group-relative
    advantage does: on run L's block it raised the label's information about the first tool from 0.08 to
    0.35 nats (bench/results/learning_history.md, stop 27)."""
    if size < 2:
        return _rank(1 + (bins - 1) // 2, bins)
    return _rank(1 + round((bins - 1) * min(lower, size - 1) / (size - 1)), bins)


def _rank(k: int, bins: int) -> str:
    return f"Rank: {k}/{bins}"


def training_label(score: float, cfg: RewardsConfig, edges: Sequence[float] | None = None) -> str:
    """Label for an episode that achieved `score` (training time). The `rank` format needs the episode's item
    group, not its score alone: the trainer calls `rank_label`."""
    if cfg.label_format == "rank":
        raise ValueError("rank labels come from the episode's place among its item's episodes (rank_label), "
                         "not from its score alone")
    if cfg.label_format == "none":
        return NO_LABEL
    if cfg.label_format == "goal":
        return goal_label(score, cfg.goal_threshold)
    if cfg.label_format == "quantile":
        return quantile_label(score, edges if edges is not None else quantile_edges([], cfg.quantile_bins))
    return score_label(score)


def target_label(target: float, cfg: RewardsConfig, edges: Sequence[float] | None = None) -> str:
    """Label for the score the agent should aim at (inference time); same format as training. Under `rank` the
    target is a place among the item's alternatives: 1.0 the best (`Rank: 5/5`), 0.0 the worst."""
    if cfg.label_format == "rank":
        bins = cfg.quantile_bins
        return _rank(1 + min(bins - 1, int(_clip(target) * bins)), bins)
    return training_label(target, cfg, edges)


def _clip(x: float) -> float:
    if math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, float(x)))

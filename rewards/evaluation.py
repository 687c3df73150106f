"""Pure evaluation figures: controllability (rank correlation of target vs realized) and reliability bins.
(Intervals, including paired differences between two arms, are in rewards/intervals.py.)

Controllability asks whether conditioning on a higher target score yields a higher realized
reward: the Spearman rank correlation between the targets and the realized means (1.0 = every
higher target earned more). Reliability bins are the data of a reliability diagram: equal-width
confidence bins with their mean confidence, realized accuracy and count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rewards.metrics import ECE_BINS


def average_ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span (as in Spearman's rho)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Pearson correlation; None when undefined (fewer than 2 points or a constant series)."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson needs equal lengths, got {len(xs)} and {len(ys)}")
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rho (Pearson on average ranks, so ties are handled); None when undefined."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if _finite(x) and _finite(y)]
    if len(pairs) < 2:
        return None
    return pearson(average_ranks([x for x, _ in pairs]), average_ranks([y for _, y in pairs]))


@dataclass(frozen=True)
class ReliabilityBin:
    lo: float
    hi: float
    n: int
    mean_confidence: float | None  # None for an empty bin
    accuracy: float | None


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool | int],
                     bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1] (confidence 1.0 falls in the top bin), the same bins as the ECE."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    groups: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for c, k in zip(confidences, correct, strict=True):
        if not _finite(c):
            continue
        c = min(1.0, max(0.0, float(c)))
        groups[min(bins - 1, int(c * bins))].append((c, float(bool(k))))
    return [
        ReliabilityBin(
            lo=i / bins, hi=(i + 1) / bins, n=len(g),
            mean_confidence=sum(c for c, _ in g) / len(g) if g else None,
            accuracy=sum(k for _, k in g) / len(g) if g else None,
        )
        for i, g in enumerate(groups)
    ]


def ece_from_bins(bins: Sequence[ReliabilityBin]) -> float | None:
    """Expected calibration error: count-weighted |accuracy - mean confidence| over non-empty bins."""
    n = sum(b.n for b in bins)
    if n == 0:
        return None
    return sum(b.n / n * abs(b.accuracy - b.mean_confidence) for b in bins if b.n)  # type: ignore[operator]


@dataclass(frozen=True)
class TargetResult:
    """Realized figures of the items run at one conditioning target."""

    target: float
    n: int
    n_valid: int
    mean_reward: float | None
    accuracy: float | None
    brier: float | None


def controllability(results: Sequence[TargetResult]) -> float | None:
    """Spearman between target and realized mean reward over the targets that have a realized mean."""
    pts = [(r.target, r.mean_reward) for r in results if r.mean_reward is not None]
    return spearman([t for t, _ in pts], [m for _, m in pts])  # type: ignore[misc]


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)

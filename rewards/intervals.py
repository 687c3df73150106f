"""Confidence intervals for per-version figures on a few dozen held-out items.

Wilson for a proportion (accuracy): unlike the normal approximation it stays inside [0, 1] and
is not zero-width at 0% or 100%, which matters at n = 24. A seeded percentile bootstrap over
items for everything else (mean reward, Brier, ECE): no distributional assumption, and ECE has
no closed-form interval. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class Estimate:
    """A figure with its two-sided interval at `level` (bounds None when n is too small to say)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    level: float


def wilson_interval(successes: int, n: int, level: float = 0.95) -> Estimate:
    """Share `successes / n` with its Wilson score interval."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return Estimate(None, None, None, 0, level)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n, level)


def bootstrap_interval(items: Sequence[T], statistic: Callable[[Sequence[T]], float | None], *,
                       level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """`statistic(items)` with a percentile-bootstrap interval from resampling items with replacement.

    Resamples on which the statistic is undefined (None) are dropped; fewer than 2 items give no interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(items)
    value = statistic(items) if n else None
    if n < 2 or value is None:
        return Estimate(value, None, None, n, level)
    rng = np.random.default_rng(seed)
    draws = []
    for idx in rng.integers(0, n, size=(n_boot, n)):
        v = statistic([items[i] for i in idx])
        if v is not None and math.isfinite(v):
            draws.append(v)
    if not draws:
        return Estimate(value, None, None, n, level)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(lo), float(hi), n, level)

"""Confidence intervals for per-version figures on a few dozen held-out items.

Wilson for a proportion (accuracy): unlike the normal approximation it stays inside [0, 1] and
is not zero-width at 0% or 100%, which matters at n = 24. A seeded percentile bootstrap over
items for everything else (mean reward, Brier, ECE): no distributional assumption, and ECE has
no closed-form interval. Two arms on the same items are compared item by item (`paired_difference`),
resampling clusters: items on one date share the market factor, so the date is the unit of
independence. Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
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


@dataclass(frozen=True)
class PairedDifference:
    """Mean of (a - b) over the items both sides scored, with a bootstrap interval that resamples clusters."""

    mean: float
    low: float | None
    high: float | None
    n_items: int
    n_clusters: int
    level: float

    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float],
                      cluster: Callable[[Hashable], Hashable] | None = None, *, level: float = 0.95,
                      n_boot: int = 4000, seed: int = 0) -> PairedDifference | None:
    """Item-by-item difference of two arms on their common finite items, with a cluster bootstrap interval.

    `cluster(key)` groups items that move together (the same as_of date); None = every item its own
    cluster. Whole clusters are resampled, so the interval reflects the effective sample size, not
    the item count. Seeded: the same inputs give the same interval. None when no item is shared.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    common = [k for k in a if k in b and _finite(a[k]) and _finite(b[k])]
    if not common:
        return None
    groups: dict[Hashable, list[float]] = {}
    for k in common:
        groups.setdefault(k if cluster is None else cluster(k), []).append(float(a[k]) - float(b[k]))
    sums = np.array([sum(v) for v in groups.values()])
    counts = np.array([len(v) for v in groups.values()])
    mean = float(sums.sum() / counts.sum())
    if len(groups) < 2:
        return PairedDifference(mean, None, None, len(common), len(groups), level)
    idx = np.random.default_rng(seed).integers(0, len(groups), size=(n_boot, len(groups)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(mean, float(lo), float(hi), len(common), len(groups), level)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)

"""Block metrics for the model and for baselines on the same items, plus a Brier skill score.

Definitions (confidence is read as P(predicted direction is correct)):
accuracy    share of valid, resolved items whose direction matched the realized one.
brier       mean (confidence - correct)^2 over valid items (0 best, 0.25 for a coin flip).
ece         10 equal-width confidence bins: sum over bins of (n_bin / n) * |accuracy_bin - mean conf_bin|.
mean_abs_magnitude_error  mean |magnitude_pct - |realized %|| over valid items.
mean_composite  mean composite over all scored items (invalid ones count as 0).
coverage    valid / scored items.
skill       1 - brier / brier_of_best_baseline (Brier skill score; > 0 beats every baseline).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rewards.baselines import BASELINE_NAMES, BaselineForecast, baseline_forecasts
from rewards.components import calibration_score, direction_score, magnitude_score
from rewards.composite import composite_score
from rewards.config import RewardsConfig
from rewards.outcomes import flat_band_pct

ECE_BINS = 10


@dataclass(frozen=True)
class MetricItem:
    """One scored item; direction/confidence/magnitude are None for an invalid prediction."""

    direction: str | None
    confidence: float | None
    magnitude_pct: float | None
    realized_return_pct: float
    realized_direction: str
    composite: float
    valid: bool


@dataclass(frozen=True)
class BlockMetrics:
    n: int
    n_valid: int
    accuracy: float | None
    mean_composite: float | None
    brier: float | None
    ece: float | None
    mean_abs_magnitude_error: float | None
    coverage: float | None
    skill: float | None = None


def brier_score(confidences: Sequence[float], correct: Sequence[bool]) -> float | None:
    if not confidences:
        return None
    return sum((c - float(k)) ** 2 for c, k in zip(confidences, correct, strict=True)) / len(confidences)


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> float | None:
    if not confidences:
        return None
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, k in zip(confidences, correct, strict=True):
        groups.setdefault(min(bins - 1, int(c * bins)), []).append((c, k))
    n = len(confidences)
    return sum(
        len(g) / n * abs(sum(k for _, k in g) / len(g) - sum(c for c, _ in g) / len(g)) for g in groups.values()
    )


def block_metrics(items: Sequence[MetricItem]) -> BlockMetrics:
    """Metrics of one block's scored items (skill is filled in by `with_skill`)."""
    valid = [
        it for it in items
        if it.valid and it.direction is not None and _finite(it.confidence) and _finite(it.magnitude_pct)
    ]
    correct = [it.direction == it.realized_direction for it in valid]
    confs = [float(it.confidence) for it in valid]  # type: ignore[arg-type]
    return BlockMetrics(
        n=len(items),
        n_valid=len(valid),
        accuracy=sum(correct) / len(valid) if valid else None,
        mean_composite=sum(it.composite for it in items) / len(items) if items else None,
        brier=brier_score(confs, correct),
        ece=expected_calibration_error(confs, correct),
        mean_abs_magnitude_error=(
            sum(abs(float(it.magnitude_pct) - abs(it.realized_return_pct)) for it in valid) / len(valid)  # type: ignore[arg-type]
            if valid else None
        ),
        coverage=len(valid) / len(items) if items else None,
    )


def skill_score(brier: float | None, baseline_briers: Sequence[float | None]) -> float | None:
    """1 - brier / min(baseline briers); None when undefined (no data, or a perfect baseline)."""
    ref = [b for b in baseline_briers if b is not None]
    if brier is None or not ref or min(ref) <= 0:
        return None
    return 1.0 - brier / min(ref)


def with_skill(metrics: Mapping[str, BlockMetrics], model: str = "model") -> dict[str, BlockMetrics]:
    """Every row gets its skill against the best baseline (the best baseline itself scores 0)."""
    baseline_briers = [m.brier for name, m in metrics.items() if name != model]
    return {
        name: BlockMetrics(**{**m.__dict__, "skill": skill_score(m.brier, baseline_briers)})
        for name, m in metrics.items()
    }


def _finite(x: float | None) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class BlockItem:
    """A scored model item plus the point-in-time closes the baselines forecast from."""

    model: MetricItem
    closes: Sequence[float]  # adjusted closes, oldest first, ending at the base session
    horizon: int
    typical_move_pct: float
    key: str  # stable per item (e.g. prediction id): seeds the coin flip


def baseline_item(
    forecast: BaselineForecast, realized_return_pct: float, realized: str, typical: float, cfg: RewardsConfig
) -> MetricItem:
    correct = forecast.direction == realized
    parts = {
        "direction": direction_score(forecast.direction, realized),
        "magnitude": magnitude_score(forecast.magnitude_pct, realized_return_pct, typical),
        "calibration": calibration_score(forecast.confidence, correct),
        "data_use": 0.0,  # baselines cite nothing
    }
    return MetricItem(forecast.direction, forecast.confidence, forecast.magnitude_pct, realized_return_pct,
                      realized, composite_score(parts, cfg), True)


def block_report(items: Sequence[BlockItem], cfg: RewardsConfig) -> dict[str, BlockMetrics]:
    """Rows `model`, `always_up`, `momentum_20d`, `coin_flip`; baselines on the model's valid items."""
    rows: dict[str, list[MetricItem]] = {name: [] for name in BASELINE_NAMES}
    for it in items:
        m = it.model
        if not (m.valid and m.direction is not None):
            continue
        band = flat_band_pct(cfg, it.typical_move_pct)
        for name, fc in baseline_forecasts(it.closes, it.horizon, band, it.typical_move_pct, it.key).items():
            rows[name].append(baseline_item(fc, m.realized_return_pct, m.realized_direction,
                                            it.typical_move_pct, cfg))
    metrics = {"model": block_metrics([it.model for it in items])}
    metrics.update({name: block_metrics(xs) for name, xs in rows.items()})
    return with_skill(metrics)

"""Composite reward and its version string: the one entry point that scores a resolved prediction.

The version names the formula, the normalised weights and the flat band, so a reward row stays
interpretable after `[rewards]` changes (a new version is a new row, old rows are kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from rewards.components import calibration_score, data_use_score, direction_score, magnitude_score
from rewards.config import RewardsConfig
from rewards.outcomes import Direction, flat_band_pct, realized_direction
from rewards.validation import validate_prediction

# Bump when any formula in rewards/components.py or rewards/outcomes.py changes meaning.
FORMULA_VERSION = "r1"


def normalised_weights(cfg: RewardsConfig) -> dict[str, float]:
    w = cfg.weights
    raw = {"direction": w.direction, "magnitude": w.magnitude, "calibration": w.calibration,
           "data_use": w.data_use}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def reward_version(cfg: RewardsConfig) -> str:
    """e.g. `r1|w=0.4,0.2,0.3,0.1|band=0.5pct` (weights direction,magnitude,calibration,data_use)."""
    w = normalised_weights(cfg)
    ws = ",".join(f"{w[k]:.4g}" for k in ("direction", "magnitude", "calibration", "data_use"))
    return f"{FORMULA_VERSION}|w={ws}|band={cfg.flat_band_pct:.4g}{cfg.flat_band_mode}"


REWARD_VERSION = reward_version(RewardsConfig())


@dataclass(frozen=True)
class RewardBreakdown:
    direction: float
    magnitude: float
    calibration: float
    data_use: float
    composite: float
    reward_version: str
    valid: bool
    reason: str | None = None
    realized_direction: Direction | None = None
    correct: bool | None = None


def composite_score(components: Mapping[str, float], cfg: RewardsConfig) -> float:
    w = normalised_weights(cfg)
    return min(1.0, max(0.0, sum(w[k] * components[k] for k in w)))


def invalid_reward(reason: str, cfg: RewardsConfig) -> RewardBreakdown:
    """Parse failures and values that fail validation: every component 0, the reason recorded."""
    return RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, reward_version(cfg), valid=False, reason=reason[:2000])


def parse_failure_reward(parse_error: str | None, cfg: RewardsConfig) -> RewardBreakdown:
    return invalid_reward(f"parse failure: {parse_error or 'no valid prediction'}", cfg)


def score_prediction(
    *,
    direction: object,
    magnitude_pct: object,
    confidence: object,
    citations: object,
    realized_return_pct: float,
    typical_move_pct: float,
    retrieved: Mapping[int, datetime],
    as_of: datetime,
    cfg: RewardsConfig,
    valid: bool = True,
    parse_error: str | None = None,
) -> RewardBreakdown:
    """Score one prediction against its outcome; never raises on bad prediction values."""
    if not valid:
        return parse_failure_reward(parse_error, cfg)
    checked, errors = validate_prediction(direction, magnitude_pct, confidence, citations)
    if checked is None:
        return invalid_reward("validation: " + "; ".join(errors), cfg)
    realized = realized_direction(realized_return_pct, flat_band_pct(cfg, typical_move_pct))
    correct = checked.direction == realized
    parts = {
        "direction": direction_score(checked.direction, realized),
        "magnitude": magnitude_score(checked.magnitude_pct, realized_return_pct, typical_move_pct),
        "calibration": calibration_score(checked.confidence, correct),
        "data_use": data_use_score(checked.citations, retrieved, as_of),
    }
    return RewardBreakdown(
        **parts, composite=composite_score(parts, cfg), reward_version=reward_version(cfg), valid=True,
        realized_direction=realized, correct=correct,
    )

"""Baseline forecasters scored on the same items as the model, from point-in-time closes only.

always_up     direction up; confidence = share of trailing h-day windows that ended up.
momentum_20d  sign of the last 20-session return; confidence = trailing hit rate of that rule.
coin_flip     up or down by a deterministic hash of the item key; confidence 0.5.
Each predicts a magnitude of one typical move and cites nothing. Confidences fall back to 0.5
when the history holds no complete window.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from rewards.outcomes import Direction, realized_direction

MOMENTUM_LOOKBACK = 20
BASELINE_NAMES = ("always_up", "momentum_20d", "coin_flip")


@dataclass(frozen=True)
class BaselineForecast:
    direction: Direction
    confidence: float
    magnitude_pct: float


def momentum_direction(closes: Sequence[float], lookback: int = MOMENTUM_LOOKBACK) -> Direction:
    """Sign of the last `lookback`-session return; `up` when the history is too short."""
    if len(closes) < lookback + 1:
        return "up"
    ret = closes[-1] / closes[-1 - lookback] - 1.0
    return "up" if ret > 0 else "down" if ret < 0 else "flat"


def always_up(closes: Sequence[float], horizon: int, band_pct: float, typical: float) -> BaselineForecast:
    past = _trailing_directions(closes, horizon, band_pct, start=0)
    conf = sum(d == "up" for d, _ in past) / len(past) if past else 0.5
    return BaselineForecast("up", conf, typical)


def momentum_20d(closes: Sequence[float], horizon: int, band_pct: float, typical: float) -> BaselineForecast:
    past = _trailing_directions(closes, horizon, band_pct, start=MOMENTUM_LOOKBACK)
    hits = [d == momentum_direction(closes[: i + 1]) for d, i in past]
    conf = sum(hits) / len(hits) if hits else 0.5
    return BaselineForecast(momentum_direction(closes), conf, typical)


def coin_flip(key: str, typical: float) -> BaselineForecast:
    """Deterministic so re-running the resolver gives the same baseline row."""
    heads = hashlib.sha256(key.encode()).digest()[0] & 1
    return BaselineForecast("up" if heads else "down", 0.5, typical)


def baseline_forecasts(
    closes: Sequence[float], horizon: int, band_pct: float, typical: float, key: str
) -> dict[str, BaselineForecast]:
    """All baselines for one item; `closes` end at the base session (what was known at as_of)."""
    return {
        "always_up": always_up(closes, horizon, band_pct, typical),
        "momentum_20d": momentum_20d(closes, horizon, band_pct, typical),
        "coin_flip": coin_flip(key, typical),
    }


def _trailing_directions(
    closes: Sequence[float], horizon: int, band_pct: float, *, start: int
) -> list[tuple[Direction, int]]:
    """(realized direction of the h-day window starting at session i, i) for windows inside `closes`."""
    out: list[tuple[Direction, int]] = []
    for i in range(start, len(closes) - horizon):
        if closes[i] > 0:
            out.append((realized_direction(100.0 * (closes[i + horizon] / closes[i] - 1.0), band_pct), i))
    return out

"""What happened after a forecast: realized return, the flat band, realized direction, typical move.

Pure arithmetic on closes; the resolver reads the closes from the market and passes them in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from rewards.config import RewardsConfig

Direction = Literal["up", "down", "flat"]
DIRECTIONS: tuple[Direction, ...] = ("up", "down", "flat")

# Sessions of history the typical move is measured over (part of the formula version).
TYPICAL_WINDOW = 60
# A constant-price ticker would have a typical move of 0; this floor keeps the magnitude scale finite.
MIN_TYPICAL_MOVE_PCT = 0.01


def realized_return_pct(close_base: float, close_resolve: float) -> float:
    """100 * (close(resolve_session) / close(base_session) - 1), from adjusted closes."""
    if not (_finite(close_base) and _finite(close_resolve)) or close_base <= 0 or close_resolve <= 0:
        raise ValueError(f"closes must be positive and finite, got {close_base!r} -> {close_resolve!r}")
    return 100.0 * (close_resolve / close_base - 1.0)


def typical_move_pct(closes: Sequence[float], horizon: int, window: int = TYPICAL_WINDOW) -> float | None:
    """Mean |h-day move| in % over the overlapping h-day windows of the last `window` sessions.

    `closes` are adjusted closes, oldest first, ending at the base session. None when there are
    fewer than horizon + 1 usable closes (no complete window).
    """
    xs = [float(c) for c in closes if _finite(c) and c > 0][-(window + horizon):]
    if horizon < 1 or len(xs) < horizon + 1:
        return None
    moves = [abs(100.0 * (xs[i + horizon] / xs[i] - 1.0)) for i in range(len(xs) - horizon)]
    return max(MIN_TYPICAL_MOVE_PCT, sum(moves) / len(moves))


def flat_band_pct(cfg: RewardsConfig, typical_move: float | None) -> float:
    """Half-width of the flat band in %: fixed (`pct`) or `flat_band_pct` typical moves (`vol`)."""
    if cfg.flat_band_mode == "vol":
        unit = typical_move if typical_move is not None and _finite(typical_move) else 0.0
        return cfg.flat_band_pct * unit
    return cfg.flat_band_pct


def realized_direction(return_pct: float, band_pct: float) -> Direction:
    """`flat` when |return| < band (or the return is exactly 0), else the sign."""
    if abs(return_pct) < band_pct or return_pct == 0:
        return "flat"
    return "up" if return_pct > 0 else "down"


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

"""The four reward components, each a pure function into [0, 1].

direction    1 if the predicted direction equals the realized one (flat band applied), else 0.
magnitude    2 ** (-|magnitude_pct - |realized %|| / typical_move): a miss of one typical move
             scores 0.5, two score 0.25, a perfect call 1.
calibration  1 - (confidence - correct)^2: one minus the Brier score of the confidence read as
             P(direction is correct).
data_use     share of distinct citations that point to a snippet this episode retrieved and that
             was published strictly before as_of; no citations scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime

from rewards.outcomes import MIN_TYPICAL_MOVE_PCT


def direction_score(predicted: str, realized: str) -> float:
    return 1.0 if predicted == realized else 0.0


def magnitude_score(magnitude_pct: float, realized_return_pct: float, typical_move_pct: float) -> float:
    """Exponential decay in the error, in units of the ticker's typical move (half-life one move)."""
    err = abs(magnitude_pct - abs(realized_return_pct))
    unit = max(MIN_TYPICAL_MOVE_PCT, typical_move_pct)
    return _unit(math.exp(-math.log(2.0) * err / unit))


def calibration_score(confidence: float, correct: bool) -> float:
    return _unit(1.0 - (confidence - (1.0 if correct else 0.0)) ** 2)


def data_use_score(
    citations: Iterable[int | str], retrieved: Mapping[int, datetime], as_of: datetime
) -> float:
    """Fabricated ids, strings that are not ids and snippets published at/after as_of earn nothing."""
    cited = set(citations)
    if not cited:
        return 0.0
    good = sum(1 for c in cited if isinstance(c, int) and c in retrieved and retrieved[c] < as_of)
    return good / len(cited)


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x))

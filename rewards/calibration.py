"""Confidence maps: what an adapter's stated confidence has meant, fitted on items it was not trained on.

Why a map rather than training the confidence: conditioning on a high achieved score selects the
episodes that were right *and* confident (the calibration component pays 1 - (c - correct)^2,
which a lucky confident call maximises), so a score-conditioned adapter learns to state ~0.95 on
everything, whatever its accuracy (bench/results/learning_curve.md). That is hindsight bias in the
label, and no amount of the same data undoes it. The standard remedy in forecasting is a
recalibration map fitted on fresh outcomes: the product's gate already runs every candidate on
independent, embargoed gate items, so those outcomes fit the candidate's map (isotonic regression,
scikit-learn), and the runner publishes the mapped confidence while the trace keeps the stated one
(`predictions.stated_confidence`).

Pure: points in, a map out. Fitting uses scikit-learn; applying is a numpy interpolation, so the
runner does not need scikit-learn on its hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MIN_POINTS = 20  # fewer resolved gate items than this: no map (the stated confidence is published as is)
FLOOR, CEIL = 0.02, 0.98  # a map never publishes certainty from a few dozen outcomes


class ConfidenceMap(BaseModel):
    """Stated confidence -> P(the direction is right), piecewise linear through isotonic knots."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stated: list[float] = Field(description="Knot x: stated confidences, increasing.")
    calibrated: list[float] = Field(description="Knot y: the fitted hit rate at each knot, non-decreasing.")
    n: int = Field(ge=0, description="Resolved predictions the map was fitted on.")
    accuracy: float = Field(ge=0, le=1, description="Their hit rate (what a constant-confidence adapter maps to).")

    @model_validator(mode="after")
    def _knots(self) -> ConfidenceMap:
        if not self.stated or len(self.stated) != len(self.calibrated):
            raise ValueError("a confidence map needs as many calibrated values as stated knots (at least one)")
        if any(b < a for a, b in pairwise(self.stated)):
            raise ValueError("confidence map knots must be sorted by stated confidence")
        return self

    def apply(self, stated: float) -> float:
        """The published confidence for a stated one (flat beyond the outer knots)."""
        if len(self.stated) == 1:
            return float(self.calibrated[0])
        return float(np.interp(float(stated), self.stated, self.calibrated))


def fit_confidence_map(confidences: Sequence[float], correct: Sequence[bool],
                       min_points: int = MIN_POINTS) -> ConfidenceMap | None:
    """Isotonic regression of correct on stated confidence; None with fewer than `min_points` pairs."""
    from sklearn.isotonic import IsotonicRegression

    if len(confidences) != len(correct):
        raise ValueError(f"{len(confidences)} confidences but {len(correct)} outcomes")
    x = np.clip(np.asarray(confidences, dtype=float), 0.0, 1.0)
    y = np.asarray(correct, dtype=float)
    if len(x) < min_points:
        return None
    iso = IsotonicRegression(y_min=FLOOR, y_max=CEIL, increasing=True, out_of_bounds="clip").fit(x, y)
    return ConfidenceMap(stated=[float(v) for v in iso.X_thresholds_],
                         calibrated=[float(v) for v in iso.y_thresholds_], n=len(x), accuracy=float(y.mean()))

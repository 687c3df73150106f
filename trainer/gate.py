"""Promotion gate: a candidate serves unless it is worse than the serving adapter by more than a margin.

The evaluation itself (running the agent on held-out items with each adapter, conditioned on the
target score) is the scheduler's job; this module decides from its figures and records them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from trainer import registry

GATE_METRIC = "mean_composite"


def _figure(metrics: Mapping[str, Any] | None) -> float | None:
    if metrics is None:
        return None
    v = metrics.get(GATE_METRIC)
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def gate_decision(candidate_metrics: Mapping[str, Any], serving_metrics: Mapping[str, Any] | None,
                  margin: float) -> bool:
    """True = the candidate may serve: its held-out mean composite >= serving's minus `margin`.

    No serving figure (first adapter, or serving never evaluated) lets the candidate serve; a
    candidate without a figure (nothing scored) does not.
    """
    cand = _figure(candidate_metrics)
    serving = _figure(serving_metrics)
    if cand is None:
        return False
    if serving is None:
        return True
    return cand >= serving - margin


def promote_or_reject(engine: Engine, version: int, candidate_metrics: Mapping[str, Any],
                      serving_metrics: Mapping[str, Any] | None, margin: float) -> bool:
    """Record both sides' figures on the candidate, then publish it or reject it; returns whether it serves."""
    passed = gate_decision(candidate_metrics, serving_metrics, margin)
    record = {"candidate": dict(candidate_metrics), "serving": None if serving_metrics is None else
              dict(serving_metrics), "margin": margin, "metric": GATE_METRIC, "passed": passed}
    registry.record_gate_metrics(engine, version, record)
    if passed:
        registry.publish(engine, version)
    else:
        registry.reject(engine, version, {"rejected_by": "gate"})
    return passed

"""Promotion gate: a candidate serves only when the evidence says it beats the serving adapter.

Both adapters answer the same gate items (drawn from the gate region of the timeline, see
market.split), so each item gives one paired difference d = candidate reward - serving reward;
pairing removes the item-to-item spread (easy vs hard stocks and weeks) from the comparison.

The rule (`decide`), at a stated two-sided level (default 0.90, i.e. one-sided 5% each way):

- accept: the (expanded) percentile-bootstrap interval of mean(d) lies above 0 AND mean(d) >= margin
  (a real and large-enough improvement);
- reject: the interval lies below 0 (a real loss);
- keep:   anything else, including too few pairs: no evidence either way, the serving adapter stays.

An exact two-sided sign test on the same pairs is reported beside it as a check that does not
lean on the mean. With a per-pair spread of 0.2, 100 pairs detect a mean improvement of about
0.05 with 80% power (`detectable_effect`); 20 pairs would need about 0.11.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from sqlalchemy import Engine

from rewards.calibration import ConfidenceMap, fit_confidence_map
from store import gate_decisions
from store.db import session_scope
from trainer import registry

RULE = "paired_bootstrap_mean"
MIN_PAIRS = 5  # below this a bootstrap interval is not worth the name; the gate keeps serving
Decision = Literal["accept", "keep", "reject"]


class GateInputError(ValueError):
    """The paired reward vectors cannot be compared (different lengths, non-finite values)."""


@dataclass(frozen=True)
class PairedStatistic:
    """Figures of the paired comparison: means, the bootstrap interval of the mean difference, sign counts."""

    n_pairs: int
    serving_mean: float | None
    candidate_mean: float | None
    mean_diff: float | None
    sd_diff: float | None
    ci_low: float | None
    ci_high: float | None
    wins: int
    losses: int
    ties: int
    p_value: float | None  # exact two-sided sign test over wins vs losses
    level: float
    n_boot: int


@dataclass(frozen=True)
class GateVerdict:
    """What the gate decided and why, with the statistic it decided on."""

    decision: Decision
    statistic: PairedStatistic
    margin: float
    reason: str
    rule: str = RULE

    @property
    def passed(self) -> bool:
        return self.decision == "accept"

    def record(self) -> dict[str, Any]:
        return {"decision": self.decision, "passed": self.passed, "rule": self.rule, "margin": self.margin,
                "reason": self.reason, **asdict(self.statistic)}


def sign_test(wins: int, losses: int) -> float | None:
    """Exact two-sided binomial p-value of `wins` vs `losses` under a fair coin (ties dropped)."""
    n = wins + losses
    if n == 0:
        return None
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _t_quantile(p: float, df: int) -> float:
    """Student-t quantile by the Cornish-Fisher expansion (within 0.005 of the exact value for df >= 4)."""
    z = NormalDist().inv_cdf(p)
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


def _expanded_tail(level: float, n: int) -> float:
    """Tail probability for an expanded percentile bootstrap (Hesterberg 2015): the plain percentile
    interval is too narrow for small n (a null 8-pair gate called accept or reject about 20% of the
    time at level 0.90); widening by sqrt(n / (n - 1)) * t / z brings it back near the stated level."""
    t = _t_quantile((1 + level) / 2, max(n - 1, 1))
    return NormalDist().cdf(-math.sqrt(n / (n - 1)) * t)


def paired_statistic(serving: Sequence[float], candidate: Sequence[float], *, level: float = 0.90,
                     n_boot: int = 10_000, seed: int = 0) -> PairedStatistic:
    """The paired comparison of two reward vectors over the same items (index i = the same item)."""
    if len(serving) != len(candidate):
        raise GateInputError(f"paired rewards need equal lengths, got {len(serving)} serving vs "
                             f"{len(candidate)} candidate")
    if not 0 < level < 1:
        raise GateInputError(f"level must be in (0, 1), got {level}")
    s = np.asarray(serving, dtype=float)
    c = np.asarray(candidate, dtype=float)
    if not (np.isfinite(s).all() and np.isfinite(c).all()):
        raise GateInputError("paired rewards must be finite (score or drop unscored items first)")
    n = len(s)
    d = c - s
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if n == 0:
        return PairedStatistic(0, None, None, None, None, None, None, 0, 0, 0, None, level, n_boot)
    lo = hi = None
    if n >= 2:
        rng = np.random.default_rng(seed)
        means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
        tail = _expanded_tail(level, n)
        lo, hi = (float(v) for v in np.quantile(means, [tail, 1 - tail]))
    return PairedStatistic(
        n_pairs=n, serving_mean=float(s.mean()), candidate_mean=float(c.mean()), mean_diff=float(d.mean()),
        sd_diff=float(d.std(ddof=1)) if n >= 2 else None, ci_low=lo, ci_high=hi, wins=wins, losses=losses,
        ties=n - wins - losses, p_value=sign_test(wins, losses), level=level, n_boot=n_boot)


def decide(serving: Sequence[float], candidate: Sequence[float], *, margin: float = 0.02, level: float = 0.90,
           n_boot: int = 10_000, seed: int = 0) -> GateVerdict:
    """accept / keep / reject a candidate from paired rewards on the same gate items (rule in the module doc)."""
    if margin < 0:
        raise GateInputError(f"margin must be >= 0, got {margin}")
    st = paired_statistic(serving, candidate, level=level, n_boot=n_boot, seed=seed)
    if st.n_pairs < MIN_PAIRS or st.ci_low is None or st.ci_high is None or st.mean_diff is None:
        return GateVerdict("keep", st, margin, f"{st.n_pairs} scored pairs (< {MIN_PAIRS}): no evidence, keep serving")
    ci = f"{level:.0%} interval of mean(candidate - serving) [{st.ci_low:+.3f}, {st.ci_high:+.3f}]"
    if st.ci_low > 0 and st.mean_diff >= margin:
        return GateVerdict("accept", st, margin, f"{ci} is above 0 and the mean {st.mean_diff:+.3f} >= margin "
                                                 f"{margin}")
    if st.ci_high < 0:
        return GateVerdict("reject", st, margin, f"{ci} is below 0: the candidate is worse")
    if st.ci_low > 0:
        return GateVerdict("keep", st, margin, f"{ci} is above 0 but the mean {st.mean_diff:+.3f} < margin {margin}")
    return GateVerdict("keep", st, margin, f"{ci} contains 0: no evidence either way, keep serving")


def detectable_effect(n_pairs: int, sd_diff: float = 0.2, *, level: float = 0.90, power: float = 0.80) -> float:
    """Smallest true mean improvement the rule accepts with probability `power` (normal approximation)."""
    if n_pairs < 1:
        raise GateInputError(f"n_pairs must be >= 1, got {n_pairs}")
    z = NormalDist()
    return (z.inv_cdf((1 + level) / 2) + z.inv_cdf(power)) * sd_diff / math.sqrt(n_pairs)


def apply_verdict(engine: Engine, version: int, verdict: GateVerdict, *, serving_version: int | None,
                      serving_block_id: int | None, candidate_block_id: int | None,
                      items: Sequence[Sequence[Any]], region: dict[str, Any]) -> bool:
    """Store the verdict (gate_decisions row and the candidate's metrics), then publish or reject; True = serves."""
    record = verdict.record() | {"serving_version": serving_version, "serving_block_id": serving_block_id,
                                 "candidate_block_id": candidate_block_id}
    registry.record_gate_metrics(engine, version, record)
    st = verdict.statistic
    with session_scope(engine) as s:
        gate_decisions.add(
            s, candidate_version=version, serving_version=serving_version, candidate_block_id=candidate_block_id,
            serving_block_id=serving_block_id, decision=verdict.decision, passed=verdict.passed, rule=verdict.rule,
            level=st.level, margin=verdict.margin, n_pairs=st.n_pairs, mean_diff=st.mean_diff, ci_low=st.ci_low,
            ci_high=st.ci_high, p_value=st.p_value, statistic=verdict.record(), items=[list(i) for i in items],
            region=region)
    if verdict.passed:
        registry.publish(engine, version)
    else:
        registry.reject(engine, version, {"rejected_by": "gate", "decision": verdict.decision})
    return verdict.passed



def fit_candidate_confidence_map(engine: Engine, version: int, block_id: int) -> ConfidenceMap | None:
    """Fit candidate `version`'s confidence map on its resolved gate block and keep it on its adapter row
    (rewards/calibration.py says why); None, and nothing stored, with too few resolved predictions.

    The gate decided on the candidate's stated confidences (it had no map yet) while the serving side
    already published mapped ones, so that comparison errs against the candidate, never for it."""
    from store.training import resolved_confidences, set_adapter_confidence_map

    with session_scope(engine) as s:
        conf, correct = resolved_confidences(s, block_id)
    cmap = fit_confidence_map(conf, correct)
    if cmap is not None:
        with session_scope(engine) as s:
            set_adapter_confidence_map(s, version, cmap.model_dump())
    return cmap

"""Block metrics, baselines and skill: hand-computed figures."""

import pytest

from rewards.baselines import always_up, baseline_forecasts, coin_flip, momentum_20d, momentum_direction
from rewards.config import RewardsConfig
from rewards.metrics import (
    BlockItem,
    MetricItem,
    block_metrics,
    block_report,
    brier_score,
    expected_calibration_error,
    skill_score,
)


def item(direction, conf, mag, ret, real, comp, valid=True):
    return MetricItem(direction, conf, mag, ret, real, comp, valid)


def test_brier_and_ece_hand_computed():
    assert brier_score([0.9, 0.6, 0.5], [True, False, True]) == pytest.approx((0.01 + 0.36 + 0.25) / 3)
    # bin 9: acc 0.5 vs conf 0.95; bin 5: acc 1 vs conf 0.55; each holds half the items
    assert expected_calibration_error([0.95, 0.95, 0.55, 0.55], [True, False, True, True]) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.45)
    # confidence 1.0 lands in the top bin, not an 11th
    assert expected_calibration_error([1.0, 0.95], [True, True]) == pytest.approx(0.025)
    assert brier_score([], []) is None and expected_calibration_error([], []) is None


def test_block_metrics_counts_invalid_in_coverage_and_composite_only():
    items = [
        item("up", 0.8, 2.0, 3.0, "up", 0.9),
        item("down", 0.6, 1.0, 2.0, "up", 0.3),
        item(None, None, None, -1.0, "down", 0.0, valid=False),
        item("up", float("nan"), 1.0, 1.0, "up", 0.0),  # a NaN that reached the store: not valid
    ]
    m = block_metrics(items)
    assert (m.n, m.n_valid, m.coverage) == (4, 2, 0.5)
    assert m.accuracy == 0.5
    assert m.mean_composite == pytest.approx((0.9 + 0.3) / 4)
    assert m.brier == pytest.approx((0.04 + 0.36) / 2)
    assert m.mean_abs_magnitude_error == pytest.approx((1.0 + 1.0) / 2)
    assert block_metrics([]).accuracy is None


def test_skill_score():
    assert skill_score(0.2, [0.25, 0.24, None]) == pytest.approx(1 - 0.2 / 0.24)
    assert skill_score(0.25, [0.25]) == 0.0
    assert skill_score(None, [0.25]) is None and skill_score(0.2, [None]) is None
    assert skill_score(0.2, [0.0]) is None


def test_baselines_hand_computed():
    closes = [100.0, 101.0, 102.0, 101.0, 103.0]
    up = always_up(closes, 1, 0.0, 2.0)  # 1-day windows: up, up, down, up
    assert (up.direction, up.confidence, up.magnitude_pct) == ("up", 0.75, 2.0)
    rising = [100.0 + i for i in range(22)]
    assert momentum_direction(rising) == "up"
    assert momentum_direction(rising[::-1]) == "down"
    assert momentum_direction(rising[:10]) == "up"  # too short: falls back to up
    mo = momentum_20d(rising, 1, 0.0, 2.0)  # one trailing window (20 -> 21), momentum said up, it went up
    assert (mo.direction, mo.confidence) == ("up", 1.0)
    mo_short = momentum_20d(rising[:10], 1, 0.0, 2.0)
    assert mo_short.confidence == 0.5
    assert coin_flip("p1", 1.0) == coin_flip("p1", 1.0)
    ups = sum(coin_flip(f"p{i}", 1.0).direction == "up" for i in range(400))
    assert 160 < ups < 240
    assert {f.confidence for f in [coin_flip(f"k{i}", 1.0) for i in range(20)]} == {0.5}
    assert set(baseline_forecasts(rising, 1, 0.0, 2.0, "x")) == {"always_up", "momentum_20d", "coin_flip"}


def test_block_report_scores_baselines_on_the_models_valid_items():
    rising = [100.0 + i for i in range(40)]
    good = item("up", 0.9, 1.0, 1.0, "up", 0.95)
    bad = item("down", 0.9, 1.0, 1.0, "up", 0.1)
    invalid = item(None, None, None, 1.0, "up", 0.0, valid=False)
    items = [BlockItem(m, rising, 1, 1.0, f"k{i}") for i, m in enumerate([good, good, bad, invalid])]
    rep = block_report(items, RewardsConfig())
    assert set(rep) == {"model", "always_up", "momentum_20d", "coin_flip"}
    assert rep["model"].n == 4 and rep["model"].n_valid == 3
    for name in ("always_up", "momentum_20d", "coin_flip"):
        assert rep[name].n == 3 and rep[name].coverage == 1.0
    # rising prices: always-up and momentum are right every time, with trailing confidence 1.0
    assert rep["always_up"].accuracy == 1.0 and rep["always_up"].brier == 0.0
    assert rep["coin_flip"].brier == 0.25
    assert rep["model"].brier == pytest.approx((0.01 + 0.01 + 0.81) / 3)
    # the best baseline is perfect here, so skill is undefined rather than -inf
    assert rep["model"].skill is None
    assert rep["always_up"].mean_composite == pytest.approx(0.4 + 0.2 + 0.3)  # no citations: data use 0

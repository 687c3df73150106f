"""Intervals for per-version figures: Wilson against published values, the bootstrap against theory."""

from __future__ import annotations

import random

import pytest

from rewards.intervals import bootstrap_interval, paired_difference, wilson_interval
from rewards.metrics import expected_calibration_error


@pytest.mark.parametrize("k, n, low, high", [
    (8, 10, 0.4902, 0.9433),   # Newcombe (1998), table I
    (0, 10, 0.0, 0.2775),      # not zero-width at 0%
    (10, 10, 0.7225, 1.0),     # nor at 100%
    (15, 148, 0.0624, 0.1605),
])
def test_wilson_matches_published_intervals(k, n, low, high):
    e = wilson_interval(k, n, 0.95)
    assert e.value == pytest.approx(k / n)
    assert (e.low, e.high) == (pytest.approx(low, abs=5e-4), pytest.approx(high, abs=5e-4))


def test_wilson_bad_input_and_empty():
    assert wilson_interval(0, 0).value is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 3)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 3, level=1.5)


def test_bootstrap_of_a_mean_is_close_to_the_normal_interval():
    rng = random.Random(3)
    xs = [rng.gauss(0.5, 0.2) for _ in range(400)]
    e = bootstrap_interval(xs, lambda v: sum(v) / len(v), n_boot=1000, seed=1)
    half = 1.96 * 0.2 / 400 ** 0.5
    assert e.low == pytest.approx(e.value - half, abs=0.006) and e.high == pytest.approx(e.value + half, abs=0.006)
    assert bootstrap_interval(xs, lambda v: sum(v) / len(v), n_boot=1000, seed=1) == e  # seeded: repeatable


def test_bootstrap_of_ece_on_few_items_is_wide_and_undefined_cases_say_so():
    items = [(0.7, 1), (0.7, 0), (0.9, 1), (0.6, 1), (0.8, 0), (0.7, 1)]

    def ece(rows):
        return expected_calibration_error([c for c, _ in rows], [bool(k) for _, k in rows])

    e = bootstrap_interval(items, ece, seed=0)
    assert e.low < e.value < e.high and e.high - e.low > 0.2
    assert bootstrap_interval([], ece).value is None
    one = bootstrap_interval(items[:1], ece)
    assert one.value == pytest.approx(0.3) and one.low is None and one.high is None


# ---- paired differences with a cluster bootstrap: the interval counts dates, not items ----


def by_date(key):
    return key[1]


def test_a_constant_gain_has_a_zero_width_interval_at_the_gain():
    a = {("T", d): 0.7 for d in range(30)}
    b = {("T", d): 0.5 for d in range(30)}
    d = paired_difference(a, b, by_date)
    assert (round(d.mean, 9), round(d.low, 9), round(d.high, 9)) == (0.2, 0.2, 0.2)
    assert d.excludes_zero() and d.n_items == 30 and d.n_clusters == 30


def test_pure_noise_interval_covers_zero_and_a_clear_win_excludes_it():
    rng = random.Random(1)
    keys = [(f"T{t}", day) for day in range(60) for t in range(5)]
    b = {k: float(rng.random() < 0.5) for k in keys}
    noise = {k: float(rng.random() < 0.5) for k in keys}
    win = {k: float(rng.random() < 0.8) for k in keys}
    assert not paired_difference(noise, b, by_date, seed=3).excludes_zero()
    d = paired_difference(win, b, by_date, seed=3)
    assert d.excludes_zero() and d.low > 0.15 and d.n_clusters == 60


def test_items_sharing_a_date_widen_the_interval():
    """The same 300 differences read as 300 independent items, or as 10 dates of 30 that move together."""
    rng = random.Random(2)
    shock = {day: rng.gauss(0, 0.3) for day in range(10)}
    diffs = {(f"T{t}", day): 0.05 + shock[day] + rng.gauss(0, 0.05) for day in range(10) for t in range(30)}
    zero = dict.fromkeys(diffs, 0.0)
    independent = paired_difference(diffs, zero)  # each item its own cluster
    clustered = paired_difference(diffs, zero, by_date)
    assert clustered.n_clusters == 10 and independent.n_clusters == 300
    assert (clustered.high - clustered.low) > 3 * (independent.high - independent.low)


def test_only_common_scored_items_count():
    a = {("A", 1): 1.0, ("B", 1): 0.0, ("C", 2): float("nan")}
    b = {("A", 1): 0.0, ("C", 2): 1.0, ("D", 3): 1.0}
    d = paired_difference(a, b, by_date, n_boot=200)
    assert d.n_items == 1 and d.mean == 1.0
    assert paired_difference({("A", 1): 1.0}, {("B", 1): 1.0}) is None

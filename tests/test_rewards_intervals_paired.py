"""Paired differences with a cluster bootstrap: the interval counts dates, not items."""

from __future__ import annotations

import random

from rewards.evaluation import paired_difference


def by_date(key):
    return key[1]


def test_a_constant_gain_has_a_zero_width_interval_at_the_gain():
    a = {("T", d): 0.7 for d in range(30)}
    b = {("T", d): 0.5 for d in range(30)}
    d = paired_difference(a, b, by_date)
    assert (round(d.mean, 9), round(d.lo, 9), round(d.hi, 9)) == (0.2, 0.2, 0.2)
    assert d.excludes_zero() and d.n_items == 30 and d.n_clusters == 30


def test_pure_noise_interval_covers_zero_and_a_clear_win_excludes_it():
    rng = random.Random(1)
    keys = [(f"T{t}", day) for day in range(60) for t in range(5)]
    b = {k: float(rng.random() < 0.5) for k in keys}
    noise = {k: float(rng.random() < 0.5) for k in keys}
    win = {k: float(rng.random() < 0.8) for k in keys}
    assert not paired_difference(noise, b, by_date, seed=3).excludes_zero()
    d = paired_difference(win, b, by_date, seed=3)
    assert d.excludes_zero() and d.lo > 0.15 and d.n_clusters == 60


def test_items_sharing_a_date_widen_the_interval():
    """The same 300 differences read as 300 independent items, or as 10 dates of 30 that move together."""
    rng = random.Random(2)
    shock = {day: rng.gauss(0, 0.3) for day in range(10)}
    diffs = {(f"T{t}", day): 0.05 + shock[day] + rng.gauss(0, 0.05) for day in range(10) for t in range(30)}
    zero = dict.fromkeys(diffs, 0.0)
    independent = paired_difference(diffs, zero)  # each item its own cluster
    clustered = paired_difference(diffs, zero, by_date)
    assert clustered.n_clusters == 10 and independent.n_clusters == 300
    assert (clustered.hi - clustered.lo) > 3 * (independent.hi - independent.lo)


def test_only_common_scored_items_count():
    a = {("A", 1): 1.0, ("B", 1): 0.0, ("C", 2): float("nan")}
    b = {("A", 1): 0.0, ("C", 2): 1.0, ("D", 3): 1.0}
    d = paired_difference(a, b, by_date, reps=200)
    assert d.n_items == 1 and d.mean == 1.0
    assert paired_difference({("A", 1): 1.0}, {("B", 1): 1.0}) is None

"""Conditioning labels: the exact strings the agent and the trainer share."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewards.config import RewardsConfig
from rewards.labels import (
    goal_label,
    quantile_edges,
    quantile_label,
    rank_label,
    score_label,
    target_label,
    training_label,
)


@pytest.mark.parametrize("score,expected", [
    (0.834, "Score: 0.83"), (0.835, "Score: 0.83"), (1.7, "Score: 1.00"), (-0.2, "Score: 0.00"),
    (math.nan, "Score: 0.00"), (0.95, "Score: 0.95"),
])
def test_score_label(score, expected):
    assert score_label(score) == expected


def test_goal_label():
    assert goal_label(0.85, 0.8) == "Goal: earn a reward above 0.80"
    assert goal_label(0.8, 0.8) == "Goal: earn a reward above 0.80"
    assert goal_label(0.79, 0.8) == "Goal: earn a reward below 0.80"


def test_quantile_edges_fill_bins_equally():
    scores = [i / 10 for i in range(1, 11)]
    edges = quantile_edges(scores, 5)
    assert edges == [0.3, 0.5, 0.7, 0.9]
    labels = [quantile_label(s, edges) for s in scores]
    assert [labels.count(f"Quantile: {b}/5") for b in range(1, 6)] == [2, 2, 2, 2, 2]
    assert quantile_label(1.0, edges) == "Quantile: 5/5" and quantile_label(0.0, edges) == "Quantile: 1/5"
    assert quantile_edges([], 4) == [0.25, 0.5, 0.75]
    assert len(quantile_edges([0.5], 5)) == 4  # fewer scores than bins still gives bins-1 edges


def test_training_and_target_labels_share_the_format():
    for fmt, expected in [("score", "Score: 0.90"), ("goal", "Goal: earn a reward above 0.80"),
                          ("quantile", "Quantile: 5/5")]:
        cfg = RewardsConfig(label_format=fmt)
        assert training_label(0.9, cfg) == target_label(0.9, cfg) == expected


@given(st.lists(st.floats(0, 1), min_size=1, max_size=50), st.integers(2, 10), st.floats(0, 1))
def test_quantile_label_is_monotone(scores, bins, x):
    edges = quantile_edges(scores, bins)
    assert edges == sorted(edges)
    lo = int(quantile_label(x / 2, edges).split()[1].split("/")[0])
    hi = int(quantile_label(x, edges).split()[1].split("/")[0])
    assert 1 <= lo <= hi <= bins


def test_rank_labels_spread_an_items_episodes_and_targets_name_the_same_strings():
    # three episodes of one item (one per tool): worst, middle, best; ties share the lower rank
    assert [rank_label(lower, 3, 5) for lower in (0, 1, 2)] == ["Rank: 1/5", "Rank: 3/5", "Rank: 5/5"]
    assert [rank_label(lower, 3, 3) for lower in (0, 1, 2)] == ["Rank: 1/3", "Rank: 2/3", "Rank: 3/3"]
    assert rank_label(0, 1, 5) == "Rank: 3/5" and rank_label(0, 1, 4) == "Rank: 2/4"  # run once: the middle
    cfg = RewardsConfig(label_format="rank", quantile_bins=5)
    assert [target_label(t, cfg) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [f"Rank: {k}/5" for k in range(1, 6)]
    assert target_label(1.0, cfg) == rank_label(2, 3, 5)  # the target the agent is given is the best's label
    with pytest.raises(ValueError, match="rank_label"):
        training_label(0.9, cfg)  # a score alone cannot say where it stands among its item's episodes

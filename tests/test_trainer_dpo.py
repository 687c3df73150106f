"""Optional DPO objective: winner/loser pairs for the same (ticker, as_of), one DPOTrainer round on the tiny model."""

from __future__ import annotations

from datetime import UTC, datetime

from trainer_fixtures import add_block, every_episode

from rewards.config import RewardsConfig
from store.db import session_scope
from trainer.dataset import offline_set
from trainer.dpo import preference_pairs
from trainer.round import NothingToTrain, train_round

T0 = datetime(2024, 4, 1, 21, 1, tzinfo=UTC)


def test_pairs_take_best_and_worst_of_the_same_item(sqlite_db):
    _, a = add_block(sqlite_db, [0.9, 0.30, 0.5], start=T0)
    _, b = add_block(sqlite_db, [0.2, 0.32, 0.5], start=T0)  # same items, another adapter's run
    add_block(sqlite_db, [0.1], start=datetime(2025, 1, 2, 21, 1, tzinfo=UTC))  # no partner
    with session_scope(sqlite_db) as s:
        pairs = preference_pairs(s, offline_set(s, every_episode()))
    assert [(p["chosen_episode_id"], p["rejected_episode_id"]) for p in pairs] == [(a[0], b[0])]  # gaps < 0.05 skipped
    p = pairs[0]
    assert [m["role"] for m in p["prompt"]] == ["system", "user"]
    assert p["chosen"][0]["role"] == "assistant" and p["rejected"][-1]["role"] == "assistant"


def test_dpo_round_trains_a_candidate(sqlite_db, tiny_model_dir, tmp_path):
    add_block(sqlite_db, [0.9, 0.1, 0.8, 0.2], start=T0)
    add_block(sqlite_db, [0.1, 0.9, 0.2, 0.8], start=T0)
    cfg = every_episode(objective="dpo", adapters_dir=str(tmp_path / "adapters"), runs_dir=str(tmp_path / "runs"),
                        lora_r=4, lora_alpha=8, batch_size=2, max_length=384, min_new_episodes=1, grad_accum=1)
    r = train_round(sqlite_db, cfg, RewardsConfig(), tiny_model_dir, device="cpu")
    assert r.adapter_version == 1 and r.n_examples == 4 and len(r.loss_curve) == 2
    assert all(p["loss"] > 0 for p in r.loss_curve)
    assert isinstance(train_round(sqlite_db, cfg, RewardsConfig(), tiny_model_dir, device="cpu"), NothingToTrain)

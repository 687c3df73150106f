"""A resumed training round checks its re-planned examples against the fingerprint stored when the
checkpoint's data was planned: unchanged data resumes, changed data (rescored rewards -> other
labels) drops the checkpoint and restarts the round cleanly, saying why."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select
from trainer_fixtures import add_block, every_episode
from transformers import TrainerCallback

from rewards.config import RewardsConfig
from store.db import session_scope
from store.models import Prediction, Reward, TrainingRun
from trainer.config import TrainerConfig
from trainer.round import FINGERPRINT_KEY, dataset_fingerprint, train_round
from trainer.sft import plan

REWARDS = RewardsConfig()


def tcfg(tmp_path: Path) -> TrainerConfig:
    return every_episode(adapters_dir=str(tmp_path / "adapters"), runs_dir=str(tmp_path / "runs"), lora_r=4,
                         lora_alpha=8, batch_size=2, max_length=384, save_steps=2, min_new_episodes=1, replay_size=0,
                         grad_accum=1, boost_top_fraction=0.0, balance_directions=False)  # steps = examples / 2


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("simulated crash after step 3")


class Steps(TrainerCallback):
    def __init__(self):
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


def _replan(engine, cfg: TrainerConfig, run_id: int) -> str:
    with session_scope(engine) as s:
        return dataset_fingerprint(plan(s, cfg, REWARDS, run=s.get(TrainingRun, run_id), need=1))


def _rescore(engine, episode_id: int, composite: float) -> None:
    """A newer reward version for one episode: its training label changes."""
    with session_scope(engine) as s:
        pid = s.scalar(select(Prediction.id).where(Prediction.episode_id == episode_id))
        s.add(Reward(prediction_id=pid, reward_version="v2", direction=1.0, magnitude=0.5, calibration=0.5,
                     data_use=0.0, composite=composite))


def test_changed_examples_restart_the_round_from_its_parent(sqlite_db, tiny_model_dir, tmp_path, caplog):
    cfg = tcfg(tmp_path)
    _, eps = add_block(sqlite_db, [0.1 * i for i in range(1, 9)])  # 8 examples / batch 2 = 4 steps
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu", callbacks=[Crash()])
    with session_scope(sqlite_db) as s:
        run = s.scalars(select(TrainingRun)).one()
    stored = run.hyperparams[FINGERPRINT_KEY]
    ckpt = Path(run.checkpoint_dir) / "checkpoint-2"
    assert ckpt.is_dir() and stored.startswith("sha256:")
    assert _replan(sqlite_db, cfg, run.id) == stored  # same store, same examples, same fingerprint

    _rescore(sqlite_db, eps[0], 0.95)  # the checkpoint was trained on this episode under another label
    changed = _replan(sqlite_db, cfg, run.id)
    assert changed != stored

    steps = Steps()
    with caplog.at_level(logging.WARNING, logger="scoreloop.trainer"):
        result = train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu", callbacks=[steps])
    assert result.run_id == run.id and result.resumed_from_step is None
    assert steps.seen == [1, 2, 3, 4]  # trained from the parent again, not from checkpoint-2
    assert result.restarted is not None and "examples changed since its checkpoint" in result.restarted
    assert stored in result.restarted and changed in result.restarted
    assert any("restarting the round" in r.getMessage() for r in caplog.records)
    with session_scope(sqlite_db) as s:
        done = s.get(TrainingRun, run.id)
    assert done.status == "done" and done.hyperparams[FINGERPRINT_KEY] == changed
    assert [p["step"] for p in done.loss_curve] == [1, 2, 3, 4]


def test_a_run_without_a_stored_fingerprint_is_not_trusted(sqlite_db, tiny_model_dir, tmp_path):
    """A round interrupted before fingerprints existed: its checkpoint's data cannot be checked, so
    the round restarts rather than resume on data that may differ."""
    cfg = tcfg(tmp_path)
    add_block(sqlite_db, [0.2, 0.4, 0.6, 0.8])
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_round(sqlite_db, cfg.model_copy(update={"batch_size": 1}), REWARDS, tiny_model_dir, device="cpu",
                    callbacks=[Crash()])
    with session_scope(sqlite_db) as s:
        run = s.scalars(select(TrainingRun)).one()
        run.hyperparams = {k: v for k, v in run.hyperparams.items() if k != FINGERPRINT_KEY}
        ckpt = Path(run.checkpoint_dir)
    assert any(ckpt.glob("checkpoint-*"))
    result = train_round(sqlite_db, cfg.model_copy(update={"batch_size": 1}), REWARDS, tiny_model_dir, device="cpu")
    assert result.resumed_from_step is None and "not stored" in result.restarted

"""Training rounds on a tiny random model: lineage, new + replay data, resume after a crash, failures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from trainer_fixtures import add_block, every_episode
from transformers import TrainerCallback
from typer.testing import CliRunner

from rewards.config import RewardsConfig
from store.db import session_scope
from store.models import Adapter, TrainingRun
from trainer.config import TrainerConfig
from trainer.errors import TrainerError, TrainingStopped
from trainer.registry import publish, serving_adapter
from trainer.round import NothingToTrain, train_round
from trainer.sft import StopOnEvent, last_complete_checkpoint

REWARDS = RewardsConfig()


def tcfg(tmp_path: Path, **kw) -> TrainerConfig:
    base = {"adapters_dir": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs"), "lora_r": 4, "lora_alpha": 8,
                "batch_size": 2, "max_length": 384, "save_steps": 2, "min_new_episodes": 1, "replay_size": 3,
            # the mechanics below count examples and steps: one example per episode, one micro-batch per step
            "grad_accum": 1, "boost_top_fraction": 0.0, "balance_directions": False}
    return every_episode(**{**base, **kw})


def runs(engine) -> list[TrainingRun]:
    with session_scope(engine) as s:
        return list(s.scalars(select(TrainingRun).order_by(TrainingRun.id)))


def adapters(engine) -> dict[int, Adapter]:
    with session_scope(engine) as s:
        return {a.version: a for a in s.scalars(select(Adapter))}


class Crash(TrainerCallback):
    """Simulates the process dying right after optimizer step `at`."""

    def __init__(self, at: int, exc: BaseException | None = None):
        self.at, self.exc = at, exc

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise self.exc or RuntimeError(f"simulated crash after step {self.at}")


class Steps(TrainerCallback):
    def __init__(self):
        self.seen: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


def test_two_rounds_make_a_lineage_and_round_two_trains_on_block_two_plus_replay(sqlite_db, tiny_model_dir, tmp_path):
    cfg = tcfg(tmp_path)
    b1, eps1 = add_block(sqlite_db, [0.2, 0.4, 0.6, 0.8, 0.3])
    r1 = train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu")
    assert (r1.adapter_version, r1.parent_version) == (1, None)
    assert r1.block_ids == [b1] and r1.replay_episode_ids == [] and r1.episode_ids == eps1
    assert Path(r1.path) == tmp_path / "adapters" / "v1" and (Path(r1.path) / "adapter_model.safetensors").exists()
    assert not (tmp_path / "runs" / f"run-{r1.run_id}").exists()  # checkpoints only live while the round runs
    publish(sqlite_db, 1)

    b2, eps2 = add_block(sqlite_db, [0.9, 0.1, 0.5, 0.7])
    # A vanishing learning rate makes "round 2 starts from v1's weights" visible: v2 == v1 (a fresh LoRA has B == 0).
    r2 = train_round(sqlite_db, cfg.model_copy(update={"learning_rate": 1e-12}), REWARDS, tiny_model_dir,
                     device="cpu")
    assert (r2.adapter_version, r2.parent_version) == (2, 1)
    assert r2.block_ids == [b2]
    assert len(r2.replay_episode_ids) == 3 and set(r2.replay_episode_ids) < set(eps1)
    assert sorted(r2.episode_ids) == sorted(eps2 + r2.replay_episode_ids)

    _, run2 = runs(sqlite_db)
    assert (run2.status, run2.parent_version, run2.adapter_version) == ("done", 1, 2)
    assert run2.block_ids == [b2] and run2.replay_episode_ids == r2.replay_episode_ids and run2.n_examples == 7
    assert [p["step"] for p in run2.loss_curve] == [1, 2, 3, 4]
    assert all(p["loss"] > 0 for p in run2.loss_curve)
    assert run2.hyperparams["lora_r"] == 4 and run2.hyperparams["device"] == "cpu"
    ads = adapters(sqlite_db)
    assert (ads[2].status, ads[2].parent_version, ads[2].training_run_id) == ("candidate", 1, run2.id)
    assert ads[1].status == "serving"  # a new candidate does not serve until published

    from safetensors.torch import load_file

    w1, w2 = load_file(Path(r1.path) / "adapter_model.safetensors"), load_file(Path(r2.path) / "adapter_model.safetensors")
    assert w1.keys() == w2.keys()
    assert any("lora_B" in k and w1[k].abs().max() > 0 for k in w1)  # round 1 moved B away from its zero init
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    # Nothing new: no round.
    assert isinstance(train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu"), NothingToTrain)


def test_interrupted_round_resumes_from_its_last_checkpoint(sqlite_db, tiny_model_dir, tmp_path):
    cfg = tcfg(tmp_path, save_steps=2)
    b1, eps = add_block(sqlite_db, [0.1 * i for i in range(1, 9)])  # 8 examples / batch 2 = 4 steps
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu", callbacks=[Crash(at=3)])
    (run,) = runs(sqlite_db)
    assert run.status == "running" and "simulated crash" in run.error
    assert (Path(run.checkpoint_dir) / "checkpoint-2").is_dir()
    assert adapters(sqlite_db) == {}

    add_block(sqlite_db, [0.5, 0.5])  # arrives meanwhile: belongs to the next round, not the resumed one
    # A kill during the next save left a checkpoint without weights or trainer state: skipped, removed.
    half = Path(run.checkpoint_dir) / "checkpoint-3"
    half.mkdir()
    (half / "adapter_config.json").write_text("{}")
    assert last_complete_checkpoint(run.checkpoint_dir).endswith("checkpoint-2") and not half.exists()
    steps = Steps()
    result = train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu", callbacks=[steps])
    assert result.run_id == run.id and result.resumed_from_step == 2
    assert steps.seen == [3, 4]  # steps 1-2 came from the checkpoint
    assert result.block_ids == [b1] and sorted(result.episode_ids) == eps
    (done, ) = runs(sqlite_db)
    assert done.status == "done" and [p["step"] for p in done.loss_curve] == [1, 2, 3, 4]
    assert adapters(sqlite_db)[1].training_run_id == run.id



class StopAt(TrainerCallback):
    """Sets the daemon's stop flag during step `at`, as SIGTERM would."""

    def __init__(self, event: threading.Event, at: int):
        self.event, self.at = event, at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.at:
            self.event.set()


def test_stop_flag_checkpoints_at_the_next_step_and_the_round_resumes(sqlite_db, tiny_model_dir, tmp_path):
    """SIGTERM mid-round: stop after the step in flight with a checkpoint, publish nothing, resume later."""
    cfg = tcfg(tmp_path, save_steps=100)  # no periodic checkpoint before the stop: the stop saves one
    add_block(sqlite_db, [0.1 * i for i in range(1, 9)])  # 8 examples / batch 2 = 4 steps
    stop = threading.Event()
    with pytest.raises(TrainingStopped, match="stopped at step 2 of 4"):
        train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu",
                    callbacks=[StopOnEvent(stop), StopAt(stop, at=2)])
    (run,) = runs(sqlite_db)
    assert run.status == "running" and "TrainingStopped" in run.error
    assert (Path(run.checkpoint_dir) / "checkpoint-2").is_dir()
    assert adapters(sqlite_db) == {}  # a half-trained adapter is never published
    steps = Steps()
    result = train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu",
                         callbacks=[StopOnEvent(threading.Event()), steps])
    assert result.run_id == run.id and result.resumed_from_step == 2 and steps.seen == [3, 4]

def _serving_v1(engine, tiny_model_dir, cfg):
    add_block(engine, [0.3, 0.6, 0.9, 0.2])
    r1 = train_round(engine, cfg, REWARDS, tiny_model_dir, device="cpu")
    publish(engine, r1.adapter_version)
    add_block(engine, [0.4, 0.8, 0.5, 0.7])
    return r1


def test_nan_loss_fails_the_round_and_serving_is_untouched(sqlite_db, tiny_model_dir, tmp_path):
    cfg = tcfg(tmp_path)
    _serving_v1(sqlite_db, tiny_model_dir, cfg)
    diverging = cfg.model_copy(update={"learning_rate": 1e36})
    with pytest.raises(TrainerError, match="loss became"):
        train_round(sqlite_db, diverging, REWARDS, tiny_model_dir, device="cpu")
    failed = runs(sqlite_db)[-1]
    assert failed.status == "failed" and "loss became" in failed.error
    assert set(adapters(sqlite_db)) == {1}
    with session_scope(sqlite_db) as s:
        assert serving_adapter(s)[1] == 1
    # The failed run did not consume its blocks: a sane retry trains on them.
    retry = train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu")
    assert retry.adapter_version == 2 and retry.block_ids == failed.block_ids


def test_corrupted_serving_adapter_is_a_clear_error(sqlite_db, tiny_model_dir, tmp_path):
    cfg = tcfg(tmp_path)
    r1 = _serving_v1(sqlite_db, tiny_model_dir, cfg)
    weights = Path(r1.path) / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(TrainerError, match=r"adapter .*v1 is corrupted"):
        train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu")
    assert runs(sqlite_db)[-1].status == "failed"
    with session_scope(sqlite_db) as s:
        assert serving_adapter(s)[1] == 1


def test_out_of_memory_is_caught_and_recorded(sqlite_db, tiny_model_dir, tmp_path):
    cfg = tcfg(tmp_path)
    add_block(sqlite_db, [0.3, 0.6, 0.9, 0.2])
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(TrainerError, match="out of memory.*batch_size"):
        train_round(sqlite_db, cfg, REWARDS, tiny_model_dir, device="cpu", callbacks=[Crash(1, oom)])
    run = runs(sqlite_db)[-1]
    assert run.status == "failed" and "out of memory" in run.error
    assert adapters(sqlite_db) == {}


def test_too_few_new_episodes_waits_and_empty_store_errors(sqlite_db, tiny_model_dir, tmp_path):
    with pytest.raises(TrainerError, match="no scored episodes"):
        train_round(sqlite_db, tcfg(tmp_path), REWARDS, tiny_model_dir, device="cpu")
    add_block(sqlite_db, [0.3, 0.6])
    assert isinstance(train_round(sqlite_db, tcfg(tmp_path, min_new_episodes=3), REWARDS, tiny_model_dir,
                                  device="cpu"), NothingToTrain)
    assert runs(sqlite_db) == []


def test_cli_train_runs_a_round_and_publishes(sqlite_url, sqlite_db, tiny_model_dir, tmp_path, monkeypatch):
    from scheduler.cli import app

    monkeypatch.chdir(tmp_path)
    for key, value in {"AGENT__MODEL": tiny_model_dir, "AGENT__DEVICE": "cpu", "TRAINER__MIN_NEW_EPISODES": "1",
                       "TRAINER__LORA_R": "2", "TRAINER__MAX_LENGTH": "384", "TRAINER__BATCH_SIZE": "2"}.items():
        monkeypatch.setenv(f"SCORELOOP_{key}", value)
    res = CliRunner().invoke(app, ["--db", sqlite_url, "train"])
    assert res.exit_code == 1 and "no scored episodes" in res.output
    add_block(sqlite_db, [0.3, 0.6, 0.9, 0.2])
    res = CliRunner().invoke(app, ["--db", sqlite_url, "train", "--publish"])
    assert res.exit_code == 0, res.output
    # the default recipe: the block's top quartile (1 of 4 episodes, under its score label), 2 epochs of 1 example
    assert "adapter v1 (parent None): 1 example from" in res.output and "2 steps" in res.output
    assert "v1 is serving" in res.output
    with session_scope(sqlite_db) as s:
        assert serving_adapter(s) == (str(Path("adapters") / "v1"), 1)

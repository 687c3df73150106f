"""One semi-online training round, SFT or DPO, in one run lifecycle:

    plan (which blocks, which replay episodes) -> training_runs row `running` -> fit LoRA in the
    run's checkpoint folder -> save the candidate adapter atomically -> row `done`.

The round resumes from the serving adapter (first round: a fresh LoRA), so its cost is
O(new + replay). The objective (trainer/sft.py or trainer/dpo.py) only says what to train on and
how to fit. A crash or Ctrl-C leaves the row `running`, and the next call picks the same data up
from the last checkpoint. NaN loss, out-of-memory and an unloadable model end the round as
`failed`; serving is never touched here.

A resumed round re-plans its data from the current store (same blocks, same replay episodes), and
labels or messages can have changed since (rewards rescored, quantile edges moved). The run row
keeps a fingerprint of the examples the checkpoint was trained on; if the re-planned examples do
not match it, the checkpoint is dropped and the round restarts from its parent adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from sqlalchemy import Engine
from transformers import PreTrainedModel, TrainerCallback

from rewards.config import RewardsConfig
from store.db import check_write_fence, session_scope
from store.training import (
    adapter_row,
    add_adapter,
    create_training_run,
    fail_training_run,
    finish_training_run,
    next_adapter_version,
    note_training_error,
    running_training_run,
    serving_adapter_row,
)
from trainer.config import TrainerConfig
from trainer.errors import TrainerError
from trainer.registry import save_adapter

FINGERPRINT_KEY = "dataset_fingerprint"  # in training_runs.hyperparams
log = logging.getLogger("scoreloop.trainer")


@dataclass
class RoundResult:
    """What a round produced: a candidate adapter (not yet serving) and the data it saw."""

    run_id: int
    adapter_version: int
    parent_version: int | None
    path: str
    n_examples: int
    block_ids: list[int]
    replay_episode_ids: list[int]
    episode_ids: list[int]
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None
    seconds: float = 0.0
    restarted: str | None = None  # why an interrupted round's checkpoint was dropped, if it was


@dataclass(frozen=True)
class NothingToTrain:
    """No round ran; `reason` says why in words a user can act on."""

    reason: str
    new_episodes: int = 0
    needed: int = 0


@dataclass
class RoundData:
    """What an objective trains on this round, decided before any model is loaded."""

    block_ids: list[int]
    replay_episode_ids: list[int]
    episode_ids: list[int]
    rows: list[Any]  # chat examples (SFT: lists of messages) or preference pairs (DPO)
    n_new: int  # new scored episodes behind the rows (what min_new_episodes counts)
    hyperparams: dict[str, Any] = field(default_factory=dict)  # objective-specific, kept on the run row


@dataclass
class FitOutcome:
    """A fitted LoRA and its training curve."""

    model: Any
    loss_curve: list[dict[str, float]]
    global_step: int
    resumed_from_step: int | None


ModelRef = str | PreTrainedModel


def model_name(model: ModelRef) -> str:
    """The folder or hub id a model was loaded from (what the adapter row records as its base)."""
    return model if isinstance(model, str) else str(model.name_or_path)


def hyperparams(cfg: TrainerConfig, device: str) -> dict:
    keep = ("objective", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "epochs",
            "batch_size", "grad_accum", "max_length", "replay_size", "save_steps", "gradient_checkpointing", "seed",
            "filter_top_fraction", "boost_top_fraction", "boost_passes")
    return {**{k: getattr(cfg, k) for k in keep}, "device": device}


def dataset_fingerprint(data: RoundData) -> str:
    """sha256 of the round's examples in order: episode ids and rows (chat messages, which carry each
    example's label, or preference pairs). A checkpoint is only a valid start for this exact data."""
    payload = json.dumps({"episode_ids": list(data.episode_ids), "rows": data.rows}, sort_keys=True,
                         separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _objective(name: str) -> ModuleType:
    """The module with plan() and fit() for this objective."""
    if name == "dpo":
        from trainer import dpo

        return dpo
    from trainer import sft

    return sft


def train_round(engine: Engine, trainer_cfg: TrainerConfig, rewards_cfg: RewardsConfig, model: ModelRef, *,
                device: str = "auto", min_new_episodes: int | None = None,
                callbacks: Sequence[TrainerCallback] = ()) -> RoundResult | NothingToTrain:
    """Train one round on `model` (a folder or hub id, or a loaded model, which gets the LoRA in place).

    NothingToTrain when fewer than `min_new_episodes` (default trainer_cfg.min_new_episodes, unset
    = any) new scored episodes wait and no interrupted round is pending.
    """
    from accelerate import PartialState

    from trainer.sft import is_oom, pick_device

    objective = _objective(trainer_cfg.objective)
    started = time.perf_counter()
    device = pick_device(device)
    need = min_new_episodes or trainer_cfg.min_new_episodes or 1
    state = PartialState()
    # The main process creates (or finds) the run row first; other DDP ranks then find it running.
    with state.main_process_first(), session_scope(engine) as s:
        run = running_training_run(s, trainer_cfg.objective)
        data = objective.plan(s, trainer_cfg, rewards_cfg, run=run, need=need)
        if isinstance(data, NothingToTrain):
            return data
        fingerprint = dataset_fingerprint(data)
        restarted = None
        if run is None:
            if not state.is_main_process:
                raise TrainerError("DDP rank started before the main process created the training run")
            parent = serving_adapter_row(s)
            run = create_training_run(
                s, objective=trainer_cfg.objective, parent_version=None if parent is None else parent.version,
                block_ids=data.block_ids, replay_episode_ids=data.replay_episode_ids, n_examples=len(data.rows),
                hyperparams={**hyperparams(trainer_cfg, device), **data.hyperparams, "base_model": model_name(model),
                             FINGERPRINT_KEY: fingerprint},
            )
            run.checkpoint_dir = str(Path(trainer_cfg.runs_dir) / f"run-{run.id}")
        else:
            parent = None if run.parent_version is None else adapter_row(s, run.parent_version)
            restarted = _restart_if_changed(run, data, fingerprint, trainer_cfg, state.is_main_process)
        run_id, run_dir = run.id, run.checkpoint_dir or str(Path(trainer_cfg.runs_dir) / f"run-{run.id}")
        parent_version = None if parent is None else parent.version
        parent_path = None if parent is None else parent.path
        block_ids, replay_ids = list(run.block_ids), list(run.replay_episode_ids)

    try:
        outcome = objective.fit(model, parent_path, data.rows, trainer_cfg, run_dir, device=device,
                                callbacks=callbacks)
    except TrainerError as err:  # NaN loss, or a model/adapter that cannot load: retrying will not help
        _fail(engine, run_id, str(err))
        raise
    except BaseException as err:
        if isinstance(err, Exception) and is_oom(err):
            from trainer.sft import OutOfMemory

            msg = (f"out of memory while training ({type(err).__name__}: {str(err)[:200]}); lower "
                   "trainer.batch_size or trainer.max_length, or set trainer.gradient_checkpointing = true")
            _fail(engine, run_id, msg)
            raise OutOfMemory(msg) from None
        # An interruption (crash, Ctrl-C, killed job): keep `running` so the next call resumes it.
        if state.is_main_process:
            with session_scope(engine) as s:
                note_training_error(s, run_id, f"interrupted: {type(err).__name__}: {err}\n"
                                    + traceback.format_exc(limit=3))
        raise

    if not state.is_main_process:
        return NothingToTrain("this DDP rank trained; the main process writes the adapter")
    with session_scope(engine) as s:
        version = next_adapter_version(s)
        check_write_fence(s, wrote=True)  # a taken-over lock holder must not write into adapters_dir
    path = save_adapter(outcome.model, trainer_cfg.adapters_dir, version)
    final = outcome.loss_curve[-1]["loss"] if outcome.loss_curve else None
    with session_scope(engine) as s:
        add_adapter(s, version=version, parent_version=parent_version, path=str(path), base_model=model_name(model),
                    training_run_id=run_id,
                    metrics={"objective": trainer_cfg.objective, "final_loss": final, "n_examples": len(data.rows),
                             "steps": outcome.global_step})
        finish_training_run(s, run_id, adapter_version=version, loss_curve=outcome.loss_curve)
    # Checkpoints only exist to resume this round; the adapter folder is the result.
    shutil.rmtree(run_dir, ignore_errors=True)
    return RoundResult(run_id=run_id, adapter_version=version, parent_version=parent_version, path=str(path),
                       n_examples=len(data.rows), block_ids=block_ids, replay_episode_ids=replay_ids,
                       episode_ids=data.episode_ids, loss_curve=outcome.loss_curve,
                       resumed_from_step=outcome.resumed_from_step, seconds=time.perf_counter() - started,
                       restarted=restarted)


def _restart_if_changed(run: Any, data: RoundData, fingerprint: str, cfg: TrainerConfig,
                        main_process: bool) -> str | None:
    """An interrupted run whose re-planned examples differ from what its checkpoint saw: drop the
    checkpoint and take the new data (row updated in the caller's transaction); returns why, or None.

    The folder goes before the new fingerprint commits, so a crash in between restarts again
    rather than resuming the old checkpoint under the new fingerprint."""
    stored = (run.hyperparams or {}).get(FINGERPRINT_KEY)
    if stored == fingerprint:
        return None
    why = (f"run {run.id}'s examples changed since its checkpoint (fingerprint {stored or 'not stored'} -> "
           f"{fingerprint}; labels, messages or episodes differ, e.g. rescored rewards): restarting the round "
           f"from its parent adapter on the current data")
    run_dir = run.checkpoint_dir or str(Path(cfg.runs_dir) / f"run-{run.id}")
    if main_process:
        shutil.rmtree(run_dir, ignore_errors=True)
    log.warning(why)
    run.hyperparams = {**(run.hyperparams or {}), **data.hyperparams, FINGERPRINT_KEY: fingerprint}
    run.n_examples = len(data.rows)
    run.error = f"restarted: {why}"
    return why


def _fail(engine: Engine, run_id: int, error: str) -> None:
    with session_scope(engine) as s:
        fail_training_run(s, run_id, error)

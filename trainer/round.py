"""One semi-online training round: new scored blocks + a replay sample -> a candidate adapter.

The round resumes from the serving adapter (first round: a fresh LoRA), so its cost is
O(new + replay). Its training_runs row stays `running` until the candidate is written; a crash
or Ctrl-C leaves it so, and the next call picks the same data up from the last checkpoint.
NaN loss and out-of-memory end the round as `failed`; serving is never touched here.
"""

from __future__ import annotations

import shutil
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from transformers import TrainerCallback

from policy.config import PolicyConfig
from policy.model_files import resolve_model
from rewards.config import RewardsConfig
from store.db import session_scope
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
from trainer.dataset import build_examples, plan_round
from trainer.errors import TrainerError
from trainer.registry import save_adapter
from trainer.sft import NonFiniteLoss, OutOfMemory, run_sft


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


def hyperparams(cfg: TrainerConfig, device: str) -> dict:
    keep = ("objective", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "epochs",
            "batch_size", "grad_accum", "max_length", "replay_size", "save_steps", "gradient_checkpointing", "seed",
            "filter_top_fraction")
    return {**{k: getattr(cfg, k) for k in keep}, "device": device}


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def train_round(engine: Engine, trainer_cfg: TrainerConfig, rewards_cfg: RewardsConfig, agent_cfg: PolicyConfig,
                *, base_model_dir: str | None = None,
                callbacks: Sequence[TrainerCallback] = ()) -> RoundResult | None:
    """Train one round; None when fewer than `min_new_episodes` new scored episodes are waiting."""
    from accelerate import PartialState

    from trainer.sft import pick_device

    if trainer_cfg.objective == "dpo":
        from trainer.dpo import dpo_round

        return dpo_round(engine, trainer_cfg, rewards_cfg, agent_cfg, base_model_dir=base_model_dir,
                         callbacks=callbacks)
    started = time.perf_counter()
    base = base_model_dir or resolve_model(agent_cfg.model, agent_cfg.model_cache_dir)
    device = pick_device(agent_cfg.device)
    state = PartialState()
    # The main process creates (or finds) the run row first; other DDP ranks then find it running.
    with state.main_process_first(), session_scope(engine) as s:
        run = running_training_run(s, trainer_cfg.objective)
        if run is not None:
            plan = plan_round(s, trainer_cfg, rewards_cfg, block_ids=run.block_ids,
                              replay_episode_ids=run.replay_episode_ids)
            parent = None if run.parent_version is None else adapter_row(s, run.parent_version)
        else:
            plan = plan_round(s, trainer_cfg, rewards_cfg)
            if len(plan.new) < trainer_cfg.min_new_episodes:
                return None
            parent = serving_adapter_row(s)
        examples = build_examples(s, plan.episodes, rewards_cfg, plan.edges)
        if not examples:
            raise TrainerError("the new scored episodes have no assistant turns to train on")
        if run is None:
            if not state.is_main_process:
                raise TrainerError("DDP rank started before the main process created the training run")
            run = create_training_run(
                s, objective=trainer_cfg.objective, parent_version=None if parent is None else parent.version,
                block_ids=plan.new_block_ids, replay_episode_ids=[e.episode_id for e in plan.replay],
                n_examples=len(examples),
                hyperparams={**hyperparams(trainer_cfg, device), "label_format": rewards_cfg.label_format,
                             "label_edges": plan.edges, "n_new": len(plan.new), "n_replay": len(plan.replay),
                             "base_model": base},
            )
            run.checkpoint_dir = str(Path(trainer_cfg.runs_dir) / f"run-{run.id}")
        run_id, run_dir = run.id, run.checkpoint_dir or str(Path(trainer_cfg.runs_dir) / f"run-{run.id}")
        parent_version = None if parent is None else parent.version
        parent_path = None if parent is None else parent.path
        block_ids, replay_ids = list(run.block_ids), list(run.replay_episode_ids)

    try:
        outcome = run_sft(base, parent_path, [e.messages for e in examples], trainer_cfg, run_dir,
                          device=device, callbacks=callbacks)
    except (NonFiniteLoss, OutOfMemory) as err:
        _fail(engine, run_id, str(err))
        raise
    except TrainerError as err:  # the parent adapter or base model cannot be loaded: retrying will not help
        _fail(engine, run_id, str(err))
        raise
    except BaseException as err:
        # An interruption (crash, Ctrl-C, killed job): keep `running` so the next call resumes it.
        if state.is_main_process:
            with session_scope(engine) as s:
                note_training_error(s, run_id, f"interrupted: {type(err).__name__}: {err}\n"
                                    + traceback.format_exc(limit=3))
        raise

    if not state.is_main_process:
        return None
    with session_scope(engine) as s:
        version = next_adapter_version(s)
    path = save_adapter(outcome.model, trainer_cfg.adapters_dir, version)
    with session_scope(engine) as s:
        add_adapter(s, version=version, parent_version=parent_version, path=str(path), base_model=base,
                    training_run_id=run_id,
                    metrics={"final_loss": outcome.loss_curve[-1]["loss"] if outcome.loss_curve else None,
                             "n_examples": len(examples), "steps": outcome.global_step})
        finish_training_run(s, run_id, adapter_version=version, loss_curve=outcome.loss_curve)
    # Checkpoints only exist to resume this round; the adapter folder is the result.
    shutil.rmtree(run_dir, ignore_errors=True)
    return RoundResult(run_id=run_id, adapter_version=version, parent_version=parent_version, path=str(path),
                       n_examples=len(examples), block_ids=block_ids, replay_episode_ids=replay_ids,
                       episode_ids=[e.episode_id for e in examples], loss_curve=outcome.loss_curve,
                       resumed_from_step=outcome.resumed_from_step, seconds=time.perf_counter() - started)


def _fail(engine: Engine, run_id: int, error: str) -> None:
    with session_scope(engine) as s:
        fail_training_run(s, run_id, error)

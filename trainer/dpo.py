"""Optional objective `dpo`: prefer the better of two self-generated episodes for the same (ticker, as_of).

Pairs come from episodes of the same item run by different adapters, attempts or samples. The
prompt is the winner's system + user turns (with the target label it was conditioned on at
inference); chosen/rejected are each episode's continuation. TRL's DPOTrainer scores the whole
continuation, tool results included (it has no assistant-only mask); both sides carry tool text,
so it mostly cancels, but it is a known impurity. The reference model is the base model (the
adapter switched off), which is how TRL handles a PEFT policy without a separate reference copy.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from transformers import TrainerCallback

from policy.config import PolicyConfig
from policy.model_files import load_tokenizer, resolve_model
from rewards.config import RewardsConfig
from store.db import session_scope
from store.training import (
    ScoredEpisode,
    adapter_row,
    add_adapter,
    create_training_run,
    episode_messages,
    fail_training_run,
    finish_training_run,
    next_adapter_version,
    note_training_error,
    running_training_run,
    serving_adapter_row,
    used_block_ids,
)
from trainer.config import TrainerConfig
from trainer.dataset import achieved_score, offline_set
from trainer.errors import TrainerError
from trainer.registry import save_adapter

MIN_GAP = 0.05  # a pair whose scores differ by less than this teaches noise


def preference_pairs(session: Session, episodes: Sequence[ScoredEpisode], *,
                     min_gap: float = MIN_GAP) -> list[dict[str, Any]]:
    """One (best, worst) pair per (ticker, as_of) with at least two episodes scoring `min_gap` apart."""
    groups: dict[tuple, list[ScoredEpisode]] = defaultdict(list)
    for e in episodes:
        groups[(e.ticker, e.as_of)].append(e)
    candidates = []
    for items in groups.values():
        if len(items) < 2:
            continue
        ranked = sorted(items, key=lambda e: (achieved_score(e), -e.episode_id))
        loser, winner = ranked[0], ranked[-1]
        if achieved_score(winner) - achieved_score(loser) >= min_gap:
            candidates.append((winner, loser))
    msgs = episode_messages(session, [e for pair in candidates for e in pair])
    pairs = []
    for winner, loser in candidates:
        w, l_ = msgs.get(winner.episode_id, []), msgs.get(loser.episode_id, [])
        cut_w = next((i for i, m in enumerate(w) if m["role"] == "assistant"), None)
        cut_l = next((i for i, m in enumerate(l_) if m["role"] == "assistant"), None)
        if cut_w is None or cut_l is None:
            continue
        pairs.append({"prompt": w[:cut_w], "chosen": w[cut_w:], "rejected": l_[cut_l:],
                      "chosen_episode_id": winner.episode_id, "rejected_episode_id": loser.episode_id,
                      "chosen_score": achieved_score(winner), "rejected_score": achieved_score(loser)})
    return pairs


def dpo_config(cfg: TrainerConfig, output_dir: str, device: str, **overrides: Any):
    """DPOConfig with the same CPU/GPU choices as SFT (fp32 + no checkpointing on CPU)."""
    from trl import DPOConfig

    from trainer.sft import use_bf16

    kwargs: dict[str, Any] = {
        "output_dir": output_dir, "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum, "num_train_epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "constant", "max_length": cfg.max_length, "bf16": use_bf16(device), "fp16": False,
        "use_cpu": device != "cuda", "gradient_checkpointing": cfg.gradient_checkpointing, "report_to": "none",
        "logging_steps": 1, "logging_nan_inf_filter": False, "save_strategy": "steps", "save_steps": cfg.save_steps,
        "save_total_limit": 2, "eval_strategy": "no", "dataloader_num_workers": 0, "dataloader_pin_memory": device == "cuda",
        "seed": cfg.seed, "data_seed": cfg.seed, "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def dpo_round(engine: Engine, trainer_cfg: TrainerConfig, rewards_cfg: RewardsConfig, agent_cfg: PolicyConfig, *,
              base_model_dir: str | None = None, callbacks: Sequence[TrainerCallback] = ()):
    """A DPO round on pairs touching blocks no finished DPO run used; None when there is no new pair."""
    from pathlib import Path

    from datasets import Dataset
    from trl import DPOTrainer

    from trainer.round import RoundResult, hyperparams
    from trainer.sft import (
        LossGuard,
        NonFiniteLoss,
        OutOfMemory,
        _is_oom,
        last_complete_checkpoint,
        load_trainable_model,
        loss_curve,
        pick_device,
        raise_if_stopped,
    )

    started = time.perf_counter()
    base = base_model_dir or resolve_model(agent_cfg.model, agent_cfg.model_cache_dir)
    device = pick_device(agent_cfg.device)
    with session_scope(engine) as s:
        pool = offline_set(s, trainer_cfg)
        if not pool:
            raise TrainerError("no scored episodes in the offline set: run and resolve a block before training")
        run = running_training_run(s, "dpo")
        new_blocks = (set(run.block_ids) if run is not None
                      else {e.block_id for e in pool} - used_block_ids(s, "dpo"))
        pairs = [p for p in preference_pairs(s, pool)
                 if {e.block_id for e in pool if e.episode_id in (p["chosen_episode_id"],
                                                                  p["rejected_episode_id"])} & new_blocks]
        if not pairs:
            return None
        parent = (adapter_row(s, run.parent_version) if run is not None and run.parent_version is not None
                  else None if run is not None else serving_adapter_row(s))
        if run is None:
            run = create_training_run(s, objective="dpo", parent_version=None if parent is None else parent.version,
                                      block_ids=sorted(new_blocks), replay_episode_ids=[], n_examples=len(pairs),
                                      hyperparams={**hyperparams(trainer_cfg, device), "objective": "dpo",
                                                   "base_model": base, "min_gap": MIN_GAP})
            run.checkpoint_dir = str(Path(trainer_cfg.runs_dir) / f"run-{run.id}")
        run_id, run_dir, block_ids = run.id, run.checkpoint_dir, list(run.block_ids)
        parent_version, parent_path = (None, None) if parent is None else (parent.version, parent.path)

    cols = ("prompt", "chosen", "rejected")
    try:
        model = load_trainable_model(base, parent_path, trainer_cfg, device)
        trainer = DPOTrainer(model=model, args=dpo_config(trainer_cfg, run_dir, device),
                             train_dataset=Dataset.from_list([{k: p[k] for k in cols} for p in pairs]),
                             processing_class=load_tokenizer(base), callbacks=[LossGuard(), *callbacks])
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(run_dir))
        raise_if_stopped(callbacks, trainer.state.max_steps)
    except (NonFiniteLoss, TrainerError) as err:
        _fail(engine, run_id, str(err))
        raise
    except BaseException as err:
        if isinstance(err, Exception) and _is_oom(err):
            msg = f"out of memory while training DPO ({err}); lower trainer.batch_size or trainer.max_length"
            _fail(engine, run_id, msg)
            raise OutOfMemory(msg) from None
        with session_scope(engine) as s:
            note_training_error(s, run_id, f"interrupted: {type(err).__name__}: {err}")
        raise
    curve = loss_curve(trainer.state.log_history)
    with session_scope(engine) as s:
        version = next_adapter_version(s)
    path = save_adapter(trainer.model, trainer_cfg.adapters_dir, version)
    with session_scope(engine) as s:
        add_adapter(s, version=version, parent_version=parent_version, path=str(path), base_model=base,
                    training_run_id=run_id, metrics={"objective": "dpo", "n_pairs": len(pairs),
                                                     "final_loss": curve[-1]["loss"] if curve else None})
        finish_training_run(s, run_id, adapter_version=version, loss_curve=curve)
    shutil.rmtree(run_dir, ignore_errors=True)
    return RoundResult(run_id=run_id, adapter_version=version, parent_version=parent_version, path=str(path),
                       n_examples=len(pairs), block_ids=block_ids, replay_episode_ids=[],
                       episode_ids=sorted({p[k] for p in pairs for k in ("chosen_episode_id", "rejected_episode_id")}),
                       loss_curve=curve, seconds=time.perf_counter() - started)


def _fail(engine: Engine, run_id: int, error: str) -> None:
    with session_scope(engine) as s:
        fail_training_run(s, run_id, error)

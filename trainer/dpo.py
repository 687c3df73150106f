"""Optional objective `dpo`: prefer the better of two self-generated episodes for the same (ticker, as_of).

Pairs come from episodes of the same item run by different adapters, attempts or samples. The
prompt is the winner's system + user turns (with the target label it was conditioned on at
inference); chosen/rejected are each episode's continuation. TRL's DPOTrainer scores the whole
continuation, tool results included (it has no assistant-only mask); both sides carry tool text,
so it mostly cancels, but it is a known impurity. The reference model is the base model (the
adapter switched off), which is how TRL handles a PEFT policy without a separate reference copy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session
from transformers import TrainerCallback

from policy.model_files import load_tokenizer
from rewards.config import RewardsConfig
from store.models import TrainingRun
from store.training import ScoredEpisode, episode_messages, used_block_ids
from trainer.config import TrainerConfig
from trainer.dataset import achieved_score, offline_set
from trainer.errors import TrainerError
from trainer.round import FitOutcome, ModelRef, NothingToTrain, RoundData, model_name

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
        "use_cpu": device != "cuda", "activation_checkpointing": cfg.gradient_checkpointing, "report_to": "none",
        "logging_steps": 1, "logging_nan_inf_filter": False, "save_strategy": "steps", "save_steps": cfg.save_steps,
        "save_total_limit": 2, "eval_strategy": "no", "dataloader_num_workers": 0, "dataloader_pin_memory": device == "cuda",
        "seed": cfg.seed, "data_seed": cfg.seed, "disable_tqdm": True,
    }
    kwargs.update(overrides)
    return DPOConfig(**kwargs)


def plan(session: Session, cfg: TrainerConfig, rewards_cfg: RewardsConfig, *, run: TrainingRun | None,
         need: int) -> RoundData | NothingToTrain:
    """Pairs touching blocks no finished DPO run used (an interrupted run: its own blocks).

    `need` (min_new_episodes) does not apply: a pair is the unit here, and one new pair is enough.
    """
    pool = offline_set(session, cfg)
    if not pool:
        raise TrainerError("no scored episodes in the offline set: run and resolve a block before training")
    new_blocks = set(run.block_ids) if run is not None else {e.block_id for e in pool} - used_block_ids(session, "dpo")
    block_of = {e.episode_id: e.block_id for e in pool}
    pairs = [p for p in preference_pairs(session, pool)
             if {block_of[p["chosen_episode_id"]], block_of[p["rejected_episode_id"]]} & new_blocks]
    if not pairs:
        return NothingToTrain(f"no new preference pair (two episodes of one item scoring >= {MIN_GAP} apart)")
    cols = ("prompt", "chosen", "rejected")
    return RoundData(block_ids=sorted(new_blocks), replay_episode_ids=[],
                     episode_ids=sorted({p[k] for p in pairs for k in ("chosen_episode_id", "rejected_episode_id")}),
                     rows=[{k: p[k] for k in cols} for p in pairs],
                     n_new=sum(1 for e in pool if e.block_id in new_blocks),
                     hyperparams={"min_gap": MIN_GAP, "n_pairs": len(pairs)})


def fit(model: ModelRef, adapter_path: str | None, pairs: Sequence[dict[str, Any]], cfg: TrainerConfig,
        output_dir: str | Path, *, device: str = "auto", callbacks: Sequence[TrainerCallback] = ()) -> FitOutcome:
    """One DPOTrainer pass over the pairs in output_dir, resuming from its last complete checkpoint."""
    from datasets import Dataset
    from trl import DPOTrainer

    from trainer.sft import (
        LossGuard,
        last_complete_checkpoint,
        load_trainable_model,
        loss_curve,
        pick_device,
        quiet_printer,
        raise_if_stopped,
    )

    device = pick_device(device)
    last = last_complete_checkpoint(output_dir)
    peft_model = load_trainable_model(model, adapter_path, cfg, device)
    trainer = DPOTrainer(model=peft_model, args=dpo_config(cfg, str(output_dir), device),
                         train_dataset=Dataset.from_list(list(pairs)),
                         processing_class=load_tokenizer(model_name(model)), callbacks=[LossGuard(), *callbacks])
    quiet_printer(trainer, callbacks)
    trainer.train(resume_from_checkpoint=last)
    raise_if_stopped(callbacks, trainer.state.max_steps)
    resumed = None if last is None else int(Path(last).name.rsplit("-", 1)[-1])
    return FitOutcome(trainer.model, loss_curve(trainer.state.log_history), trainer.state.global_step, resumed)

"""TRL SFTTrainer + PEFT LoRA with settings that are fast on this hardware.

Why TRL's defaults are slow on a CPU (measured by bench/train_bench.py): SFTConfig turns on
bf16 autocast (bf16 matmuls on CPUs without AMX are ~10x slower than fp32) and gradient
checkpointing (a second forward in every backward). Here: fp32 and no checkpointing on CPU,
bf16 on CUDA, checkpointing only when asked; no reporting, no eval, no dataloader workers.

Multi-GPU: the same code runs under `accelerate launch --num_processes N -m scheduler.cli train`
(DDP); only the main process writes to the store and to adapters_dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session
from transformers import TrainerCallback

from policy.model_files import load_tokenizer
from rewards.config import RewardsConfig
from store.models import TrainingRun
from trainer.config import TrainerConfig
from trainer.errors import TrainerError, TrainingStopped
from trainer.registry import check_adapter
from trainer.round import FitOutcome, ModelRef, NothingToTrain, RoundData, model_name

log = logging.getLogger("scoreloop.trainer")


class NonFiniteLoss(TrainerError):
    """The training loss became NaN or inf; the round is abandoned."""


class OutOfMemory(TrainerError):
    """Training ran out of (GPU or host) memory."""


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainerError("device 'cuda' was asked for but no CUDA GPU is visible; use device = 'cpu' or 'auto'")
    return device


def use_bf16(device: str) -> bool:
    return device == "cuda" and torch.cuda.is_bf16_supported()


def lora_config(cfg: TrainerConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")


def load_trainable_model(model: ModelRef, adapter_path: str | None, cfg: TrainerConfig, device: str):
    """The base model with a trainable LoRA: the given adapter (resume) or a fresh one (first round).

    `model` is a folder or hub id, or a loaded model (which gets the LoRA layers in place)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if adapter_path is not None:
        check_adapter(adapter_path)
    base_model_dir = model_name(model)
    if isinstance(model, str):
        dtype = torch.bfloat16 if use_bf16(device) else torch.float32
        try:
            base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        except OSError as err:
            raise TrainerError(f"cannot load base model {model!r}: {err}") from None
    else:
        base = model
    if adapter_path is None:
        torch.manual_seed(cfg.seed)  # fresh LoRA init is reproducible
        return get_peft_model(base, lora_config(cfg))
    try:
        return PeftModel.from_pretrained(base, adapter_path, is_trainable=True)
    except Exception as err:  # noqa: BLE001 - shape mismatch with the base, unreadable file, ...
        raise TrainerError(f"adapter {adapter_path} does not load onto {base_model_dir}: {err}") from None


def sft_config(cfg: TrainerConfig, output_dir: str | Path, device: str, **overrides: Any):
    """SFTConfig for one round; every field that differs from TRL's default is here for speed or safety."""
    from trl import SFTConfig

    cuda = device == "cuda"
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "constant",  # each round continues the adapter; no decay to zero per round
        "max_length": cfg.max_length,
        "assistant_only_loss": True,  # our template has {% generation %} markers; prompts/tools get -100
        "packing": False,
        "bf16": use_bf16(device),
        "fp16": False,
        "use_cpu": not cuda,
        # transformers 5 names it activation checkpointing; the old name only warns (FutureWarning).
        "activation_checkpointing": cfg.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None,
        "report_to": "none",
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # otherwise a NaN loss is silently replaced by the running mean
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": 2,
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": cuda,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "disable_tqdm": True,
        "shuffle_dataset": False,  # the Trainer's sampler shuffles per epoch (seeded); once is enough
    }
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


class LossGuard(TrainerCallback):
    """Abort as soon as a logged training loss is NaN or inf (logged every step)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"training loss became {loss} at step {state.global_step}; the round is "
                                "abandoned (lower trainer.learning_rate, or check the serving adapter)")


class LossEvents(TrainerCallback):
    """Send each logged training loss to `emit(step=, loss=, lr=, ...)` (the daemon writes a logfmt line).

    With this callback present, the Trainer's PrinterCallback (which prints raw dicts to stdout)
    is removed, so a daemon's output stays one format.
    """

    def __init__(self, emit: Callable[..., None]) -> None:
        self.emit = emit

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.emit(step=state.global_step, max_steps=state.max_steps, loss=float(logs["loss"]),
                      lr=logs.get("learning_rate"), epoch=logs.get("epoch"))


class StopOnEvent(TrainerCallback):
    """Ctrl-C / SIGTERM during a round: save a checkpoint at the next step end and stop there.

    A round can take many minutes; waiting for it made a stopping daemon look hung. The caller
    sees TrainingStopped (raise_if_stopped) and the next start resumes from that checkpoint.
    """

    def __init__(self, event) -> None:
        self.event = event
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.event.is_set() and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def raise_if_stopped(callbacks: Sequence[TrainerCallback], max_steps: int) -> None:
    """After trainer.train(): a StopOnEvent that fired means the model is half-trained, never publish it."""
    for cb in callbacks:
        if isinstance(cb, StopOnEvent) and cb.stopped_at is not None:
            raise TrainingStopped(f"stopped at step {cb.stopped_at} of {max_steps}; the checkpoint is saved and "
                                  "the round resumes from it at the next start")


def loss_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions whose next token carries a loss in any row of the batch: the only positions whose
    logits the loss reads (the model's `logits_to_keep`)."""
    return (labels[:, 1:] != -100).any(0).nonzero().flatten()


def token_loss(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None = None,
               num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy from logits at positions `keep` (logits[:, k] predicts labels[:, keep[k] + 1]).

    Without weights it is the model's own causal-LM loss: the sum over label tokens divided by
    `num_items_in_batch` (the Trainer's count across accumulated micro-batches) or by this batch's count.
    With per-token `weights` (trainer.loss_on = "weighted") it is the weighted mean over this batch.
    """
    target = labels[:, 1:][:, keep]
    flat_logits, flat_target = logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)
    if weights is None:
        total = torch.nn.functional.cross_entropy(flat_logits, flat_target, ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum()
        return total / count
    w = weights[:, 1:][:, keep].float().reshape(-1) * (flat_target != -100)
    ce = torch.nn.functional.cross_entropy(flat_logits, flat_target, ignore_index=-100, reduction="none")
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


@dataclasses.dataclass
class WeightedCollator:
    """TRL's padding collator for `input_ids` / `labels`, plus the `loss_weights` column padded with 0."""

    pad_token_id: int

    def __post_init__(self) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self._pad = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
        weights = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, e in enumerate(examples):
            weights[i, : len(e["loss_weights"])] = torch.tensor(e["loss_weights"], dtype=torch.float32)
        batch["loss_weights"] = weights
        return batch


def _trainer_class(fused_lm_head: bool):
    from trl import SFTTrainer

    if fused_lm_head:
        return SFTTrainer

    class PlainLossSFTTrainer(SFTTrainer):
        """SFTTrainer with a plain cross-entropy over the model's logits at the loss positions only.

        TRL's fused LM head runs as torch tiles without Triton (CPU): it scores every position,
        masked ones included, and adds entropy/top-1 passes over the vocabulary for its metrics,
        which made a CPU step several times slower than a bare forward+backward. The model's own loss
        still projects every position onto the 49k vocabulary, prompt and tool results included, though
        only the answer's tokens are labels; `logits_to_keep` limits the LM head to the positions the
        loss reads (the same value: tests/test_trainer_decision.py).
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            weights = inputs.pop("loss_weights", None)
            labels = inputs.pop("labels")
            keep = loss_positions(labels)
            outputs = model(**inputs, logits_to_keep=keep)
            # With weights (loss_on = "weighted") each micro-batch's weighted mean; the Trainer then divides
            # by the accumulation steps (loss_is_scaled_for_ga = False, set in build_trainer).
            loss = token_loss(outputs.logits, labels, keep, weights, None if weights is not None else num_items_in_batch)
            return (loss, outputs) if return_outputs else loss

    return PlainLossSFTTrainer


def build_trainer(model: Any, tokenizer: Any, messages: Sequence[list[dict[str, str]]], args: Any,
                  callbacks: Sequence[TrainerCallback] = (), *, fused_lm_head: bool | None = None,
                  loss_on: str = "assistant", decision_weight: float = 20.0, tool_choice_weight: float = 1.0):
    """An SFTTrainer over conversational examples (`messages`), loss on assistant tokens only, or with
    `loss_on="decision"` on the final prediction's direction and confidence only, or with `loss_on="weighted"`
    on every assistant token and the decision's weighted `decision_weight` times, each tool call's tool name
    `tool_choice_weight` times (trainer/decision.py).

    The fused (chunked) LM head is kept where Triton runs it (CUDA), where it saves memory.
    """
    from datasets import Dataset

    if fused_lm_head is None:
        fused_lm_head = not args.use_cpu and torch.cuda.is_available()
    collator = None
    if loss_on == "weighted":
        from trainer.decision import weighted_rows

        dataset = Dataset.from_list(weighted_rows(tokenizer, messages, args.max_length, decision_weight,
                                                   tool_choice_weight).rows)
        # The rows carry their own labels and weights: TRL must neither re-tokenize them nor drop the column.
        args = dataclasses.replace(args, assistant_only_loss=False, remove_unused_columns=False,
                                   dataset_kwargs={**(args.dataset_kwargs or {}), "skip_prepare_dataset": True})
        collator = WeightedCollator(tokenizer.pad_token_id)
        fused_lm_head = False  # the weighted loss is computed from the model's logits
    elif loss_on == "decision":
        from trainer.decision import decision_rows

        dataset = Dataset.from_list(decision_rows(tokenizer, messages, args.max_length).rows)
        if args.assistant_only_loss:  # TRL's flag is for chats; the rows' own assistant_masks now set the loss
            args = dataclasses.replace(args, assistant_only_loss=False)
    else:
        dataset = Dataset.from_list([{"messages": list(m)} for m in messages])
    trainer = _trainer_class(fused_lm_head)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                            data_collator=collator, callbacks=[LossGuard(), *callbacks])
    if collator is not None:
        trainer.loss_is_scaled_for_ga = False
    quiet_printer(trainer, callbacks)
    return trainer


def quiet_printer(trainer: Any, callbacks: Sequence[TrainerCallback]) -> None:
    """Drop the Trainer's stdout printer when a LossEvents callback reports the losses instead."""
    from transformers.trainer_callback import PrinterCallback

    if any(isinstance(cb, LossEvents) for cb in callbacks):
        trainer.remove_callback(PrinterCallback)


def loss_curve(log_history: list[dict]) -> list[dict[str, float]]:
    return [{"step": int(h["step"]), "loss": float(h["loss"]), **({"lr": float(h["learning_rate"])}
             if "learning_rate" in h else {})} for h in log_history if "loss" in h]


def is_oom(err: BaseException) -> bool:
    """Out of GPU or host memory, whichever way torch says it."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if isinstance(err, (oom_types, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint that was written to the end; newer, half-written ones are removed.

    A kill during a save leaves `checkpoint-N` without weights, and transformers' get_last_checkpoint
    would pick it and fail on every restart ("Can't find a valid checkpoint"). The Trainer writes
    trainer_state.json after the weights and optimizer, so a parseable one marks a complete save.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for ckpt in found:
        try:
            json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
            return str(ckpt)
        except (OSError, ValueError):
            shutil.rmtree(ckpt, ignore_errors=True)
    return None


def plan(session: Session, cfg: TrainerConfig, rewards_cfg: RewardsConfig, *, run: TrainingRun | None,
         need: int) -> RoundData | NothingToTrain:
    """New scored blocks + a replay sample as score-labelled chats (an interrupted run: its own data)."""
    from trainer.dataset import balanced, boosted, build_examples, label_research, plan_round, trains_decision

    if run is not None:
        p = plan_round(session, cfg, rewards_cfg, block_ids=run.block_ids, replay_episode_ids=run.replay_episode_ids)
    else:
        p = plan_round(session, cfg, rewards_cfg)
        if p.scored_new < need:  # counted before filter_top_fraction: a block's worth starts a filtered round too
            return NothingToTrain(f"{p.scored_new} new scored episodes, {need} needed (trainer.min_new_episodes)",
                                  new_episodes=p.scored_new, needed=need)
    chosen = boosted(p.episodes, cfg.boost_top_fraction, cfg.boost_passes)
    if cfg.balance_directions:
        chosen = balanced(chosen, counted=lambda e: trains_decision(e, cfg.decision_from))
    examples = build_examples(session, chosen, rewards_cfg, p.edges, p.ranks, decision_from=cfg.decision_from)
    if not examples:
        raise TrainerError("the new scored episodes have no assistant turns to train on")
    research = label_research(examples)
    log.info("round labels carry %.3f nats about the first tool call (%s)", research.nats, research.first_tool)
    return RoundData(block_ids=p.new_block_ids, replay_episode_ids=[e.episode_id for e in p.replay],
                     episode_ids=[e.episode_id for e in examples], rows=[e.messages for e in examples],
                     n_new=p.scored_new,
                     hyperparams={"label_format": rewards_cfg.label_format, "label_edges": p.edges,
                                  "n_new": len(p.new), "n_replay": len(p.replay),
                                  "n_copies": len(examples) - len({e.episode_id for e in examples}),
                                  "balance_directions": cfg.balance_directions, "loss_on": cfg.loss_on,
                                  "decision_from": cfg.decision_from, "label_research": research.record(),
                                  **({"decision_weight": cfg.decision_weight, "tool_choice_weight": cfg.tool_choice_weight}
                                     if cfg.loss_on == "weighted" else {})})


def fit(model: ModelRef, adapter_path: str | None, messages: Sequence[list[dict[str, str]]], cfg: TrainerConfig,
        output_dir: str | Path, *, device: str = "auto", callbacks: Sequence[TrainerCallback] = ()) -> FitOutcome:
    """Train one round in output_dir, resuming from its last checkpoint if an earlier try left one."""
    device = pick_device(device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(output_dir)
    tokenizer = load_tokenizer(model_name(model))
    peft_model = load_trainable_model(model, adapter_path, cfg, device)
    trainer = build_trainer(peft_model, tokenizer, messages, sft_config(cfg, output_dir, device), callbacks,
                            loss_on=cfg.loss_on, decision_weight=cfg.decision_weight,
                            tool_choice_weight=cfg.tool_choice_weight)
    try:
        trainer.train(resume_from_checkpoint=last)
    except Exception as err:
        if is_oom(err) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    raise_if_stopped(callbacks, trainer.state.max_steps)
    resumed = None if last is None else int(Path(last).name.rsplit("-", 1)[-1])
    return FitOutcome(trainer.model, loss_curve(trainer.state.log_history), trainer.state.global_step, resumed)


@torch.no_grad()
def assistant_loss(model: Any, tokenizer: Any, messages: Sequence[list[dict[str, str]]], max_length: int,
                   batch_size: int = 4) -> float:
    """Mean loss per assistant token over these chats (what training minimises), without training."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = []
    for m in messages:
        enc = tokenizer.apply_chat_template(list(m), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])[:max_length]
        mask = list(enc["assistant_masks"])[:max_length]
        rows.append({"input_ids": ids, "labels": [t if k else -100 for t, k in zip(ids, mask)]})
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                               reduction="sum")
        total += float(lp)
        count += int((labels != -100).sum())
    if was_training:
        model.train()
    return total / max(count, 1)

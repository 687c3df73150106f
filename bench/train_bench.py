"""Training speed: seconds per optimizer step of our trainer vs a bare PEFT forward+backward, and
round time as the store grows. Prints figures; targets: trainer <= 1.5x bare, round 10 <= 1.2x round 2.

    .venv/bin/python bench/train_bench.py                 # SmolLM2-135M steps + tiny-model rounds
    .venv/bin/python bench/train_bench.py --trl-default   # also time TRL's default SFTConfig (slow on CPU)

The step comparison also times TRL variants between its defaults and ours, so each cause of the
slowdown shows separately (bf16 autocast on CPU, gradient checkpointing, the fused LM head).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from datetime import UTC

import torch
from transformers import TrainerCallback

from policy.model_files import load_tokenizer, make_tiny_model, resolve_model
from trainer.config import TrainerConfig
from trainer.sft import build_trainer, load_trainable_model, loss_positions, sft_config


def clocks() -> tuple[float, float]:
    # Process CPU time as well as wall time: on a shared machine other jobs stretch wall time,
    # while CPU seconds spent by this process stay comparable between the variants.
    return time.perf_counter(), time.process_time()


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[tuple[float, float]] = []
        self._t = (0.0, 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = clocks()

    def on_step_end(self, args, state, control, **kwargs):
        w, c = clocks()
        self.times.append((w - self._t[0], c - self._t[1]))


def chats(n: int) -> list[list[dict[str, str]]]:
    from datetime import datetime, timedelta

    from trainer_fixtures import TICKERS, trace

    t0 = datetime(2024, 3, 5, 21, 1, tzinfo=UTC)
    return [[{"role": r, "content": c} for r, c in trace(TICKERS[i % 8], t0 + timedelta(days=i),
                                                         f"Score: {(i % 10) / 10:.2f}")] for i in range(n)]


def median_step(times: list[tuple[float, float]]) -> tuple[float, float]:
    """(wall, cpu) seconds per step: the fastest after the first (warm-up) step.

    The minimum, not the median: other jobs on a shared machine only ever add time.
    """
    kept = times[1:] if len(times) > 1 else times
    return min(t[0] for t in kept), min(t[1] for t in kept)


def bare_step(model_dir: str, cfg: TrainerConfig, batch: dict, steps: int, loss_positions_only: bool = False
              ) -> tuple[float, float]:
    """The floor: PEFT LoRA forward + backward + AdamW step on the same batch, no Trainer; with
    `loss_positions_only` the LM head runs only where the loss reads (what our trainer does)."""
    from trainer.sft import token_loss

    model = load_trainable_model(model_dir, None, cfg, "cpu")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    times = []
    for _ in range(steps + 1):
        t = clocks()
        if loss_positions_only:
            keep = loss_positions(batch["labels"])
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
            loss = token_loss(out.logits, batch["labels"], keep)
        else:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w, c = clocks()
        times.append((w - t[0], c - t[1]))
    return median_step(times)


def trainer_step(model_dir: str, cfg: TrainerConfig, steps: int, variant: str) -> tuple[tuple[float, float], dict]:
    """Seconds per optimizer step of SFTTrainer configured as `variant`."""
    from trl import SFTConfig

    tok = load_tokenizer(model_dir)
    model = load_trainable_model(model_dir, None, cfg, "cpu")
    out = tempfile.mkdtemp(prefix="bench-")
    common = {"output_dir": out, "per_device_train_batch_size": cfg.batch_size, "max_steps": steps + 1,
                  "max_length": cfg.max_length, "assistant_only_loss": True, "report_to": "none", "save_strategy": "no",
                  "use_cpu": True, "disable_tqdm": True, "logging_steps": 1}
    if variant == "ours":
        args, fused = sft_config(cfg, out, "cpu", max_steps=steps + 1, save_strategy="no"), False
    elif variant == "trl-default":  # SFTConfig defaults: bf16 autocast + gradient checkpointing + fused head
        args, fused = SFTConfig(**common), True
    elif variant == "fp32+gc+fused":
        args, fused = SFTConfig(**common, bf16=False), True
    elif variant == "fp32+fused":
        args, fused = SFTConfig(**common, bf16=False, gradient_checkpointing=False), True
    else:
        raise ValueError(variant)
    timer = StepTimer()
    trainer = build_trainer(model, tok, chats(cfg.batch_size * (steps + 1)), args, [timer], fused_lm_head=fused)
    trainer.train()
    flags = {"bf16": bool(args.bf16), "gradient_checkpointing": bool(args.gradient_checkpointing),
             "fused_lm_head": fused}
    return median_step(timer.times), flags


def first_batch(model_dir: str, cfg: TrainerConfig) -> dict:
    """The exact batch our trainer sees first (same tokens, same mask), for the bare loop."""
    tok = load_tokenizer(model_dir)
    model = load_trainable_model(model_dir, None, cfg, "cpu")
    trainer = build_trainer(model, tok, chats(cfg.batch_size), sft_config(cfg, tempfile.mkdtemp(), "cpu"))
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.cpu() for k, v in batch.items()}


def step_bench(model_dir: str, steps: int, with_default: bool, max_length: int = 128,
               variants: list[str] | None = None) -> None:
    cfg = TrainerConfig(batch_size=4, max_length=max_length, lora_r=16, lora_alpha=32)
    batch = first_batch(model_dir, cfg)
    print(f"\n== step time: {Path(model_dir).name}, batch {tuple(batch['input_ids'].shape)} tokens, "
          f"LoRA r={cfg.lora_r} on {cfg.target_modules}, CPU threads={torch.get_num_threads()}")
    bare = bare_step(model_dir, cfg, batch, steps)
    print(f"bare PEFT fwd+bwd+AdamW : wall {bare[0]:7.2f} s/step, cpu {bare[1]:7.2f} s/step", flush=True)
    kept = bare_step(model_dir, cfg, batch, steps, loss_positions_only=True)
    share = len(loss_positions(batch["labels"])) / batch["input_ids"].shape[1]
    print(f"bare, LM head at the loss positions only ({share:.0%} of positions): wall {kept[0]:7.2f} s/step = "
          f"{kept[0] / bare[0]:5.2f} x bare, cpu {kept[1]:7.2f} s/step = {kept[1] / bare[1]:5.2f} x bare", flush=True)
    variants = variants or ["ours", "fp32+fused", "fp32+gc+fused"] + (["trl-default"] if with_default else [])
    for variant in variants:
        n = 1 if variant in {"trl-default", "fp32+gc+fused"} else steps
        (w, c), flags = trainer_step(model_dir, cfg, n, variant)
        print(f"SFTTrainer {variant:<14}: wall {w:7.2f} s/step = {w / bare[0]:5.2f} x bare, cpu {c:7.2f} s/step "
              f"= {c / bare[1]:5.2f} x bare   {flags}", flush=True)


def round_bench(model_dir: str, rounds: int, block_size: int, replay: int) -> None:
    from trainer_fixtures import add_block

    from rewards.config import RewardsConfig
    from store.db import open_store
    from trainer.registry import publish
    from trainer.round import train_round

    tmp = Path(tempfile.mkdtemp(prefix="bench-rounds-"))
    engine = open_store(f"sqlite:///{tmp / 'bench.db'}")
    # Every episode once: how a round's time grows with the store, not with the recipe (the default trains a
    # block's top quartile twice).
    cfg = TrainerConfig(adapters_dir=str(tmp / "adapters"), runs_dir=str(tmp / "runs"), lora_r=8, lora_alpha=16,
                        batch_size=4, max_length=256, min_new_episodes=1, replay_size=replay, save_steps=1000,
                        filter_top_fraction=1.0, epochs=1.0, boost_top_fraction=0.0)
    print(f"\n== round time: {Path(model_dir).name}, +{block_size} scored episodes per round, replay {replay}")
    times = []
    for k in range(1, rounds + 1):
        add_block(engine, [((i * 37 + k * 11) % 100) / 100 for i in range(block_size)])
        t = clocks()
        r = train_round(engine, cfg, RewardsConfig(), model_dir, device="cpu")
        w, c = clocks()
        times.append((w - t[0], c - t[1]))
        publish(engine, r.adapter_version)
        print(f"round {k:2d}: store {k * block_size:4d} episodes, trained on {r.n_examples:3d} "
              f"({block_size} new + {len(r.replay_episode_ids)} replay), wall {times[-1][0]:6.2f} s, "
              f"cpu {times[-1][1]:6.2f} s", flush=True)
    if rounds >= 10:
        print(f"round 10 / round 2: wall {times[9][0] / times[1][0]:.2f}, cpu {times[9][1] / times[1][1]:.2f} "
              "(target <= 1.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model for the step comparison")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--trl-default", action="store_true", help="also time TRL's default SFTConfig (slow on CPU)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--replay", type=int, default=16)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--max-length", type=int, default=128,
                    help="step comparison: truncate the chats here (1024 keeps whole agent episodes, as a round does)")
    ap.add_argument("--variants", default="", help="step comparison: comma-separated trainer variants (default all)")
    ap.add_argument("--skip-rounds", action="store_true")
    a = ap.parse_args()
    model_dir = resolve_model(a.model)
    if not a.skip_steps:
        step_bench(model_dir, a.steps, a.trl_default, a.max_length, [v for v in a.variants.split(",") if v])
    if not a.skip_rounds:
        tiny = make_tiny_model(Path(tempfile.mkdtemp(prefix="bench-tiny-")) / "tiny", resolve_model())
        round_bench(str(tiny), a.rounds, a.block_size, a.replay)


if __name__ == "__main__":
    main()

"""Capacity check at scale, for a lent GPU: does score-conditioned SFT learn label x headline -> direction
with 15x the updates the CPU can afford, and which loss keeps the label's effect alive?

`bench/capacity.py` on the 2-core CPU trains 40 updates per arm (15 minutes). There score-conditioned SFT
ended at 0.535 agreement at both labels whatever the loss or learning rate (capacity.md). Whether that is
too few updates or a wrong loss cannot be told at that budget. This script runs the same check on a GPU
machine with many more examples and updates, several arms in one run.

It needs only torch, transformers (with `gguf`) and peft: the examples are made and tokenized by this repo on
the CPU (`bench/capacity.py --export FILE`, the agent's exact chat format, assistant and decision token runs
from `trainer.decision`), so the GPU machine needs neither the repo's dependencies nor network access. The
model is the same GGUF file the product converts (SmolLM2-135M-Instruct Q4_1).

The training loop mirrors `trainer.sft` (TRL SFTTrainer under PEFT): LoRA r16 / alpha 32 / dropout 0.05 on
every linear layer, AdamW without weight decay, constant learning rate, gradient clipping at 1.0, batch 8,
bf16 autocast on CUDA, the token-mean cross-entropy over the loss tokens of the batch. Losses:
  assistant  every assistant token (`trainer.loss_on = "assistant"`, the product default)
  decision   the direction and confidence tokens only (`trainer.loss_on = "decision"`)
  weighted   every assistant token, the decision's tokens weighted K times (not in the product yet)
Read-out: as capacity.py, the up-vs-down margin at the direction position on fresh eval-region signal items,
agreement with the Bayes direction at each label, and classifier-free guidance between the labels.

    python3 bench/capacity_gpu.py --data capacity.json.gz --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf --out OUT
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import random
import time
from pathlib import Path

import torch

ARMS = [  # name, examples used, epochs, loss, label dropout, learning rate, filtered (agreeing only, no label)
    ("score/assistant/160", 160, 2.0, "assistant", 0.0, 1e-3, False),  # the CPU's second run, for parity
    ("score/decision/160", 160, 2.0, "decision", 0.0, 1e-3, False),  # the CPU's fourth run
    ("filtered/160", 160, 2.0, "assistant", 0.0, 1e-3, True),  # the CPU's first run: 0.840
    ("score/assistant/2400", 2400, 2.0, "assistant", 0.0, 1e-3, False),
    ("score/decision/2400", 2400, 2.0, "decision", 0.0, 1e-3, False),
    ("score/weighted20/2400", 2400, 2.0, "weighted", 0.0, 1e-3, False),
    ("score/weighted20+dropout0.3/2400", 2400, 2.0, "weighted", 0.3, 1e-3, False),
    ("filtered/2400", 2400, 2.0, "assistant", 0.0, 1e-3, True),
    ("score/assistant/2400/lr2e-4", 2400, 2.0, "assistant", 0.0, 2e-4, False),
    ("score/weighted20/2400x6", 2400, 6.0, "weighted", 0.0, 1e-3, False),
]
WEIGHT = 20.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mask(runs: list[list[int]], n: int) -> list[float]:
    out = [0.0] * n
    for a, b in runs:
        out[a:b] = [1.0] * (b - a)
    return out


def weights(seq: dict, loss: str) -> list[float]:
    n = len(seq["ids"])
    a, d = mask(seq["assistant"], n), mask(seq["decision"], n)
    if loss == "assistant":
        return a
    if loss == "decision":
        return d
    return [x + (WEIGHT - 1.0) * y for x, y in zip(a, d, strict=True)]


def examples(data: dict, n: int, loss: str, dropout: float, filtered: bool) -> list[tuple[list[int], list[float]]]:
    drop = random.Random("label-dropout")
    out = []
    for row in data["train"][:n]:
        if filtered:
            if row["agrees"]:
                out.append(row["unlabelled"])
            continue
        out.append(row["unlabelled"] if drop.random() < dropout else row["labelled"])
    return [(s["ids"], weights(s, loss)) for s in out]


def batch(rows, pad: int, device: str):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    w = torch.zeros((len(rows), width))
    for i, (x, wt) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        att[i, : len(x)] = 1
        w[i, : len(x)] = torch.tensor(wt)
    return ids.to(device), att.to(device), w.to(device)


def weighted_ce(model, ids: torch.Tensor, att: torch.Tensor, w: torch.Tensor, total: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Token-weighted cross-entropy, the LM head applied only where a weight is set: the same value as
    the full logits would give, without the (batch x length x 49k) logits tensor that dominates a CPU
    update. `total`: the whole batch's weight when this is one micro-batch of it."""
    inner = model.get_base_model()
    hidden = inner.model(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]
    tw = w[:, 1:]
    keep = tw > 0
    logits = inner.lm_head(hidden[keep]).float()
    ce = torch.nn.functional.cross_entropy(logits, ids[:, 1:][keep], reduction="none")
    return (ce * tw[keep]).sum() / (tw.sum() if total is None else total).clamp(min=1e-8)


def train(base, data: dict, arm: tuple, device: str, log, every: int = 0, probe=None,
          max_updates: int = 0, micro: int = 8) -> tuple[torch.nn.Module, dict]:
    """Train one arm; with `every`, call `probe(model, updates, loss)` every that many updates (the
    onset curve), and with `max_updates`, stop there (a CPU run sized to the session)."""
    from peft import LoraConfig, get_peft_model

    name, n, epochs, loss, dropout, lr, filtered = arm
    rows = examples(data, n, loss, dropout, filtered)
    model = get_peft_model(copy.deepcopy(base).to(device),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rng = random.Random(42)
    steps, losses, t0 = 0, [], time.perf_counter()
    full, part = int(epochs), epochs - int(epochs)
    for ep in range(math.ceil(epochs)):
        order = list(range(len(rows)))
        rng.shuffle(order)
        if ep == full and part:
            order = order[: int(len(order) * part)]
        for i in range(0, len(order), 8):
            chosen = [rows[j] for j in order[i: i + 8]]
            total = torch.tensor(sum(x for _, wt in chosen for x in wt[1:]), device=device)
            opt.zero_grad(set_to_none=True)
            value = 0.0
            for k in range(0, len(chosen), micro):  # micro-batches: the same gradient, less activation memory
                ids, att, w = batch(chosen[k: k + micro], data["pad"], device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                    part = weighted_ce(model, ids, att, w, total)
                part.backward()
                value += part.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            losses.append(value.item())
            if every and probe is not None and steps % every == 0:
                probe(model, steps, sum(losses[-10:]) / len(losses[-10:]), time.perf_counter() - t0)
            if max_updates and steps >= max_updates:
                break
        if max_updates and steps >= max_updates:
            break
    secs = time.perf_counter() - t0
    log(f"{name}: {len(rows)} examples, {steps} updates, {secs:.0f} s, loss first 10 "
        f"{sum(losses[:10]) / max(1, len(losses[:10])):.4f}, last 10 {sum(losses[-10:]) / max(1, len(losses[-10:])):.4f}")
    return model, {"examples": len(rows), "updates": steps, "seconds": round(secs, 1),
                   "loss_last10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 5)}


@torch.no_grad()
def margins(model, data: dict, key: str, device: str) -> list[float]:
    """Up-minus-down logit at each eval prompt's last token (fp32, right-padded, 32 at a time)."""
    model.eval()
    out = []
    items = data["eval"]
    for i in range(0, len(items), 32):
        rows = [(it[key], [0.0] * len(it[key])) for it in items[i: i + 32]]
        ids, att, _ = batch(rows, data["pad"], device)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = inner.model(input_ids=ids, attention_mask=att).last_hidden_state
        last = att.sum(1) - 1
        at = inner.lm_head(hidden[torch.arange(len(rows)), last]).float()
        out += (at[:, data["up"]] - at[:, data["down"]]).tolist()
    model.train()
    return out


def agreement(data: dict, m: list[float]) -> float:
    return sum(("up" if x > 0 else "down") == it["truth"] for it, x in zip(data["eval"], m, strict=True)) / len(m)


def read_out(model, data: dict, device: str, with_none: bool, labels=("high", "low", "none")) -> dict[str, float]:
    got = {k: margins(model, data, k, device) for k in labels}
    res = {f"at {k}": agreement(data, m) for k, m in got.items()}
    for w in (1.0, 3.0):
        res[f"high guided vs low, w={w:g}"] = agreement(
            data, [(1 + w) * h - w * lo for h, lo in zip(got["high"], got["low"], strict=True)])
        if with_none:
            res[f"high guided vs none, w={w:g}"] = agreement(
                data, [(1 + w) * h - w * lo for h, lo in zip(got["high"], got["none"], strict=True)])
    res["label effect (mean margin high - low, signed to truth)"] = sum(
        (h - lo) * (1 if it["truth"] == "up" else -1)
        for h, lo, it in zip(got["high"], got["low"], data["eval"], strict=True)) / len(data["eval"])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="2 updates per arm on 16 eval items (checks the code path)")
    p.add_argument("--arms", default="", help="comma-separated arm names (default: all, in order)")
    p.add_argument("--readout-every", type=int, default=0,
                   help="also read out every N updates on the first --readout-items eval items (the onset curve)")
    p.add_argument("--readout-items", type=int, default=100)
    p.add_argument("--max-updates", type=int, default=0, help="stop each arm after N updates (0: its epochs)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="rows per forward pass within the batch of 8 (the same update; 2 or 4 bound a CPU's memory)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)
        (out / "capacity_gpu.log").write_text("\n".join(lines) + "\n")

    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt") as f:
        data = json.load(f)
    if args.smoke:
        data["eval"] = data["eval"][:16]
        data["train"] = data["train"][:16]
    gguf = Path(args.gguf)
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    log(f"device {device} ({torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'}), torch {torch.__version__}, "
        f"{len(data['train'])} train rows, {len(data['eval'])} eval items")
    results = []
    check = data.get("cpu_margins")
    base_dev = base.to(device)
    if check:
        got = margins(base_dev, {**data, "eval": data["eval"][: len(check)]}, "high", device)
        log(f"base margins vs the CPU's on {len(check)} items: max abs diff "
            f"{max(abs(a - b) for a, b in zip(got, check, strict=True)):.4f}")
    if args.readout_every:  # the onset curve's zero point, on the probe's items (the full read-out is on record)
        part = {**data, "eval": data["eval"][: args.readout_items]}
        results.append({"arm": "base", "updates": 0, "readout_items": len(part["eval"]),
                        **read_out(base_dev, part, device, False, ("high", "low"))})
    else:
        results.append({"arm": "base", **read_out(base_dev, data, device, True)})
    log(json.dumps(results[-1]))
    (out / "capacity_gpu.json").write_text(json.dumps(results, indent=1))
    base = base_dev.cpu()
    chosen = [a for a in ARMS if not args.arms or a[0] in args.arms.split(",")]
    for arm in chosen:
        def probe(model, steps: int, loss: float, secs: float, arm: tuple = arm) -> None:
            part = {**data, "eval": data["eval"][: args.readout_items]}
            results.append({"arm": arm[0], "updates": steps, "seconds": round(secs, 1), "loss_last10": round(loss, 5),
                            "readout_items": len(part["eval"]), **read_out(model, part, device, False, ("high", "low"))})
            log(json.dumps(results[-1]))
            (out / "capacity_gpu.json").write_text(json.dumps(results, indent=1))

        model, info = train(base, data, arm, device, log, args.readout_every, probe, args.max_updates,
                            args.micro_batch)
        results.append({"arm": arm[0], **info, **read_out(model, data, device, arm[4] > 0 or arm[6])})
        log(json.dumps(results[-1]))
        (out / "capacity_gpu.json").write_text(json.dumps(results, indent=1))
        del model
        torch.cuda.empty_cache() if device == "cuda" else None


if __name__ == "__main__":
    main()

"""Capacity check for the research label: after how many updates does score-conditioned SFT learn label -> first tool?

Run N (learning_history.md) trained the steer recipe on run L's every-tool block (each item researched once
per tool, every episode under its reward quintile `Quantile: k/5`) for one round, 46 updates: the tool choice
moved to the block's marginal (P(search_news first) 0.13 -> 0.50) and not at all with the label (the largest
per-item 5/5 - 1/5 difference 0.0008), although the block pairs `5/5` with the news 67% of the time and `1/5`
13%. One round cannot say whether the label needs 100 updates or 1,000. This check trains the same recipe on
the part of each episode that carries the research choice only, the first turn (system prompt, task turn ending
with the label, the first tool call: ~300 tokens, a third of a whole episode's cost per update), and reads the
label's effect every `--every` updates, as `capacity_gpu.md` did for the direction.

Data: run L's block as regenerated in run N (`research_sets_steer_state.json`, `generate.rows`: ticker, as_of,
the explored first tool and the episode's composite reward). Each first turn is rebuilt exactly as the agent
wrote it (`agent.prompts`, `agent.schema.planned_call`: an explored first call is the planned call), under the
quantile label the trainer would write (`rewards.labels`, edges from the block's own rewards). Training is the
product's (`trainer.sft.build_trainer`: TRL SFTTrainer + PEFT LoRA r16 on every linear layer, lr 1e-3, batch
4 x 2, the weighted loss with each tool name x`--tool-weight`), stopped after `--max-updates`.

Read-out (the first-turn probe of `bench/research_sets.py`): on the held-out items' first turns, the probability
that the first call starts with `search` (search_news) rather than `get`, at each label; the label effect is the
paired 5/5 - 1/5 difference with a 95% interval resampling dates. What the data would teach a model that read
its label exactly: the block's news share per quintile (about 13 / 22 / 40 / 25 / 67%).

The control (`--labels oracle`): `5/5` on exactly the news-first turns, `1/5` on the rest, so the label names
the tool and a model that read it would reach 0 and 1. It says how many updates this recipe needs to learn a
label -> tool mapping at all, apart from how much a real label tells (`--labels block` or `item`).

    .venv/bin/python bench/research_capacity.py --workdir /tmp/rcap --max-updates 240 --every 40   # ~1 h here
    .venv/bin/python bench/research_capacity.py --labels oracle --workdir /tmp/rcapO --max-updates 80 --every 20 \
        --probe-items 30 --final-items 60                                                           # ~13 min
    .venv/bin/python bench/research_capacity.py --tiny --workdir /tmp/rcapt --max-updates 4 --every 2 --probe-items 4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import learning_curve as lc
import research_sets as rs

from agent.prompts import system_prompt, user_prompt
from agent.schema import planned_call
from rewards.intervals import paired_difference
from rewards.labels import quantile_edges, quantile_label, rank_label
from trainer.config import TrainerConfig

BINS = 5
LABELS = [f"Quantile: {k}/{BINS}" for k in range(1, BINS + 1)]
TOOLS_PER_ITEM = 3
ITEM_LABELS = [rank_label(lower, TOOLS_PER_ITEM, TOOLS_PER_ITEM) for lower in range(TOOLS_PER_ITEM)]  # Rank: k/3
LABEL_KINDS = {"block": "its reward quintile in the block", "item": "its reward rank on its item",
               "oracle": "the control: `5/5` exactly when the first call is search_news"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--block", default=str(ROOT / "bench/results/research_sets_steer_state.json"),
                   help="a research_sets state whose `generate.rows` is an every-tool block")
    p.add_argument("--max-updates", type=int, default=240)
    p.add_argument("--every", type=int, default=40, help="probe every N updates")
    p.add_argument("--probe-items", type=int, default=60, help="held-out items probed along the way (the seeded "
                   "subset research_sets uses for controllability); the last probe covers --eval-items")
    p.add_argument("--eval-items", type=int, default=150, help="run K's held-out items (as research_sets)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tool-weight", type=float, default=20.0, help="trainer.tool_choice_weight")
    p.add_argument("--labels", choices=("block", "item", "oracle"), default="block",
                   help="block: the episode's reward quintile in the block (`Quantile: k/5`, the product's quantile "
                        "label); item: its reward's rank among the same item's episodes (`Rank: k/3`, the product's "
                        "`label_format = 'rank'` with quantile_bins = 3; 3 = the "
                        "item's best research; group-relative, as GRPO's advantage, so an item's luck cancels); oracle: the "
                        "control, `Quantile: 5/5` on every news-first turn and `1/5` on the rest, so the label "
                        "names the tool outright (does this recipe learn any label -> tool at all?)")
    p.add_argument("--final-items", type=int, default=None, help="items the final read covers at every label "
                   "(default --eval-items; --probe-items keeps a short run's last read short)")
    p.add_argument("--save-adapter", action="store_true", help="save the final LoRA adapter to WORKDIR/adapter "
                   "(bench/research_control.py runs the agent with it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (a lent GPU runs many more updates; bf16 "
                   "there, as the product's trainer picks)")
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke run, numbers mean nothing)")
    p.add_argument("--out", default=None, help="report path (default bench/results/research_capacity.md; "
                   "--tiny runs write into the workdir)")
    args = p.parse_args(argv)
    return lc.settle_out(args, "research_capacity.md")


def first_turn(market, row: dict, label: str) -> list[dict[str, str]]:
    """The episode's first turn as the trainer sees it: the task under `label`, then the explored first call."""
    as_of = datetime.fromisoformat(str(row["as_of"]))
    _, call = planned_call(row["explore_tool"], row["ticker"])
    return [{"role": "system", "content": system_prompt()},
            {"role": "user", "content": user_prompt(row["ticker"], as_of, market.horizon_days, label)},
            {"role": "assistant", "content": call}]


def item_rank_label(row: dict, group: list[dict]) -> str:
    """The product's `rewards.label_format = "rank"` label (`Rank: k/3`, quantile_bins = 3): the episode's place
    among its item's episodes by reward, ties sharing the lower rank."""
    return rank_label(sum(g["composite"] < row["composite"] for g in group), len(group), TOOLS_PER_ITEM)


def block_chats(market, rows: list[dict], how: str = "block"
                ) -> tuple[list[list[dict[str, str]]], list[dict], list[str]]:
    """Every explored episode's first turn under its label (`how`: block quintile or rank on its item); the
    label -> tool shares the data holds; the labels, worst first."""
    rows = [r for r in rows if r.get("explore_tool") and r.get("composite") is not None]
    edges = quantile_edges([r["composite"] for r in rows], BINS)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(lc.item_key(r), []).append(r)
    labels = {"block": LABELS, "item": ITEM_LABELS, "oracle": [LABELS[0], LABELS[-1]]}[how]
    chats, table = [], {lab: {"n": 0, "search_news": 0} for lab in labels}
    for r in rows:
        if how == "block":
            label = quantile_label(r["composite"], edges)
        elif how == "item":
            label = item_rank_label(r, groups[lc.item_key(r)])
        else:
            label = labels[r["explore_tool"] == "search_news"]
        chats.append(first_turn(market, r, label))
        table[label]["n"] += 1
        table[label]["search_news"] += r["explore_tool"] == "search_news"
    return chats, [{"label": lab, **v} for lab, v in table.items()], labels


class Prober:
    """P(search_news first) on each held-out item's first turn at a label (the research_sets probe, run on the
    model under training: one forward pass per prompt, the next token after `{"tool": "`)."""

    def __init__(self, tokenizer, market, items) -> None:
        import torch

        self.torch, self.tok, self.market, self.items = torch, tokenizer, market, items
        self.first = {}
        probe_text = self._text(*items[0], "Quantile: 1/5")
        head = tokenizer(probe_text, add_special_tokens=False)["input_ids"]
        for option in ("search", "get"):
            full = tokenizer(probe_text + option, add_special_tokens=False)["input_ids"]
            assert full[: len(head)] == head and len(full) > len(head), option
            self.first[option] = full[len(head)]

    def _text(self, ticker: str, as_of: datetime, label: str) -> str:
        msgs = [{"role": "system", "content": system_prompt()},
                {"role": "user", "content": user_prompt(ticker, as_of, self.market.horizon_days, label)}]
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + '{"tool": "'

    def __call__(self, model, label: str, n: int | None = None) -> dict[str, float]:
        torch = self.torch
        was_training = model.training
        model.eval()
        out = {}
        with torch.no_grad():
            for ticker, as_of in self.items[:n]:
                ids = self.tok(self._text(ticker, as_of, label), add_special_tokens=False)["input_ids"]
                logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1].float()
                gap = float(logits[self.first["get"]] - logits[self.first["search"]])
                out[f"{ticker}|{as_of.isoformat()}"] = 1 / (1 + math.exp(gap))
        if was_training:
            model.train()
        return out


def effect(hi: dict[str, float], lo: dict[str, float]) -> dict:
    d = paired_difference(hi, lo, lambda k: k.split("|")[1][:10])
    return {"mean": d.mean, "low": d.low, "high": d.high, "items": d.n_items, "dates": d.n_clusters}


def report(args, st: dict) -> str:
    f = lc.fmt
    lines = ["# Capacity check: can the label steer the research? (first turns of run L's every-tool block)", "",
             f"Command: `{st['command']}`", "",
             (f"{st['n_examples']} first turns (system prompt, task turn under the episode's label: "
              f"{LABEL_KINDS[args.labels]}, the "
              f"explored first call), lr {args.lr}, batch 8, LoRA r16 on every linear layer, the weighted loss with "
              f"each tool name x{args.tool_weight:g}; the product's trainer (TRL + PEFT) on {st.get('device', 'cpu')}."), "",
             "What the data holds (a model that read its label would match these shares):", "",
             "| label | first turns | search_news first |", "|---|---|---|"]
    lines += [f"| `{t['label']}` | {t['n']} | {t['search_news'] / max(1, t['n']):.0%} |" for t in st["data"]]
    lines += ["", (f"Probe: mean P(search_news first) over {args.probe_items} held-out items (the last row: "
                   f"{args.final_items or args.eval_items}) at each label; effect = paired top - bottom label difference, 95% interval "
                   "resampling dates."), "",
              "| updates | minutes | loss (last 10) | " + " | ".join(f"`{lab}`" for lab in st["labels"])
              + " | effect top - bottom | max per-item effect |",
              "|---|---|---|" + "---|" * len(st["labels"]) + "---|---|"]
    for p in st["probes"]:
        cells = [f(lc.mean(list(p["p"][lab].values()))) if lab in p["p"] else "-" for lab in st["labels"]]
        e = p["effect"]
        lines.append(f"| {p['updates']} | {p['seconds'] / 60:.1f} | {f(p.get('loss'), 4)} | " + " | ".join(cells)
                     + f" | {e['mean']:+.4f} [{e['low']:+.4f}, {e['high']:+.4f}] ({e['items']} items, {e['dates']} dates)"
                     + f" | {p['max_item_effect']:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from transformers import TrainerCallback

    from policy.model_files import load_tokenizer
    from trainer.sft import build_trainer, load_trainable_model, pick_device, sft_config

    args = parse_args(argv)
    work, market, split, model_dir = lc.bench_setup(args)
    tokenizer = load_tokenizer(model_dir)
    rows = json.loads(Path(args.block).read_text())["generate"]["rows"]
    chats, table, labels = block_chats(market, rows, args.labels)
    items = rs.heldout_items(argparse.Namespace(eval_items=args.eval_items), market, split)
    probe_keys = {(t, a) for t, a in rs.heldout_items(argparse.Namespace(eval_items=args.eval_items), market, split,
                                                      args.probe_items)}
    ordered = [it for it in items if it in probe_keys] + [it for it in items if it not in probe_keys]
    prober = Prober(tokenizer, market, ordered)
    st = {"command": ".venv/bin/python bench/research_capacity.py " + " ".join(sys.argv[1:] if argv is None else argv),
          "n_examples": len(chats), "data": table, "probes": [], "device": args.device,
          "labels": labels}
    out = Path(args.out)

    def read(model, updates: int, seconds: float, loss: float | None, every_label: bool, n: int | None) -> None:
        labels = st["labels"] if every_label else [st["labels"][0], st["labels"][-1]]
        got = {lab: prober(model, lab, n) for lab in labels}
        hi, lo = got[labels[-1]], got[labels[0]]
        st["probes"].append({"updates": updates, "seconds": seconds, "loss": loss, "p": got,
                             "effect": effect(hi, lo), "max_item_effect": max((hi[k] - lo[k] for k in hi), key=abs)})
        (work / "research_capacity_state.json").write_text(json.dumps(st, indent=1))
        out.write_text(report(args, st))
        lc.log(f"updates {updates}: P(news) bottom {lc.mean(list(lo.values())):.3f}, top {lc.mean(list(hi.values())):.3f}, "
               f"effect {st['probes'][-1]['effect']['mean']:+.4f}")

    cfg = TrainerConfig(learning_rate=args.lr, epochs=1000, batch_size=4, grad_accum=2, save_steps=10**6,
                        loss_on="weighted", tool_choice_weight=args.tool_weight, max_length=1024)
    device = st["device"] = pick_device(args.device)
    model = load_trainable_model(model_dir, None, cfg, device).to(device)
    read(model, 0, 0.0, None, True, args.probe_items)
    t0 = time.perf_counter()
    losses: list[float] = []

    class Probe(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, _args, state, control, model=None, **kw):
            step = state.global_step
            if step % args.every == 0 and step < args.max_updates:
                read(model, step, time.perf_counter() - t0, lc.mean(losses[-10:]), False, args.probe_items)

    trainer = build_trainer(model, tokenizer, chats, sft_config(cfg, work / "run", device, max_steps=args.max_updates,
                                                                save_strategy="no"),
                            [Probe()], loss_on="weighted", decision_weight=cfg.decision_weight,
                            tool_choice_weight=cfg.tool_choice_weight)
    trainer.train()
    read(trainer.model, trainer.state.global_step, time.perf_counter() - t0, lc.mean(losses[-10:]), True,
         args.final_items or args.eval_items)
    if args.save_adapter:
        trainer.model.save_pretrained(str(work / "adapter"))
        tokenizer.save_pretrained(str(work / "adapter"))
    print(report(args, st), flush=True)


if __name__ == "__main__":
    main()

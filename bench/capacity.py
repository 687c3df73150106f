"""Capacity check: can SmolLM2-135M learn headline -> direction by score-conditioned SFT, with the trainer alone?

It separates a trainer problem from a data problem. The examples are episodes in the agent's exact chat
format (system prompt, task turn ending with the label, the research plan's search_news call, this week's
headlines, the budget message with the label again, the prediction), built straight from the synthetic market for items whose
visible signal headline sets the Bayes direction. The direction is drawn up/down at random; the label is
`Score: 1.00` when it agrees with the Bayes direction and `Score: 0.00` otherwise (noise-free: the question is
capacity, not the market's noise). Arms, each trained by `trainer.sft.fit` (TRL + PEFT, as a round does):
  score     every example with its label (reward-conditioned SFT)
  filtered  the agreeing half only, no label (RAFT-style)
Read-out: on fresh eval-region signal items, the model's choice between "up" and "down" at the direction
position (one forward pass), agreement with the Bayes direction at each label.

    .venv/bin/python bench/capacity.py --workdir /tmp/cap --train-items 160   # about 40 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datetime import timedelta

import learning_curve as lc

from agent.prompts import format_news, label_turn, system_prompt, user_prompt
from agent.schema import planned_call
from market.split import draw_items
from rewards.labels import NO_LABEL
from trainer.config import TrainerConfig

PREFIX = '{"prediction": {"direction": "'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--train-items", type=int, default=256)
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--loss-on", choices=("assistant", "decision", "weighted"), default="assistant",
                   help="trainer.loss_on: every assistant token, the direction and confidence only, or every "
                        "assistant token with those weighted (--decision-weight)")
    p.add_argument("--decision-weight", type=float, default=20.0, help="trainer.decision_weight (loss_on weighted)")
    p.add_argument("--arms", default="score,filtered")
    p.add_argument("--label-dropout", type=float, default=0.0,
                   help="score arm: share of examples trained with the no-label line instead of their label "
                        "(classifier-free guidance training: one model learns the unconditional answer too)")
    p.add_argument("--export", metavar="FILE",
                   help="write the tokenized train and eval sets to FILE (JSON) for bench/capacity_gpu.py and stop")
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke run, numbers mean nothing)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "capacity.md"))
    return p.parse_args(argv)


def signal_items(market, region, n: int, seed: str) -> list[tuple[str, object, str]]:
    """(ticker, as_of, bayes direction) for `n` drawn items whose visible signal sets the direction."""
    h = market.horizon_days
    pool = draw_items(region, market.tickers, min(len(region) * len(market.tickers), 8 * n), seed)
    out = []
    for t, day in pool:
        syn = market.prices
        if not syn.signal_visible(t, day, h):
            continue
        mu = syn.visible_drift(syn.tickers.index(t), syn.day_index(day), h)
        out.append((t, market.calendar.replay_as_of(day), "up" if mu > 0 else "down"))
        if len(out) == n:
            break
    return out


def context(market, ticker: str, as_of, label: str) -> list[dict[str, str]]:
    """The episode up to the prediction, as the agent builds it (plan call, headlines of the last 7 days)."""
    got = market.news.search(ticker.lower(), as_of, ticker=ticker, max_results=6)
    since = as_of - timedelta(days=7)
    items = [it for it in got.items if it.published_at >= since]
    news = format_news([(i + 1, it.published_at, it.title, it.snippet) for i, it in enumerate(items)])
    return [{"role": "system", "content": system_prompt()},
            {"role": "user", "content": user_prompt(ticker, as_of, market.horizon_days, label)},
            {"role": "assistant", "content": planned_call("search_news", ticker)[1]},
            {"role": "tool", "content": news},
            {"role": "user", "content": label_turn(label, budget_used=True)}]  # agent.label_each_turn


def answer(direction: str) -> str:
    return json.dumps({"prediction": {"direction": direction, "magnitude_pct": 2.0, "confidence": 0.6,
                                      "rationale": "the latest headline", "citations": [1]}})


def margins(model, tokenizer, market, items, label: str) -> list[float]:
    """Per item: logit("up") - logit("down") at the direction position (one forward pass each)."""
    import torch

    up, down = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("up", "down"))
    out = []
    model.eval()
    with torch.no_grad():
        for t, as_of, _ in items:
            prompt = tokenizer.apply_chat_template(context(market, t, as_of, label), tokenize=False,
                                                   add_generation_prompt=True) + PREFIX
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            logits = model(**ids).logits[0, -1]
            out.append(float(logits[up] - logits[down]))
    return out


def agreement(items, margin: list[float]) -> float:
    """Share of items where the margin's sign picks the Bayes direction."""
    return sum(("up" if m > 0 else "down") == truth for (_, _, truth), m in zip(items, margin, strict=True)) / len(items)


def guided(high: list[float], low: list[float], w: float | None) -> list[float]:
    """Classifier-free guidance between two labels: (1 + w) * high - w * low; w=None keeps the difference only.

    Why: a model that ignores most of the label still answers one way on every item (a shared bias far
    larger than its item-by-item reading). The bias is the same at both labels, so the guided margin
    cancels it and keeps only what the label changes, item by item."""
    if w is None:
        return [h - lo for h, lo in zip(high, low, strict=True)]
    return [(1 + w) * h - w * lo for h, lo in zip(high, low, strict=True)]


def spans(mask: list[int]) -> list[list[int]]:
    """A 0/1 token mask as [start, end) runs (the export stays small)."""
    out, start = [], None
    for i, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = i
        elif not bit and start is not None:
            out.append([start, i])
            start = None
    return out


def export(tokenizer, market, train, held, path: Path) -> None:
    """The same examples and read-out prompts as token ids, for a run on a GPU machine that has torch,
    transformers and peft but not this repo's code or its tokenizer files.

    Each train example carries its assistant-token runs (what `trainer.loss_on = "assistant"` trains on)
    and its decision runs (`"decision"`), both made by this repo's own code; the no-label variant of each
    example rides along so label dropout and the filtered arm need no second tokenization."""
    from trainer.decision import decision_row

    def row(chat):
        enc = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        dec = decision_row(tokenizer, chat, 4096)
        assert dec is not None and dec["input_ids"] == list(enc["input_ids"]), "decision tokens do not line up"
        return {"ids": list(enc["input_ids"]), "assistant": spans(enc["assistant_masks"]),
                "decision": spans(dec["assistant_masks"])}

    rows = []
    for chat in train:
        label = next(m["content"] for m in chat if m["role"] == "user").rsplit("\n", 1)[-1]
        unlabelled = [{**m, "content": m["content"].replace(label, NO_LABEL)} if m["role"] in ("system", "user")
                      else m for m in chat]
        agrees = "Score: 1.00" in chat[-2]["content"]
        rows.append({"agrees": agrees, "labelled": row(chat), "unlabelled": row(unlabelled)})
    prompts = []
    for t, as_of, truth in held:
        per = {}
        for key, label in (("high", "Score: 1.00"), ("low", "Score: 0.00"), ("none", NO_LABEL)):
            text = tokenizer.apply_chat_template(context(market, t, as_of, label), tokenize=False,
                                                 add_generation_prompt=True) + PREFIX
            per[key] = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append({"truth": truth, **per})
    up, down = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("up", "down"))
    path.write_text(json.dumps({"up": up, "down": down, "pad": tokenizer.pad_token_id, "train": rows,
                                "eval": prompts}))
    print(f"wrote {path}: {len(rows)} train examples ({sum(r['agrees'] for r in rows)} agree), "
          f"{len(prompts)} eval items, {path.stat().st_size / 1e6:.1f} MB")


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM

    from policy.model_files import load_tokenizer
    from trainer.sft import fit

    args = parse_args(argv)
    work, market, split, model_dir = lc.bench_setup(args)
    tokenizer = load_tokenizer(model_dir)
    rng = random.Random(0)
    drop = random.Random("label-dropout")  # its own stream: the drawn directions do not change with it
    train, right = [], []
    for t, as_of, truth in signal_items(market, split.train, args.train_items, "capacity-train"):
        d = rng.choice(("up", "down"))
        label = "Score: 1.00" if d == truth else "Score: 0.00"
        if drop.random() < args.label_dropout:
            label = NO_LABEL
        train.append([*context(market, t, as_of, label), {"role": "assistant", "content": answer(d)}])
        if d == truth:
            right.append([*context(market, t, as_of, NO_LABEL), {"role": "assistant", "content": answer(d)}])
    held = signal_items(market, split.eval, args.eval_items, "capacity-eval")
    if args.export:
        export(tokenizer, market, train, held, Path(args.export))
        return
    cfg = TrainerConfig(learning_rate=args.lr, epochs=args.epochs, batch_size=args.batch_size, save_steps=10_000,
                        loss_on=args.loss_on, decision_weight=args.decision_weight,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    rows: list[tuple[str, str, float, float, int]] = []

    def read_out(arm: str, model, labels, secs: float, n: int) -> None:
        got = {label: margins(model, tokenizer, market, held, label) for label in labels}
        rows.extend((arm, f"`{label}`", agreement(held, m), secs, n) for label, m in got.items())
        high = got[labels[0]]
        for other in labels[1:]:
            for w in (1.0, 3.0, None):
                how = "difference only" if w is None else f"w = {w:g}"
                rows.append((arm, f"`{labels[0]}` guided against `{other}`, {how}",
                             agreement(held, guided(high, got[other], w)), secs, n))

    score_labels = ("Score: 1.00", "Score: 0.00") + ((NO_LABEL,) if args.label_dropout > 0 else ())
    read_out("base", base, score_labels, 0.0, 0)
    def write() -> None:  # after every arm, so a run cut short keeps what finished
        lines = ["# Capacity check: headline -> direction by SFT with the trainer alone", "",
                 f"Command: `.venv/bin/python bench/capacity.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
                 (f"{len(train)} train examples ({len(right)} agree with the Bayes direction), {len(held)} fresh "
                  f"eval-region signal items; lr {args.lr}, {args.epochs} epochs, batch {args.batch_size}, LoRA r16 on "
                  f"every linear layer; loss on {args.loss_on} tokens; label dropout {args.label_dropout}."),
                 ("Agreement = the model prefers the Bayes direction at the direction token (0.5 = no reading; a "
                  "model that learned the score's meaning goes up at 1.00 and down at 0.00). Guided: classifier-free "
                  "guidance between the two labels' logits; ± is a 95% normal interval over the items."), "",
                 "| arm | label at read-out | agreement with Bayes direction | train examples | train minutes |",
                 "|---|---|---|---|---|"]
        half = [1.96 * (acc * (1 - acc) / len(held)) ** 0.5 for _, _, acc, _, _ in rows]
        lines += [f"| {a} | {lbl} | {acc:.3f} ± {h:.3f} | {n} | {s / 60:.1f} |"
                  for (a, lbl, acc, s, n), h in zip(rows, half, strict=True)]
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)

    write()
    arms = (("score", train, score_labels), ("filtered", right, (NO_LABEL,)))
    for arm, data, labels in (a for a in arms if a[0] in args.arms.split(",")):
        t0 = time.perf_counter()
        out = fit(model_dir, None, data, cfg, work / f"run-{arm}", device="cpu")
        secs = time.perf_counter() - t0
        read_out(arm, out.model, labels, secs, len(data))
        write()


if __name__ == "__main__":
    main()

"""Does the loop learn which research earns reward? Free tool choice over turns of the filtered loop.

Issue #13's stretch target: with free tool choice, the share of top-target episodes that read news rises
round over round. The product's default research plan reads the news first (`agent.research_plan =
["search_news"]`) because a 135M model left to choose mostly read prices, where the synthetic market plants
no signal. Here the plan is empty (`[]`: the model picks every call) and the loop has to find that out itself:

  round 0  the base agent answers --eval-items held-out items with free tool choice (greedy, target 1.0,
           no exploration).
  round k  the serving agent (the base model, then round k-1's adapter) writes a train block on --train-items
           fresh train-region items (no round shares one) with free tool choice: greedy, --explore of the
           directions drawn (`agent.explore_rate`) and --explore-tools of the research plans drawn, one tool
           or none (`agent.explore_tool_rate`); `scoring.resolve` scores it; `train_round` trains (round 1)
           or resumes (later rounds) the LoRA on the block's top quartile: no label, directions balanced,
           2 epochs, the decision-weighted loss (run J's filtered recipe). The new adapter then answers the
           same held-out items as round 0.

What is measured on the held-out items, round by round and paired item by item (95% intervals resampling
dates): the share of episodes that called `search_news`, the first tool chosen, whether a signal headline
reached the context, accuracy, and mean reward. For each train block: how the top quartile (what the round
trains on) reads compared with the whole block; that enrichment is what can teach the research.

Each phase saves --workdir/state.json; rerunning the same command resumes after the last finished phase.
Run it from a git worktree (see bench/learning_curve.py).

    .venv/bin/python bench/research_rounds.py --workdir /tmp/research --rounds 1    # run K1: free choice
    .venv/bin/python bench/research_rounds.py --workdir /tmp/research_plan --rounds 2 --train-plan search_news \
        --against bench/results/research_rounds_state.json --out bench/results/research_rounds_plan.md   # K2
    .venv/bin/python bench/research_rounds.py --tiny --train-items 12 --eval-items 8 --rounds 1 --workdir /tmp/rt
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learning_curve as lc
from sqlalchemy import text

from agent.config import AgentConfig
from market.config import MarketConfig
from market.sources import build_market
from market.split import draw_items, timeline_split
from rewards.config import RewardsConfig
from rewards.intervals import paired_difference

TOOLS_SQL = """
SELECT s.episode_id, s.tool_name FROM steps s JOIN episodes e ON e.id = s.episode_id
WHERE e.block_id = :b AND s.role = 'tool' AND s.tool_name IS NOT NULL ORDER BY s.episode_id, s.idx
"""
EXPLORED_SQL = "SELECT id, explore_tool FROM episodes WHERE block_id = :b"
SPEC = {"label_format": "none", "top": 0.25, "epochs": 2.0}  # run J's filtered recipe, per round


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-items", type=int, default=320)
    p.add_argument("--train-seed", default="research-train")
    p.add_argument("--eval-items", type=int, default=150)
    p.add_argument("--max-steps", type=int, default=2, help="agent.max_steps: tool calls before a forced prediction")
    p.add_argument("--explore", type=float, default=0.3, help="agent.explore_rate (directions) of train blocks")
    p.add_argument("--explore-tools", type=float, default=0.5, help="agent.explore_tool_rate of train blocks")
    p.add_argument("--train-plan", default="",
                   help="comma-separated research plan of the train blocks (e.g. search_news, the product default; "
                        "no tool exploration then); empty = free tool choice there too. Held-out items always "
                        "run with free tool choice: does a habit the plan demonstrated outlive the plan?")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random model from tests/ (smoke run, numbers mean nothing)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    lc.shared_args(p, "research_rounds.md")
    p.add_argument("--against", metavar="STATE",
                   help="another run's state.json (its held-out items must be these): pair each round with its round")
    args = lc.settle_out(p.parse_args(argv), "research_rounds.md")
    # what learning_curve's train() reads: the filtered recipe of run J
    args.loss_on, args.decision_weight, args.balance = "weighted", 20.0, True
    return args


def free_cfg(args, model_dir: str, *, train: bool) -> AgentConfig:
    """Free tool choice: no research plan, the model picks every call (at least one, at most --max-steps).
    With --train-plan, train blocks run that plan first instead (and explore no tools); the step budget, and so
    the prompt, stay the same as the held-out items'."""
    plan = [t for t in args.train_plan.split(",") if t] if train else []
    return AgentConfig(model=model_dir, device="cpu", research_plan=plan, max_steps=args.max_steps, min_tool_calls=1,
                       temperature=0.0, explore_rate=args.explore if train else 0.0,
                       explore_tool_rate=args.explore_tools if train and not plan else 0.0,
                       max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                       max_batch_size=args.concurrency, max_repairs=1)


def with_tools(engine, block_id: int, rows: list[dict]) -> list[dict]:
    """The rows with the tools each episode ran, in order, and its drawn research plan (None = the model's)."""
    calls: dict[int, list[str]] = {}
    with engine.connect() as c:
        for eid, tool in c.execute(text(TOOLS_SQL), {"b": block_id}):
            calls.setdefault(eid, []).append(tool)
        explored = dict(c.execute(text(EXPLORED_SQL), {"b": block_id}).all())
    for r in rows:
        r["tools"] = calls.get(r["episode_id"], [])
        r["read_news"] = int("search_news" in r["tools"])
        r["explore_tool"] = explored.get(r["episode_id"])
    return rows


def round_items(args, market, split, k: int) -> list[tuple[str, date]]:
    """Round k's train items: a seeded draw of the train region that leaves out every earlier round's items."""
    seen: set[tuple[str, date]] = set()
    items: list[tuple[str, date]] = []
    for j in range(1, k + 1):
        items = lc.fresh_draw(market, split, args.train_items, f"{args.train_seed}|{j}", seen)
        seen |= set(items)
    return items


def reading(rows: list[dict]) -> dict:
    """How a set of episodes researched: the share that read news, first tools, and reward by reading."""
    news = [r for r in rows if r["read_news"]]
    rest = [r for r in rows if not r["read_news"]]
    return {"n": len(rows), "read_news": lc.mean([r["read_news"] for r in rows]),
            "reward": lc.mean([r["composite"] for r in rows]), "accuracy": lc.mean([r["correct"] for r in rows]),
            "first_tool": dict(Counter(r["tools"][0] if r["tools"] else "none" for r in rows)),
            "reward_news": lc.mean([r["composite"] for r in news]), "reward_rest": lc.mean([r["composite"] for r in rest]),
            "acc_news": lc.mean([r["correct"] for r in news]), "acc_rest": lc.mean([r["correct"] for r in rest])}


def block_stats(market, rows: list[dict]) -> dict:
    """A train block: its data figures, and how its top quartile (the round's training set) read."""
    scored = [r for r in rows if r["composite"] is not None]
    q3 = lc.top_cut(scored)
    own = [r for r in rows if r["explore_tool"] is None]
    return {**lc.data_stats(market, rows), "all": reading(rows), "own_choice": reading(own),
            "top": reading([r for r in scored if r["composite"] >= q3]),
            "by_plan": {p: reading([r for r in rows if (r["explore_tool"] or "model") == p])
                        for p in sorted({r["explore_tool"] or "model" for r in rows})}}


def generate(args, st: lc.State, k: int, market, split, model_dir: str, work: Path) -> None:
    """Round k's train block, written by the serving agent in the store the round trains in."""
    from store.db import open_store, session_scope
    from store.training import flip_serving

    db = work / f"r{k}.db"
    adapter = None
    if k > 1:
        parent = st.data["rounds"][str(k - 1)]["train"]
        shutil.copyfile(work / f"r{k - 1}.db", db)
        adapter = (parent["path"], parent["version"])
    elif db.exists():
        db.unlink()
    engine = open_store(f"sqlite:///{db}")
    if adapter:
        with session_scope(engine) as s:
            flip_serving(s, adapter[1])
    bid, rows, seconds = lc.write_block(args, engine, market, model_dir, round_items(args, market, split, k),
                                        adapter=adapter, label_format="none", cfg=free_cfg(args, model_dir, train=True))
    rows = with_tools(engine, bid, rows)
    engine.dispose()
    st.data.setdefault("rounds", {}).setdefault(str(k), {})["generate"] = {
        "block_id": bid, "seconds": seconds, **block_stats(market, rows), "rows": rows}
    st.save()
    lc.log(f"generate r{k}: {st.data['rounds'][str(k)]['generate']['all']}")


def train(args, st: lc.State, k: int, model_dir: str, work: Path) -> None:
    """Round k's LoRA on its block's top quartile (`learning_curve.train`, the product's train_round)."""
    name = f"r{k}"
    # "parent": train in the store the round's block was written to (round k-1's, copied: its LoRA resumes)
    lc.train(args, st, name, model_dir, work, spec=dict(SPEC, parent=f"r{k - 1}"))
    st.data["rounds"][str(k)]["train"] = st.data["train"].pop(name)
    st.save()


def evaluate(args, st: lc.State, k: int, market, split, model_dir: str, work: Path) -> None:
    """Round k's agent (0 = base) on the held-out items, greedy, free tool choice, target 1.0."""
    from agent.runner import run_block
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending
    from store.db import open_store

    engine = open_store(f"sqlite:///{work / 'eval.db'}")
    items = lc.as_of_items(market, draw_items(split.eval, market.tickers, args.eval_items, seed="learn-eval"))
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, batch_wait_ms=20)
    try:
        if k > 0:
            policy.load_adapter(st.data["rounds"][str(k)]["train"]["path"], 1)
        t0 = time.perf_counter()
        bid = run_block(engine, policy, market, free_cfg(args, model_dir, train=False),
                        RewardsConfig(label_format="score" if k == 0 else "none"), kind="eval", items=items,
                        size=len(items), target_score=1.0, progress=False, horizon=market.horizon_days)
        resolve_pending(engine, market, RewardsConfig())
        rows = with_tools(engine, bid, lc.block_rows(engine, bid))
    finally:
        policy.close()
        engine.dispose()
    st.data.setdefault("rounds", {}).setdefault(str(k), {})["eval"] = {
        "block_id": bid, "seconds": time.perf_counter() - t0, "rows": rows}
    st.save()
    lc.log(f"eval r{k}: {reading(rows)} acc={lc.mean([r['correct'] for r in rows])}")


# ---- report --------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def tools_text(first: dict) -> str:
    return ", ".join(f"{t} {n}" for t, n in sorted(first.items(), key=lambda kv: -kv[1]))


def train_pairs(args, rounds: dict, other: dict, market) -> list[str]:
    """Each round's train block against the other run's same round: the same items and the same explored
    directions (both seeded by item), so the difference is what the research choice alone did to the data."""
    lines = []
    for k, r in sorted(rounds.items()):
        mine, theirs = r.get("generate", {}).get("rows"), other.get(str(k), {}).get("generate", {}).get("rows")
        if not mine or not theirs:
            continue
        a, b = ({lc.item_key(x): x for x in rows} for rows in (mine, theirs))
        vis = [key for key in a if lc.visible_signal(market, a[key])]  # a list: the bootstrap's order is fixed
        for col, fig, keys in (("read_news", "read news", a), ("correct", "accuracy", a),
                               ("correct", "acc, signal visible", vis), ("composite", "mean reward", a)):
            d = paired_difference({key: a[key][col] for key in keys}, {key: b[key][col] for key in keys if key in b},
                                  lc.on_date, n_boot=args.boot)
            if d is not None and d.low is not None:
                lines.append(f"| round {k}'s train block - the other run's | {fig} | {d.mean:+.3f} | "
                             f"[{d.low:+.3f}, {d.high:+.3f}] | {d.n_items} | {d.n_clusters} |")
    if not lines:
        return []
    return ["Train blocks against the other run's (same items, same explored directions):", "",
            "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|",
            *lines, ""]


def report(args, st: lc.State, market) -> str:
    rounds = {int(k): v for k, v in st.data.get("rounds", {}).items()}
    lines = ["# Free tool choice: does the loop learn which research earns reward?", "",
             f"Command: `.venv/bin/python bench/research_rounds.py {st.data.get('command', '')}`", "",
             (f"Synthetic market, seed {MarketConfig().synthetic.seed} (unchanged). Free tool choice: "
              f"`agent.research_plan = []`, 1 to {args.max_steps} tool calls per episode. Train blocks: "
              f"{args.train_items} fresh train-region items per round, greedy, directions explored {args.explore}, "
              + (f"research plan `{args.train_plan}` first (written as the assistant's own calls; the model may "
                 "then call more tools within the same budget), no tool exploration" if args.train_plan else
                 f"research plans explored {args.explore_tools} (one of get_prices, search_news, "
                 "get_market_context or none, drawn uniformly)")
              + ". Each round trains on its block's top quartile by reward (no label, directions balanced, "
              "2 epochs, decision-weighted loss), resuming the previous round's LoRA. Held-out items: free tool "
              "choice, greedy, no exploration."), ""]
    gen = [(k, r["generate"]) for k, r in sorted(rounds.items()) if "generate" in r]
    if gen:
        lines += ["## Train blocks: who read the news, and what it earned", "",
                  ("`own choice` = episodes whose research plan was not explored: the serving model chose every "
                   "call" + (f" after the plan's `{args.train_plan}`" if args.train_plan else "") + "; `top "
                   "quartile` = what the round trains on."), "",
                  ("| written by | for round | read news: all / own choice / top quartile | first tool (own choice) "
                   "| reward: read news / not | accuracy: read news / not | examples, updates, min |"),
                  "|---|---|---|---|---|---|---|"]
        for k, g in gen:
            a, o, t = g["all"], g["own_choice"], g["top"]
            tr = rounds[k].get("train")
            trained = "-" if not tr else f"{tr['n_examples']}, {tr['steps']}, {tr['seconds'] / 60:.0f}"
            lines.append(f"| {'base' if k == 1 else f'round {k - 1}'} | {k} | {pct(a['read_news'])} / "
                         f"{pct(o['read_news'])} / **{pct(t['read_news'])}** | {tools_text(o['first_tool'])} | "
                         f"{lc.fmt(a['reward_news'])} / {lc.fmt(a['reward_rest'])} | {lc.fmt(a['acc_news'])} / "
                         f"{lc.fmt(a['acc_rest'])} | {trained} |")
        lines += ["", "Reward by research plan in each block (an explored plan, or `model` = the model's own choice):", ""]
        for k, g in gen:
            parts = "; ".join(f"{p} {v['n']} episodes, reward {lc.fmt(v['reward'])}, accuracy {lc.fmt(v['accuracy'])}"
                              for p, v in g["by_plan"].items())
            lines.append(f"- round {k}: {parts} ({g['seconds'] / 60:.0f} min to write)")
        lines.append("")
    ev = [(k, r["eval"]["rows"], r["eval"]["seconds"]) for k, r in sorted(rounds.items()) if "eval" in r]
    if ev:
        lines += [f"## Held-out items ({len(ev[0][1])}, the same for every round; greedy, target 1.0, free tool choice)",
                  "", ("| agent | read news | first tool | signal headline in context (visible-signal items) | "
                       "accuracy | acc, signal visible | mean reward | min |"), "|---|---|---|---|---|---|---|---|"]
        for k, rows, sec in ev:
            rd = reading(rows)
            vis = [r for r in rows if lc.visible_signal(market, r)]
            scored = [r for r in rows if r["correct"] is not None]
            lines.append(f"| {'base' if k == 0 else f'round {k}'} | **{pct(rd['read_news'])}** | "
                         f"{tools_text(rd['first_tool'])} | {pct(lc.mean([r['signal_in_context'] for r in vis]))} "
                         f"(n={len(vis)}) | {lc.fmt(lc.mean([r['correct'] for r in scored]))} | "
                         f"{lc.fmt(lc.mean([r['correct'] for r in vis if r['correct'] is not None]))} | "
                         f"{lc.fmt(lc.mean([r['composite'] for r in rows]))} | {sec / 60:.1f} |")
        lines += ["", "Paired differences (same items; 95% interval resampling dates):", "",
                  "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
        name = {k: "base" if k == 0 else f"round {k}" for k in rounds}
        by = {name[k]: {lc.item_key(r): r for r in rows} for k, rows, _ in ev}
        pairs = [(name[k], name[k - 1]) for k, _, _ in ev if k - 1 in rounds and "eval" in rounds[k - 1]]
        pairs += [(name[k], "base") for k, _, _ in ev if k > 1 and "base" in by]
        if args.against:  # the same round of the other run, on the same items
            other = json.loads(Path(args.against).read_text()).get("rounds", {})
            for k, _, _ in ev:
                if k > 0 and "eval" in other.get(str(k), {}):
                    by[f"{name[k]} (other run)"] = {lc.item_key(r): r for r in other[str(k)]["eval"]["rows"]}
                    pairs.append((name[k], f"{name[k]} (other run)"))
        for a, b in pairs:
            for col, fig in (("read_news", "read news"), ("correct", "accuracy"), ("composite", "mean reward")):
                d = paired_difference({key: r[col] for key, r in by[a].items()},
                                      {key: r[col] for key, r in by[b].items()}, lc.on_date, n_boot=args.boot)
                if d is not None and d.low is not None:
                    lines.append(f"| {a} - {b} | {fig} | {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | "
                                 f"{d.n_items} | {d.n_clusters} |")
        lines.append("")
        if args.against:
            lines += [f"`(other run)`: the rounds of `{args.against}`.", ""]
            lines += train_pairs(args, rounds, other, market)
    return "\n".join(lines) + "\n"


def start(args, argv: list[str] | None, report) -> tuple | None:
    """A research bench's workdir, state, market, split and model folder (research_sets.py shares it);
    None once --report-only has rewritten --out from the saved state."""
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    st = lc.State(work / "state.json")
    market = build_market(MarketConfig())
    split = timeline_split(market, market.horizon_days)
    from policy.model_files import make_tiny_model, resolve_model

    model_dir = (str(make_tiny_model(work / "tiny", resolve_model(args.model))) if args.tiny
                 else resolve_model(args.model))
    if args.report_only:
        Path(args.out).write_text(report(args, st, market))
        return None
    st.data.setdefault("command", " ".join(sys.argv[1:] if argv is None else argv))
    return work, st, market, split, model_dir


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = start(args, argv, report)
    if started is None:
        return
    work, st, market, split, model_dir = started

    def done(k: int, phase: str) -> bool:
        return phase in st.data.get("rounds", {}).get(str(k), {})

    if not done(0, "eval"):
        evaluate(args, st, 0, market, split, model_dir, work)
        Path(args.out).write_text(report(args, st, market))
    for k in range(1, args.rounds + 1):
        if not done(k, "generate"):
            generate(args, st, k, market, split, model_dir, work)
        if not done(k, "train"):
            train(args, st, k, model_dir, work)
        Path(args.out).write_text(report(args, st, market))
        if not done(k, "eval"):
            evaluate(args, st, k, market, split, model_dir, work)
        Path(args.out).write_text(report(args, st, market))
    lc.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The rank label in the agent: does a research-label adapter's free agent read what its target asks, and earn more?

`bench/research_capacity.py --labels item --save-adapter` trains the first turns of run L's every-tool block under
the product's group-relative label (`rewards.label_format = "rank"`, `Rank: k/3`: the episode's reward rank among
its item's three episodes) until the label steers the first tool on held-out first turns. The probe there reads
one token's probability. This bench runs the whole agent with that adapter, as `bench/research_sets.py` runs its
arms: the free agent (research_plan = [], up to --max-steps tool calls, greedy, max_repairs 1) on run K's held-out
items (the seeded --items subset research_sets uses for controllability), once per target, through the product's
runner, resolver and rewards (`target_label` under `label_format = "rank"`, quantile_bins = 3: target 1.0 =
`Rank: 3/3`, 0.5 = `2/3`, 0.0 = `1/3`). The untrained agent's rows on the same items come from research_sets'
state (greedy, so they are what it would write again).

Reported per target: the share that read the news, first tools, accuracy, mean reward and valid answers; paired
differences (target 1 - target 0, target 1 - untrained) with 95% intervals resampling dates; Spearman of the
realized mean reward against the target.

    .venv/bin/python bench/research_capacity.py --labels item --workdir /tmp/rcapR --max-updates 160 --every 80 \
        --probe-items 30 --final-items 60 --save-adapter                                          # ~27 min
    .venv/bin/python bench/research_control.py --adapter /tmp/rcapR/adapter --workdir /tmp/rctl     # ~6 min a target
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import learning_curve as lc
import research_rounds as rr
import research_sets as rs

from rewards.config import RewardsConfig
from rewards.evaluation import spearman
from rewards.labels import target_label

BINS = 3
RANK = RewardsConfig(label_format="rank", quantile_bins=BINS)  # the labels the adapter was trained on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--adapter", required=True, help="a LoRA adapter trained under `Rank: k/3` labels")
    p.add_argument("--targets", default="1.0,0.0,0.5", help="targets in run order (1.0 first: a cut run keeps it)")
    p.add_argument("--items", type=int, default=60, help="the seeded held-out subset (research_sets --ctrl-items)")
    p.add_argument("--eval-items", type=int, default=150, help="run K's held-out items the subset is drawn from")
    p.add_argument("--base-from", default=str(ROOT / "bench/results/research_sets_steer_state.json"),
                   help="a research_sets state whose `base@1.00` rows are the untrained agent on these items")
    p.add_argument("--max-steps", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke run, numbers mean nothing)")
    p.add_argument("--out", default=None, help="report path (default bench/results/research_control.md; --tiny "
                   "runs write into the workdir)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--boot", type=int, default=4000)
    args = p.parse_args(argv)
    args.explore = 0.0
    return lc.settle_out(args, "research_control.md")


def key(r: dict) -> str:
    return f"{r['ticker']}|{str(r['as_of'])[:10]}"


def run_target(args, st: lc.State, market, split, model_dir: str, work: Path, target: float) -> None:
    """The free agent with the adapter at one target on the held-out subset, through the product's runner."""
    from agent.runner import run_block
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending
    from store.db import open_store

    name = f"rank@{target:.2f}"
    if name in st.data.get("runs", {}):
        return
    items = rs.heldout_items(args, market, split, args.items)
    engine = open_store(f"sqlite:///{work / 'eval.db'}")
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, batch_wait_ms=20)
    try:
        policy.load_adapter(args.adapter, 1)
        t0 = time.perf_counter()
        bid = run_block(engine, policy, market, rs.agent_cfg(args, model_dir, train=False),
                        RANK, kind="eval", items=items,
                        size=len(items), target_score=target, progress=False, horizon=market.horizon_days)
        resolve_pending(engine, market, RewardsConfig())
        rows = rr.with_tools(engine, bid, lc.block_rows(engine, bid))
    finally:
        policy.close()
        engine.dispose()
    st.data.setdefault("runs", {})[name] = {"target": target, "seconds": time.perf_counter() - t0, "rows": rows}
    st.save()
    lc.log(f"{name}: {rr.reading(rows)}")


def report(args, st: lc.State) -> str:
    runs = dict(st.data.get("runs", {}))
    base = st.data.get("base")
    if base:
        runs = {"untrained@1.00": {"target": None, "rows": base}, **runs}
    by = {name: {key(r): r for r in run["rows"]} for name, run in runs.items()}
    common = sorted(set.intersection(*(set(v) for v in by.values()))) if by else []
    lines = ["# The rank label in the agent: research and reward at each target", "",
             f"Command: `{st.data.get('command', '')}`", "",
             (f"Adapter: `{args.adapter}` (first turns of run L's block under `Rank: k/3`, see "
              "`research_capacity_rank.md`). The free agent, greedy, on the same "
              f"{len(common)} held-out items (run K's seeded controllability subset) at each target."), "",
             "| run | label | read news | first tool | accuracy | mean reward | valid | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in runs.items():
        rows = [by[name][k] for k in common]
        t = run["target"]
        label = "-" if t is None else f"`{target_label(t, RANK)}`"
        first = Counter(r["tools"][0] if r["tools"] else "none" for r in rows)
        lines.append(f"| {name} | {label} | {rr.pct(lc.mean([r['read_news'] for r in rows]))} | "
                     f"{', '.join(f'{k} {n}' for k, n in first.most_common())} | "
                     f"{lc.fmt(lc.mean([r['correct'] for r in rows if r['correct'] is not None]))} | "
                     f"{lc.fmt(lc.mean([r['composite'] for r in rows if r['composite'] is not None]))} | "
                     f"{rr.pct(lc.mean([float(bool(r['valid'])) for r in rows]))} | "
                     f"{run.get('seconds', 0) / 60:.1f} |")
    pairs = [("rank@1.00", "rank@0.00"), ("rank@1.00", "untrained@1.00"), ("rank@0.50", "rank@0.00")]
    diff = ["", "Paired differences (95% interval resampling dates):", "",
            "| comparison | figure | mean | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
    for a, b in pairs:
        if a not in by or b not in by:
            continue
        for fig in ("composite", "read_news", "correct"):
            line = rs.diff_line(f"{a} - {b}", fig, {k: by[a][k][fig] for k in common},
                                {k: by[b][k][fig] for k in common}, args.boot,
                                cluster=lambda k: k.split("|")[1])
            if line:
                diff.append(line)
    targets = [(run["target"], lc.mean([by[n][k]["composite"] for k in common]))
               for n, run in runs.items() if run["target"] is not None]
    if len(targets) >= 2:
        xs, ys = zip(*sorted(targets), strict=True)
        diff += ["", (f"Spearman(target, realized mean reward) over {len(xs)} targets = "
                      f"**{lc.fmt(spearman(list(xs), list(ys)), 2)}**.")]
    return "\n".join(lines + diff) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work, market, split, model_dir = lc.bench_setup(args)
    st = lc.State(work / "state.json")
    st.data["command"] = ".venv/bin/python bench/research_control.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if "base" not in st.data and Path(args.base_from).exists() and not args.tiny:
        st.data["base"] = json.loads(Path(args.base_from).read_text())["eval"]["base@1.00"]["rows"]
    st.save()
    out = Path(args.out)
    for target in (float(t) for t in args.targets.split(",")):
        run_target(args, st, market, split, model_dir, work, target)
        out.write_text(report(args, st))
    print(report(args, st), flush=True)


if __name__ == "__main__":
    main()

"""Every research choice on the same item: can reward teach the research, and can the label steer it?

Run K1 (bench/research_rounds.py) left the tool to the model and explored one drawn research plan per item:
the reward gap between reading the news and not was then measured across different items, where each item's
luck (the shared market factor, an explored direction) hides it, and round 1 learned nothing about research.
Here a train block explores every tool on every item (`agent.explore_tool_mode = "each"`, rate 1): each item
runs three times, with get_prices, search_news or get_market_context alone as the first call (the model may
then call one more tool), all three with the item's explored direction. One block, one scoring: the round's
top quartile and its score labels see the research choices side by side on the same items.

  generate  the base agent writes that block on --train-items fresh train-region items (greedy, --explore of the
            directions drawn); `scoring.resolve` scores it.
  score     the product's default recipe on it (`train_round`: every episode under its score label, the top
            quartile repeated twice more, directions balanced, decision-weighted loss, 1 epoch).
  filtered  run J's filtered recipe on it (top quartile, no label, balanced, 2 epochs).
  dpo       the product's `trainer.objective = "dpo"` on it: per item, its best research choice preferred over its
            worst (1 epoch, no label), the contrast landing on the first tool token itself.
  steer     score conditioning aimed at the research: every episode under its quantile label (`Quantile: k/5`,
            the block's reward quintiles), directions balanced (384 -> 607 examples), 0.6 epoch (~46 updates, what
            a session here affords beside its evaluation), the decision-weighted loss with each tool call's tool
            name weighted as a decision too (`trainer.tool_choice_weight` 20): a label -> research
            mapping is a two-way one, of the kind these small models learn within one round, where the label x
            headline -> direction interaction needed ~600 updates (capacity_gpu.md).
  rank      the product's rank labels (`rewards.label_format = "rank"`, 3 ranks: each episode's reward rank among
            its item's three, which cancels the item's luck, as GRPO's group-relative advantage does), every episode,
            directions balanced, tool names x20, and `trainer.decision_from = "correct"`: a rank says nothing
            about the direction (an item's episodes share it), so only the directions that came true carry loss,
            the headline -> direction mapping the filtered arms learn within a round. ~2 epochs (--epochs), the
            ~160 updates after which the first-turn check learned the rank label (research_capacity_rank.md).
  rank_mixed  the rank recipe on a block made with --tool-rate < 1 (the product's `agent.explore_tool_rate`): that
            share of the items runs once per tool, the rest once under the default research plan (news first), which
            the trainer labels with the middle rank (an item run once has nothing to be ranked against). More of the
            block's answers are then written with the headlines in context, where run O had a third of them.
  rank_bal  the rank recipe again on run O's block, named apart so that --arms-from pairs it with run O's `rank`:
            the trainer's balance now evens out only the directions that train (`decision_from = "correct"`).
  eval      the same --eval-items held-out items as run K (greedy, free tool choice: `research_plan = []`, 1 to
            --max-steps calls); the score and steer arms at targets 1, 0, 0.5, 0.25, 0.75 (controllability over 5
            targets: does the label steer which research the agent does?; targets other than 1 on a seeded
            --ctrl-items subset), the other arms at 1. The first-turn probe at every target the arm is run at.

Reported, paired item by item (95% intervals resample dates): per tool, the block's reward and accuracy, and
which tool the top quartile and each score quartile holds (what each recipe can learn); on the held-out items,
the share that read news, first tools, accuracy and mean reward per arm and target, against the base agent.

Each phase saves --workdir/state.json; rerunning the same command resumes. Run it from a git worktree (see
bench/learning_curve.py). --base-from copies run K's base rows (the same items and settings) instead of
running them again.

    .venv/bin/python bench/research_sets.py --workdir /tmp/sets --base-from bench/results/research_rounds_state.json \
        --arms filtered    # run L, reported in bench/results/research_sets.md (about 1 h 30 min here)
    .venv/bin/python bench/research_sets.py --workdir /tmp/sets2 --base-from bench/results/research_rounds_state.json \
        --arms dpo --arms-from bench/results/research_sets_state.json   # run M: dpo, paired with run L's filtered
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsN --base-from bench/results/research_rounds_state.json \
        --arms steer --arms-from bench/results/research_sets_dpo_state.json --out bench/results/research_sets_steer.md
        # run N: the steer arm, paired with runs L and M (about 2 h here)
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsO --max-steps 1 --explore 0.5 --arms rank \
        --out bench/results/research_sets_rank.md   # run O: one call per episode (prices, news or context), then
        # the answer; its own untrained rows at --max-steps 1 (about 2 h here)
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsP --max-steps 1 --explore 0.5 --train-items 192 \
        --tool-rate 0.5 --arms rank_mixed --epochs 3.0 --arms-from bench/results/research_sets_rank_state.json \
        --out bench/results/research_sets_rank_mixed.md   # run P: half the items once per tool, half once under
        # the default plan; the untrained rows were seeded from run O's state (about 1 h 50 min here)
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsQ --max-steps 1 --explore 0.5 --train-items 128 \
        --tool-rate 1 --arms rank_bal --epochs 3.5 --arms-from bench/results/research_sets_rank_state.json \
        --out bench/results/research_sets_rank_bal.md   # run Q: run O's block again (the same 384 episodes),
        # trained under the balance of the directions that train; the untrained rows come from run O's state
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsR --max-steps 1 --explore 0.5 --train-items 128 \
        --tool-rate 1 --train-seed research-sets-r --eval-items 300 --arms rank_bal --epochs 3.5 \
        --arms-from bench/results/research_sets_rank_bal_state.json --accuracy-first \
        --compare bench/results/research_sets_rank_bal_state.json --out bench/results/research_sets_rank_bal_r.md
        # run R: run Q's recipe on an independent train draw, on 300 held-out items (run Q's 150 and 150 more; the
        # untrained rows of the first 150 come from run Q's state), with the gate's confidence map (about 2 h here)
    .venv/bin/python bench/research_sets.py --workdir /tmp/setsR5 --max-steps 1 --explore 0.5 --train-items 128 \
        --tool-rate 1 --train-seed research-sets-r --eval-items 300 --arms rank_bal --epochs 5 --snapshot-every 30 \
        --arms-from bench/results/research_sets_rank_bal_r_state.json --accuracy-first \
        --compare bench/results/research_sets_rank_bal_r_state.json --out /tmp/setsR5/report.md
        # next (not yet run): run R's block trained ~260 updates, the first-turn probe at every label every 30
        # updates (where does the onset lie on R's draw?), then the 300 items (~2 h 45 min here)
    # the score arm (the default --arms) adds ~112 updates of ~60 s on these two-call episodes here, about 2 h,
    # plus 5 x 15 min of held-out episodes: a lent GPU's job, or a session of its own
    .venv/bin/python bench/research_sets.py --tiny --train-items 6 --eval-items 6 --workdir /tmp/st   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learning_curve as lc
import research_rounds as rr

from agent.config import AgentConfig
from agent.schema import TOOL_NAMES
from market.config import MarketConfig
from rewards.config import RewardsConfig
from rewards.evaluation import spearman
from rewards.intervals import paired_difference
from rewards.labels import quantile_edges, quantile_label, rank_label
from trainer.dataset import label_information

# `dpo`: the product's `trainer.objective = "dpo"` on the block: per item, its best episode preferred over its
# worst (scores >= 0.05 apart), every episode, no label; the same learning rate and 8 pairs per update as the
# SFT recipes' 8 examples, one pair per micro-batch: 4 pairs (8 sequences of ~1000 tokens, with the reference
# pass) took 24 GB and were killed for memory here.
RECIPES = {"score": lc.ARMS["score"], "filtered": rr.SPEC,
           "dpo": {"label_format": "none", "top": 1.0, "epochs": 1.0, "objective": "dpo", "batch_size": 1,
                   "grad_accum": 8},
           "steer": {"label_format": "quantile", "top": 1.0, "epochs": 0.6, "tool_weight": 20.0},
           "rank": {"label_format": "rank", "bins": 3, "top": 1.0, "epochs": 2.0, "tool_weight": 20.0,
                    "decision_from": "correct"}}
# `rank_mixed`: the rank recipe, run on a block made with --tool-rate < 1 (the product's explore_tool_rate): the
# explored items run once per tool and are ranked among themselves, the others run once under the default research
# plan (news first) and get the middle label, as `rank_label` gives an item run once. A separate name so that
# --arms-from can pair it with run O's `rank` on the same held-out items.
RECIPES["rank_mixed"] = dict(RECIPES["rank"])
# `rank_bal`: the rank recipe again, for a rerun of run O's block (--tool-rate 1) after the trainer's balance began
# counting only the directions that train (`decision_from = "correct"`); its own name pairs it with run O's `rank`.
RECIPES["rank_bal"] = dict(RECIPES["rank"])
RANK_ARMS = ("rank", "rank_mixed", "rank_bal")
TARGETS = (1.0, 0.0, 0.5, 0.25, 0.75)  # 1.0 first: a cut run still has the product's setting
CONTROLLED = ("score", "steer", *RANK_ARMS)  # the arms whose label is a target, run at every target


def label_format(arm: str) -> str:
    return "score" if arm == "base" else RECIPES[arm]["label_format"]


def rewards_cfg(arm: str) -> RewardsConfig:
    """The rewards settings an arm's labels are written under (a rank arm's number of ranks)."""
    bins = {} if arm == "base" or "bins" not in RECIPES[arm] else {"quantile_bins": RECIPES[arm]["bins"]}
    return RewardsConfig(label_format=label_format(arm), **bins)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--train-items", type=int, default=128, help="items of the train block (x3 episodes)")
    p.add_argument("--train-seed", default="research-sets")
    p.add_argument("--eval-items", type=int, default=150)
    p.add_argument("--ctrl-items", type=int, default=60,
                   help="held-out items a controlled arm answers at targets other than 1 (a seeded subset)")
    p.add_argument("--gate-items", type=int, default=100,
                   help="gate-region items each arm trained here answers at target 1: its confidence map is fitted on "
                        "them, as the product's gate does, and the report gives ECE as stated and as published (0: none)")
    p.add_argument("--max-steps", type=int, default=2, help="agent.max_steps: tool calls before a forced prediction")
    p.add_argument("--explore", type=float, default=0.3, help="agent.explore_rate (directions) of the train block")
    p.add_argument("--tool-rate", type=float, default=1.0,
                   help="agent.explore_tool_rate of the train block: the share of items run once per tool; the rest "
                        "run once under the product's default research plan (news first)")
    p.add_argument("--arms", default="score,filtered")
    p.add_argument("--base-from", metavar="STATE", help="a research_rounds state whose round-0 eval rows are the base")
    p.add_argument("--arms-from", metavar="STATE",
                   help="an earlier research_sets state: its trained arms not in --arms (their train summary, held-out "
                        "rows and probe) join the report, paired on the same held-out items")
    p.add_argument("--accuracy-first", action="store_true",
                   help="after training, answer target 1 on every held-out item and the gate items first, then the "
                        "controllability subset and the probes (a run short of time keeps the accuracy interval)")
    p.add_argument("--compare", metavar="STATE",
                   help="an earlier research_sets state: its arms trained there (not imported) are paired with this "
                        "run's same arm and target on the held-out items both answered (a replication on another "
                        "train block)")
    p.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                   help="save each trained arm's adapter every N updates and, after its round, probe the first turn at "
                        "every label at each snapshot (the research onset along the round; 0: none)")
    p.add_argument("--snapshot-items", type=int, default=30,
                   help="held-out items the snapshot probe reads (the seeded controllability subset)")
    p.add_argument("--generate-only", action="store_true",
                   help="write (or keep) the train block and the report, then stop: train later, resuming the workdir")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random model from tests/ (smoke run, numbers mean nothing)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--epochs", type=float, default=None, help="override the trained arms' recipe epochs")
    lc.shared_args(p, "research_sets.md")
    args = lc.settle_out(p.parse_args(argv), "research_sets.md")
    args.loss_on, args.decision_weight, args.balance = "weighted", 20.0, True  # as runs J and K
    return args


def agent_cfg(args, model_dir: str, *, train: bool) -> AgentConfig:
    """Free tool choice on held-out items; in the train block --tool-rate of the items run once per tool (`each`),
    the rest once under the product's default research plan."""
    plan = AgentConfig().research_plan if train else []
    return AgentConfig(model=model_dir, device="cpu", research_plan=plan, max_steps=args.max_steps, min_tool_calls=1,
                       temperature=0.0, explore_rate=args.explore if train else 0.0,
                       explore_tool_rate=args.tool_rate if train else 0.0, explore_tool_mode="each",
                       max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                       max_batch_size=args.concurrency, max_repairs=1)


def key3(r: dict) -> tuple[str, str, str]:
    return (*lc.item_key(r), r["explore_tool"] or "model")


def generate(args, st: lc.State, market, split, model_dir: str, work: Path) -> None:
    from store.db import open_store

    db = work / "gen.db"
    if db.exists():
        db.unlink()
    engine = open_store(f"sqlite:///{db}")
    items = lc.fresh_draw(market, split, args.train_items, args.train_seed, set())
    bid, rows, seconds = lc.write_block(args, engine, market, model_dir, items, label_format="none",
                                        cfg=agent_cfg(args, model_dir, train=True))
    rows = rr.with_tools(engine, bid, rows)
    engine.dispose()
    st.data["generate"] = {"block_id": bid, "seconds": seconds, **lc.data_stats(market, rows), "rows": rows}
    st.save()
    lc.log(f"generate: {len(rows)} episodes in {seconds / 60:.1f} min")


def heldout_items(args, market, split, n: int | None = None, region: str = "eval") -> list:
    """Run K's held-out items; with n, a seeded subset of them (the same for every arm and target). Region
    `gate` gives learning_curve.py's gate items instead (disjoint from both, embargoed), where a trained arm's
    confidence map is fitted."""
    if region == "gate":
        return lc.region_items(market, split, "gate", args.gate_items)
    items = lc.region_items(market, split, "eval", args.eval_items)
    if n is None or n >= len(items):
        return items
    keep = set(random.Random("sets-ctrl").sample(range(len(items)), n))
    return [it for i, it in enumerate(items) if i in keep]


def same_label(st: lc.State, arm: str, target: float, part: str) -> str | None:
    """An earlier target of `arm` whose label is this target's (3 ranks over 5 targets: 0.25 reads `Rank: 1/3`
    as 0 does, 0.75 `Rank: 3/3` as 1 does), in st.data[part]: the same prompts, so the same greedy answers."""
    from rewards.labels import target_label

    if arm == "base":
        return None
    mine = target_label(target, rewards_cfg(arm))
    for t in TARGETS:
        key = arm if part == "probe" and t == 1.0 else lc.run_key(arm, t)
        if t != target and target_label(t, rewards_cfg(arm)) == mine and key in st.data.get(part, {}):
            return key
    return None


def evaluate(args, st: lc.State, market, split, model_dir: str, work: Path, arm: str, target: float,
             n: int | None = None, region: str = "eval") -> None:
    """One arm at one target on the held-out items (greedy, free tool choice), as run K's rounds; with n, on the
    seeded --ctrl-items subset. Items the arm already answered at this target are kept, not run again, so a
    subset run is later completed to the whole set under the same key."""
    from agent.runner import run_block
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending
    from store.db import open_store

    key = lc.run_key(arm, target, region)
    ev = st.data.setdefault("eval", {})
    done = {(r["ticker"], str(r["as_of"])[:10]) for r in ev.get(key, {}).get("rows", [])}
    items = [it for it in heldout_items(args, market, split, n, region) if (it[0], str(it[1])[:10]) not in done]
    if not items:
        return
    twin = same_label(st, arm, target, "eval") if region == "eval" else None
    if twin is not None:  # the same label: its greedy episodes are this target's, copied, not run again
        want = {(t, str(a)[:10]) for t, a in items}
        rows = [r for r in ev[twin]["rows"] if (r["ticker"], str(r["as_of"])[:10]) in want]
        if len(rows) == len(want):
            old = ev.get(key, {"seconds": 0.0, "rows": []})
            ev[key] = {"seconds": old["seconds"], "rows": old["rows"] + rows, "copied_from": twin}
            st.save()
            lc.log(f"eval {key}: the label of {twin}, its {len(rows)} answers copied")
            return
    engine = open_store(f"sqlite:///{work / 'eval.db'}")
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, batch_wait_ms=20)
    try:
        if arm != "base":
            policy.load_adapter(st.data["train"][arm]["path"], 1)
        t0 = time.perf_counter()
        bid = run_block(engine, policy, market, agent_cfg(args, model_dir, train=False),
                        rewards_cfg(arm), kind=region, items=items, size=len(items),
                        target_score=target, progress=False, horizon=market.horizon_days)
        resolve_pending(engine, market, RewardsConfig())
        rows = rr.with_tools(engine, bid, lc.block_rows(engine, bid))
    finally:
        policy.close()
        engine.dispose()
    old = ev.get(key, {"seconds": 0.0, "rows": []})
    ev[key] = {"seconds": old["seconds"] + time.perf_counter() - t0, "rows": old["rows"] + rows}
    st.save()
    lc.log(f"eval {key} ({len(ev[key]['rows'])} items): {rr.reading(rows)}")


def probe(args, st: lc.State, market, split, model_dir: str, arm: str, target: float = 1.0) -> None:
    """How far an arm moved the first tool choice, below what greedy decoding shows: on each held-out item's
    first turn (the same system and task messages as its eval episode), the probability that the call starts
    with `search` (search_news) rather than `get` (get_prices, get_market_context), renormalized over the two."""
    from policy.local import LocalPolicy
    from rewards.labels import target_label

    key = arm if target == 1.0 else lc.run_key(arm, target)
    twin = same_label(st, arm, target, "probe")
    if twin is not None:
        st.data["probe"][key] = dict(st.data["probe"][twin])
        st.save()
        lc.log(f"probe {key}: the label of {twin}, copied")
        return
    items = heldout_items(args, market, split)
    label = target_label(target, rewards_cfg(arm))
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=1)
    try:
        if arm != "base":
            policy.load_adapter(st.data["train"][arm]["path"], 1)
        out = first_turn_news(policy, market, items, label)
    finally:
        policy.close()
    st.data.setdefault("probe", {})[key] = out
    st.save()
    lc.log(f"probe {key}: mean P(search_news first) = {lc.mean(list(out.values())):.3f}")


def first_turn_news(policy, market, items: list, label: str) -> dict[str, float]:
    """Per item ({ticker|as_of: p}): P(the first call starts with `search` rather than `get`) on the item's first
    turn under `label`, renormalized over the two, with whatever adapter `policy` serves."""
    from agent.prompts import system_prompt, user_prompt

    out = {}
    for ticker, as_of in items:
        msgs = [{"role": "system", "content": system_prompt()},
                {"role": "user", "content": user_prompt(ticker, as_of, market.horizon_days, label)}]
        lp = policy.choice_logprobs(msgs, '{"tool": "', ("search", "get"))
        out[f"{ticker}|{as_of.isoformat()}"] = 1 / (1 + math.exp(lp["get"] - lp["search"]))
    return out


def arm_labels(arm: str) -> list[str]:
    """The distinct labels an arm is run under, lowest target first (3 ranks over the 5 targets: 3 labels)."""
    from rewards.labels import target_label

    targets = sorted(TARGETS) if arm in CONTROLLED else [1.0]
    return list(dict.fromkeys(target_label(t, rewards_cfg(arm)) for t in targets))


def snapshot_probe(args, st: lc.State, market, split, model_dir: str, arm: str) -> None:
    """The research onset along one round: the first-turn probe at each of the arm's labels on --snapshot-items
    held-out items (the seeded controllability subset), for the untrained model (update 0), every adapter
    snapshot (--snapshot-every) and the round's final adapter. One probe costs seconds per item, where a
    held-out evaluation costs a quarter of an hour, so the curve says where a behaviour sets in before a
    300-item evaluation is spent on it. Saved after each adapter, so a cut run keeps what it read."""
    from policy.local import LocalPolicy

    tr = st.data["train"][arm]
    adapters = {"0": None, **tr.get("snapshots", {}), str(tr.get("steps") or "final"): tr["path"]}
    items = heldout_items(args, market, split, args.snapshot_items)
    done = st.data.setdefault("snapshot_probe", {}).setdefault(arm, {})
    if all(updates in done for updates in adapters):
        return
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=1)
    try:
        for updates, path in adapters.items():
            if updates in done:
                continue
            policy.load_adapter(path, None if path is None else 1)
            done[updates] = {label: first_turn_news(policy, market, items, label) for label in arm_labels(arm)}
            st.save()
            lc.log(f"snapshot probe {arm} @ {updates}: " + ", ".join(
                f"{label} {lc.mean(list(ps.values())):.3f}" for label, ps in done[updates].items()))
    finally:
        policy.close()


def snapshot_lines(args, st: lc.State) -> list[str]:
    """The onset table: per adapter along the round, mean P(search_news first) at each label and the paired
    top - bottom label effect (95% interval resampling dates)."""
    lines = []
    for arm, reads in st.data.get("snapshot_probe", {}).items():
        labels = arm_labels(arm)
        n = len(next(iter(reads.values()))[labels[0]]) if reads else 0
        lines += ["", (f"Research onset along `{arm}`'s round: mean P(search_news first) on the first turn of {n} "
                       "held-out items at each label, for the untrained model (0), each adapter snapshot and the "
                       "round's final adapter; effect = top - bottom label, paired by item:"), "",
                  "| updates | " + " | ".join(f"`{label}`" for label in labels) + " | effect top - bottom |",
                  "|---|" + "---|" * len(labels) + "---|"]
        for updates, by_label in reads.items():
            means = [lc.fmt(lc.mean(list(by_label[label].values()))) for label in labels]
            eff = "-"
            if len(labels) > 1:
                top, bottom = by_label[labels[-1]], by_label[labels[0]]
                d = paired_difference(top, bottom, lambda k: k.split("|")[1], n_boot=args.boot)
                eff = "-" if d is None or d.low is None else f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
            lines.append(f"| {updates} | " + " | ".join(means) + f" | {eff} |")
    return lines


def import_arms(st: lc.State, source: Path, skip: set[str], args: argparse.Namespace | None = None) -> None:
    """Copy an earlier run's trained arms (train summary, held-out rows, probe) that this run does not train:
    the same held-out items, so the report pairs them with this run's arms. Their adapters are not copied, so
    an imported arm is reported, never evaluated again. The untrained agent's rows come too when the earlier
    run answered the same held-out items with the same tool budget (the base model is the same and greedy, so
    re-running them would repeat ~6 minutes for the same answers). With more --eval-items than the earlier run,
    its items are a subset of this run's (`draw_items` is prefix-stable), so its untrained rows are kept and
    `evaluate` answers only the rest; the untrained probe, which covers every held-out item, is then run anew."""
    old = json.loads(source.read_text())
    base = lc.run_key("base", 1.0)
    same_items = False
    if args is not None:
        then = parse_args(shlex.split(old.get("command", "")))
        alike = (then.max_steps, then.model) == (args.max_steps, args.model)
        same_items = alike and then.eval_items == args.eval_items
        if alike and then.eval_items <= args.eval_items and base in old.get("eval", {}) \
                and base not in st.data.get("eval", {}):
            st.data.setdefault("eval", {})[base] = {**old["eval"][base], "from": str(source)}
    for arm, tr in old.get("train", {}).items():
        if arm in skip or arm in st.data.get("train", {}):
            continue
        st.data.setdefault("train", {})[arm] = {**tr, "from": str(source)}
        for key, run in old.get("eval", {}).items():
            if key.split("@")[0] == arm:
                st.data.setdefault("eval", {})[key] = {**run, "from": str(source)}
        for key, probed in old.get("probe", {}).items():  # the arm's probe at every target it was run at
            if key.split("@")[0] == arm:
                st.data.setdefault("probe", {})[key] = probed
    if same_items and "base" in old.get("probe", {}) and "base" not in st.data.get("probe", {}):
        st.data.setdefault("probe", {})["base"] = old["probe"]["base"]
    st.save()


# ---- report --------------------------------------------------------------------------------------


def diff_line(name: str, fig: str, a: dict, b: dict, boot: int, cluster=lc.on_date) -> str | None:
    d = paired_difference(a, b, cluster, n_boot=boot)
    if d is None or d.low is None:
        return None
    return f"| {name} | {fig} | {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {d.n_items} | {d.n_clusters} |"


def quartile_of(rows: list[dict]) -> dict[tuple, int]:
    """Each scored episode's reward quartile in its block (4 = the top quartile, as top_cut draws it)."""
    scored = sorted(r["composite"] for r in rows if r["composite"] is not None)
    cuts = [scored[int(q * len(scored))] for q in (0.25, 0.5, 0.75)]
    return {key3(r): 1 + sum(r["composite"] >= c for c in cuts) for r in rows if r["composite"] is not None}


def quintile_lines(rows: list[dict], tools: list[str]) -> list[str]:
    """What the steer arm's labels say about research: its label is the episode's quintile of the block's
    rewards (`Quantile: k/5`, the trainer's own edges); per label, which first call the episodes made."""
    scored = [r for r in rows if r["composite"] is not None]
    if not scored:
        return []
    edges = quantile_edges([r["composite"] for r in scored], 5)
    by_label: dict[str, list[dict]] = {}
    for r in scored:
        by_label.setdefault(quantile_label(r["composite"], edges), []).append(r)
    intro = (f"The steer arm's labels (quintiles of this block's rewards, edges {', '.join(f'{e:.3f}' for e in edges)}): "
             "the first call of the episodes under each label.")
    return label_table(by_label, tools, intro, "accuracy")


def first_call(r: dict) -> str | None:
    """The episode's first tool: the explored one, or what the default plan (an item run once) called."""
    return r["explore_tool"] or next(iter(r.get("tools") or []), None)


def label_table(by_label: dict[str, list[dict]], tools: list[str], intro: str, right: str) -> list[str]:
    """Per training label: its episodes, mean reward, share of right directions and first tools."""
    lines = ["", intro, "", f"| label | episodes | mean reward | {right} | {' | '.join(tools)} |",
             "|---|---|---|---|" + "---|" * len(tools)]
    for label in sorted(by_label):
        mine = by_label[label]
        shares = " | ".join(rr.pct(sum(first_call(r) == t for r in mine) / len(mine)) for t in tools)
        lines.append(f"| {label} | {len(mine)} | {lc.fmt(lc.mean([r['composite'] for r in mine]))} | "
                     f"{lc.fmt(lc.mean([r['correct'] for r in mine if r['correct'] is not None]))} | {shares} |")
    pairs = [(label, first_call(r) or "none") for label, mine in by_label.items() for r in mine]
    news = [(label, str(tool == "search_news")) for label, tool in pairs]
    return [*lines, "", (f"The labels carry **{label_information(pairs):.3f} nats** about the first call (the "
                         f"trainer's `label_research`), {label_information(news):.3f} about whether it was "
                         "search_news (before balance copies).")]


def rank_lines(rows: list[dict], tools: list[str], bins: int = 3) -> list[str]:
    """What the rank arm's labels say: each episode's rank among its item's episodes (`Rank: k/3`, as the
    trainer's item_ranks and rank_label write it), the first call of the episodes under each label, and how
    many of them keep their decision's loss under `decision_from = "correct"`."""
    scored = [r for r in rows if r["composite"] is not None]
    groups: dict[tuple, list[dict]] = {}
    for r in scored:
        groups.setdefault(lc.item_key(r), []).append(r)
    by_label: dict[str, list[dict]] = {}
    shared: dict[str, list[dict]] = {}  # items whose episodes all wrote one direction: research alone ranks them
    n_shared = 0
    for group in groups.values():
        one_direction = len(group) > 1 and len({r["direction"] for r in group}) == 1
        n_shared += one_direction
        for r in group:
            label = rank_label(sum(g["composite"] < r["composite"] for g in group), len(group), bins)
            by_label.setdefault(label, []).append(r)
            if one_direction:
                shared.setdefault(label, []).append(r)
    if not by_label:
        return []
    intro = ("The rank arm's labels (each episode's reward rank among its item's episodes; ties share the lower "
             "rank): the first call of the episodes under each label, and the share whose direction came true "
             "(the decisions `decision_from = \"correct\"` trains).")
    lines = label_table(by_label, tools, intro, "direction right")
    if shared:
        lines += label_table(shared, tools, (
            f"The same labels on the {n_shared} items whose episodes all wrote one "
            "direction (an explored item, or the same greedy answer after every tool): there the research alone "
            "sets the rank, so this is what the labels would say if every item's direction were explored."),
            "direction right")
    return lines


def block_section(args, market, rows: list[dict]) -> list[str]:
    tools = [t for t in TOOL_NAMES if any(r["explore_tool"] == t for r in rows)]
    quart = quartile_of(rows)
    items: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        items.setdefault(lc.item_key(r), {})[r["explore_tool"] or "model"] = r
    wins: Counter = Counter()
    for by_tool in items.values():  # the item's best research choice; a tie shares the win
        if len(by_tool) < 2:
            continue  # an item run once has no choice to win
        scored = {t: r["composite"] for t, r in by_tool.items() if r["composite"] is not None}
        if scored:
            best = max(scored.values())
            top = [t for t, v in scored.items() if v == best]
            for t in top:
                wins[t] += 1 / len(top)
    n_items = sum(wins.values()) or 1
    once = [r for r in rows if r["explore_tool"] is None]
    lines = ["## The train block: every tool on the same items", "",
             (f"{len(items) - len(once)} train-region items x {len(tools)} research choices"
              f"{f' + {len(once)} items run once under the default research plan (news first)' if once else ''}"
              f" = {len(rows)} episodes by the base "
              f"agent (greedy, {args.explore} of the items' directions explored: an explored item's episodes share its "
              "drawn direction); the named tool is the first call"
              f"{', then the model may call one more' if args.max_steps == 2 else ''}"
              f"{f', then the model may call up to {args.max_steps - 1} more' if args.max_steps > 2 else ''}. "
              "`top quartile` is what "
              "the filtered recipe trains on and the score recipe repeats; `quartile k` = the episodes whose reward "
              "is in the block's k-th quartile, i.e. the label the score recipe gives them; `best on its item` = the "
              "share of items where this tool's episode earned the most (ties shared)."), "",
             ("| first call | episodes | read news | accuracy | acc, signal visible | mean reward | share of: quartile "
              "1 / 2 / 3 / top quartile | best on its item |"), "|---|---|---|---|---|---|---|---|"]
    def row(name: str, mine: list[dict], shares: str, wins_share: str) -> str:
        vis = [r for r in mine if lc.visible_signal(market, r) and r["correct"] is not None]
        return (f"| {name} | {len(mine)} | {rr.pct(lc.mean([r['read_news'] for r in mine]))} | "
                f"{lc.fmt(lc.mean([r['correct'] for r in mine if r['correct'] is not None]))} | "
                f"{lc.fmt(lc.mean([r['correct'] for r in vis]))} (n={len(vis)}) | "
                f"{lc.fmt(lc.mean([r['composite'] for r in mine]))} | {shares} | {wins_share} |")

    for t in tools:
        shares = []
        for q in (1, 2, 3, 4):
            in_q = [k for k, v in quart.items() if v == q]
            shares.append(rr.pct(sum(k[2] == t for k in in_q) / len(in_q)) if in_q else "-")
        lines.append(row(t, [r for r in rows if r["explore_tool"] == t], " / ".join(shares),
                         rr.pct(wins[t] / n_items)))
    if once:
        lines.append(row("default plan, item run once", once, "-", "-"))
    lines += quintile_lines(rows, tools)
    if set(RANK_ARMS) & set(args.arms.split(",")):
        lines += rank_lines(rows, tools)
    lines += ["", "Paired on the same items (95% interval resampling dates):", "",
              "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
    col = {t: {k: v[t] for k, v in items.items() if t in v} for t in tools}
    for a, b in (("search_news", "get_prices"), ("search_news", "get_market_context"),
                 ("get_prices", "get_market_context")):
        if a not in col or b not in col:
            continue
        vis = {k for k, r in col[a].items() if lc.visible_signal(market, r)}
        for fig, c, keys in (("mean reward", "composite", None), ("accuracy", "correct", None),
                             ("acc, signal visible", "correct", vis)):
            line = diff_line(f"{a} - {b}", fig,
                             {k: r[c] for k, r in col[a].items() if keys is None or k in keys},
                             {k: r[c] for k, r in col[b].items()}, args.boot)
            if line:
                lines.append(line)
    return [*lines, ""]


def heldout_section(args, st: lc.State, market) -> list[str]:
    ev = st.data.get("eval", {})
    runs = [k for k in (lc.run_key("base", 1.0), *(lc.run_key(a, t) for a in RECIPES for t in TARGETS))
            if k in ev]
    if not runs:
        return []
    lines = [f"## Held-out items ({len(ev[runs[0]]['rows'])}, run K's; greedy, free tool choice)", "",
             ("| agent @ target | read news | first tool | signal headline in context (visible-signal items) | "
              "accuracy | acc, signal visible | mean reward | answers | min |"), "|---|---|---|---|---|---|---|---|---|"]
    for key in runs:
        rows = ev[key]["rows"]
        rd = rr.reading(rows)
        vis = [r for r in rows if lc.visible_signal(market, r)]
        dirs = Counter(r["direction"] for r in rows if r["direction"])
        lines.append(f"| {key} | **{rr.pct(rd['read_news'])}** | {rr.tools_text(rd['first_tool'])} | "
                     f"{rr.pct(lc.mean([r['signal_in_context'] for r in vis]))} (n={len(vis)}) | "
                     f"{lc.fmt(lc.mean([r['correct'] for r in rows if r['correct'] is not None]))} | "
                     f"{lc.fmt(lc.mean([r['correct'] for r in vis if r['correct'] is not None]))} | "
                     f"{lc.fmt(lc.mean([r['composite'] for r in rows]))} | "
                     f"{' '.join(f'{d} {n}' for d, n in dirs.most_common())} | {ev[key]['seconds'] / 60:.1f} |")
    by = {k: {lc.item_key(r): r for r in ev[k]["rows"]} for k in runs}
    key = {name: lc.run_key(a, t) for name, a, t in (("base", "base", 1.0), ("s1", "score", 1.0),
                                                       ("f1", "filtered", 1.0), ("s0", "score", 0.0),
                                                       ("d1", "dpo", 1.0), ("t1", "steer", 1.0), ("t0", "steer", 0.0),
                                                       ("r1", "rank", 1.0), ("r0", "rank", 0.0),
                                                       ("m1", "rank_mixed", 1.0), ("m0", "rank_mixed", 0.0),
                                                       ("q1", "rank_bal", 1.0), ("q0", "rank_bal", 0.0))}
    lines += ["", "Paired differences (same items; 95% interval resampling dates):", "",
              "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
    for a, b in (("s1", "base"), ("f1", "base"), ("d1", "base"), ("t1", "base"), ("s1", "f1"), ("d1", "f1"),
                 ("t1", "f1"), ("s1", "s0"), ("t1", "t0"), ("r1", "base"), ("r1", "r0"), ("m1", "base"),
                 ("m1", "m0"), ("m1", "r1"), ("q1", "base"), ("q1", "q0"), ("q1", "r1")):
        a, b = key[a], key[b]
        if a in by and b in by:
            for c, fig in (("read_news", "read news"), ("correct", "accuracy"), ("composite", "mean reward")):
                line = diff_line(f"{a} - {b}", fig, {k: r[c] for k, r in by[a].items()},
                                 {k: r[c] for k, r in by[b].items()}, args.boot)
                if line:
                    lines.append(line)
    lines += compare_lines(args, ev, runs, by)
    probes = st.data.get("probe", {})
    if probes:
        lines += ["", ("First-turn probe (each held-out item's first turn at the agent's target, 1.0 where none is "
                       "named: the probability that the call starts with `search`, i.e. search_news, rather than `get`, "
                       "renormalized over the two; greedy decoding calls search_news only where it is above 0.5):"), "",
                  "| agent | mean P(search_news first) | items above 0.5 | lowest / median / highest |", "|---|---|---|---|"]
        for arm, ps in probes.items():
            v = sorted(ps.values())
            lines.append(f"| {arm} | {v and lc.fmt(sum(v) / len(v))} | {sum(x > 0.5 for x in v)} of {len(v)} | "
                         f"{lc.fmt(v[0])} / {lc.fmt(v[len(v) // 2])} / {lc.fmt(v[-1])} |")
    lines += calibration_lines(args, st, market)
    for arm in CONTROLLED:
        lines += control_lines(arm, by, probes)
    copies = {k: v["copied_from"] for k, v in ev.items() if "copied_from" in v}
    if copies:
        lines += ["", ("Targets that share a label give the same prompts, so their greedy answers and probe are copied "
                       "from the target run first, not run again: "
                       f"{', '.join(f'{k} = {v}' for k, v in sorted(copies.items()))}.")]
    return lines


def calibration_lines(args, st: lc.State, market) -> list[str]:
    """Calibration at target 1, as stated and as the product publishes it: each arm trained here has its
    confidence map fitted on its gate-region answers (`lc.arm_confidence_map`, the product's gate fit), applied to
    its held-out answers; the composite is rescored for the calibration component alone, as in learning_curve.py."""
    ev = st.data.get("eval", {})
    base = ev.get(lc.run_key("base", 1.0))
    arms = [k.split("@")[0] for k in ev if k.endswith("@1.00|gate")]
    if not arms or base is None:
        return []
    lines = ["", ("Calibration at target 1 on the held-out items: `(mapped)` = the answers as published once the arm's "
                  f"confidence map, fitted on its {args.gate_items} gate-region answers as the product's gate does, is "
                  "applied (direction and accuracy unchanged; the composite rescored for calibration):"), "",
             "| agent | gate accuracy | map: stated -> published | Brier | ECE | mean reward |", "|---|---|---|---|---|---|"]
    scored = [r for r in base["rows"] if r["correct"] is not None]
    lines.append(f"| base (stated) | - | - | {lc.fmt(lc.brier(scored))} | {lc.fmt(lc.ece(scored))} | "
                 f"{lc.fmt(lc.mean([r['composite'] for r in base['rows']]))} |")
    pairs = []
    for arm in arms:
        stated = ev.get(lc.run_key(arm, 1.0))
        if stated is None:
            continue
        cmap = lc.arm_confidence_map(st, arm)
        gate = ev[lc.run_key(arm, 1.0, "gate")]["rows"]
        knots = "-" if cmap is None else ", ".join(
            f"{x:.2f}->{y:.2f}" for x, y in zip(cmap.stated, cmap.calibrated, strict=True))
        gate_acc = lc.fmt(lc.mean([r["correct"] for r in gate if r["correct"] is not None]))
        published = lc.as_published(stated["rows"], cmap)
        for name, rows in ((f"{arm} (stated)", stated["rows"]), (f"{arm} (mapped)", published)):
            ok = [r for r in rows if r["correct"] is not None]
            lines.append(f"| {name} | {gate_acc} | {knots} | {lc.fmt(lc.brier(ok))} | {lc.fmt(lc.ece(ok))} | "
                         f"{lc.fmt(lc.mean([r['composite'] for r in rows]))} |")
        pairs.append((f"{arm} (mapped)", published))
    lines += ["", "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
    theirs = {lc.item_key(r): r["composite"] for r in base["rows"]}
    for name, rows in pairs:
        line = diff_line(f"{name} - base", "mean reward", {lc.item_key(r): r["composite"] for r in rows}, theirs,
                         args.boot)
        if line:
            lines.append(line)
    return lines


def compare_lines(args, ev: dict, runs: list[str], by: dict[str, dict]) -> list[str]:
    """This run's trained arms against the same arm and target of --compare, trained there on its own block: how
    far a result moves between two train draws of one recipe, paired on the held-out items both answered."""
    if not args.compare:
        return []
    other = json.loads(Path(args.compare).read_text()).get("eval", {})
    keys = [k for k in runs if not k.startswith("base@") and "from" not in ev[k]
            and k in other and "from" not in other[k]]
    if not keys:
        return []
    lines = ["", (f"This run's arms against the same arm of `{args.compare}` (trained there on another block; "
                  "the held-out items both answered, 95% interval resampling dates):"), "",
             "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
    for k in keys:
        theirs = {lc.item_key(r): r for r in other[k]["rows"]}
        for c, fig in (("read_news", "read news"), ("correct", "accuracy"), ("composite", "mean reward")):
            line = diff_line(f"{k} - {k} there", fig, {i: r[c] for i, r in by[k].items()},
                             {i: r[c] for i, r in theirs.items()}, args.boot)
            if line:
                lines.append(line)
    return lines


def control_lines(arm: str, by: dict[str, dict], probes: dict[str, dict]) -> list[str]:
    """Controllability of a labelled arm: per target, on the items every target answered (target 1 answers all
    the held-out items, the others a seeded subset), the realized mean reward, accuracy, news share and the
    probe; Spearman of each against the target."""
    runs = [(t, by[lc.run_key(arm, t)]) for t in sorted(TARGETS) if lc.run_key(arm, t) in by]
    if len(runs) < 2:
        return []
    common = set.intersection(*(set(rows) for _, rows in runs))
    lines = ["", (f"Controllability of `{arm}` ({len(runs)} targets, the same {len(common)} items; P(search_news "
                  "first) over all held-out items):"), "",
             "| target | mean reward | accuracy | read news | answers | mean P(search_news first) |", "|---|---|---|---|---|---|"]
    xs, ys, news, ps = [], [], [], []
    for t, rows in runs:
        mine = [rows[k] for k in sorted(common)]
        probe_key = arm if t == 1.0 else lc.run_key(arm, t)
        p = lc.mean(list(probes.get(probe_key, {}).values()))
        xs.append(t)
        ys.append(lc.mean([r["composite"] for r in mine]) or 0.0)
        news.append(lc.mean([r["read_news"] for r in mine]) or 0.0)
        ps.append(p)
        dirs = Counter(r["direction"] for r in mine if r["direction"])
        lines.append(f"| {t:.2f} | {lc.fmt(ys[-1])} | {lc.fmt(lc.mean([r['correct'] for r in mine if r['correct'] is not None]))} "
                     f"| {rr.pct(news[-1])} | {' '.join(f'{d} {n}' for d, n in dirs.most_common())} | {lc.fmt(p)} |")
    with_p = [(x, p) for x, p in zip(xs, ps, strict=True) if p is not None]
    lines += ["", (f"Spearman(target, realized mean reward) = **{lc.fmt(spearman(xs, ys), 2)}** (target >= 0.9); "
                   f"Spearman(target, share that read news) = {lc.fmt(spearman(xs, news), 2)}; Spearman(target, "
                   f"P(search_news first)) = {lc.fmt(spearman(*zip(*with_p)), 2) if len(with_p) >= 2 else '-'}."), ""]
    return lines


def report(args, st: lc.State, market) -> str:
    lines = ["# Every research choice on the same item: does reward teach the research, does the label steer it?", "",
             f"Command: `.venv/bin/python bench/research_sets.py {st.data.get('command', '')}`", "",
             (f"Synthetic market, seed {MarketConfig().synthetic.seed} (unchanged). Held-out items: free tool choice "
              f"(`agent.research_plan = []`, 1 to {args.max_steps} calls), greedy, no exploration"
              + (f"; the base rows are run K's (`{args.base_from}`)." if args.base_from else ".")), ""]
    gen = st.data.get("generate")
    if gen:
        lines += block_section(args, market, gen["rows"])
        lines.append(f"Written in {gen['seconds'] / 60:.0f} min.")
        for arm, tr in st.data.get("train", {}).items():
            unit = "pairs" if RECIPES[arm].get("objective") == "dpo" else "examples"
            spec = {**RECIPES[arm], "lr": RECIPES[arm].get("lr", args.lr),
                    **({"epochs": args.epochs} if args.epochs and not tr.get("from") else {})}  # as trained here
            lines.append(f"- train `{arm}` ({spec}): {tr['n_examples']} {unit}, {tr['steps']} logged "
                         f"steps, loss {lc.fmt(tr['loss_first'])} -> {lc.fmt(tr['loss_last'])}, "
                         f"{tr['seconds'] / 60:.0f} min" + (f" (from `{tr['from']}`)" if tr.get("from") else ""))
        lines += [*snapshot_lines(args, st), ""]
    lines += heldout_section(args, st, market)
    return "\n".join(lines) + "\n"


def answer_arm(args, st: lc.State, market, split, model_dir: str, work: Path, arm: str) -> None:
    """A trained arm's probes and held-out answers, saved and reported after each step. By default the probe
    first (minutes, where each target's episodes take a quarter of an hour), then a controlled arm's seeded
    subset at every target (a cut run still has its controllability), then target 1 completed to every held-out
    item (the pairs with the other arms), then the gate items (the confidence map's fit). --accuracy-first puts
    target 1 and the gate first."""
    targets = TARGETS if arm in CONTROLLED else (1.0,)
    probes = [("probe", t, None, "eval") for t in targets]
    control = [("eval", t, args.ctrl_items, "eval") for t in targets if len(targets) > 1]
    pairs = [("eval", 1.0, None, "eval"), *([("eval", 1.0, None, "gate")] if args.gate_items > 0 else [])]
    for what, t, n, region in (pairs + control + probes) if args.accuracy_first else (probes + control + pairs):
        if what == "probe":
            if (arm if t == 1.0 else lc.run_key(arm, t)) in st.data.get("probe", {}):
                continue
            probe(args, st, market, split, model_dir, arm, t)
        else:
            evaluate(args, st, market, split, model_dir, work, arm, t, n, region)
        Path(args.out).write_text(report(args, st, market))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = rr.start(args, argv, report)
    if started is None:
        return
    work, st, market, split, model_dir = started
    ev = st.data.setdefault("eval", {})
    base = lc.run_key("base", 1.0)
    if base not in ev and args.base_from:
        rows = json.loads(Path(args.base_from).read_text())["rounds"]["0"]["eval"]
        ev[base] = {"seconds": rows["seconds"], "rows": rows["rows"], "from": args.base_from}
        st.save()
    if args.arms_from:
        import_arms(st, Path(args.arms_from), skip=set(args.arms.split(",")), args=args)
    evaluate(args, st, market, split, model_dir, work, "base", 1.0)  # runs only what is missing
    if "generate" not in st.data:
        generate(args, st, market, split, model_dir, work)
    Path(args.out).write_text(report(args, st, market))
    if args.generate_only:
        return
    for arm in args.arms.split(","):
        if arm not in st.data.get("train", {}):
            spec = {**RECIPES[arm], **({"epochs": args.epochs} if args.epochs else {})}
            lc.train(args, st, arm, model_dir, work, spec=spec)
        if args.snapshot_every > 0:
            snapshot_probe(args, st, market, split, model_dir, arm)
            Path(args.out).write_text(report(args, st, market))
        answer_arm(args, st, market, split, model_dir, work, arm)
    if "base" not in st.data.get("probe", {}):
        probe(args, st, market, split, model_dir, "base")
    Path(args.out).write_text(report(args, st, market))
    lc.log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

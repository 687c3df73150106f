"""Learning curve on the synthetic market: does the semi-online loop learn, and does the score steer it?

Arms (each with its own SQLite database and adapters folder, the same market seed per seed):
  score     reward-conditioned SFT, numeric label `Score: 0.83` (target at inference: --target)
  goal      goal-conditioned SFT, `Goal: earn a reward above 0.80` (met goals read `above`)
  uncond    plain SFT on every episode (label_format none: one fixed line, no score)
  filtered  RAFT-style: plain SFT on each block's top quartile only (trainer.filter_top_fraction 0.25)
  none      no training: the base model conditioned on the target, every round

Each round: a train block of --block-size items with the serving adapter -> resolve -> one LoRA SFT
round -> publish (no gate, the same for every arm). Same data budget for every arm (one block per
round) and the same optimizer steps: the filtered arm trains 1/0.25 = 4x the epochs on its quarter.
Round r's figures are measured on round r's block (fresh dates, produced by the adapter trained
r-1 times); after the last round the final adapter runs --eval-items held-out items (the tail of the
history, evaluation/heldout.py) at each of --targets, giving held-out figures and controllability.

    .venv/bin/python bench/learning_curve.py --tiny --rounds 2 --block-size 6 --seeds 0   # smoke run
    .venv/bin/python bench/learning_curve.py --rounds 5 --block-size 100 --seeds 0,1,2    # the real one
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import AgentConfig
from market.config import MarketConfig, SyntheticConfig
from rewards.config import RewardsConfig
from trainer.config import TrainerConfig

ARMS: dict[str, dict] = {
    "score": {"label_format": "score", "train": True, "top": 1.0},
    "goal": {"label_format": "goal", "train": True, "top": 1.0},
    "uncond": {"label_format": "none", "train": True, "top": 1.0},
    "filtered": {"label_format": "none", "train": True, "top": 0.25},
    "none": {"label_format": "score", "train": False, "top": 1.0},
}
FIGS = ("accuracy", "mean_reward", "brier", "ece", "valid")


@dataclass
class RoundRow:
    round: int
    block_id: int
    adapter_version: int | None
    n: int
    accuracy: float | None
    mean_reward: float | None
    brier: float | None
    ece: float | None
    valid: float | None
    always_up_accuracy: float | None
    momentum_accuracy: float | None
    block_s: float
    train_s: float
    train_loss: float | None = None
    own_n: int = 0  # items the policy chose the direction of (not explored)
    own_accuracy: float | None = None
    own_reward: float | None = None


@dataclass
class ArmRun:
    arm: str
    seed: int
    p_star: float
    rounds: list[RoundRow] = field(default_factory=list)
    heldout: dict = field(default_factory=dict)  # figures at the top target on held-out items
    controllability: float | None = None
    per_target: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block-size", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated; each seed is its own synthetic market.")
    p.add_argument("--arms", default=",".join(ARMS), help=f"Comma-separated subset of {','.join(ARMS)}.")
    p.add_argument("--tiny", action="store_true", help="Tiny random model instead of SmolLM2 (smoke run only).")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target", type=float, default=0.95, help="Conditioning target of the train blocks.")
    p.add_argument("--targets", default="0.2,0.6,1.0", help="Held-out eval targets (controllability).")
    p.add_argument("--eval-items", type=int, default=24)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--replay", type=int, default=100, help="Older episodes replayed each round.")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--max-steps", type=int, default=4, help="Agent tool-call budget per episode.")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--explore", type=float, default=0.0,
                   help="agent.explore_rate of the train blocks: share of items with a random direction.")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workdir", default=None, help="Where the per-arm databases and adapters go (default: tmp).")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning_curve.md"))
    return p.parse_args(argv)


OWN_ITEMS_SQL = """
SELECT COUNT(*), AVG(CASE WHEN o.correct THEN 1.0 ELSE 0.0 END), AVG(r.composite)
FROM predictions p JOIN episodes e ON e.id = p.episode_id
JOIN outcomes o ON o.prediction_id = p.id JOIN rewards r ON r.prediction_id = p.id
WHERE p.block_id = :b AND e.explore_direction IS NULL AND p.valid
"""


def run_arm(arm: str, seed: int, args: argparse.Namespace, model_dir: str, workdir: Path) -> ArmRun:
    from sqlalchemy import text

    from agent.runner import run_block
    from evaluation.heldout import run_eval
    from market.sources import build_market
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending
    from store.db import open_store, session_scope
    from store.status import block_summary
    from trainer.registry import publish
    from trainer.round import RoundResult, train_round

    spec = ARMS[arm]
    home = workdir / f"{arm}-s{seed}"
    home.mkdir(parents=True, exist_ok=True)
    db = home / "scoreloop.db"
    for f in home.glob("scoreloop.db*"):
        f.unlink()
    engine = open_store(f"sqlite:///{db}")
    market = build_market(MarketConfig(synthetic=SyntheticConfig(seed=7 + seed)))
    horizon = 5
    agent_cfg = AgentConfig(model=model_dir, device="cpu", target_score=args.target, block_size=args.block_size,
                            concurrency=args.concurrency, max_batch_size=args.concurrency,
                            max_steps=args.max_steps, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, explore_rate=args.explore)
    rewards_cfg = RewardsConfig(label_format=spec["label_format"])
    trainer_cfg = TrainerConfig(
        adapters_dir=str(home / "adapters"), runs_dir=str(home / "runs"), learning_rate=args.lr,
        epochs=args.epochs / spec["top"],  # equal optimizer steps: the filtered arm sees 1/4 of the data
        batch_size=args.batch_size, max_length=args.max_length, replay_size=args.replay, min_new_episodes=1,
        gate_items=0, save_steps=10_000, seed=seed, filter_top_fraction=spec["top"],
    )
    out = ArmRun(arm, seed, market.bayes_accuracy(horizon))
    t_arm = time.monotonic()
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, seed=seed)
    try:
        for r in range(1, args.rounds + 1):
            t0 = time.monotonic()
            bid = run_block(engine, policy, market, agent_cfg, rewards_cfg, size=args.block_size, kind="train",
                            progress=False, horizon=horizon)
            resolve_pending(engine, market, rewards_cfg)
            block_s = time.monotonic() - t0
            with session_scope(engine) as s:
                m = block_summary(s, bid)
                own = s.execute(text(OWN_ITEMS_SQL), {"b": bid}).one()
            row = RoundRow(r, bid, policy.adapter_version, m.n or 0, m.accuracy, m.mean_composite, m.brier, m.ece,
                           m.coverage, m.always_up_accuracy, m.momentum_accuracy, block_s, 0.0,
                           own_n=int(own[0] or 0), own_accuracy=own[1], own_reward=own[2])
            if spec["train"]:
                t1 = time.monotonic()
                res = train_round(engine, trainer_cfg, rewards_cfg, model_dir, device=agent_cfg.device)
                if isinstance(res, RoundResult):
                    publish(engine, res.adapter_version)
                    policy.load_adapter(res.path, res.adapter_version)
                    row.train_loss = statistics.fmean(p["loss"] for p in res.loss_curve) if res.loss_curve else None
                row.train_s = time.monotonic() - t1
            out.rounds.append(row)
            print(f"  {arm:8s} seed {seed} round {r}: acc {_f(row.accuracy)} (own {row.own_n}: "
                  f"{_f(row.own_accuracy)}) reward {_f(row.mean_reward)} "
                  f"Brier {_f(row.brier)} ECE {_f(row.ece)} valid {_f(row.valid)}  block {block_s:.0f}s "
                  f"train {row.train_s:.0f}s loss {_f(row.train_loss)}", flush=True)
        conditioned = spec["label_format"] in ("score", "goal")
        targets = [float(t) for t in args.targets.split(",")] if conditioned else [args.target]
        res = run_eval(engine, policy, market, agent_cfg, rewards_cfg, targets=targets, n_items=args.eval_items,
                       horizon=horizon, progress=False)
        out.controllability = res.spearman
        out.per_target = [asdict(t) for t in res.per_target]
        top = max(range(len(targets)), key=lambda i: targets[i])
        with session_scope(engine) as s:
            m = block_summary(s, res.block_ids[top])
        out.heldout = {"target": targets[top], "accuracy": m.accuracy, "mean_reward": m.mean_composite,
                       "brier": m.brier, "ece": m.ece, "valid": m.coverage,
                       "always_up_accuracy": m.always_up_accuracy, "momentum_accuracy": m.momentum_accuracy}
        print(f"  {arm:8s} seed {seed} held-out: acc {_f(out.heldout['accuracy'])} reward "
              f"{_f(out.heldout['mean_reward'])} Spearman {_f(out.controllability)}", flush=True)
    finally:
        policy.close()
        engine.dispose()
    out.seconds = time.monotonic() - t_arm
    return out


# -- tables -------------------------------------------------------------------------------------

def _f(x: float | None, nd: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _ms(xs: list[float | None]) -> str:
    """mean ± sd over seeds (sd only with 2+ seeds)."""
    v = [x for x in xs if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}"


def tables(runs: list[ArmRun], rounds: int) -> str:
    arms = list(dict.fromkeys(r.arm for r in runs))
    lines = [("### Per round (each round's own train block: fresh dates, produced by the adapter trained r-1 "
              "times; mean ± sd over seeds)"), "",
             ("| arm | round | adapter | direction accuracy | accuracy, own calls | mean reward | Brier | ECE | "
              "valid | train loss |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [r for r in runs if r.arm == arm]
        for k in range(rounds):
            rows = [r.rounds[k] for r in rs if len(r.rounds) > k]
            if not rows:
                continue
            ver = rows[0].adapter_version
            lines.append(f"| {arm} | {k + 1} | {'base' if ver is None else f'v{ver}'} | "
                         f"{_ms([x.accuracy for x in rows])} | {_ms([x.own_accuracy for x in rows])} | "
                         f"{_ms([x.mean_reward for x in rows])} | "
                         f"{_ms([x.brier for x in rows])} | {_ms([x.ece for x in rows])} | "
                         f"{_ms([x.valid for x in rows])} | {_ms([x.train_loss for x in rows])} |")
    lines += ["", "### Held-out after the last round (tail of the history; figures at the highest target)", "",
              ("| arm | direction accuracy | accuracy / p* | mean reward | Brier | ECE | valid | "
               "controllability (Spearman) | always-up acc | momentum acc |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = [r for r in runs if r.arm == arm and r.heldout]
        if not rs:
            continue
        h = [r.heldout for r in rs]
        ratio = [x["accuracy"] / r.p_star if x["accuracy"] is not None else None for x, r in zip(h, rs)]
        lines.append(f"| {arm} | {_ms([x['accuracy'] for x in h])} | {_ms(ratio)} | "
                     f"{_ms([x['mean_reward'] for x in h])} | {_ms([x['brier'] for x in h])} | "
                     f"{_ms([x['ece'] for x in h])} | {_ms([x['valid'] for x in h])} | "
                     f"{_ms([r.controllability for r in rs])} | {_ms([x['always_up_accuracy'] for x in h])} | "
                     f"{_ms([x['momentum_accuracy'] for x in h])} |")
    cond = [r for r in runs if r.per_target and len(r.per_target) > 1]
    if cond:
        lines += ["", "### Controllability: realized mean reward per target on held-out items", "",
                  "| arm | seed | " + " | ".join(f"target {t['target']:.2f}" for t in cond[0].per_target)
                  + " | Spearman |", "|---|---|" + "---|" * (len(cond[0].per_target) + 1)]
        for r in cond:
            lines.append(f"| {r.arm} | {r.seed} | " + " | ".join(_f(t["mean_reward"]) for t in r.per_target)
                         + f" | {_f(r.controllability)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from policy.model_files import make_tiny_model, resolve_model

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"unknown arm(s) {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="learning_curve-"))
    model_dir = resolve_model(args.model)
    if args.tiny:
        model_dir = str(make_tiny_model(workdir / "tiny-model", model_dir))
    started = time.monotonic()
    print(f"learning curve: arms {arms}, seeds {seeds}, {args.rounds} rounds of {args.block_size} items, model "
          f"{'tiny random' if args.tiny else args.model}, torch threads {torch.get_num_threads()}, work in {workdir}",
          flush=True)
    command = "python bench/learning_curve.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    runs: list[ArmRun] = []
    for seed in seeds:
        for arm in arms:
            runs.append(run_arm(arm, seed, args, model_dir, workdir))
            # Written after every arm, so a long run that is stopped early still leaves its finished arms.
            elapsed = time.monotonic() - started
            p_stars = sorted({round(r.p_star, 4) for r in runs})
            body = tables(runs, args.rounds)
            write_results(Path(args.out), command, args, runs, p_stars, body, elapsed)
    print()
    print(f"market Bayes accuracy p* (horizon 5): {', '.join(f'{p:.4f}' for p in p_stars)} (per seed)")
    print(body)
    print(f"\ntotal {elapsed / 60:.1f} min")
    return 0


def write_results(out: Path, command: str, args: argparse.Namespace, runs: list[ArmRun], p_stars: list[float],
                  body: str, elapsed: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}
    text = "\n".join([
        "# Learning curve on the synthetic market", "",
        f"Command: `{command}`", "",
        f"Config: `{json.dumps(cfg)}`", "",
        f"Market Bayes accuracy p* at horizon 5 (per seed's market): {', '.join(f'{p:.4f}' for p in p_stars)}", "",
        f"Wall time: {elapsed / 60:.1f} min on this machine.", "",
        body, "",
    ])
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=1, default=str), encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    sys.exit(main())

"""Re-evaluate the final adapters of a learning-curve run on a larger held-out set, at one target.

The learning curve's own held-out eval is small (it runs every target for every arm); this one
spends the time on more items at the top target, which is what the accuracy/ECE targets are about.

    .venv/bin/python bench/heldout_eval.py --workdir /tmp/lc/work --arms score,uncond --items 36
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import AgentConfig
from market.config import MarketConfig, SyntheticConfig
from rewards.config import RewardsConfig

LABELS = {"score": "score", "goal": "goal", "uncond": "none", "filtered": "none", "none": "score"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="The learning curve's --workdir (one folder per arm-seed).")
    p.add_argument("--arms", default="score,goal,uncond,filtered,none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=36)
    p.add_argument("--target", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args(argv)

    from evaluation.heldout import run_eval
    from market.sources import build_market
    from policy.local import LocalPolicy
    from policy.model_files import resolve_model
    from store.db import open_store, session_scope
    from store.status import block_summary
    from store.training import serving_adapter_row

    model_dir = resolve_model("smollm2-135m")
    market = build_market(MarketConfig(synthetic=SyntheticConfig(seed=7 + args.seed)))
    print(f"p* = {market.bayes_accuracy(5):.4f}; {args.items} held-out items at target {args.target}")
    print("| arm | adapter | n | direction accuracy | mean reward | Brier | ECE | always-up acc | momentum acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in args.arms.split(","):
        engine = open_store(f"sqlite:///{Path(args.workdir) / f'{arm}-s{args.seed}' / 'scoreloop.db'}")
        agent_cfg = AgentConfig(model=model_dir, device="cpu", max_steps=args.max_steps,
                                temperature=args.temperature, concurrency=8, max_batch_size=8)
        policy = LocalPolicy(model_dir, device="cpu", max_batch_size=8, seed=args.seed)
        try:
            with session_scope(engine) as s:
                row = serving_adapter_row(s)
                adapter = None if row is None else (row.path, row.version)
            if adapter is not None:
                policy.load_adapter(*adapter)
            t0 = time.monotonic()
            res = run_eval(engine, policy, market, agent_cfg, RewardsConfig(label_format=LABELS[arm]),
                           targets=[args.target], n_items=args.items, progress=False)
            with session_scope(engine) as s:
                m = block_summary(s, res.block_ids[0]).pick(
                    ("n", "accuracy", "mean_composite", "brier", "ece", "always_up_accuracy", "momentum_accuracy"))
        finally:
            policy.close()
            engine.dispose()

        def f(k: str, m: dict = m) -> str:
            return "-" if m.get(k) is None else f"{m[k]:.3f}"

        print(f"| {arm} | {'base' if adapter is None else f'v{adapter[1]}'} | {m.get('n')} | {f('accuracy')} | "
              f"{f('mean_composite')} | {f('brier')} | {f('ece')} | {f('always_up_accuracy')} | "
              f"{f('momentum_accuracy')} |   ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

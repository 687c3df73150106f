"""Share of a block's wall time spent writing traces (target <= 2%).

Runs one block on the synthetic market with a real local model and a fresh database, timing every
trace transaction (steps, tool calls, snippets, predictions) with the runner's WriteClock.
The figure is the wall time during which any trace write was open / block wall time; the summed
write seconds over threads (which double-counts overlapping writes and lock waits) is printed too. bench/block_bench.py calls `measure` for its trace section.

    .venv/bin/python bench/trace_share.py [--model smollm2-135m|tiny|DIR] [--size 8] [--db URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TraceShare:
    wall_s: float
    write_s: float
    busy_s: float
    writes: int
    episodes: int

    @property
    def share(self) -> float:
        """Wall time with a trace write open / block wall time."""
        return self.busy_s / self.wall_s if self.wall_s else 0.0

    @property
    def summed_share(self) -> float:
        """Write seconds summed over threads / wall (counts lock waits and overlap: an upper bound)."""
        return self.write_s / self.wall_s if self.wall_s else 0.0


def measure(policy, db_url: str, size: int = 8, concurrency: int = 8) -> TraceShare:
    """Run one block with `policy` and time its trace writes."""
    from agent.config import AgentConfig
    from agent.recorder import WriteClock
    from agent.runner import run_block
    from market.config import MarketConfig
    from market.sources import build_market
    from rewards.config import RewardsConfig
    from store.db import open_store

    engine = open_store(db_url)
    market = build_market(MarketConfig())
    clock = WriteClock()
    t0 = time.perf_counter()
    run_block(engine, policy, market, AgentConfig(concurrency=concurrency, max_steps=3), RewardsConfig(),
              size=size, progress=False, clock=clock)
    wall = time.perf_counter() - t0
    engine.dispose()
    return TraceShare(wall_s=wall, write_s=clock.seconds, busy_s=clock.busy_seconds, writes=clock.writes, episodes=size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (random Llama), smollm2-135m, or an HF folder")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--db", default=None, help="database URL (default: a fresh SQLite file)")
    args = ap.parse_args()

    from policy.local import LocalPolicy
    from policy.model_files import make_tiny_model, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="trace-share-"))
    model = args.model
    if model == "tiny":
        model = str(make_tiny_model(tmp / "tiny", resolve_model()))
    db = args.db or f"sqlite:///{tmp / 'bench.db'}"
    policy = LocalPolicy(model, device="auto", max_batch_size=args.concurrency)
    try:
        r = measure(policy, db, args.size, args.concurrency)
    finally:
        policy.close()
    print(f"block of {r.episodes} episodes on {args.model}: wall {r.wall_s:.2f}s, "
          f"{r.writes} trace transactions {r.write_s * 1000:.0f} ms "
          f"({1000 * r.write_s / max(r.writes, 1):.2f} ms each)")
    print(f"trace writing share of block wall time: {100 * r.share:.2f}% (target <= 2%); "
          f"summed over threads {100 * r.summed_share:.2f}%")


if __name__ == "__main__":
    main()

"""A small real store with two adapter versions: traces, rewards, a gate record and eval runs.

Built the way the system builds it: the block runner with a scripted policy (the offline
implementation of the Policy protocol) on the synthetic market, the resolver, and `run_eval` on
held-out items. The browse and report tests read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Engine, text

from agent.config import AgentConfig
from evaluation.heldout import run_eval
from market.config import MarketConfig
from market.sources import Market, build_market
from policy.scripted import ScriptedPolicy
from rewards.config import RewardsConfig
from scoring.resolve import resolve_pending
from store.db import session_scope
from store.models import Adapter

NEWS = '{"tool": "search_news", "args": {"query": "estimates"}}'
PRICES = '{"tool": "get_prices", "args": {"lookback_days": 20}}'
CONTEXT = '{"tool": "get_market_context", "args": {"lookback_days": 20}}'


def pred(direction: str, confidence: float, rationale: str) -> str:
    return json.dumps({"prediction": {"direction": direction, "magnitude_pct": 1.2, "confidence": confidence,
                                      "rationale": rationale, "citations": []}})


@dataclass(frozen=True)
class TraceStore:
    market: Market
    base_block: int
    v1_block: int
    gate_blocks: tuple[int, int]  # serving (base), candidate (v1) on the same items
    eval_runs: tuple[int, ...]  # base, v1 on the same held-out items (empty: built without)


def market() -> Market:
    return build_market(MarketConfig())


def agent_cfg() -> AgentConfig:
    # research_plan=[]: the scripts below make every tool call themselves
    return AgentConfig(concurrency=2, research_plan=[], explore_rate=0.0)


def base_policy() -> ScriptedPolicy:
    """The base model: news then up; on SYN02 and SYN05 it reads prices and says down."""
    down = [PRICES, pred("down", 0.8, "base: prices fell for a week")]
    return ScriptedPolicy([NEWS, pred("up", 0.6, "base: headline looked positive")],
                          per_ticker={"SYN02": down, "SYN05": down})


def v1_policy() -> ScriptedPolicy:
    """Adapter v1: news, prices and the market context before every answer."""
    return ScriptedPolicy([NEWS, PRICES, CONTEXT, pred("up", 0.7, "v1: signal headline and rising prices")],
                          adapter_version=1)


def build_trace_store(engine: Engine, mk: Market | None = None, *, block_size: int = 12,
                      eval_items: int = 12, with_eval: bool = True) -> TraceStore:
    mk = mk or market()
    cfg, rcfg = agent_cfg(), RewardsConfig()
    base, v1 = base_policy(), v1_policy()
    b0 = run_block(engine, base, mk, cfg, rcfg, size=block_size)
    with session_scope(engine) as s:
        s.add(Adapter(version=1, parent_version=None, path="adapters/v1", base_model="scripted", status="candidate"))
    gate_serving = run_block(engine, base, mk, cfg, rcfg, size=4, kind="gate")
    gate_cand = run_block(engine, v1, mk, cfg, rcfg, size=4, kind="gate", as_of=_first_as_of(engine, gate_serving),
                          tickers=_tickers(engine, gate_serving))
    resolve_pending(engine, mk, rcfg)
    with session_scope(engine) as s:
        serving_m, cand_m = (s.execute(text(
            "SELECT block_id, n, n_valid, accuracy, mean_composite, brier, ece FROM v_block_summary "
            "WHERE block_id = :b"), {"b": b}).mappings().one() for b in (gate_serving, gate_cand))
        row = s.query(Adapter).filter_by(version=1).one()
        row.metrics = {"gate": {"candidate": dict(cand_m), "serving": dict(serving_m) | {"adapter_version": None},
                                "margin": 0.02, "metric": "mean_composite"}}
        passed = (cand_m["mean_composite"] or 0) >= (serving_m["mean_composite"] or 0) - 0.02
        row.metrics["gate"]["passed"] = passed
        row.status = "serving" if passed else "rejected"
    b1 = run_block(engine, v1, mk, cfg, rcfg, size=block_size)
    resolve_pending(engine, mk, rcfg)
    if not with_eval:
        return TraceStore(mk, b0, b1, (gate_serving, gate_cand), ())
    e0 = run_eval(engine, base, mk, cfg, rcfg, targets=[0.5, 1.0], n_items=eval_items, progress=False)
    e1 = run_eval(engine, v1, mk, cfg, rcfg, targets=[0.5, 1.0], n_items=eval_items, progress=False)
    return TraceStore(mk, b0, b1, (gate_serving, gate_cand), (e0.eval_run_id, e1.eval_run_id))


def run_block(engine: Engine, policy: ScriptedPolicy, mk: Market, cfg: AgentConfig, rcfg: RewardsConfig,
              **kw) -> int:
    from agent.runner import run_block as run

    return run(engine, policy, mk, cfg, rcfg, progress=False, **kw)


def _first_as_of(engine: Engine, block_id: int):
    from store.eval_runs import block_items

    with session_scope(engine) as s:
        return block_items(s, block_id)[0][1]


def _tickers(engine: Engine, block_id: int) -> list[str]:
    from store.eval_runs import block_items

    with session_scope(engine) as s:
        items = block_items(s, block_id)
    return [t for t, a in items if a == items[0][1]]

"""Research that reaches the signal: the research plan, repeated calls, the news window, exploration draws.

Run on the synthetic market and a real SQLite store; the scripted policy only writes the model's turns.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from agent.config import AgentConfig
from agent.runner import explore, run_block
from market.config import MarketConfig
from market.sources import build_market
from policy.scripted import ScriptedPolicy
from rewards.config import RewardsConfig
from store import traces
from store.db import session_scope
from store.models import Episode, ToolCall

PRICES = '{"tool": "get_prices", "args": {"lookback_days": 20}}'


def pred(direction="up") -> str:
    return json.dumps({"prediction": {"direction": direction, "magnitude_pct": 1.0, "confidence": 0.6,
                                      "rationale": "r", "citations": []}})


@pytest.fixture(scope="module")
def market():
    return build_market(MarketConfig())


def traces_of(engine, block_id):
    with session_scope(engine) as s:
        ids = s.scalars(select(Episode.id).where(Episode.block_id == block_id).order_by(Episode.idx)).all()
        return [traces.episode_trace(s, i) for i in ids]


def test_default_plan_puts_this_weeks_headlines_before_the_first_decoded_turn(sqlite_db, market):
    policy = ScriptedPolicy(["(turn 0 is the plan's)", pred()])  # the model's first (and only) turn predicts
    block_id = run_block(sqlite_db, policy, market, AgentConfig(concurrency=2, max_steps=1), RewardsConfig(),
                         size=24, progress=False)
    with_news = 0
    for tr in traces_of(sqlite_db, block_id):
        roles = [s.role for s in tr.steps]
        # max_steps=1: the plan's call spends the budget, so the budget message asks for the prediction
        assert roles == ["system", "user", "assistant", "tool", "user", "assistant"]
        assert json.loads(tr.steps[2].content) == {"tool": "search_news", "args": {"query": tr.episode.ticker.lower()}}
        news = tr.steps[3].content
        if news != "No news found.":
            with_news += 1
            for line in news.splitlines():  # every shown headline is from the 7 days before as_of
                day = line.split()[1]
                assert tr.episode.as_of.date() - timedelta(days=7) <= date.fromisoformat(day) <= tr.episode.as_of.date()
    # every model call saw the tool result: the only decoded turn came after the news
    assert len(policy.calls) == 24 and all(c["turn"] == 1 for c in policy.calls)
    assert with_news >= 12  # about 2 headlines a week per ticker on this market


def test_a_repeated_identical_call_is_answered_from_the_first_result(sqlite_db, market):
    policy = ScriptedPolicy([PRICES, PRICES, pred()])
    cfg = AgentConfig(concurrency=1, max_steps=3, research_plan=[])
    block_id = run_block(sqlite_db, policy, market, cfg, RewardsConfig(), size=1, progress=False)
    (tr,) = traces_of(sqlite_db, block_id)
    tools = [s.content for s in tr.steps if s.role == "tool"]
    assert len(tools) == 2 and tools[1] == f"(same call as before, same result) {tools[0]}"
    with session_scope(sqlite_db) as s:
        calls = s.scalars(select(ToolCall).where(ToolCall.episode_id == tr.episode.id).order_by(ToolCall.id)).all()
        assert [c.cache_hit for c in calls] == [False, True]


def test_an_unknown_tool_in_the_plan_is_a_config_error():
    with pytest.raises(ValueError, match="research_plan"):
        AgentConfig(research_plan=["read_minds"])
    with pytest.raises(ValueError, match="more than max_steps"):
        AgentConfig(research_plan=["search_news", "get_prices"], max_steps=1)


def test_explored_directions_are_up_and_down_with_flat_at_its_rate(market):
    day = market.calendar.replay_as_of(market.span[0] + timedelta(days=60))
    items = [traces.PlannedItem(f"SYN{i % 12:02d}", day + timedelta(days=i)) for i in range(4000)]
    drawn = Counter(it.explore_direction for it in explore(items, rate=0.5, flat_rate=0.1))
    explored = drawn["up"] + drawn["down"] + drawn["flat"]
    assert abs(explored / 4000 - 0.5) < 0.03
    assert abs(drawn["flat"] / explored - 0.1) < 0.02
    assert abs(drawn["up"] - drawn["down"]) / explored < 0.06
    # seeded by the item: the same items explore the same way
    assert explore(items[:50], 0.5, 0.1) == explore(items[:50], 0.5, 0.1)


def test_tool_exploration_replaces_the_plan_and_is_recorded(sqlite_db, market):
    """Every tool (and `none`: the model chooses) is drawn; the explored episode's first call is that tool."""
    policy = ScriptedPolicy([PRICES, pred(), pred()])
    cfg = AgentConfig(concurrency=2, max_steps=2, explore_tool_rate=1.0)
    block_id = run_block(sqlite_db, policy, market, cfg, RewardsConfig(), size=24, progress=False)
    seen = set()
    for tr in traces_of(sqlite_db, block_id):
        tool = tr.episode.explore_tool
        seen.add(tool)
        first_call = next(s for s in tr.steps if s.role == "assistant")
        if tool == "none":  # no planned call: the model's own first turn (the script's PRICES) decides
            assert first_call.completion_tokens is not None and '"get_prices"' in first_call.content
        else:  # the plan was this one tool, written by the graph
            assert first_call.completion_tokens is None and json.loads(first_call.content)["tool"] == tool
    assert seen == {"get_prices", "search_news", "get_market_context", "none"}


def test_tool_exploration_each_runs_every_tool_on_the_same_item(sqlite_db, market):
    """`each`: an explored item becomes one episode per tool, same item and same explored direction, so the
    research choices are compared on the same item; unexplored items keep the plan, once."""
    policy = ScriptedPolicy([PRICES, pred(), pred()])
    cfg = AgentConfig(concurrency=2, max_steps=2, explore_rate=0.5, explore_tool_rate=0.5, explore_tool_mode="each")
    block_id = run_block(sqlite_db, policy, market, cfg, RewardsConfig(), size=12, progress=False)
    by_item: dict[tuple, list] = {}
    for tr in traces_of(sqlite_db, block_id):
        ep = tr.episode
        by_item.setdefault((ep.ticker, ep.as_of), []).append(ep)
        first_call = next(s for s in tr.steps if s.role == "assistant")
        assert json.loads(first_call.content)["tool"] == (ep.explore_tool or "search_news")  # the plan, graph-written
        assert tr.prediction is not None
    assert len(by_item) == 12
    sizes = Counter(len(eps) for eps in by_item.values())
    assert set(sizes) == {1, 3} and sizes[3] >= 2  # some items explored three ways, the rest run once
    for eps in by_item.values():
        tools = sorted(str(e.explore_tool) for e in eps)
        assert tools in (["None"], ["get_market_context", "get_prices", "search_news"])
        assert len({e.explore_direction for e in eps}) == 1  # one item, one explored direction
    with session_scope(sqlite_db) as s:
        assert traces.get_block(s, block_id).size == sum(len(eps) for eps in by_item.values())

"""Fuzz: Hypothesis-generated malformed and hostile model outputs through parse, validate and record.

What a model (or a broken server) can send: truncated JSON, prose around it, NaN and infinities,
numbers of 5000 digits, nesting 50,000 deep, wrong types in every field, NUL bytes, lone UTF-16
surrogates, chat control tokens. Each must end as an action, a recorded parse failure, or a
validation error: never an uncaught exception, and every output is kept in the trace.
"""

from __future__ import annotations

import json
import threading
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from agent.config import AgentConfig
from agent.runner import run_block
from agent.sanitize import storable_text
from agent.schema import TOOL_NAMES, ActionError, Final, parse_action
from market.config import MarketConfig
from market.sources import build_market
from policy.protocol import Completion
from rewards.config import RewardsConfig
from rewards.validation import validate_prediction
from store.db import session_scope
from store.models import Block, Episode, Prediction, Step

HOSTILE_TEXT = ["\x00", "\ud800", "\udfff", "\ufffd", "<|im_start|>", "<|im_<|x|>end|>", "²", "١٢", "\u202e",
                "9" * 5000, "'; DROP TABLE steps; --", "\\", '"', "\n", "\t", "NaN", "Infinity", "-0", "1e400"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(HOSTILE_TEXT),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3), max_leaves=8)
# Near misses of a real answer: the right keys, each value sometimes right and sometimes anything.
predictions = st.fixed_dictionaries({}, optional={
    "direction": st.sampled_from(["up", "down", "flat", "UP", "sideways", ""]) | values,
    "magnitude_pct": st.floats(-1e6, 1e6) | st.integers(-(10**400), 10**400) | values,
    "confidence": st.floats(-2, 2) | values,
    "rationale": st.text(max_size=60) | st.sampled_from(HOSTILE_TEXT) | values,
    "citations": st.lists(st.integers(-5, 10**20) | st.sampled_from(HOSTILE_TEXT) | values, max_size=5) | values,
})
tools = st.fixed_dictionaries({"tool": st.sampled_from([*TOOL_NAMES, "delete_db", ""]) | values}, optional={
    "args": st.fixed_dictionaries({}, optional={"lookback_days": st.integers(-(10**20), 10**20) | values,
                                               "query": st.text(max_size=120) | values}) | values,
})
objects = st.one_of(st.fixed_dictionaries({"prediction": predictions | values}), tools, values)


def _render(obj: object, style: int, cut: int) -> str:
    text = json.dumps(obj, allow_nan=True, ensure_ascii=style % 2 == 0)
    if style % 5 == 1:
        text = f"Sure! Here is my answer:\n```json\n{text}\n```\nHope that helps."
    if style % 7 == 3:
        text = text[: max(0, len(text) - cut)]  # cut by the token budget
    return text


SPECIAL = [
    "[" * 50_000, '{"prediction": ' * 20_000, '{"prediction": {"magnitude_pct": ' + "1" * 5000 + "}}",
    ('{"prediction": {"direction": "up", "magnitude_pct": 1, "confidence": 0.5, "rationale": "x\x00y", '
     '"citations": ["\\ud800", "²"]}}'),
    '{"tool": "search_news", "args": {"query": "\\u0000<|im_start|>system"}}', "", " ", "{}", "{", "}{", "null",
    '{"tool": "get_prices", "args": {"lookback_days": 1e999}}', "\ud800{\udfff", "\x00" * 10,
]
outputs = st.one_of(
    st.builds(_render, objects, st.integers(0, 69), st.integers(0, 40)),
    st.text(max_size=200),
    st.sampled_from(SPECIAL),
    st.lists(st.sampled_from(HOSTILE_TEXT + ["{", "}", "[", "]", ":", ",", '"prediction"', '"tool"']),
             max_size=30).map("".join),
)


@settings(max_examples=1500, deadline=None)
@given(text=outputs, raw=predictions)
def test_parse_and_validate_never_raise(text, raw):
    try:
        action = parse_action(text)
    except ActionError as err:
        assert str(err)  # a message the repair turn can show the model
    else:
        if isinstance(action, Final):
            p = action.prediction
            checked, errors = validate_prediction(p.direction, p.magnitude_pct, p.confidence, p.citations)
            assert (checked is None) == bool(errors)
    # what a store row may hold, whatever the parser would have said about it
    checked, errors = validate_prediction(raw.get("direction"), raw.get("magnitude_pct"), raw.get("confidence"),
                                          raw.get("citations"))
    assert (checked is None) == bool(errors) and all(isinstance(e, str) for e in errors)


class HostilePolicy:
    """A Policy that answers with Hypothesis-generated outputs in order, then a valid prediction (a real
    protocol implementation serving test data; drawn up front, as Hypothesis draws only in the test thread)."""

    adapter_version = None

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.sent: list[str] = []
        self._lock = threading.Lock()

    def complete(self, messages, *, json_schema=None, max_new_tokens=160, temperature=0.7, seed=None):
        with self._lock:
            n = len(self.sent)
            text = self.texts[n] if n < len(self.texts) else (
                '{"prediction": {"direction": "up", "magnitude_pct": 1, "confidence": 0.5, '
                '"rationale": "fallback", "citations": []}}')
            self.sent.append(text)
        return Completion(text=text, prompt_tokens=1, completion_tokens=1, latency_ms=0.1)

    def load_adapter(self, path, version):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def market():
    return build_market(MarketConfig())


RECORD_EXAMPLES, PER_EXAMPLE = 10, 100  # 1,000 generated outputs through the real graph and recorder


@pytest.mark.slow  # about a minute: 1,000 model turns, each a committed step
@settings(max_examples=RECORD_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_hostile_outputs_through_the_real_graph_are_recorded(sqlite_db, market, data):
    policy = HostilePolicy([data.draw(outputs) for _ in range(PER_EXAMPLE)])
    # no research plan, no minimum: every turn is the model's own output
    cfg = AgentConfig(concurrency=1, min_tool_calls=0, max_repairs=1, research_plan=[], explore_tool_rate=0.0)
    blocks = []
    while len(policy.sent) < PER_EXAMPLE:
        blocks.append(run_block(sqlite_db, policy, market, cfg, RewardsConfig(), size=25, progress=False))
    with session_scope(sqlite_db) as s:
        statuses = Counter(s.scalars(select(Block.status).where(Block.id.in_(blocks))))
        episodes = s.scalar(select(func.count()).select_from(Episode).where(Episode.block_id.in_(blocks)))
        preds = s.scalar(select(func.count()).select_from(Prediction).where(Prediction.block_id.in_(blocks)))
        assistant = s.scalars(select(Step.content).join(Episode).where(
            Episode.block_id.in_(blocks), Step.role == "assistant").order_by(Step.id)).all()
    assert statuses == {"complete": len(blocks)}
    assert preds == episodes == 25 * len(blocks)  # each episode: a prediction or a recorded parse failure
    # every output kept in the trace, verbatim but for NUL and lone surrogates (U+FFFD)
    assert assistant == [storable_text(t) for t in policy.sent]

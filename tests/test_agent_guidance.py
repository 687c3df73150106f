"""agent.guidance: the prediction's direction chosen by classifier-free guidance between two score labels,
on a real model (the tiny random Llama through LocalPolicy) and through the real graph and store."""

from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from agent.config import AgentConfig
from agent.guidance import DIRECTIONS, PREDICTION_PREFIX, guided_direction, swap_label
from agent.runner import run_block
from market.config import MarketConfig
from market.sources import build_market
from policy.local import LocalPolicy
from policy.protocol import PolicyError
from policy.scripted import ScriptedPolicy
from rewards.config import RewardsConfig
from store import traces
from store.db import session_scope
from store.models import Block, Episode

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HIGH, LOW = "Score: 1.00", "Score: 0.00"


def chat(label: str = HIGH) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You forecast stock moves. Answer with one JSON object."},
        {"role": "user", "content": f"Stock: ACME\nPredict its move over the next 5 trading days.\n{label}"},
        {"role": "assistant", "content": '{"tool": "search_news", "args": {"query": "acme"}}'},
        {"role": "tool", "content": f"[1] 2024-03-04 ACME wins a record contract - {label} is not a label here"},
        {"role": "user", "content": f"Tool budget used up. Reply now with your prediction JSON.\n{label}"},
    ]


@pytest.fixture(scope="module")
def policy(tiny_model_dir) -> LocalPolicy:
    pol = LocalPolicy(tiny_model_dir, batch_wait_ms=0)
    yield pol
    pol.close()


def test_choice_logprobs_are_the_models_next_token_logprobs(policy, tiny_model_dir):
    """Checked against a plain transformers forward pass of the same text, outside LocalPolicy."""
    from transformers import AutoModelForCausalLM

    got = policy.choice_logprobs(chat(), PREDICTION_PREFIX, DIRECTIONS)
    tok = policy.tokenizer
    text = tok.apply_chat_template(chat(), tokenize=False, add_generation_prompt=True) + PREDICTION_PREFIX
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)
    for d in DIRECTIONS:
        first = tok(text + d, add_special_tokens=False)["input_ids"][len(ids)]
        assert got[d] == pytest.approx(float(logp[first]), abs=1e-4)


def test_at_weight_zero_the_choice_is_the_targets_most_likely_direction(policy):
    """(Not always the constrained greedy decode's: under a grammar the decoder may reach a direction
    through other token splits of the fixed prefix; on the tiny random model it does.)"""
    direction, scores = guided_direction(policy, chat(), HIGH, LOW, 0.0)
    high = policy.choice_logprobs(chat(), PREDICTION_PREFIX, DIRECTIONS)
    assert scores == pytest.approx(high) and direction == max(DIRECTIONS, key=high.get)


@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_guided_scores_step_past_the_target_away_from_the_low_label(policy, weight):
    high = policy.choice_logprobs(chat(HIGH), PREDICTION_PREFIX, DIRECTIONS)
    low = policy.choice_logprobs(chat(LOW), PREDICTION_PREFIX, DIRECTIONS)
    assert high != low  # the label reaches the decision
    direction, scores = guided_direction(policy, chat(), HIGH, LOW, weight)
    for d in DIRECTIONS:
        assert scores[d] == pytest.approx((1 + weight) * high[d] - weight * low[d], abs=1e-2)  # fp32 re-runs
    assert direction == max(DIRECTIONS, key=scores.get)


def test_swap_label_leaves_tool_data_and_the_assistant_alone():
    swapped = swap_label(chat(HIGH), HIGH, LOW)
    assert swapped[1]["content"].endswith(LOW) and swapped[4]["content"].endswith(LOW)
    assert swapped[3] == chat(HIGH)[3] and swapped[2] == chat(HIGH)[2]


def test_a_guided_episode_predicts_the_guided_direction(sqlite_db, tiny_model_dir):
    """Through run_block: the stored prediction's direction is the guided choice recomputed from the
    stored trace (the chat up to the final turn), and the rest of the prediction is decoded after it."""
    market = build_market(MarketConfig())
    cfg = AgentConfig(guidance=3.0, max_steps=1, temperature=0.0, concurrency=1, max_new_tokens=48)
    with LocalPolicy(tiny_model_dir, batch_wait_ms=0) as pol:
        block_id = run_block(sqlite_db, pol, market, cfg, RewardsConfig(), size=2, progress=False, target_score=1.0)
        with session_scope(sqlite_db) as s:
            block = s.get(Block, block_id)
            assert block.config["agent"]["guidance"] == 3.0
            for ep in s.scalars(select(Episode).where(Episode.block_id == block_id)):
                tr = traces.episode_trace(s, ep.id)
                steps = [(st.role, st.content) for st in tr.steps]
                last = max(i for i, (role, _) in enumerate(steps) if role == "assistant")
                messages = [{"role": r, "content": c} for r, c in steps[:last]]
                expected, _ = guided_direction(pol, messages, ep.conditioning, LOW, 3.0)
                assert tr.prediction.valid and tr.prediction.direction == expected


def test_a_backend_that_cannot_score_choices_is_refused_before_the_block(sqlite_db):
    market = build_market(MarketConfig())
    with pytest.raises(PolicyError, match="choice_logprobs"):
        run_block(sqlite_db, ScriptedPolicy(["{}"]), market, AgentConfig(guidance=1.0), RewardsConfig(), size=1,
                  progress=False)
    with session_scope(sqlite_db) as s:
        assert s.scalars(select(Block)).first() is None  # nothing planned, nothing to clean up


def test_guidance_with_a_server_backend_is_a_config_error():
    """Caught when the settings load, before any daemon starts."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs backend = 'local'"):
        AgentConfig(guidance=1.0, backend="openai")
    assert AgentConfig(guidance=1.0).backend == "local"

"""LocalPolicy: schema-valid JSON from constrained decoding, micro-batching across threads that
keeps each caller's answer its own, and LoRA adapter swaps that fail safe."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from policy.local import LocalPolicy
from policy.protocol import Policy, PolicyError


class Forecast(BaseModel):
    """A small prediction schema, bounded like the agent's."""

    ticker: str = Field(max_length=8)
    direction: Literal["up", "down", "flat"]
    magnitude_pct: float = Field(ge=0, le=50)
    confidence: float = Field(ge=0, le=1)
    rationale: str = Field(max_length=60)
    citations: list[int] = Field(max_length=3)


SCHEMA = Forecast.model_json_schema()


def chat(ticker: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You forecast stock moves. Answer with one JSON object."},
        {"role": "user", "content": f"Ticker {ticker}, horizon 5 sessions. Give your prediction."},
    ]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def policy(tiny_model_dir) -> LocalPolicy:
    # A long batch window so that threads started together surely share a batch.
    pol = LocalPolicy(tiny_model_dir, max_batch_size=8, batch_wait_ms=300)
    yield pol
    pol.close()


def test_is_a_policy(policy):
    assert isinstance(policy, Policy)
    assert policy.adapter_version is None


@pytest.mark.parametrize("seed", range(5))
def test_constrained_output_validates_against_the_schema(policy, seed):
    done = policy.complete(chat("ACME"), json_schema=SCHEMA, max_new_tokens=200, temperature=1.0, seed=seed)
    Forecast.model_validate_json(done.text)  # raises if the random model escaped the grammar
    assert done.prompt_tokens > 10 and 0 < done.completion_tokens <= 200
    assert done.latency_ms > 0


def test_sampling_is_reproducible_per_seed(policy):
    a = policy.complete(chat("ACME"), max_new_tokens=24, temperature=1.0, seed=7)
    b = policy.complete(chat("ACME"), max_new_tokens=24, temperature=1.0, seed=7)
    c = policy.complete(chat("ACME"), max_new_tokens=24, temperature=1.0, seed=8)
    assert a.text == b.text
    assert a.text != c.text


def test_unconstrained_output_respects_the_token_budget(policy):
    done = policy.complete(chat("ACME"), max_new_tokens=5, temperature=0)
    assert 1 <= done.completion_tokens <= 5


def test_concurrent_calls_share_batches_and_get_their_own_answers(policy):
    tickers = ["AAPL", "MSFT", "NVDA", "AMZN", "META", "GOOG", "TSLA", "JPM"]
    budgets = [12, 30, 12, 30, 12, 30, 12, 30]  # mixed budgets in one batch
    schemas = [SCHEMA if i % 2 else None for i in range(8)]  # constrained and free rows together
    alone = [
        policy.complete(chat(t), json_schema=s, max_new_tokens=b, temperature=0)
        for t, s, b in zip(tickers, schemas, budgets)
    ]
    before = policy.stats
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = policy.complete(chat(tickers[i]), json_schema=schemas[i], max_new_tokens=budgets[i], temperature=0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = policy.stats
    assert after.requests - before.requests == 8
    assert after.generate_calls - before.generate_calls < 8  # shared forward passes
    assert after.padded_tokens >= before.padded_tokens
    # Same prompt, greedy: the same text whether batched with others (left-padded) or alone.
    assert [r.text for r in results] == [r.text for r in alone]
    assert len({r.text for r in results}) > 1  # callers did not receive each other's answers
    for result, budget in zip(results, budgets):
        assert result.completion_tokens <= budget


def test_bad_schema_and_bad_chat_fail_only_their_own_call(policy):
    with pytest.raises(PolicyError):
        policy.complete(chat("ACME"), json_schema={"type": "no-such-type"}, max_new_tokens=8)
    with pytest.raises(PolicyError):
        policy.complete([{"role": "user"}], max_new_tokens=8)  # no content
    assert policy.complete(chat("ACME"), max_new_tokens=4, temperature=0).completion_tokens >= 1


def _save_lora(model_dir: str, dest: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # init_lora_weights=False draws B at random too (B = 0 would leave the outputs unchanged).
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(dest)
    return dest


def test_adapter_swap_and_a_broken_adapter_keeps_the_old_one(tiny_model_dir, tmp_path):
    good = _save_lora(tiny_model_dir, tmp_path / "v1", seed=1)
    other = _save_lora(tiny_model_dir, tmp_path / "v2", seed=2)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    no_config = tmp_path / "no-config"
    shutil.copytree(good, no_config)
    (no_config / "adapter_config.json").unlink()

    prompt = chat("ACME")
    with LocalPolicy(tiny_model_dir, batch_wait_ms=0) as pol:
        base_text = pol.complete(prompt, max_new_tokens=16, temperature=0).text
        pol.load_adapter(str(good), 1)
        assert pol.adapter_version == 1
        v1_text = pol.complete(prompt, max_new_tokens=16, temperature=0).text
        assert v1_text != base_text

        for bad in (broken, no_config, tmp_path / "missing"):
            with pytest.raises(PolicyError):
                pol.load_adapter(str(bad), 9)
            assert pol.adapter_version == 1
            assert pol.complete(prompt, max_new_tokens=16, temperature=0).text == v1_text

        pol.load_adapter(str(other), 2)
        assert pol.adapter_version == 2
        assert pol.complete(prompt, max_new_tokens=16, temperature=0).text not in (v1_text, base_text)

        pol.load_adapter(None, None)  # back to the base model
        assert pol.adapter_version is None
        assert pol.complete(prompt, max_new_tokens=16, temperature=0).text == base_text

    # The adapter can also be given at construction (how build_policy starts a serving policy).
    with LocalPolicy(tiny_model_dir, adapter_path=str(good), adapter_version=1, batch_wait_ms=0) as pol:
        assert pol.adapter_version == 1
        assert pol.complete(prompt, max_new_tokens=16, temperature=0).text == v1_text


def test_closed_policy_refuses_calls(tiny_model_dir):
    pol = LocalPolicy(tiny_model_dir, batch_wait_ms=0)
    pol.close()
    with pytest.raises(PolicyError):
        pol.complete(chat("ACME"), max_new_tokens=4)


def test_build_policy_local_with_the_serving_adapter(tiny_model_dir, tmp_path):
    from agent.config import AgentConfig
    from policy.backends import build_policy

    adapter = _save_lora(tiny_model_dir, tmp_path / "v3", seed=3)
    cfg = AgentConfig(model=tiny_model_dir, batch_wait_ms=0, max_batch_size=4)
    pol = build_policy(cfg, (str(adapter), 3))
    try:
        assert isinstance(pol, LocalPolicy)
        assert pol.adapter_version == 3 and pol.max_batch_size == 4
    finally:
        pol.close()


@pytest.mark.slow
def test_smollm2_constrained_prediction_is_valid_json(smollm2_dir):
    with LocalPolicy(smollm2_dir, batch_wait_ms=0) as pol:
        messages = [
            {"role": "system", "content": "You are a stock forecaster. Reply with a JSON prediction."},
            {"role": "user", "content": "AAPL closed at 190.1, 188.4, 191.7 over the last three sessions. "
                                        "Predict the move over the next 5 sessions."},
        ]
        done = pol.complete(messages, json_schema=SCHEMA, max_new_tokens=160, temperature=0.7, seed=0)
    forecast = Forecast.model_validate_json(done.text)
    assert forecast.direction in ("up", "down", "flat")


@pytest.mark.parametrize("direction", ["down", "flat"])
def test_exploration_schema_makes_the_model_take_the_drawn_direction(policy, direction):
    """agent.explore_rate goes through the decoder: the model may only write the drawn direction."""
    from agent.schema import FINAL_SCHEMA, with_direction

    for seed in range(3):
        done = policy.complete(chat("ACME"), json_schema=with_direction(FINAL_SCHEMA, direction),
                               max_new_tokens=24, temperature=1.0, seed=seed)
        assert done.text.replace(" ", "").startswith(f'{{"prediction":{{"direction":"{direction}"')


@pytest.mark.parametrize(("shown", "seeds"), [([5, 9], range(4)), ([], range(2))])
def test_citation_schema_lets_the_model_cite_only_what_it_was_shown(policy, shown, seeds):
    """agent.schema.with_citations through the decoder: a random model sampling at temperature 1 writes only
    the shown snippet ids, at most that many, and `[]` when it was shown none (no runaway numbers)."""
    from agent.schema import FINAL_SCHEMA, Final, with_citations

    for seed in seeds:
        done = policy.complete(chat("ACME"), json_schema=with_citations(FINAL_SCHEMA, shown), max_new_tokens=200,
                               temperature=1.0, seed=seed)
        cited = Final.model_validate_json(done.text).prediction.citations
        assert set(cited) <= set(shown) and len(cited) <= len(shown)

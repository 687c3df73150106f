"""OpenAIPolicy against a real OpenAI-compatible HTTP server on 127.0.0.1 (policy/openai_server.py
serving the tiny model through LocalPolicy): guided JSON, concurrency, adapter publish and failures."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydantic import BaseModel

from policy.openai_client import OpenAIPolicy, adapter_name
from policy.openai_server import OpenAIServer
from policy.protocol import Completion, Policy, PolicyError

CHAT = [{"role": "system", "content": "You forecast stocks."}, {"role": "user", "content": "AAPL?"}]


class Call(BaseModel):
    """A small action-like schema whose every field is an enum or a boolean, so a random model
    finishes it within the token budget whatever decoder the server uses."""

    tool: Literal["get_prices", "search_news"]
    ticker: Literal["AAPL", "MSFT"]
    horizon: Literal["1d", "5d"]
    up: bool


@pytest.fixture(scope="module")
def local_policy(tiny_model_dir):
    from policy.local import LocalPolicy

    policy = LocalPolicy(tiny_model_dir, device="cpu", max_batch_size=8, batch_wait_ms=50)
    yield policy
    policy.close()


@pytest.fixture(scope="module")
def server(local_policy, tiny_model_dir):
    srv = OpenAIServer(local_policy, "tiny", "127.0.0.1", 0, model_path=tiny_model_dir)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def client(server):
    policy = OpenAIPolicy(server.url, "tiny", timeout_s=120, backoff_s=0.01)
    yield policy
    policy.close()


def _make_adapter(model_dir: str, dest: Path, seed: int) -> str:
    """A PEFT LoRA (r=8 on q/k/v/o) with random non-zero B, so it changes the model's outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(dest)
    return str(dest)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("adapters")
    return [_make_adapter(tiny_model_dir, root / f"v{i}", seed=i) for i in (1, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_it_is_a_policy(client):
    assert isinstance(client, Policy)
    assert client.adapter_version is None and client.model_name == "tiny"
    assert client.models() == ["tiny"] or "tiny" in client.models()


def test_guided_json_validates_against_the_schema(client):
    schema = Call.model_json_schema()
    for seed in range(2):
        out = client.complete(CHAT, json_schema=schema, max_new_tokens=80, temperature=1.0, seed=seed)
        Call.model_validate_json(out.text)  # a random model's output, shaped only by the schema
        assert out.prompt_tokens > 0 and 0 < out.completion_tokens <= 80
        assert out.latency_ms > 0


def test_guided_json_field_for_older_vllm(server):
    with OpenAIPolicy(server.url, "tiny", json_mode="guided_json") as policy:
        out = policy.complete(CHAT, json_schema=Call.model_json_schema(), max_new_tokens=80, seed=3)
    Call.model_validate_json(out.text)


def test_free_text_respects_the_token_budget_and_seed(client):
    a = client.complete(CHAT, max_new_tokens=12, temperature=1.0, seed=7)
    b = client.complete(CHAT, max_new_tokens=12, temperature=1.0, seed=7)
    assert a.completion_tokens <= 12
    assert a.text == b.text  # same seed, same text: the server passes the seed through


def test_eight_concurrent_requests_are_answered_in_shared_batches(client, local_policy):
    before = local_policy.stats
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda i: client.complete(CHAT, max_new_tokens=12, seed=100 + i), range(8)))
    after = local_policy.stats
    assert all(isinstance(o, Completion) and 0 < o.completion_tokens <= 12 for o in outs)
    assert len({o.text for o in outs}) > 1  # each request sampled with its own seed
    assert after.requests - before.requests == 8
    # 8 HTTP requests arriving together share forward passes instead of running one by one.
    assert after.generate_calls - before.generate_calls < 8


def test_adapter_publish_switches_the_model_name_and_the_outputs(client, adapters):
    base = client.complete(CHAT, max_new_tokens=16, temperature=0.0)
    client.load_adapter(adapters[0], 1)
    assert client.model_name == adapter_name(1) == "scoreloop-v1"
    assert client.adapter_version == 1
    assert "scoreloop-v1" in client.models()
    tuned = client.complete(CHAT, max_new_tokens=16, temperature=0.0)
    assert tuned.text != base.text
    # Back to the base model: its outputs come back exactly.
    client.load_adapter(None, None)
    assert client.model_name == "tiny" and client.adapter_version is None
    assert client.complete(CHAT, max_new_tokens=16, temperature=0.0).text == base.text


def test_a_broken_adapter_raises_and_the_old_one_keeps_serving(client, adapters, tmp_path):
    client.load_adapter(adapters[0], 1)
    before = client.complete(CHAT, max_new_tokens=16, temperature=0.0).text
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(PolicyError, match="could not load adapter .*broken.*still serving 'scoreloop-v1'"):
        client.load_adapter(str(broken), 7)
    with pytest.raises(PolicyError, match="could not load adapter"):
        client.load_adapter(str(tmp_path / "missing"), 8)
    assert client.model_name == "scoreloop-v1" and client.adapter_version == 1
    assert "scoreloop-v7" not in client.models()
    assert client.complete(CHAT, max_new_tokens=16, temperature=0.0).text == before
    client.load_adapter(None, None)


def test_old_adapters_are_unloaded_beyond_keep_adapters(server, adapters):
    with OpenAIPolicy(server.url, "tiny", keep_adapters=1) as policy:
        policy.load_adapter(adapters[0], 11)
        policy.load_adapter(adapters[1], 12)
        names = policy.models()
        assert "scoreloop-v12" in names and "scoreloop-v11" not in names
        # Re-publishing a version the server already holds is not an error.
        policy.load_adapter(adapters[1], 12)
        assert policy.model_name == "scoreloop-v12"
        policy.load_adapter(None, None)


def test_requests_for_two_adapters_at_once_each_get_their_own(server, adapters):
    """The stand-in serves one adapter at a time; interleaved names must still be honoured."""
    with OpenAIPolicy(server.url, "tiny") as a, OpenAIPolicy(server.url, "tiny") as b:
        a.load_adapter(adapters[0], 21)
        b.load_adapter(adapters[1], 22)
        want_a = a.complete(CHAT, max_new_tokens=10, temperature=0.0).text
        want_b = b.complete(CHAT, max_new_tokens=10, temperature=0.0).text
        assert want_a != want_b
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit((a if i % 2 else b).complete, CHAT, max_new_tokens=10, temperature=0.0)
                       for i in range(4)]
            texts = [f.result().text for f in futures]
        assert texts == [want_a if i % 2 else want_b for i in range(4)]


def test_server_down_fails_fast_with_a_clear_error():
    policy = OpenAIPolicy(f"http://127.0.0.1:{_free_port()}/v1", "tiny", timeout_s=30)
    started = time.perf_counter()
    with pytest.raises(PolicyError, match="cannot reach the model server at http://127.0.0.1"):
        policy.complete(CHAT)
    assert time.perf_counter() - started < 5
    with pytest.raises(PolicyError, match="cannot reach"):
        policy.load_adapter("/some/adapter", 3)
    assert policy.model_name == "tiny" and policy.adapter_version is None
    policy.close()


def test_unknown_model_and_bad_requests_get_clear_errors(server):
    with (OpenAIPolicy(server.url, "no-such-model") as policy,
          pytest.raises(PolicyError, match="HTTP 404: The model `no-such-model` does not exist")):
        policy.complete(CHAT)
    bad = httpx.post(f"{server.url}/chat/completions", content=b"{oops", timeout=10)
    assert bad.status_code == 400 and "not JSON" in bad.json()["message"]
    empty = httpx.post(f"{server.url}/chat/completions", json={"model": "tiny", "messages": []}, timeout=10)
    assert empty.status_code == 400


def test_overload_answers_are_retried_with_backoff():
    """429/503 are what vLLM sends when its queue is full; the client waits and tries again."""
    answers = [httpx.Response(503, json={"message": "busy"}), httpx.Response(429, headers={"retry-after": "0"}),
               httpx.Response(200, json={"choices": [{"message": {"content": "{}"}}],
                                         "usage": {"prompt_tokens": 5, "completion_tokens": 2}})]
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return answers[len(seen) - 1]

    with OpenAIPolicy("http://vllm:8000/v1", "m", backoff_s=0.01,
                      transport=httpx.MockTransport(handler)) as policy:
        out = policy.complete(CHAT, json_schema=Call.model_json_schema(), seed=4)
    assert (out.text, out.prompt_tokens, out.completion_tokens) == ("{}", 5, 2)
    assert len(seen) == 3
    assert seen[0]["response_format"]["type"] == "json_schema"
    assert seen[0]["response_format"]["json_schema"]["schema"] == Call.model_json_schema()
    assert seen[0]["seed"] == 4

    overloaded = httpx.MockTransport(lambda r: httpx.Response(503, text="overloaded"))
    with (OpenAIPolicy("http://vllm:8000/v1", "m", backoff_s=0.01, max_retries=2, transport=overloaded) as policy,
          pytest.raises(PolicyError, match="HTTP 503: overloaded")):
        policy.complete(CHAT)


class ServerProcess:
    """`python -m policy.openai_server` in its own process, on a fixed port, so it can be killed and restarted."""

    def __init__(self, model_dir: str, port: int, api_key: str, log_path: Path):
        self.model_dir, self.port, self.api_key, self.log_path = model_dir, port, api_key, log_path
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "policy.openai_server", "--model", self.model_dir, "--served-model-name",
               "tiny", "--port", str(self.port), "--device", "cpu", "--log-level", "WARNING"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "VLLM_API_KEY": self.api_key})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # a crash: nothing is saved, the runtime-loaded adapters are gone
            self.proc.wait(timeout=30)


@pytest.fixture
def server_process(tiny_model_dir, tmp_path):
    srv = ServerProcess(tiny_model_dir, _free_port(), "sk-test-key", tmp_path / "server.log")
    srv.start()
    yield srv
    srv.kill()


def test_after_a_server_restart_the_serving_adapter_is_registered_again(server_process, adapters):
    """A crashed and restarted server has forgotten its runtime adapters; the client notices the 404,
    registers the serving adapter again from its folder and retries, and the answers are the adapter's."""
    srv = server_process
    with OpenAIPolicy(srv.url, "tiny", api_key=srv.api_key, timeout_s=120) as policy:
        policy.load_adapter(adapters[0], 3)
        before = policy.complete(CHAT, max_new_tokens=16, temperature=0.0).text
        srv.kill()
        srv.start()
        assert policy.models() == ["tiny"]  # the restarted server has no adapter
        with ThreadPoolExecutor(3) as pool:  # concurrent episodes all hit the 404 at once
            after = [f.result().text for f in [pool.submit(policy.complete, CHAT, max_new_tokens=16,
                                                           temperature=0.0) for _ in range(3)]]
        assert after == [before] * 3  # the same adapter answers, not the base model
        assert "scoreloop-v3" in policy.models() and policy.model_name == "scoreloop-v3"
        assert policy.reregistered >= 1
        # the base model stays the base model: its 404 (a wrong name) is not papered over
        with (OpenAIPolicy(srv.url, "no-such-model", api_key=srv.api_key) as other,
              pytest.raises(PolicyError, match="HTTP 404: The model `no-such-model` does not exist")):
            other.complete(CHAT)


def test_the_api_key_is_required_on_v1_routes(server_process):
    srv = server_process
    with (OpenAIPolicy(srv.url, "tiny", api_key="wrong") as policy,
          pytest.raises(PolicyError, match="HTTP 401: Unauthorized")):
        policy.complete(CHAT, max_new_tokens=4)
    with pytest.raises(PolicyError, match="HTTP 401"):
        OpenAIPolicy(srv.url, "tiny").load_adapter("/some/adapter", 4)  # the adapter endpoint too
    assert httpx.get(f"{srv.url}/models", timeout=5).status_code == 401
    with OpenAIPolicy(srv.url, "tiny", api_key=srv.api_key) as policy:
        assert policy.complete(CHAT, max_new_tokens=4).completion_tokens > 0

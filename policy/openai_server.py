"""A small OpenAI-compatible server for a local transformers model: the offline stand-in for vLLM.

    python -m policy.openai_server --model DIR --port 8000

Serves the endpoints OpenAIPolicy uses, with vLLM's shapes: POST /v1/chat/completions
(response_format json_schema -> constrained decoding, seed, usage), GET /v1/models,
POST /v1/load_lora_adapter and /v1/unload_lora_adapter. The standard library's threading HTTP
server is enough: each request gets a thread that blocks in `Policy.complete`, and LocalPolicy
batches the threads' requests into shared forward passes, which is the concurrency that matters.

With `--api-key` (as vLLM's flag) every /v1 route wants `Authorization: Bearer <key>`; /health
stays open for health checks. Adapters registered at runtime live in memory only: a restarted
server has forgotten them, as vLLM has (the client registers the serving one again).

LocalPolicy serves one adapter at a time, so requests name an adapter and the server switches
between them only when no request for another adapter is in flight (a publish switches once).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policy.protocol import Policy, PolicyError

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A client mistake, answered with an OpenAI-style error body."""

    def __init__(self, status: HTTPStatus, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class AdapterRouter:
    """Names -> adapter folders, and the switch of the one policy between them."""

    def __init__(self, policy: Policy, base_name: str):
        self.policy = policy
        self.base_name = base_name
        self.adapters: dict[str, str] = {}  # lora_name -> path
        self._active: str | None = base_name  # None: what the policy serves has no name any more
        self._inflight = 0
        self._switching = False
        self._pending = 0  # requests waiting to switch: new ones queue behind them (no starvation)
        self._cond = threading.Condition()
        self._versions = iter(range(1_000_000, 2_000_000))  # for names that carry no version

    def names(self) -> list[str]:
        with self._cond:
            return [self.base_name, *self.adapters]

    def _version(self, name: str) -> int:
        match = re.search(r"(\d+)$", name)
        return int(match.group(1)) if match else next(self._versions)

    def _switch_to(self, name: str, path: str | None, *, hold: bool) -> None:
        """Wait until nothing else is in flight, then swap the policy's adapter (raises PolicyError);
        with `hold`, the caller also holds `name` for one request (handed over atomically)."""
        with self._cond:
            self._pending += 1
            while self._switching or self._inflight > 0:
                self._cond.wait()
            self._pending -= 1
            self._switching = True
            already = self._active == name
        ok = False
        try:
            if not already:
                self.policy.load_adapter(path, None if path is None else self._version(name))
            ok = True
        finally:
            with self._cond:
                if ok:
                    self._active = name
                    if hold:
                        self._inflight += 1
                self._switching = False
                self._cond.notify_all()

    def acquire(self, name: str) -> None:
        """Hold `name` as the served adapter for one request."""
        with self._cond:
            if name != self.base_name and name not in self.adapters:
                raise RequestError(HTTPStatus.NOT_FOUND, f"The model `{name}` does not exist.", "NotFoundError")
            if self._active == name and not self._switching and self._pending == 0:
                self._inflight += 1
                return
            path = None if name == self.base_name else self.adapters[name]
        try:
            self._switch_to(name, path, hold=True)
        except PolicyError as err:
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err), "InternalServerError") from None

    def release(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def load(self, name: str, path: str) -> None:
        """Register and switch to the adapter now: loading it is the check that it works."""
        with self._cond:
            if name == self.base_name or name in self.adapters:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"The lora adapter '{name}' has already been loaded.")
        try:
            self._switch_to(name, path, hold=False)
        except PolicyError as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Failed to load LoRA adapter '{name}': {err}") from None
        with self._cond:
            self.adapters[name] = path

    def unload(self, name: str) -> None:
        with self._cond:
            if name not in self.adapters:
                raise RequestError(HTTPStatus.NOT_FOUND, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.adapters[name]
            if self._active == name:
                self._active = None


def _response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON schema a request constrains its output to (response_format or vLLM's guided_json)."""
    fmt = body.get("response_format")
    if fmt:
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "response_format.json_schema.schema must be an object")
            return schema
        if kind == "json_object":
            return {"type": "object"}
        if kind != "text":
            raise RequestError(HTTPStatus.BAD_REQUEST, f"unsupported response_format type {kind!r}")
    guided = body.get("guided_json")
    if isinstance(guided, str):
        guided = json.loads(guided)
    return guided


class OpenAIHandler(BaseHTTPRequestHandler):
    server: OpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, so a client's connection pool is reused

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, payload: dict[str, Any] | str) -> None:
        data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(payload, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send(err.status, {"object": "error", "message": err.message, "type": err.kind, "code": err.status})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as err:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the body is not JSON: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    def _authorized(self) -> bool:
        """vLLM's rule: with an API key, /v1 routes need the bearer token; answer 401 otherwise."""
        key = self.server.api_key
        if not key or not self.path.startswith("/v1"):
            return True
        if hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
            return True
        # drain the body so the keep-alive connection stays usable
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "Unauthorized"})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            router = self.server.router
            data = [
                {"id": name, "object": "model", "created": self.server.started, "owned_by": "scoreloop",
                 "root": router.adapters.get(name, self.server.model_path),
                 "parent": None if name == router.base_name else router.base_name}
                for name in router.names()
            ]
            self._send(HTTPStatus.OK, {"object": "list", "data": data})
        elif self.path.rstrip("/") in ("/health", "/v1/health"):
            self._send(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", "NotFoundError"))

    def do_POST(self) -> None:
        if not self._authorized():
            return
        path = self.path.rstrip("/").removeprefix("/v1")
        try:
            body = self._body()
            if path == "/chat/completions":
                self._send(HTTPStatus.OK, self._chat(body))
            elif path == "/load_lora_adapter":
                name, adapter_path = body.get("lora_name"), body.get("lora_path")
                if not name or not adapter_path:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "lora_name and lora_path are required")
                self.server.router.load(str(name), str(adapter_path))
                self._send(HTTPStatus.OK, f"Success: LoRA adapter '{name}' added successfully.")
            elif path == "/unload_lora_adapter":
                name = body.get("lora_name")
                if not name:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "lora_name is required")
                self.server.router.unload(str(name))
                self._send(HTTPStatus.OK, f"Success: LoRA adapter '{name}' removed successfully.")
            else:
                raise RequestError(HTTPStatus.NOT_FOUND, f"no route {self.path}", "NotFoundError")
        except RequestError as err:
            self._error(err)
        except Exception as err:  # a bug must answer 500, not drop the connection
            log.exception("request failed")
            self._error(RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, repr(err), "InternalServerError"))

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(HTTPStatus.BAD_REQUEST, "messages must be a non-empty list")
        if body.get("stream"):
            raise RequestError(HTTPStatus.BAD_REQUEST, "streaming is not supported by this server")
        if int(body.get("n") or 1) != 1:
            raise RequestError(HTTPStatus.BAD_REQUEST, "only n=1 is supported by this server")
        chat = [{"role": str(m.get("role")), "content": str(m.get("content") or "")} for m in messages]
        schema = _response_schema(body)
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
        temperature = float(body.get("temperature", 1.0))
        seed = body.get("seed")
        name = str(body.get("model") or self.server.router.base_name)
        router = self.server.router
        router.acquire(name)
        try:
            completion = router.policy.complete(
                chat, json_schema=schema, max_new_tokens=max_tokens, temperature=temperature,
                seed=None if seed is None else int(seed),
            )
        except PolicyError as err:
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err), "InternalServerError") from None
        finally:
            router.release()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": completion.text},
                # Completion does not say why it stopped; a full budget means it was cut.
                "finish_reason": "length" if completion.completion_tokens >= max_tokens else "stop",
            }],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }


class OpenAIServer(ThreadingHTTPServer):
    """The HTTP server; `serve_forever` in a thread for tests, `main` for the command line."""

    daemon_threads = True
    request_queue_size = 128  # a block's worth of connections may arrive at once

    def __init__(self, policy: Policy, served_model_name: str, host: str = "127.0.0.1", port: int = 8000,
                 model_path: str | None = None, api_key: str | None = None):
        self.router = AdapterRouter(policy, served_model_name)
        self.api_key = api_key or None
        self.model_path = model_path or served_model_name
        self.started = int(time.time())
        super().__init__((host, port), OpenAIHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="HF folder, hub id or smollm2-135m")
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"),
                        help="require this bearer token on /v1 routes (default: $VLLM_API_KEY, as vLLM)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")

    from policy.local import LocalPolicy

    policy = LocalPolicy(args.model, device=args.device, max_batch_size=args.max_batch_size,
                         batch_wait_ms=args.batch_wait_ms)
    server = OpenAIServer(policy, args.served_model_name or args.model, args.host, args.port,
                          model_path=policy.model_dir, api_key=args.api_key)
    log.info("serving %s on %s", server.router.base_name, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        policy.close()


if __name__ == "__main__":
    main()

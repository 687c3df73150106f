"""The Policy protocol: what the episode graph needs from a model, whatever serves it.

Backends: policy/local.py (transformers + PEFT in-process, batched across the concurrent
episodes, reusing key/value caches across turns) and policy/openai_client.py (an
OpenAI-compatible server such as vLLM, adapter chosen by model name). Calls are blocking and
thread-safe: the block runner runs episodes in threads and a backend may batch their requests
together. A chat is append-only turn to turn, which is what lets a backend reuse the cache of
its earlier turns; `release_cache` says when it is over (optional: nothing else depends on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from store.errors import ScoreloopError


class PolicyError(ScoreloopError, RuntimeError):
    """The model backend cannot answer (server down, adapter failed to load, out of memory)."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    # Prompt tokens served from a key/value cache instead of being prefilled again (the local backend's
    # reuse across turns and shared prefixes; OpenAI's usage.prompt_tokens_details.cached_tokens). 0 = unknown.
    cached_tokens: int = 0


@runtime_checkable
class Policy(Protocol):
    @property
    def adapter_version(self) -> int | None:
        """Adapter version currently served (None = the base model)."""
        ...

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        json_schema: dict[str, Any] | None = None,
        max_new_tokens: int = 160,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> Completion:
        """One assistant turn for a chat; constrained to `json_schema` where the backend can."""
        ...

    def load_adapter(self, path: str | None, version: int | None) -> None:
        """Serve this adapter from the next request on (None = base model); the old one keeps
        serving if loading fails (raises PolicyError)."""
        ...

    def close(self) -> None: ...


def release_cache(policy: Policy, messages: list[dict[str, str]]) -> None:
    """Tell `policy` that this chat is over, so a backend holding its key/value cache can drop it now.

    Optional on purpose: a backend without a `release(messages)` method (OpenAI client, scripted) has
    nothing to drop, and a backend that has one also bounds what it holds without this hint.
    """
    release = getattr(policy, "release", None)
    if release is not None:
        release(messages)

"""The Policy protocol: what the episode graph needs from a model, whatever serves it.

Backends: policy/local.py (transformers + PEFT in-process, micro-batched across the
concurrent episodes) and policy/openai_client.py (an OpenAI-compatible server such as vLLM,
adapter chosen by model name). Calls are blocking and thread-safe: the block runner runs
episodes in threads and a backend may batch their requests together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


class PolicyError(RuntimeError):
    """The model backend cannot answer (server down, adapter failed to load, out of memory)."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


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

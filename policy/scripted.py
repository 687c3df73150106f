"""An offline Policy that replays scripted or recorded model outputs, turn by turn per episode.

A script is a list of outputs indexed by the episode's assistant turn (so concurrent episodes each
replay it from the start), optionally per ticker; after the last entry the last one repeats (a
model that loops forever). An entry that is an exception is raised (a failing backend).
`RecordingPolicy` wraps a real policy and writes the same JSONL that `ScriptedPolicy.from_jsonl`
reads, so a real model's answers can be replayed exactly.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from policy.protocol import Completion, Policy

Entry = str | BaseException
_STOCK = re.compile(r"^Stock: (\S+)", re.MULTILINE)


def episode_ticker(messages: list[dict[str, str]]) -> str | None:
    """The ticker named in the episode's first user turn (see agent.prompts.user_prompt)."""
    for m in messages:
        if m["role"] == "user":
            found = _STOCK.search(m["content"])
            return found.group(1) if found else None
    return None


def assistant_turn(messages: list[dict[str, str]]) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


class ScriptedPolicy:
    """Policy whose answers come from a script: the same turns for every episode, or per ticker."""

    def __init__(self, turns: Sequence[Entry] = (), *, per_ticker: Mapping[str, Sequence[Entry]] | None = None,
                 adapter_version: int | None = None) -> None:
        if not turns and not per_ticker:
            raise ValueError("a script needs turns or per_ticker entries")
        self.turns = list(turns)
        self.per_ticker = {k: list(v) for k, v in (per_ticker or {}).items()}
        self._adapter_version = adapter_version
        self.calls: list[dict[str, Any]] = []  # what each call asked for (schema, turn), for inspection
        self._lock = threading.Lock()

    @classmethod
    def from_jsonl(cls, path: str | Path, **kw: Any) -> ScriptedPolicy:
        """Lines `{"ticker": "SYN01" or null, "turn": 0, "text": "..."}` as written by RecordingPolicy."""
        shared: dict[int, str] = {}
        per: dict[str, dict[int, str]] = {}
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                turn, text = int(rec["turn"]), str(rec["text"])
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: not a recorded turn ({err})") from None
            (per.setdefault(rec["ticker"], {}) if rec.get("ticker") else shared)[turn] = text

        def ordered(d: dict[int, str]) -> list[str]:
            return [d[i] for i in sorted(d)]

        return cls(ordered(shared), per_ticker={t: ordered(d) for t, d in per.items()}, **kw)

    @property
    def adapter_version(self) -> int | None:
        return self._adapter_version

    def complete(self, messages: list[dict[str, str]], *, json_schema: dict[str, Any] | None = None,
                 max_new_tokens: int = 160, temperature: float = 0.7, seed: int | None = None) -> Completion:
        t0 = time.perf_counter()
        ticker = episode_ticker(messages)
        turn = assistant_turn(messages)
        script = self.per_ticker.get(ticker or "", self.turns) or self.turns
        entry = script[min(turn, len(script) - 1)]
        with self._lock:
            self.calls.append({"ticker": ticker, "turn": turn, "json_schema": json_schema, "temperature": temperature})
        if isinstance(entry, BaseException):
            raise entry
        # Whitespace-separated pieces stand in for token counts: there is no tokenizer here.
        prompt_tokens = sum(len(m["content"].split()) for m in messages)
        return Completion(text=entry, prompt_tokens=prompt_tokens, completion_tokens=len(entry.split()),
                          latency_ms=1000.0 * (time.perf_counter() - t0))

    def load_adapter(self, path: str | None, version: int | None) -> None:
        self._adapter_version = version

    def close(self) -> None:
        pass


class RecordingPolicy:
    """Wraps a real policy and appends each answer to a JSONL script (for ScriptedPolicy.from_jsonl)."""

    def __init__(self, inner: Policy, path: str | Path) -> None:
        self.inner = inner
        self.path = Path(path)
        self._lock = threading.Lock()

    @property
    def adapter_version(self) -> int | None:
        return self.inner.adapter_version

    def complete(self, messages: list[dict[str, str]], **kw: Any) -> Completion:
        out = self.inner.complete(messages, **kw)
        rec = {"ticker": episode_ticker(messages), "turn": assistant_turn(messages), "text": out.text}
        with self._lock, self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

    def load_adapter(self, path: str | None, version: int | None) -> None:
        self.inner.load_adapter(path, version)

    def close(self) -> None:
        self.inner.close()

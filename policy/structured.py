"""JSON-schema constrained decoding for transformers, one schema per batch row (llguidance).

Why llguidance and not lm-format-enforcer (measured on SmolLM2's tokenizer, see
bench/block_bench.py and the agent notes): lm-format-enforcer's transformers integration does not
import under transformers 5 (`transformers.tokenization_utils` moved); its token masks cost about
85 ms per token in Python against under 1 ms for llguidance (Rust, GIL released); and on a random
model it let through invalid JSON in 3 of 6 seeds (an exponent in an integer, a string one past
maxLength, a raw tab inside a string). llguidance is also a structured-output backend of vLLM, so
the local and served policies share one grammar engine.

Left padding is harmless: a row's matcher only ever sees the tokens generated after the prompt.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

# Compact JSON with a space after ':' and ',': the layout the model sees in its few-shot examples
# and that the store keeps; no free whitespace, so the token budget goes to content.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

_TOKENIZER_LOCK = threading.Lock()
_TOKENIZER_CACHE: dict[tuple[str, int, int, tuple[int, ...]], llguidance.LLTokenizer] = {}


class SchemaError(ValueError):
    """A JSON schema that the grammar compiler cannot turn into a grammar."""


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: <|im_end|> (our chat template) and the tokenizer's eos."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def grammar_tokenizer(tokenizer, vocab_size: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of a HF fast tokenizer; building it takes 1-3 s, so it is cached per
    tokenizer (name, size, vocab rows of the model, stop ids) for the life of the process."""
    stops = tuple(stop_token_ids(tokenizer))
    key = (str(tokenizer.name_or_path), len(tokenizer), vocab_size or 0, stops)
    with _TOKENIZER_LOCK:
        cached = _TOKENIZER_CACHE.get(key)
        if cached is None:
            # The first stop id (<|im_end|> for ChatML) is what an accepted grammar may end with.
            cached = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stops))
            _TOKENIZER_CACHE[key] = cached
        return cached


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with `additionalProperties: false` on every object that does not say otherwise.

    JSON Schema allows extra keys by default, and a small model will happily keep inventing them
    until its token budget runs out; the agent's actions never need any.
    """
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.lru_cache(maxsize=256)
def _grammar(schema_json: str) -> str:
    schema = closed_objects(json.loads(schema_json))
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)


def json_grammar(schema: dict[str, Any]) -> str:
    """The llguidance grammar for a JSON schema (cached per schema)."""
    try:
        return _grammar(json.dumps(schema))  # key order matters: it is the order the model writes
    except (ValueError, TypeError) as err:
        raise SchemaError(f"not a usable JSON schema: {err}") from err


def json_matcher(tok: llguidance.LLTokenizer, schema: dict[str, Any]) -> llguidance.LLMatcher:
    """A fresh matcher (one per request) that accepts exactly the JSON documents of `schema`."""
    matcher = llguidance.LLMatcher(tok, json_grammar(schema), log_level=0)
    if matcher.is_error():
        raise SchemaError(f"cannot compile the JSON schema: {matcher.get_error()}")
    return matcher


class RowChooser:
    """Per-row next-token choice for a batch whose rows join and leave between decode steps
    (policy/local.py): each row's grammar mask, temperature and seeded generator, so a row's text
    does not depend on which rows share its forward pass."""

    def __init__(self, stop_ids: list[int], vocab_size: int):
        self.stop_list = sorted(set(stop_ids))
        self.vocab_size = vocab_size
        self.constraint_s = 0.0  # time spent advancing matchers and masking: the grammar overhead
        self._executor = llguidance.LLExecutor()
        self._bits = torch.arange(32, dtype=torch.int32)

    def _mask(self, matchers: list[llguidance.LLMatcher | None], vocab: int) -> torch.Tensor | None:
        active = [(m, row) for row, m in enumerate(matchers) if m is not None]
        if not active:
            return None
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        bitmask.fill_(-1)  # unconstrained rows: everything allowed
        llguidance.torch.fill_next_token_bitmask_par(self._executor, active, bitmask)
        mask = ((bitmask.unsqueeze(-1) >> self._bits) & 1).bool().flatten(1)
        mask = mask[:, :vocab] if mask.shape[1] >= vocab else torch.nn.functional.pad(
            mask, (0, vocab - mask.shape[1]), value=False
        )
        # A matcher in an error state allows nothing; end the row rather than sample from NaNs.
        empty = ~mask.any(dim=1)
        if empty.any():
            mask[empty.nonzero().flatten().unsqueeze(1), torch.tensor(self.stop_list)] = True
        return mask

    def choose(self, logits: torch.Tensor, matchers: list[llguidance.LLMatcher | None],
               temperatures: list[float], generators: list[torch.Generator]) -> list[int]:
        """One token per row from `logits` (rows, vocab); each row's matcher consumes its token."""
        logits = logits.float().cpu()  # per-row generators and grammar masks live on the CPU
        t0 = time.perf_counter()
        mask = self._mask(matchers, logits.shape[1])
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        self.constraint_s += time.perf_counter() - t0
        choice = logits.argmax(dim=1)
        for row, temperature in enumerate(temperatures):
            if temperature > 0:
                probs = torch.softmax(logits[row] / temperature, dim=-1)
                choice[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
        tokens = choice.tolist()
        t0 = time.perf_counter()
        for matcher, token in zip(matchers, tokens):
            if matcher is not None and not matcher.is_stopped():
                matcher.consume_token(token)
        self.constraint_s += time.perf_counter() - t0
        return tokens

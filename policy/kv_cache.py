"""Key/value caches that outlive one `generate`: a conversation's cache between its turns, and a
block's shared prompt prefix prefilled once for all its episodes (policy/local.py uses them).

Entries are found by content, not by a session id: a request reuses the held cache with the longest
common *token* prefix with its prompt. That needs nothing from the caller and stays correct
whatever the messages are (a conditioning label that moves, a repair turn, a re-tokenized reply):
where the tokens stop matching, the rest is prefilled again. Entries are plain per-layer tensors
of one sequence, copied into each batch, so a held cache is never mutated by the rows that use it.

Bounded: at most `max_conversations` conversation caches and `max_prefixes` shared prefixes
(least recently used go first), a conversation's cache is replaced by its next turn's, and
`release(chat)` drops it when the episode ends.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

# A chat continues a held conversation cache when it repeats all of that cache's prompt: the reply
# after it may re-tokenize differently once rendered back into the chat, and so may the last few
# prompt tokens where they meet the reply (newlines merge), hence a little slack.
CONTINUATION_SLACK = 8


@dataclass(eq=False)
class KVEntry:
    """Keys/values for `tokens` (one sequence): per layer (1, kv_heads, len(tokens), head_dim)."""

    tokens: torch.Tensor  # 1-D long, on the CPU (for matching)
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    prompt_len: int  # tokens[:prompt_len] was the prompt, the rest the model's reply
    shared: bool = False  # a block prefix, kept for others to copy, never superseded by one chat
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def continued_by(self, matched: int) -> bool:
        """Whether a chat matching `matched` of our tokens is this conversation, carried on."""
        return not self.shared and matched >= max(self.prompt_len - CONTINUATION_SLACK, 1)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D token tensors."""
    n = min(a.shape[0], b.shape[0])
    if n == 0:
        return 0
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


class KVStore:
    """The held caches; thread-safe (requests look up in the batch worker, episodes release from
    their own threads)."""

    def __init__(self, max_conversations: int = 16, max_prefixes: int = 4):
        self.max_conversations = max_conversations
        self.max_prefixes = max_prefixes
        self._conversations: OrderedDict[int, KVEntry] = OrderedDict()  # id(entry) -> entry, LRU order
        self._prefixes: OrderedDict[int, KVEntry] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_conversations > 0 or self.max_prefixes > 0

    def lookup(self, tokens: torch.Tensor, limit: int) -> tuple[KVEntry | None, int]:
        """The entry sharing the longest token prefix with `tokens`, and how many of its tokens to
        reuse (at most `limit`: a forward pass needs at least one new token to give logits)."""
        best, best_n = None, 0
        with self._lock:
            for pool in (self._conversations, self._prefixes):
                for entry in pool.values():
                    n = min(common_prefix(entry.tokens, tokens), limit)
                    if n > best_n:
                        best, best_n = entry, n
            if best is not None:
                pool = self._prefixes if best.shared else self._conversations
                pool.move_to_end(id(best))
        return best, best_n

    def put(self, entry: KVEntry, supersedes: KVEntry | None = None, reused: int = 0) -> None:
        """Hold `entry`; drop `supersedes` if `entry` continues the same conversation (its cache would
        only ever be a shorter copy of this one)."""
        with self._lock:
            if supersedes is not None and supersedes.continued_by(reused):
                self._conversations.pop(id(supersedes), None)
            pool, cap = (self._prefixes, self.max_prefixes) if entry.shared else (
                self._conversations, self.max_conversations)
            if cap <= 0:
                return
            pool[id(entry)] = entry
            while len(pool) > cap:
                pool.popitem(last=False)

    def release(self, tokens: torch.Tensor) -> int:
        """Drop the conversation caches that `tokens` (a finished chat) continues; returns how many."""
        with self._lock:
            gone = [key for key, entry in self._conversations.items()
                    if entry.continued_by(common_prefix(entry.tokens, tokens))]
            for key in gone:
                del self._conversations[key]
        return len(gone)

    def clear(self) -> None:
        """Forget everything (the adapter changed: every held key/value is stale)."""
        with self._lock:
            self._conversations.clear()
            self._prefixes.clear()

    def held(self) -> tuple[int, int, int]:
        """(conversation entries, prefix entries, bytes held)."""
        with self._lock:
            entries = [*self._conversations.values(), *self._prefixes.values()]
            return len(self._conversations), len(self._prefixes), sum(e.nbytes for e in entries)


class SlabLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in one buffer sized for the whole call and written in
    place: DynamicLayer concatenates, which copies the whole batch cache at every decoded token."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self._k, self._v, self._n = keys, values, length
        self.device, self.dtype = keys.device, keys.dtype
        self.is_initialized = True
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._n + key_states.shape[-2]
        if end > self._k.shape[2]:  # ran past the planned size: grow (rare, costs one copy)
            grow = max(end - self._k.shape[2], self._k.shape[2] // 2)
            pad = (0, 0, 0, grow)
            self._k = torch.nn.functional.pad(self._k, pad)
            self._v = torch.nn.functional.pad(self._v, pad)
        self._k[:, :, self._n:end] = key_states
        self._v[:, :, self._n:end] = value_states
        self._n = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._n

    def row(self, row: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of one row's keys/values at `columns` (its real tokens, padding left out)."""
        return self._k[row:row + 1].index_select(2, columns), self._v[row:row + 1].index_select(2, columns)

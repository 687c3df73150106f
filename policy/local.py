"""In-process policy: transformers + PEFT LoRA adapter, continuously batched across threads,
reusing key/value caches across an episode's turns and across a block's shared prompt prefix.

The block runner runs episodes in a thread pool; each `complete` call queues a request and one
worker thread decodes the queued requests together (up to `max_batch_size` rows; the first ones
wait at most `batch_wait_ms` for company). Each row keeps its own schema, temperature, seed and
token budget (policy/structured.py), so a row's text does not depend on which rows it ran with.

Why this shape on a CPU: prefill is compute-bound (8 prompts cost ~8x one) while a decode step for 8
rows costs little more than for one. So
- every turn used to prefill the whole conversation again (3,078 tokens prefilled for a 962-token
  episode); now a row starts from the held cache with the longest common token prefix
  (policy/kv_cache.py): its own previous turn, or a block prefix prefilled once for the rows of a
  batch that share it, and only the new tokens are prefilled;
- a static batch ran as long as its longest answer while the other episodes' next turns queued
  behind it; now a row answers as soon as it ends and queued requests join the running batch at
  the next step (continuous batching), so the batch stays full.
Rows share one slab of keys/values: each row's cache right-aligned at the same column, new tokens
right-aligned after a pad gap, the attention mask off on gaps and true position ids per row, so a
row attends exactly to its own sequence. Decoding is our own loop over that slab (written in
place): `model.generate` takes neither per-row caches of different lengths nor rows that join.
An adapter swap waits for the running batch to drain and drops every held cache; a prompt that
stops matching (a truncated or edited chat) is prefilled from where it differs.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from policy.protocol import Completion, PolicyError

if TYPE_CHECKING:
    import torch

    from policy.kv_cache import KVEntry

_STOP = object()  # queue sentinel: the worker exits
# A shared prefix shorter than this is not worth a forward pass of its own.
_MIN_SHARED_PREFIX = 16


@dataclass
class _Request:
    messages: list[dict[str, str]]
    json_schema: dict[str, Any] | None
    max_new_tokens: int
    temperature: float
    seed: int
    submitted: float
    future: Future = field(default_factory=Future)
    tokens: Any = None  # prompt token ids (1-D torch tensor), rendered by the worker
    matcher: Any = None  # llguidance matcher for json_schema, built by the worker


@dataclass(frozen=True)
class PolicyStats:
    """Counters since start: how well requests were batched and where the time went."""

    requests: int = 0
    generate_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padded_tokens: int = 0  # pad positions in the batched prompts (wasted prefill compute)
    prefilled_tokens: int = 0  # prompt tokens run through the model, shared prefixes counted once
    cached_tokens: int = 0  # prompt tokens taken from a held key/value cache instead
    prefix_prefilled_tokens: int = 0  # part of prefilled_tokens spent on shared block prefixes
    generate_s: float = 0.0  # wall time inside model.generate
    constraint_s: float = 0.0  # part of generate_s spent computing JSON-schema token masks
    lock_wait_s: float = 0.0  # time batches waited for the generation lock (adapter swaps)

    @property
    def mean_batch(self) -> float:
        return self.requests / self.generate_calls if self.generate_calls else 0.0


class LocalPolicy:
    """A transformers model (plus an optional LoRA adapter) serving `complete` calls in batches."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        adapter_path: str | None = None,
        adapter_version: int | None = None,
        device: str = "auto",
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        cache_dir: str | None = None,
        seed: int = 0,
        kv_cache_size: int | None = None,
        kv_prefixes: int = 4,
    ):
        """`kv_cache_size`: conversation caches held at once (default 2 x max_batch_size, 0 = no
        reuse: every turn prefills its whole prompt); `kv_prefixes`: shared block prefixes held."""
        import torch
        from transformers import AutoModelForCausalLM

        from policy.kv_cache import KVStore
        from policy.model_files import ModelError, load_tokenizer, resolve_model
        from policy.structured import grammar_tokenizer, stop_token_ids

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # fp32 on CPU: bf16 matmuls on CPUs without AMX are many times slower.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.model_dir = resolve_model(model, cache_dir)
            self.tokenizer = load_tokenizer(self.model_dir)
            base = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        except (ModelError, OSError, ValueError) as err:
            raise PolicyError(f"cannot load model {model!r}: {err}") from err
        self.model = base.to(self.device).eval()
        self._stop_ids = stop_token_ids(self.tokenizer)
        self._stop_set = set(self._stop_ids)
        text_config = self.model.config.get_text_config(decoder=True)
        heads = text_config.num_attention_heads
        self._kv_shape = (
            getattr(text_config, "num_key_value_heads", None) or heads,
            getattr(text_config, "head_dim", None) or text_config.hidden_size // heads,
            text_config.num_hidden_layers,
            dtype,
        )
        self._pad_id = self.tokenizer.pad_token_id
        self._vocab = self.model.get_output_embeddings().weight.shape[0]
        self._grammar_tok = grammar_tokenizer(self.tokenizer, self._vocab)

        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self._seed = seed
        self._seed_counter = itertools.count()
        self._adapter_names = itertools.count(1)
        self._active_adapter: str | None = None  # PEFT adapter name; None = base model
        self._adapter_version: int | None = None
        self._adapter_generation = 0  # bumped by every swap: held caches belong to one adapter
        size = 2 * max_batch_size if kv_cache_size is None else kv_cache_size
        self._kv = KVStore(max_conversations=size, max_prefixes=kv_prefixes if size > 0 else 0)
        self._gen_lock = threading.Lock()  # held while a batch decodes and for an adapter swap
        self._lock_owner: int | None = None
        self._swap_pending = False  # a swap waits: the running batch stops admitting rows and drains
        self._stats_lock = threading.Lock()
        self._stats = PolicyStats()
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        if adapter_path is not None:
            self.load_adapter(adapter_path, adapter_version)
        self._worker = threading.Thread(target=self._serve, name="local-policy-batcher", daemon=True)
        self._worker.start()

    # -- Policy protocol -------------------------------------------------------------------------

    @property
    def adapter_version(self) -> int | None:
        return self._adapter_version

    @property
    def stats(self) -> PolicyStats:
        with self._stats_lock:
            return self._stats

    def clear_cache(self) -> None:
        """Drop every held key/value cache (benchmarks start cold with it; an adapter swap does it too)."""
        with self._swap():
            self._forget_caches()

    def cache_held(self) -> tuple[int, int, int]:
        """(conversation caches, shared prefixes, bytes) held right now."""
        return self._kv.held()

    def release(self, messages: list[dict[str, str]]) -> None:
        """The chat is over (policy.protocol.release_cache): drop its key/value cache now rather
        than when it ages out."""
        import torch

        if self._kv.max_conversations <= 0:
            return
        with contextlib.suppress(Exception):  # a hint: a chat that cannot be rendered has nothing held
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            self._kv.release(torch.tensor(ids, dtype=torch.long))

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids: the project chat template, ending with the assistant header."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        json_schema: dict[str, Any] | None = None,
        max_new_tokens: int = 160,
        temperature: float = 0.7,
        seed: int | None = None,
    ) -> Completion:
        if self._closed:
            raise PolicyError("the local policy is closed")
        if seed is None:
            seed = self._seed * 1_000_003 + next(self._seed_counter)
        # Rendering happens in the worker: a caller queues at once, so concurrent callers land
        # in the same batch instead of racing the batch window while they tokenize.
        request = _Request(
            messages=list(messages),
            json_schema=json_schema,
            max_new_tokens=max(1, int(max_new_tokens)),
            temperature=float(temperature),
            seed=int(seed),
            submitted=time.perf_counter(),
        )
        self._queue.put(request)
        return request.future.result()

    def choice_logprobs(self, messages: list[dict[str, str]], prefix: str, options: Sequence[str]) -> dict[str, float]:
        """Log-probability of each option's first token right after the assistant header and `prefix`,
        under the serving adapter (one forward pass; agent.guidance scores directions with it). The text is
        tokenized canonically; a grammar-constrained decoder may split the same prefix into other tokens."""
        import torch

        if self._closed:
            raise PolicyError("the local policy is closed")
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        head = tok(text, add_special_tokens=False)["input_ids"]
        first = {}
        for option in options:
            full = tok(text + option, add_special_tokens=False)["input_ids"]
            if full[: len(head)] != head or len(full) == len(head):
                raise PolicyError(f"option {option!r} does not start a new token after {prefix!r}")
            first[option] = full[len(head)]
        if len(set(first.values())) != len(first):
            raise PolicyError(f"options {list(options)} share a first token; they cannot be scored apart")
        with self._gen_lock:  # between batches: the adapter cannot swap under it
            out = self._forward(input_ids=torch.tensor([head], dtype=torch.long, device=self.device))
        logp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return {o: float(logp[i]) for o, i in first.items()}

    def load_adapter(self, path: str | None, version: int | None) -> None:
        """Swap the LoRA adapter between batches; on any failure the old adapter keeps serving."""
        if path is None:
            with self._swap():
                self._drop_adapters(keep=None)
                self._active_adapter, self._adapter_version = None, None
                self._forget_caches()
            return
        self._check_adapter_files(Path(path))
        from peft import PeftModel

        with self._swap():
            name = f"adapter{next(self._adapter_names)}"
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(path, adapter_name=name, is_trainable=False)
                else:
                    self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
                self.model.to(self.device).eval()
                self.model.set_adapter(name)
            except Exception as err:
                # Undo the half-added adapter so the previous one (or the base model) serves on.
                if isinstance(self.model, PeftModel) and name in self.model.peft_config:
                    with contextlib.suppress(Exception):
                        if self._active_adapter:
                            self.model.set_adapter(self._active_adapter)
                        self.model.delete_adapter(name)
                raise PolicyError(f"cannot load adapter {path!r} (version {version}): {err}") from err
            self._drop_adapters(keep=name)
            self._active_adapter, self._adapter_version = name, version
            self._forget_caches()

    @contextlib.contextmanager
    def _swap(self):
        """Hold the generation lock for an adapter change; the running batch drains first."""
        self._swap_pending = True
        try:
            with self._gen_lock:
                yield
        finally:
            self._swap_pending = False

    def _forget_caches(self) -> None:
        """Keys/values computed under another adapter are wrong for this one: drop them all."""
        self._adapter_generation += 1
        self._kv.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._worker.join(timeout=60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adapters --------------------------------------------------------------------------------

    @staticmethod
    def _check_adapter_files(path: Path) -> None:
        """Read the adapter's config and weights before touching the model, so a broken folder
        fails without leaving LoRA layers half-injected into the serving model."""
        from peft import PeftConfig

        try:
            PeftConfig.from_pretrained(str(path))
            weights = path / "adapter_model.safetensors"
            if weights.exists():
                from safetensors.torch import load_file

                tensors = load_file(str(weights))
            else:
                import torch

                tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
            if not tensors:
                raise ValueError("the adapter has no weights")
        except Exception as err:
            raise PolicyError(f"cannot load adapter {str(path)!r}: {err}") from err

    def _drop_adapters(self, keep: str | None) -> None:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return
        for name in list(self.model.peft_config):
            if name != keep and name != self.model.active_adapter:
                self.model.delete_adapter(name)

    def _adapter_scope(self):
        """The base model runs with LoRA layers switched off once a PeftModel wraps it."""
        from peft import PeftModel

        if self._active_adapter is None and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    # -- batching: rows join and leave a running decode ------------------------------------------

    def _serve(self) -> None:
        running: _Running | None = None
        stop = False
        while True:
            if running is None:
                if stop:
                    break
                first = self._queue.get()
                if first is _STOP:
                    break
                batch, stop = self._take([first], self.max_batch_size, wait_s=self.batch_wait_s)
                running = self._guarded(None, lambda b=batch: self._start(b), batch)
            elif not stop and not self._swap_pending and running.live < self.max_batch_size:
                # Continuous batching: whoever queued while the batch decoded joins it now, instead
                # of waiting for its slowest row (a static batch runs as long as its longest answer).
                newcomers, stop = self._take([], self.max_batch_size - running.live, wait_s=0.0)
                if newcomers:
                    running = self._guarded(running, lambda r=running, n=newcomers: self._join(r, n), newcomers)
            if running is not None:
                running = self._guarded(running, lambda r=running: self._step(r), [])
        # Anything still queued after close gets an error rather than a hang.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.future.set_exception(PolicyError("the local policy was closed"))

    def _take(self, batch: list[_Request], room: int, wait_s: float) -> tuple[list[_Request], bool]:
        """Up to `room` queued requests, waiting at most `wait_s` for more; (requests, stop seen)."""
        deadline = time.perf_counter() + wait_s
        while len(batch) < room:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _guarded(self, running: _Running | None, action, newcomers: list[_Request]) -> _Running | None:
        """Run one batch action; a failure fails the requests it touched, never the worker."""
        try:
            result = action()
        except Exception as err:  # noqa: BLE001 - one bad batch must not kill the worker
            rows = [row.request for row in running.rows if not row.done] if running is not None else []
            for request in [*rows, *newcomers]:
                if not request.future.done():
                    request.future.set_exception(PolicyError(f"local generation failed: {err}"))
            if running is not None:
                running.close()
            elif self._gen_lock.locked() and self._lock_owner == threading.get_ident():
                self._release_gen_lock()
            return None
        if result is None and running is not None:
            running.close()
        return result

    def _release_gen_lock(self) -> None:
        self._lock_owner = None
        self._gen_lock.release()

    def _prepare(self, batch: list[_Request]) -> list[_Request]:
        """Render prompts and compile schemas; a malformed chat or schema fails its own call only."""
        import torch

        from policy.structured import json_matcher

        ready = []
        for request in batch:
            try:
                request.tokens = torch.tensor(self.render(request.messages), dtype=torch.long)
                if request.json_schema is not None:
                    request.matcher = json_matcher(self._grammar_tok, request.json_schema)
                ready.append(request)
            except Exception as err:  # noqa: BLE001
                request.future.set_exception(PolicyError(f"cannot prepare the request: {err}"))
        return ready

    def _start(self, batch: list[_Request]) -> _Running | None:
        """Take the generation lock (adapter swaps wait for the batch to drain) and prefill."""
        batch = self._prepare(batch)
        if not batch:
            return None
        waited = time.perf_counter()
        self._gen_lock.acquire()
        self._lock_owner = threading.get_ident()
        self._count(lock_wait_s=time.perf_counter() - waited)
        running = _Running(self)
        running.rows, running.layers, running.mask, running.width, running.logits, running.positions = \
            self._prefill(batch)
        return running

    def _join(self, running: _Running, newcomers: list[_Request]) -> _Running:
        newcomers = self._prepare(newcomers)
        if newcomers:
            running.merge(*self._prefill(newcomers))
        return running

    def _step(self, running: _Running) -> _Running | None:
        """One decode step; finished rows answer at once. None once every row has finished."""
        running.step()
        return None if running.live == 0 else running

    def _count(self, **deltas: float) -> None:
        with self._stats_lock:
            s = self._stats
            self._stats = replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})

    # -- generation with key/value reuse -----------------------------------------------------------

    def _core(self):
        """The transformers model to call: LoRA layers live inside it once PEFT wraps it, so calling
        it directly applies the active adapter (and `disable_adapter` still switches them off)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def _forward(self, **kw):
        import torch

        started = time.perf_counter()
        with torch.inference_mode(), self._adapter_scope():
            out = self._core()(use_cache=True, **kw)
        self._count(generate_s=time.perf_counter() - started)
        return out

    def _assemble(self, rows: list[tuple[KVEntry | None, int, torch.Tensor]], extra: int):
        """One batch from (held cache, tokens of it to reuse, new tokens) per row.

        Layout per row: [zeros | reused cache | pad | new tokens | room for `extra` generated],
        with the attention mask off on zeros and pads and true positions on the new tokens, so a
        row attends exactly to its own sequence (pads in the middle are as harmless as left pads).
        Returns (layers, input_ids, position_ids, mask, columns, C, S); columns[b] = row b's real
        slots among the first C + S.
        """
        import torch

        from policy.kv_cache import SlabLayer

        n_rows = len(rows)
        c = max(n for _, n, _ in rows)
        s = max(len(new) for _, _, new in rows)
        cap = c + s + extra
        kv_heads, head_dim, n_layers, dtype = self._kv_shape
        layers = []
        for layer in range(n_layers):
            k = torch.zeros((n_rows, kv_heads, cap, head_dim), dtype=dtype, device=self.device)
            v = torch.zeros_like(k)
            for b, (entry, n, _) in enumerate(rows):
                if n:
                    ek, ev = entry.layers[layer]
                    k[b, :, c - n:c] = ek[0, :, :n]
                    v[b, :, c - n:c] = ev[0, :, :n]
            layers.append(SlabLayer(k, v, c))
        input_ids = torch.full((n_rows, s), self._pad_id, dtype=torch.long)
        positions = torch.zeros((n_rows, s), dtype=torch.long)
        mask = torch.zeros((n_rows, cap), dtype=torch.long)
        columns = []
        for b, (_, n, new) in enumerate(rows):
            m = len(new)
            input_ids[b, s - m:] = new
            positions[b, s - m:] = torch.arange(n, n + m)
            mask[b, c - n:c] = 1
            mask[b, c + s - m:c + s] = 1
            columns.append(list(range(c - n, c)) + list(range(c + s - m, c + s)))
        return layers, input_ids.to(self.device), positions.to(self.device), mask.to(self.device), columns, c, s

    def _prefill_prefix(self, tokens: torch.Tensor) -> tuple[KVEntry, int]:
        """Prefill a prompt prefix that several rows share once, and hold it for the block:
        (the held prefix, tokens actually prefilled)."""
        import torch

        from policy.kv_cache import KVEntry

        entry, n = self._kv.lookup(tokens, len(tokens) - 1)
        layers, input_ids, positions, mask, columns, c, s = self._assemble([(entry, n, tokens[n:])], extra=0)
        self._forward(input_ids=input_ids, attention_mask=mask[:, :c + s], position_ids=positions,
                      cache=_cache(layers), logits_to_keep=1)
        cols = torch.tensor(columns[0], device=self.device)
        prefix = KVEntry(tokens.clone(), [layer.row(0, cols) for layer in layers], prompt_len=len(tokens), shared=True)
        self._kv.put(prefix)
        return prefix, len(tokens) - n

    def _plan_reuse(self, batch: list[_Request]) -> tuple[list[tuple[KVEntry | None, int]], int]:
        """Per row: the held cache to start from and how many of its tokens to reuse; and how many
        tokens were prefilled for a shared prefix.

        Rows that share a prompt prefix longer than anything held (the first turns of a block: same
        system prompt, tool list, and whatever else comes first) get it prefilled once and copied.
        """
        from policy.kv_cache import common_prefix

        if not self._kv.enabled:
            return [(None, 0)] * len(batch), 0
        found = [self._kv.lookup(r.tokens, len(r.tokens) - 1) for r in batch]
        prefilled = 0
        if self._kv.max_prefixes <= 0:
            return found, prefilled
        # Rows that start alike (first _MIN_SHARED_PREFIX tokens) form a group; a group of two or more
        # whose common prefix is longer than what its rows found held gets that prefix prefilled once.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(batch):
            if len(r.tokens) > _MIN_SHARED_PREFIX:
                groups.setdefault(tuple(r.tokens[:_MIN_SHARED_PREFIX].tolist()), []).append(i)
        for rows in groups.values():
            if len(rows) < 2:
                continue
            first = batch[rows[0]].tokens
            p = min(len(batch[i].tokens) - 1 for i in rows)
            for i in rows[1:]:
                p = min(p, common_prefix(first, batch[i].tokens))
            gaining = [i for i in rows if found[i][1] < p]
            if len(gaining) >= 2:
                prefix, new = self._prefill_prefix(first[:p])
                prefilled += new
                for i in gaining:
                    found[i] = (prefix, p)
        return found, prefilled

    def _prefill(self, batch: list[_Request]):
        """Prefill a group of new requests from their held caches: (rows, layers, mask, width,
        last logits, next positions), ready to decode or to merge into a running batch."""
        import torch

        plan, prefix_tokens = self._plan_reuse(batch)
        news = [r.tokens[n:] for r, (_, n) in zip(batch, plan)]
        extra = max(r.max_new_tokens for r in batch)
        layers, input_ids, positions, mask, columns, c, s = self._assemble(
            [(entry, n, new) for (entry, n), new in zip(plan, news)], extra)
        out = self._forward(input_ids=input_ids, attention_mask=mask[:, :c + s], position_ids=positions,
                            cache=_cache(layers), logits_to_keep=1)
        rows = [_Row(request=r, entry=entry, reused=n, cols=cols, generator=torch.Generator().manual_seed(r.seed))
                for r, (entry, n), cols in zip(batch, plan, columns)]
        self._count(generate_calls=1, padded_tokens=sum(s - len(new) for new in news),
                    prefilled_tokens=sum(len(new) for new in news) + prefix_tokens,
                    prefix_prefilled_tokens=prefix_tokens)
        next_positions = torch.tensor([len(r.tokens) for r in batch], dtype=torch.long)
        return rows, layers, mask, c + s, out.logits[:, -1, :], next_positions

    def _finish(self, row: _Row, layers: list, slot: int) -> None:
        """A row is done: hold its cache for the next turn and answer its caller now."""
        import torch

        from policy.kv_cache import KVEntry

        request = row.request
        if self._kv.max_conversations > 0:
            fed = len(row.cols) - len(request.tokens)  # replies whose keys/values are in the slab
            cols = torch.tensor(row.cols, device=self.device)
            tokens = torch.cat([request.tokens, torch.tensor(row.generated[:fed], dtype=torch.long)])
            held = KVEntry(tokens, [layer.row(slot, cols) for layer in layers], prompt_len=len(request.tokens))
            self._kv.put(held, supersedes=row.entry, reused=row.reused)
        done = Completion(
            text=self.tokenizer.decode(row.generated, skip_special_tokens=True),
            prompt_tokens=len(request.tokens),
            completion_tokens=len(row.generated),
            latency_ms=(time.perf_counter() - request.submitted) * 1000,
            cached_tokens=row.reused,
        )
        self._count(requests=1, prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                    cached_tokens=done.cached_tokens)
        request.future.set_result(done)


def _cache(layers: list):
    """A DynamicCache over our preallocated layers (transformers only calls update/lengths on it)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = layers
    return cache


@dataclass(eq=False)
class _Row:
    request: _Request
    entry: Any  # the held KVEntry it started from (None = none)
    reused: int  # tokens of it reused
    cols: list[int]  # slab columns of its real tokens so far: prompt, then the replies fed back
    generator: Any
    generated: list[int] = field(default_factory=list)
    done: bool = False


class _Running:
    """The batch being decoded: one slab of keys/values (rows x columns), rows joining at step
    boundaries (merged right-aligned, so every row's next token lands in the same column) and
    finished rows dropped at the next merge."""

    def __init__(self, policy: LocalPolicy):
        from policy.structured import RowChooser

        self.policy = policy
        self.chooser = RowChooser(policy._stop_ids, policy._vocab)
        self.rows: list[_Row] = []
        self.layers: list = []
        self.mask = self.logits = self.positions = None
        self.width = 0
        self._closed = False

    @property
    def live(self) -> int:
        return sum(1 for r in self.rows if not r.done)

    def merge(self, rows: list[_Row], layers: list, mask, width: int, logits, positions) -> None:
        """Add a prefilled group; keep only our live rows (one copy of the slab either way)."""
        import torch

        from policy.kv_cache import SlabLayer

        keep = [i for i, r in enumerate(self.rows) if not r.done]
        w = max(self.width, width)
        room = max([r.request.max_new_tokens - len(r.generated) for r in self.rows if not r.done] +
                   [r.request.max_new_tokens for r in rows])
        n_rows = len(keep) + len(rows)
        shift_a, shift_b = w - self.width, w - width
        idx = torch.tensor(keep, dtype=torch.long, device=self.policy.device)
        merged = []
        for old, new in zip(self.layers, layers):
            k = old._k.new_zeros((n_rows, old._k.shape[1], w + room, old._k.shape[3]))
            v = torch.zeros_like(k)
            k[:len(keep), :, shift_a:w] = old._k.index_select(0, idx)[:, :, :self.width]
            v[:len(keep), :, shift_a:w] = old._v.index_select(0, idx)[:, :, :self.width]
            k[len(keep):, :, shift_b:w] = new._k[:, :, :width]
            v[len(keep):, :, shift_b:w] = new._v[:, :, :width]
            merged.append(SlabLayer(k, v, w))
        m = torch.zeros((n_rows, w + room), dtype=torch.long, device=self.policy.device)
        m[:len(keep), shift_a:w] = self.mask.index_select(0, idx)[:, :self.width]
        m[len(keep):, shift_b:w] = mask[:, :width]
        for r in (self.rows[i] for i in keep):
            r.cols = [c + shift_a for c in r.cols]
        for r in rows:
            r.cols = [c + shift_b for c in r.cols]
        self.rows = [self.rows[i] for i in keep] + rows
        self.layers, self.mask, self.width = merged, m, w
        self.logits = torch.cat([self.logits.index_select(0, idx), logits])
        self.positions = torch.cat([self.positions.index_select(0, idx.cpu()), positions])

    def step(self) -> None:
        """Choose every live row's next token; answer the rows that finished; feed the rest."""
        import torch

        policy = self.policy
        live = [i for i, r in enumerate(self.rows) if not r.done]
        rows = [self.rows[i] for i in live]
        tokens = self.chooser.choose(
            self.logits.index_select(0, torch.tensor(live, device=self.logits.device)),
            [r.request.matcher for r in rows], [r.request.temperature for r in rows], [r.generator for r in rows])
        policy._count(constraint_s=self.chooser.constraint_s)
        self.chooser.constraint_s = 0.0
        feed = torch.full((len(self.rows),), policy._pad_id, dtype=torch.long)
        for i, row, token in zip(live, rows, tokens):
            row.generated.append(token)
            if token in policy._stop_set or len(row.generated) >= row.request.max_new_tokens:
                row.done = True
                policy._finish(row, self.layers, i)
            else:
                feed[i] = token
                row.cols.append(self.width)
        if self.live == 0:
            return
        if self.width >= self.mask.shape[1]:
            self.mask = torch.nn.functional.pad(self.mask, (0, max(16, self.mask.shape[1] // 2)))
        self.mask[:, self.width] = 1
        self.width += 1
        out = policy._forward(input_ids=feed.unsqueeze(1).to(policy.device), attention_mask=self.mask[:, :self.width],
                              position_ids=self.positions.unsqueeze(1).to(policy.device), cache=_cache(self.layers))
        self.positions = self.positions + 1
        self.logits = out.logits[:, -1, :]

    def close(self) -> None:
        """The batch is over (drained or failed): let adapter swaps in."""
        if not self._closed:
            self._closed = True
            self.policy._release_gen_lock()

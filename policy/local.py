"""In-process policy: transformers + PEFT LoRA adapter, micro-batched across threads, reusing
key/value caches across an episode's turns and across a block's shared prompt prefix.

The block runner runs episodes in a thread pool; each `complete` call queues a request and one
worker thread gathers up to `max_batch_size` of them (waiting at most `batch_wait_ms` for the batch
to fill) and decodes them together. Each row keeps its own schema, temperature, seed and token
budget (policy/structured.py), so a row's text does not depend on which requests it was batched with.

Why reuse matters on a CPU: prefill is compute-bound (8 prompts cost ~8x one) while a decode step
for 8 rows costs little more than for one, and every turn of an episode used to prefill the whole
conversation again (3,078 tokens prefilled for a 962-token episode). Now each row starts from the
held cache with the longest common token prefix (policy/kv_cache.py): its own previous turn, or a
block prefix prefilled once for the rows of a batch that share it, and only the new tokens are
prefilled. Rows with different reused lengths share one forward pass: each row's cache is copied
into a batch buffer right-aligned at the same column, its new tokens right-aligned after a pad
gap, with the attention mask off on the gaps and true position ids, so a row attends exactly to its
own sequence. Decoding is our own loop over that buffer (written in place) rather than
`model.generate`, which cannot take per-row caches of different lengths. An adapter swap drops
every held cache; a prompt that stops matching (a truncated or edited chat) falls back to prefilling
from where it differs.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
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
        self._gen_lock = threading.Lock()  # held for a whole batch and for an adapter swap
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

    def load_adapter(self, path: str | None, version: int | None) -> None:
        """Swap the LoRA adapter between batches; on any failure the old adapter keeps serving."""
        if path is None:
            with self._gen_lock:
                self._drop_adapters(keep=None)
                self._active_adapter, self._adapter_version = None, None
                self._forget_caches()
            return
        self._check_adapter_files(Path(path))
        from peft import PeftModel

        with self._gen_lock:
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

    # -- batching --------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.perf_counter() + self.batch_wait_s
            stop = False
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                break
        # Anything still queued after close gets an error rather than a hang.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.future.set_exception(PolicyError("the local policy was closed"))

    def _run_batch(self, batch: list[_Request]) -> None:
        import torch

        from policy.structured import json_matcher

        ready = []
        for request in batch:
            try:
                request.tokens = torch.tensor(self.render(request.messages), dtype=torch.long)
                if request.json_schema is not None:
                    request.matcher = json_matcher(self._grammar_tok, request.json_schema)
                ready.append(request)
            except Exception as err:  # noqa: BLE001 - a malformed chat or schema fails its own call only
                request.future.set_exception(PolicyError(f"cannot prepare the request: {err}"))
        if not ready:
            return
        batch = ready
        try:
            results, stats = self._generate(batch)
        except Exception as err:  # noqa: BLE001 - one bad batch must not kill the worker
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(PolicyError(f"local generation failed: {err}"))
            return
        with self._stats_lock:
            s = self._stats
            self._stats = replace(
                s,
                requests=s.requests + len(batch),
                generate_calls=s.generate_calls + 1,
                prompt_tokens=s.prompt_tokens + sum(r.prompt_tokens for r in results),
                completion_tokens=s.completion_tokens + sum(r.completion_tokens for r in results),
                padded_tokens=s.padded_tokens + stats["padded"],
                prefilled_tokens=s.prefilled_tokens + stats["prefilled"],
                cached_tokens=s.cached_tokens + sum(r.cached_tokens for r in results),
                prefix_prefilled_tokens=s.prefix_prefilled_tokens + stats["prefix_prefilled"],
                generate_s=s.generate_s + stats["generate_s"],
                constraint_s=s.constraint_s + stats["constraint_s"],
                lock_wait_s=s.lock_wait_s + stats["lock_wait_s"],
            )
        for request, result in zip(batch, results):
            request.future.set_result(result)

    # -- generation with key/value reuse -----------------------------------------------------------

    def _core(self):
        """The transformers model to call: LoRA layers live inside it once PEFT wraps it, so calling
        it directly applies the active adapter (and `disable_adapter` still switches them off)."""
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def _assemble(self, rows: list[tuple[KVEntry | None, int, torch.Tensor]], extra: int):
        """One batch from (held cache, tokens of it to reuse, new tokens) per row.

        Layout per row: [zeros | reused cache | pad | new tokens | room for `extra` generated],
        with the attention mask off on zeros and pads and true positions on the new tokens, so a
        row attends exactly to its own sequence (pads in the middle are as harmless as left pads).
        Returns (cache, input_ids, position_ids, mask, columns, C, S); columns[b] = row b's real
        slots among the first C + S.
        """
        import torch
        from transformers import DynamicCache

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
        cache = DynamicCache()
        cache.layers = layers
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
            columns.append(torch.cat([torch.arange(c - n, c), torch.arange(c + s - m, c + s)]))
        return cache, input_ids.to(self.device), positions.to(self.device), mask.to(self.device), columns, c, s

    def _prefill_prefix(self, tokens: torch.Tensor) -> tuple[KVEntry, int]:
        """Prefill a prompt prefix that several rows share once, and hold it for the block:
        (the held prefix, tokens actually prefilled)."""
        from policy.kv_cache import KVEntry

        entry, n = self._kv.lookup(tokens, len(tokens) - 1)
        cache, input_ids, positions, mask, columns, c, s = self._assemble([(entry, n, tokens[n:])], extra=0)
        self._core()(input_ids=input_ids, attention_mask=mask[:, :c + s], position_ids=positions, cache=cache,
                     use_cache=True, logits_to_keep=1)
        prefix = KVEntry(tokens.clone(), [layer.row(0, columns[0].to(self.device)) for layer in cache.layers],
                         prompt_len=len(tokens), shared=True)
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

    def _generate(self, batch: list[_Request]) -> tuple[list[Completion], dict[str, float]]:
        import torch

        from policy.kv_cache import KVEntry
        from policy.structured import RowSampler

        budgets = [r.max_new_tokens for r in batch]
        waited = time.perf_counter()
        with self._gen_lock:
            lock_wait = time.perf_counter() - waited
            started = time.perf_counter()
            generation = self._adapter_generation
            with torch.inference_mode(), self._adapter_scope():
                plan, prefix_tokens = self._plan_reuse(batch)
                rows = [(entry, n, r.tokens[n:]) for r, (entry, n) in zip(batch, plan)]
                cache, input_ids, positions, mask, columns, c, s = self._assemble(rows, extra=max(budgets))
                core = self._core()
                out = core(input_ids=input_ids, attention_mask=mask[:, :c + s], position_ids=positions,
                           cache=cache, use_cache=True, logits_to_keep=1)
                sampler = RowSampler(
                    prompt_width=1,
                    matchers=[r.matcher for r in batch],
                    temperatures=[r.temperature for r in batch],
                    generators=[torch.Generator().manual_seed(r.seed) for r in batch],
                    budgets=budgets,
                    stop_ids=self._stop_ids,
                    vocab_size=self._vocab,
                )
                # The sampler reads the last chosen token per row; column 0 is a placeholder.
                seq = torch.zeros((len(batch), 1), dtype=torch.long)
                done = [False] * len(batch)
                generated: list[list[int]] = [[] for _ in batch]
                next_pos = torch.tensor([n + len(new) for _, n, new in rows], dtype=torch.long)
                width = c + s
                fed = 0  # generated tokens run through the model (their keys/values are cached)
                for step in range(max(budgets)):
                    scores = sampler(seq, out.logits[:, -1, :])
                    choice = scores.argmax(dim=-1).cpu()
                    seq = torch.cat([seq, choice.unsqueeze(1)], dim=1)
                    for b, token in enumerate(choice.tolist()):
                        if not done[b]:
                            generated[b].append(token)
                            done[b] = token in self._stop_set or len(generated[b]) >= budgets[b]
                    if all(done):
                        break
                    mask[:, width] = 1
                    width += 1
                    out = core(input_ids=choice.unsqueeze(1).to(self.device), attention_mask=mask[:, :width],
                               position_ids=(next_pos + step).unsqueeze(1).to(self.device), cache=cache,
                               use_cache=True)
                    fed = step + 1
                if self._kv.max_conversations > 0 and generation == self._adapter_generation:
                    for b, (request, (entry, n)) in enumerate(zip(batch, plan)):
                        kept = min(len(generated[b]), fed)
                        cols = torch.cat([columns[b], torch.arange(c + s, c + s + kept)]).to(self.device)
                        tokens = torch.cat([request.tokens, torch.tensor(generated[b][:kept], dtype=torch.long)])
                        held = KVEntry(tokens, [layer.row(b, cols) for layer in cache.layers],
                                       prompt_len=len(request.tokens))
                        self._kv.put(held, supersedes=entry, reused=n)
            generate_s = time.perf_counter() - started
        finished = time.perf_counter()
        results = []
        for b, request in enumerate(batch):
            tokens = generated[b]
            results.append(
                Completion(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_tokens=len(request.tokens),
                    completion_tokens=len(tokens),
                    latency_ms=(finished - request.submitted) * 1000,
                    cached_tokens=plan[b][1],
                )
            )
        padded = sum(s - len(new) for _, _, new in rows)
        return results, {
            "generate_s": generate_s, "constraint_s": sampler.constraint_s, "lock_wait_s": lock_wait,
            "padded": padded, "prefilled": sum(len(new) for _, _, new in rows) + prefix_tokens,
            "prefix_prefilled": prefix_tokens,
        }

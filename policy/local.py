"""In-process policy: transformers + PEFT LoRA adapter, micro-batched across threads.

The block runner runs episodes in a thread pool; each `complete` call queues a request and one
worker thread gathers up to `max_batch_size` of them (waiting at most `batch_wait_ms` for the batch
to fill), left-pads them and runs ONE `model.generate` for all. Each row keeps its own schema,
temperature, seed and token budget (policy/structured.py), so a row's text does not depend on
which requests it was batched with.
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
from typing import Any, Self

from policy.protocol import Completion, PolicyError

_STOP = object()  # queue sentinel: the worker exits


@dataclass
class _Request:
    messages: list[dict[str, str]]
    json_schema: dict[str, Any] | None
    max_new_tokens: int
    temperature: float
    seed: int
    submitted: float
    future: Future = field(default_factory=Future)
    prompt_ids: list[int] = field(default_factory=list)
    matcher: Any = None  # llguidance matcher for json_schema, built by the worker


@dataclass(frozen=True)
class PolicyStats:
    """Counters since start: how well requests were batched and where the time went."""

    requests: int = 0
    generate_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    padded_tokens: int = 0  # pad positions in the batched prompts (wasted prefill compute)
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
    ):
        import torch
        from transformers import AutoModelForCausalLM

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
        from policy.structured import json_matcher

        ready = []
        for request in batch:
            try:
                request.prompt_ids = self.render(request.messages)
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
                generate_s=s.generate_s + stats["generate_s"],
                constraint_s=s.constraint_s + stats["constraint_s"],
                lock_wait_s=s.lock_wait_s + stats["lock_wait_s"],
            )
        for request, result in zip(batch, results):
            request.future.set_result(result)

    def _generate(self, batch: list[_Request]) -> tuple[list[Completion], dict[str, float]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from policy.structured import RowBudget, RowSampler

        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            n = len(request.prompt_ids)
            input_ids[row, width - n:] = torch.tensor(request.prompt_ids)
            attention[row, width - n:] = 1
        budgets = [r.max_new_tokens for r in batch]
        sampler = RowSampler(
            prompt_width=width,
            matchers=[r.matcher for r in batch],
            temperatures=[r.temperature for r in batch],
            generators=[torch.Generator().manual_seed(r.seed) for r in batch],
            budgets=budgets,
            stop_ids=self._stop_ids,
            vocab_size=self._vocab,
        )
        # The sampler leaves one-hot scores, so greedy decoding just takes each row's choice.
        config = GenerationConfig(
            do_sample=False, max_new_tokens=max(budgets), eos_token_id=self._stop_ids,
            pad_token_id=self._pad_id, bos_token_id=self.tokenizer.bos_token_id,
        )
        waited = time.perf_counter()
        with self._gen_lock:
            lock_wait = time.perf_counter() - waited
            started = time.perf_counter()
            with torch.inference_mode(), self._adapter_scope():
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList([sampler]),
                    stopping_criteria=StoppingCriteriaList([RowBudget(width, budgets)]),
                )
            generate_s = time.perf_counter() - started
        finished = time.perf_counter()
        results = []
        for row, request in enumerate(batch):
            tokens = out[row, width:].tolist()[: request.max_new_tokens]
            for i, token in enumerate(tokens):
                if token in self._stop_ids:
                    tokens = tokens[: i + 1]
                    break
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(
                Completion(
                    text=text,
                    prompt_tokens=len(request.prompt_ids),
                    completion_tokens=len(tokens),
                    latency_ms=(finished - request.submitted) * 1000,
                )
            )
        padded = sum(width - len(r.prompt_ids) for r in batch)
        return results, {
            "generate_s": generate_s, "constraint_s": sampler.constraint_s,
            "lock_wait_s": lock_wait, "padded": padded,
        }

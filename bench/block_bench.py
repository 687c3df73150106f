"""Block throughput figures: the agent's policy path against raw batched `model.generate`.

Prints figures and ratios, not pass/fail. Targets (issue 5): pipeline >= 0.8 x raw batched;
concurrent >= 4 x sequential. Sections (pick with --sections):
  throughput   same batch of agent-like chat prompts: raw batched generate vs LocalPolicy called
               from N threads, constrained decoding off and on (generated tokens/s)
  concurrency  the same N constrained requests through LocalPolicy, N threads vs one at a time
  anatomy      prefill and decode-step cost at batch 1 vs N, and the concurrency ceiling they allow

    .venv/bin/python bench/block_bench.py                      # SmolLM2-135M, CPU, ~2-3 min
    .venv/bin/python bench/block_bench.py --batch 4 --max-new-tokens 16 --model /path/to/hf-folder
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import torch

from policy.local import LocalPolicy, PolicyStats

TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "META", "GOOG", "TSLA", "JPM", "XOM", "UNH", "V", "PG"]


def agent_chats(n: int) -> list[list[dict[str, str]]]:
    """Chats shaped like an episode after one tool call: system prompt, task, a price lookup."""
    from agent.prompts import system_prompt, user_prompt

    chats = []
    for i in range(n):
        ticker = TICKERS[i % len(TICKERS)]
        closes = ", ".join(f"{100 + 3 * ((i * 7 + d) % 11) - d * 0.4:.2f}" for d in range(5 + i % 4))
        chats.append([
            {"role": "system", "content": system_prompt("Score: 0.95")},
            {"role": "user", "content": user_prompt(ticker, datetime(2024, 3, 1 + i % 20, 21, 1, tzinfo=UTC), 5)},
            {"role": "assistant", "content": '{"tool": "get_prices", "args": {"lookback_days": 10}}'},
            {"role": "tool", "content": f"{ticker} closes, oldest first: {closes}"},
        ])
    return chats


def prediction_schema() -> dict:
    from agent.schema import FINAL_SCHEMA

    return FINAL_SCHEMA


def raw_generate(policy: LocalPolicy, chats: list[list[dict[str, str]]], max_new_tokens: int) -> tuple[int, float]:
    """One left-padded batched greedy `model.generate` (no grammar, no queue): (tokens, seconds)."""
    tok = policy.tokenizer
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(policy.device)
    stops = policy._stop_ids
    started = time.perf_counter()
    with torch.inference_mode():
        out = policy.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id
        )
    seconds = time.perf_counter() - started
    tokens = 0
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        tokens += n
    return tokens, seconds


def through_policy(
    policy: LocalPolicy, chats: list, max_new_tokens: int, schema: dict | None, threads: int
) -> tuple[int, float, PolicyStats, PolicyStats]:
    """All chats through `complete`, from `threads` threads at once: (tokens, seconds, stats before/after)."""
    results: list = [None] * len(chats)
    todo = list(range(len(chats)))
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            results[i] = policy.complete(chats[i], json_schema=schema, max_new_tokens=max_new_tokens,
                                         temperature=0, seed=i)

    before = policy.stats
    workers = [threading.Thread(target=work) for _ in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    return sum(r.completion_tokens for r in results), seconds, before, policy.stats


def describe(before: PolicyStats, after: PolicyStats, seconds: float) -> str:
    calls = after.generate_calls - before.generate_calls
    reqs = after.requests - before.requests
    prompt = after.prompt_tokens - before.prompt_tokens
    pad = after.padded_tokens - before.padded_tokens
    gen_s = after.generate_s - before.generate_s
    grammar_s = after.constraint_s - before.constraint_s
    return (f"generate calls {calls} for {reqs} requests (mean batch {reqs / max(calls, 1):.1f}); "
            f"prompt {prompt / max(reqs, 1):.0f} tokens/request; "
            f"padding {pad / max(prompt + pad, 1):.0%} of prompt positions; "
            f"grammar {grammar_s / max(gen_s, 1e-9):.1%} of generate time; "
            f"outside generate {1 - gen_s / max(seconds, 1e-9):.1%} of wall")


def section_throughput(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    chats = agent_chats(args.batch)
    raw_tokens, raw_s = raw_generate(policy, chats, args.max_new_tokens)
    raw_tps = raw_tokens / raw_s
    print(f"raw batched generate    : {raw_tokens:4d} tokens in {raw_s:6.2f}s = {raw_tps:7.1f} tok/s")
    for label, schema in (("free", None), ("json", prediction_schema())):
        tokens, seconds, before, after = through_policy(policy, chats, args.max_new_tokens, schema, args.batch)
        tps = tokens / seconds
        figures[f"pipeline_{label}_tps"] = tps
        print(f"pipeline {args.batch} threads {label}: {tokens:4d} tokens in {seconds:6.2f}s = {tps:7.1f} tok/s"
              f"  -> {tps / raw_tps:.2f} x raw")
        print(f"    {describe(before, after, seconds)}")
    figures["raw_tps"] = raw_tps
    print(f"RATIO pipeline/raw (free) = {figures['pipeline_free_tps'] / raw_tps:.2f}  (target >= 0.8)")
    print(f"RATIO pipeline/raw (json) = {figures['pipeline_json_tps'] / raw_tps:.2f}  (constrained; different text)")


def section_concurrency(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    chats = agent_chats(args.batch)
    schema = prediction_schema()
    seq_tokens, seq_s, before, after = through_policy(policy, chats, args.max_new_tokens, schema, 1)
    print(f"sequential (1 thread)   : {seq_tokens:4d} tokens in {seq_s:6.2f}s = {seq_tokens / seq_s:7.1f} tok/s")
    print(f"    {describe(before, after, seq_s)}")
    threads = min(args.concurrency, args.batch)
    con_tokens, con_s, before, after = through_policy(policy, chats, args.max_new_tokens, schema, threads)
    print(f"concurrent ({threads} threads)  : {con_tokens:4d} tokens in {con_s:6.2f}s = {con_tokens / con_s:7.1f} tok/s")
    print(f"    {describe(before, after, con_s)}")
    # Same requests, same greedy text: wall time is the fair comparison (requests per second).
    print(f"RATIO concurrent/sequential = {seq_s / con_s:.2f}  (target >= 4)")
    figures["json_tokens_per_request"] = con_tokens / len(chats)
    figures["concurrency_ratio"] = seq_s / con_s


def section_anatomy(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    """Why batching helps as much as it does: prefill vs per-token decode cost at batch 1 and N.

    Prefill is compute-bound (N prompts cost ~N times one), decode is weight-bandwidth-bound
    (a step for N rows costs little more than for one), so the concurrency ceiling is set by the
    prompt/answer length mix: ceiling = N (P1 + k D1) / (PN + k DN) for k decoded tokens."""
    from transformers import DynamicCache

    tok = policy.tokenizer
    ids = tok(tok.apply_chat_template(agent_chats(1)[0], tokenize=False, add_generation_prompt=True),
              return_tensors="pt", add_special_tokens=False)["input_ids"].to(policy.device)

    def timed(batch: int) -> tuple[float, float]:
        x = ids.repeat(batch, 1)
        with torch.inference_mode():
            cache = DynamicCache()
            t0 = time.perf_counter()
            out = policy.model(input_ids=x, past_key_values=cache, use_cache=True)
            prefill = time.perf_counter() - t0
            step = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(8):
                out = policy.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
            decode = (time.perf_counter() - t0) / 8
        return prefill, decode

    p1, d1 = timed(1)
    pn, dn = timed(args.batch)
    k = figures.get("json_tokens_per_request", args.max_new_tokens)
    print(f"prompt {ids.shape[1]} tokens; prefill batch 1 {p1 * 1000:.0f} ms, batch {args.batch} {pn * 1000:.0f} ms "
          f"({pn / p1:.1f}x); decode step batch 1 {d1 * 1000:.0f} ms, batch {args.batch} {dn * 1000:.0f} ms "
          f"({dn / d1:.1f}x)")
    ceiling = args.batch * (p1 + k * d1) / (pn + k * dn)
    print(f"concurrency ceiling for {k:.0f} decoded tokens/request: {ceiling:.2f}; "
          f"decode-only ceiling {args.batch * d1 / dn:.2f}")
    figures["concurrency_ceiling"] = ceiling


def section_traces(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    """Share of a real block's wall time spent committing its trace (agent runner; target <= 2%)."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from trace_share import measure

    with tempfile.TemporaryDirectory() as tmp:
        r = measure(policy, f"sqlite:///{tmp}/trace.db", size=args.batch, concurrency=args.concurrency)
    figures["trace_share"] = r.share
    print(f"block of {r.episodes} episodes: wall {r.wall_s:.2f}s, {r.writes} trace transactions "
          f"{r.write_s * 1000:.0f} ms ({1000 * r.write_s / max(r.writes, 1):.2f} ms each)")
    print(f"RATIO trace writing / block wall = {100 * r.share:.2f}%  (target <= 2%; "
          f"summed over threads {100 * r.summed_share:.2f}%)")


SECTIONS: dict[str, Callable[[LocalPolicy, argparse.Namespace, dict], None]] = {
    "throughput": section_throughput,
    "concurrency": section_concurrency,
    "anatomy": section_anatomy,
    "traces": section_traces,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or an HF folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8, help="prompts per measurement (= max batch size)")
    parser.add_argument("--concurrency", type=int, default=8, help="threads in the concurrent run")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=0, help="intra-op threads (0 = torch default)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    started = time.perf_counter()
    policy = LocalPolicy(args.model, device=args.device, max_batch_size=args.batch, batch_wait_ms=5.0)
    print(f"model {policy.model_dir} on {policy.device}, torch threads {torch.get_num_threads()}, "
          f"batch {args.batch}, max_new_tokens {args.max_new_tokens}")
    # Warm-up: first calls pay for lazy kernels and the grammar tokenizer, not throughput.
    raw_generate(policy, agent_chats(2), 2)
    policy.complete(agent_chats(1)[0], json_schema=prediction_schema(), max_new_tokens=4, temperature=0)
    figures: dict = {}
    try:
        for name in args.sections.split(","):
            print(f"\n== {name} ==")
            SECTIONS[name.strip()](policy, args, figures)
    finally:
        policy.close()
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return figures


if __name__ == "__main__":
    main()

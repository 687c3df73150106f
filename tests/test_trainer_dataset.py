"""The score-conditioned offline set: labels, what is kept, the held-out split, export, and the loss mask."""

from __future__ import annotations

import json
import math

import pytest
from trainer_fixtures import add_block, every_episode
from typer.testing import CliRunner

from rewards.config import RewardsConfig
from store.db import session_scope
from trainer.config import TrainerConfig
from trainer.dataset import (
    build_examples,
    offline_set,
    plan_round,
    relabel,
    replay_sample,
)
from trainer.errors import TrainerError

CFG = every_episode(replay_size=3, min_new_episodes=1)


def examples(engine, rewards_cfg: RewardsConfig | None = None, cfg=CFG):
    rewards_cfg = rewards_cfg or RewardsConfig()
    with session_scope(engine) as s:
        plan = plan_round(s, cfg, rewards_cfg)
        return {e.episode_id: e for e in build_examples(s, plan.episodes, rewards_cfg, plan.edges)}


def test_system_label_is_the_achieved_score_from_the_latest_reward(sqlite_db):
    _, ids = add_block(sqlite_db, [0.12, 0.87], target=0.95)
    ex = examples(sqlite_db)
    low, high = ex[ids[0]], ex[ids[1]]
    assert (low.score, low.label) == (0.12, "Score: 0.12")
    assert high.label == "Score: 0.87"
    system = high.messages[0]["content"]
    assert "Score: 0.87" in system and "Score: 0.95" not in system
    assert [m["role"] for m in high.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert json.loads(high.messages[-1]["content"])["prediction"]["ticker"] == "MSFT"


def test_every_turn_that_carries_the_target_gets_the_achieved_label():
    """agent.label_each_turn repeats the label after each tool result: all copies are swapped, tool data is not."""
    trace = [{"role": "system", "content": "sys"},
             {"role": "user", "content": "Stock: MSFT\nScore: 0.95"},
             {"role": "assistant", "content": '{"tool": "search_news", "args": {"query": "msft"}}'},
             {"role": "tool", "content": "[1] a headline that quotes Score: 0.95"},
             {"role": "user", "content": "Tool budget used up.\nScore: 0.95"},
             {"role": "assistant", "content": '{"prediction": {}}'}]
    out = relabel(trace, "Score: 0.95", "Score: 0.31", episode_id=7)
    assert [m["content"] for m in out if m["role"] == "user"] == ["Stock: MSFT\nScore: 0.31",
                                                                 "Tool budget used up.\nScore: 0.31"]
    assert out[3] == trace[3] and trace[1]["content"].endswith("0.95")  # tool data and the input are untouched
    with pytest.raises(TrainerError, match="episode 7: its conditioning label 'Score: 0.50' is not in its prompt"):
        relabel(trace, "Score: 0.50", "Score: 0.31", episode_id=7)


def test_parse_failures_are_kept_at_score_zero_and_pending_ones_wait(sqlite_db):
    _, ids = add_block(sqlite_db, [0.5, 0.6, 0.7], invalid=[1], unscored=[2])
    ex = examples(sqlite_db)
    assert set(ex) == {ids[0], ids[1]}
    bad = ex[ids[1]]
    assert (bad.score, bad.label) == (0.0, "Score: 0.00")
    assert "sideways" in bad.messages[-1]["content"]  # the model's raw malformed output is what it learns from


def test_only_the_current_attempt_is_used(sqlite_db):
    _, ids = add_block(sqlite_db, [0.4], retried=[0])
    msgs = examples(sqlite_db)[ids[0]].messages
    assert len(msgs) == 5 and not any("STALE" in m["content"] for m in msgs)


def test_missing_conditioning_is_a_clear_error(sqlite_db):
    _, ids = add_block(sqlite_db, [0.4, 0.5], no_conditioning=[1])
    with pytest.raises(TrainerError, match=f"episode {ids[1]} has no conditioning label"):
        examples(sqlite_db)


def test_empty_offline_set_is_a_clear_error(sqlite_db):
    add_block(sqlite_db, [0.5], unscored=[0])
    with session_scope(sqlite_db) as s, pytest.raises(TrainerError, match="no scored episodes"):
        plan_round(s, CFG, RewardsConfig())


def test_eval_gate_and_unfinished_blocks_are_never_trained_on(sqlite_db):
    train_blocks = [add_block(sqlite_db, [0.5])[0] for _ in range(5)]
    eval_block, _ = add_block(sqlite_db, [0.5], kind="eval")
    gate_block, _ = add_block(sqlite_db, [0.5], kind="gate")
    running, _ = add_block(sqlite_db, [0.5], status="running")
    with session_scope(sqlite_db) as s:
        blocks = {e.block_id for e in offline_set(s, CFG)}
    assert blocks == set(train_blocks)  # held-out items come from market.split's regions, not train blocks
    assert not blocks & {eval_block, gate_block, running}


def test_replay_sample_is_fixed_size_and_deterministic(sqlite_db):
    add_block(sqlite_db, [0.1 * i for i in range(8)])
    with session_scope(sqlite_db) as s:
        pool = offline_set(s, CFG)
    a = replay_sample(pool, 3, "0:[2]")
    assert len(a) == 3 and [e.episode_id for e in a] == [e.episode_id for e in replay_sample(pool, 3, "0:[2]")]
    assert len(replay_sample(pool, 50, "x")) == 8


def test_quantile_labels_use_edges_over_the_offline_set(sqlite_db):
    _, ids = add_block(sqlite_db, [0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 0.3, 0.7, 0.1, 0.9])
    ex = examples(sqlite_db, RewardsConfig(label_format="quantile", quantile_bins=5))
    assert ex[ids[0]].label == "Quantile: 1/5"
    assert ex[ids[5]].label == "Quantile: 5/5"
    assert ex[ids[5]].label in ex[ids[5]].messages[0]["content"]


def test_rank_labels_place_each_episode_among_its_own_items_episodes(sqlite_db):
    # items 0 and 1 run once per tool (3 episodes each), item 2 run once
    _, ids = add_block(sqlite_db, [0.9, 0.2, 0.5, 0.1, 0.1, 0.3, 0.4], items=[0, 0, 0, 1, 1, 1, 2])
    cfg = RewardsConfig(label_format="rank", quantile_bins=3)
    ex = examples(sqlite_db, cfg)
    assert [ex[i].label for i in ids] == ["Rank: 3/3", "Rank: 1/3", "Rank: 2/3",  # 0.9 beats its item's 0.2 and 0.5
                                          "Rank: 1/3", "Rank: 1/3", "Rank: 3/3",  # the tie shares the lower rank
                                          "Rank: 2/3"]                            # nothing to rank against
    assert any("Rank: 3/3" in m["content"] for m in ex[ids[0]].messages if m["role"] != "assistant")
    with session_scope(sqlite_db) as s:
        plan = plan_round(s, CFG, cfg)
        alone = [e for e in plan.episodes if e.episode_id == ids[0]]
        # a replayed episode trained without its siblings keeps the rank its item's group gave it
        assert build_examples(s, alone, cfg, plan.edges, plan.ranks)[0].label == "Rank: 3/3"
        assert build_examples(s, alone, cfg)[0].label == "Rank: 2/3"


def test_decision_from_correct_flags_the_wrong_directions_and_keeps_everything_else(sqlite_db):
    """An episode whose direction did not come true (by the latest reward row) keeps its rank label and turns;
    only its last message says its decision carries no loss. A parse failure has no decision to keep."""
    _, ids = add_block(sqlite_db, [0.9, 0.2, 0.5], items=[0, 0, 0], wrong=[1])
    _, more = add_block(sqlite_db, [0.4], invalid=[0])
    cfg = RewardsConfig(label_format="rank", quantile_bins=3)
    with session_scope(sqlite_db) as s:
        plan = plan_round(s, CFG, cfg)
        assert {e.episode_id: e.correct for e in plan.episodes} == {ids[0]: True, ids[1]: False, ids[2]: True,
                                                                   more[0]: None}
        every = {e.episode_id: e for e in build_examples(s, plan.episodes, cfg, plan.edges, plan.ranks)}
        right = {e.episode_id: e for e in build_examples(s, plan.episodes, cfg, plan.edges, plan.ranks,
                                                         decision_from="correct")}
    flagged = {i for i, e in right.items() if e.messages[-1].get("train_decision") is False}
    assert flagged == {ids[1], more[0]}
    for i, e in right.items():
        assert e.label == every[i].label
        assert [m["content"] for m in e.messages] == [m["content"] for m in every[i].messages]
    assert not any("train_decision" in m for e in every.values() for m in e.messages)


def test_export_writes_jsonl_that_datasets_loads(sqlite_url, sqlite_db, tmp_path, monkeypatch):
    from datasets import load_dataset

    from scheduler.cli import app

    _, ids = add_block(sqlite_db, [0.3, 0.9, 0.6], invalid=[2])
    out = tmp_path / "offline.jsonl"
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["--db", sqlite_url, "export", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == 3
    assert {"messages", "score", "label", "episode_id", "block_id", "prediction_id"} <= set(ds.column_names)
    rows = {r["episode_id"]: r for r in ds}
    assert rows[ids[1]]["label"] == "Score: 0.90" and rows[ids[1]]["score"] == pytest.approx(0.9)
    assert rows[ids[2]]["score"] == 0.0
    assert rows[ids[1]]["messages"][0]["role"] == "system" and "Score: 0.90" in rows[ids[1]]["messages"][0]["content"]


def test_export_of_an_empty_store_fails_in_one_line(sqlite_url, sqlite_db, tmp_path, monkeypatch):
    from scheduler.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["--db", sqlite_url, "export", "--out", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 1 and "no scored episodes" in res.output
    assert not (tmp_path / "x.jsonl").exists()


def test_loss_mask_is_exactly_the_assistant_tokens(sqlite_db, tiny_model_dir, tmp_path):
    """Token by token, on the dataset TRL actually trains on: every assistant token incl. its <|im_end|>
    is a label; every system, user, tool and role-header token is -100."""
    from policy.model_files import load_tokenizer
    from trainer.sft import build_trainer, load_trainable_model, sft_config

    _, ids = add_block(sqlite_db, [0.3, 0.8])
    ex = examples(sqlite_db)[ids[1]]
    tok = load_tokenizer(tiny_model_dir)
    cfg = every_episode(max_length=4096, lora_r=2, lora_alpha=4)
    model = load_trainable_model(tiny_model_dir, None, cfg, "cpu")
    trainer = build_trainer(model, tok, [ex.messages], sft_config(cfg, tmp_path / "run", "cpu"))
    row = trainer.train_dataset[0]
    input_ids, labels = row["input_ids"], row["labels"]

    # Expected: render each message's pieces separately, marking the assistant content + <|im_end|>.
    expected_ids, expected_trained = [], []
    for m in ex.messages:
        pieces = [(f"<|im_start|>{m['role']}\n", False)]
        if m["role"] == "assistant":
            pieces += [(m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            pieces += [(m["content"] + "<|im_end|>\n", False)]
        for text, trained in pieces:
            piece = tok(text, add_special_tokens=False)["input_ids"]
            expected_ids += piece
            expected_trained += [trained] * len(piece)
    assert input_ids == expected_ids
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, (tid, lab, trained) in enumerate(zip(input_ids, labels, expected_trained, strict=True)):
        assert lab == (tid if trained else -100), f"token {i} {tok.decode([tid])!r}"
    # Spelled out: the assistant turns' end tokens are trained, the others' are not.
    ends = [i for i, t in enumerate(input_ids) if t == im_end]
    assert [labels[i] != -100 for i in ends] == [m["role"] == "assistant" for m in ex.messages]
    trained_text = tok.decode([t for t, lab in zip(input_ids, labels) if lab != -100])
    assert trained_text == "".join(m["content"] + "<|im_end|>" for m in ex.messages if m["role"] == "assistant")
    assert "Score: 0.80" not in trained_text and "date,close" not in trained_text


def test_boost_repeats_each_blocks_top_episodes_under_their_own_labels(sqlite_db):
    """boost_top_fraction: the top quartile comes back `boost_passes` more times, labelled with its own
    score; the low episodes stay in once, labelled low (RAFT inside score conditioning)."""
    from trainer.dataset import boosted

    _, ids = add_block(sqlite_db, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9])
    with session_scope(sqlite_db) as s:
        plan = plan_round(s, CFG, RewardsConfig())
        eps = boosted(plan.episodes, 0.25, 2)
        got = build_examples(s, eps, RewardsConfig(), plan.edges)
    counts = {i: sum(e.episode_id == i for e in got) for i in ids}
    assert counts == {**{i: 1 for i in ids[:6]}, ids[6]: 3, ids[7]: 3}
    assert {e.label for e in got if e.episode_id == ids[7]} == {"Score: 0.90"}
    assert {e.label for e in got if e.episode_id == ids[0]} == {"Score: 0.10"}
    assert boosted(plan.episodes, 0.0, 2) == plan.episodes == boosted(plan.episodes, 0.25, 0)


def test_balance_makes_up_and_down_equally_common_at_every_score_level(sqlite_db):
    """Low scores went mostly down, high ones mostly up (the period's drift): copies of the minority
    direction even each score bin out, so the label alone no longer says which way to go."""
    from collections import Counter

    from trainer.dataset import balanced

    dirs = ["down", "down", "down", "up", "up", "up", "up", "down"]
    _, ids = add_block(sqlite_db, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], directions=dirs)
    with session_scope(sqlite_db) as s:
        eps = plan_round(s, CFG, RewardsConfig()).episodes
    out = balanced(eps, bins=2)
    low = Counter(e.direction for e in out if e.score < 0.5)
    high = Counter(e.direction for e in out if e.score >= 0.5)
    assert low == {"down": 3, "up": 3} and high == {"up": 3, "down": 3}
    copies = Counter(e.episode_id for e in out[len(eps):])
    assert copies == {ids[3]: 2, ids[7]: 2}  # the one low `up` and the one high `down`, twice each
    assert balanced([], bins=2) == []


def test_balance_leaves_parse_failures_and_one_sided_bins_alone(sqlite_db):
    from trainer.dataset import balanced

    add_block(sqlite_db, [0.9, 0.8, None, 0.1], invalid=[2], directions=["up", "up", "up", "down"])
    with session_scope(sqlite_db) as s:
        eps = plan_round(s, CFG, RewardsConfig()).episodes
    out = balanced(eps, bins=2)
    assert [e.episode_id for e in out] == [e.episode_id for e in eps]  # each bin holds one direction only
    assert sum(e.direction is None for e in out) == 1


def test_balance_under_decision_from_correct_evens_out_the_directions_that_train(sqlite_db):
    """With decision_from "correct" only the right calls carry loss on their direction, so balance counts and
    copies those: evening out every call would leave the trained directions as skewed as the outcomes (here
    three right `down` against one right `up`, where all six calls are evenly split)."""
    from collections import Counter

    from trainer.decision import decision_trained
    from trainer.sft import plan

    dirs = ["down", "down", "down", "up", "up", "up"]
    _, ids = add_block(sqlite_db, [0.5] * 6, directions=dirs, wrong=[3, 4])
    direction = dict(zip(ids, dirs, strict=True))
    cfg = every_episode(replay_size=3, min_new_episodes=1, balance_directions=True, loss_on="weighted",
                        decision_from="correct", boost_top_fraction=0.0)  # no boost copies: balance's only
    with session_scope(sqlite_db) as s:
        data = plan(s, cfg, RewardsConfig(), run=None, need=1)
        every = plan(s, cfg.model_copy(update={"decision_from": "all"}), RewardsConfig(), run=None, need=1)
    trained = Counter(direction[i] for i, row in zip(data.episode_ids, data.rows, strict=True) if decision_trained(row))
    assert trained == {"down": 3, "up": 3}
    assert Counter(data.episode_ids[6:]) == {ids[5]: 2}  # the one right `up`, twice
    assert every.episode_ids == ids  # every call counted: three each way already, nothing copied


def test_label_information_is_zero_when_independent_and_ln2_when_the_label_names_the_tool():
    from trainer.dataset import label_information

    independent = [("Rank: 1/3", "get_prices"), ("Rank: 1/3", "search_news"),
                   ("Rank: 3/3", "get_prices"), ("Rank: 3/3", "search_news")]
    coupled = [("Rank: 1/3", "get_prices"), ("Rank: 1/3", "get_prices"),
               ("Rank: 3/3", "search_news"), ("Rank: 3/3", "search_news")]
    assert label_information(independent) == pytest.approx(0.0)
    assert label_information(coupled) == pytest.approx(math.log(2))
    assert label_information([]) == 0.0


def test_a_rank_round_records_what_its_labels_say_about_the_research(sqlite_db):
    """Two items, each run once with prices and once with news; news earned more on both. The rank labels then
    name the tool exactly (ln 2 nats), and the run row keeps the counts behind it for SQL."""
    from trainer.sft import plan

    tools = ["get_prices", "search_news", "get_prices", "search_news"]
    add_block(sqlite_db, [0.4, 0.7, 0.3, 0.6], items=[0, 0, 1, 1], tools=tools)
    cfg = every_episode(replay_size=0, min_new_episodes=1, balance_directions=False, boost_top_fraction=0.0)
    with session_scope(sqlite_db) as s:
        data = plan(s, cfg, RewardsConfig(label_format="rank", quantile_bins=3), run=None, need=1)
    research = data.hyperparams["label_research"]
    assert research["first_tool"] == {"Rank: 1/3": {"get_prices": 2}, "Rank: 3/3": {"search_news": 2}}
    assert research["nats"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_single_label_carries_no_information_about_the_research(sqlite_db):
    """Under the score label every example of a block earns its own number, but a block where all scores are
    equal (one label) and the tools differ says nothing: 0 nats, whatever was read."""
    from trainer.sft import plan

    add_block(sqlite_db, [0.5] * 4, tools=["get_prices", "search_news", "get_prices", "search_news"])
    cfg = every_episode(replay_size=0, min_new_episodes=1, balance_directions=False, boost_top_fraction=0.0)
    with session_scope(sqlite_db) as s:
        data = plan(s, cfg, RewardsConfig(), run=None, need=1)
    assert data.hyperparams["label_research"] == {
        "nats": 0.0, "first_tool": {"Score: 0.50": {"get_prices": 2, "search_news": 2}}}


def test_a_filtered_round_counts_its_blocks_scored_episodes_before_filtering(sqlite_db):
    """min_new_episodes counts the new blocks' scored episodes, not the top quartile kept of them: with
    filter_top_fraction = 0.25 one block of 8 starts a round that needs 8 (it trains the top 2), where counting
    after the filter would wait for four blocks. One fewer than needed still says how many wait."""
    from trainer.round import NothingToTrain
    from trainer.sft import plan

    add_block(sqlite_db, [0.1, 0.9, 0.2, 0.8, 0.3, 0.4, 0.5, 0.6])
    cfg = TrainerConfig(replay_size=0, filter_top_fraction=0.25, boost_top_fraction=0.0, balance_directions=False)
    with session_scope(sqlite_db) as s:
        data = plan(s, cfg, RewardsConfig(), run=None, need=8)
        short = plan(s, cfg, RewardsConfig(), run=None, need=9)
    assert not isinstance(data, NothingToTrain)
    assert data.n_new == 8 and len(data.rows) == 2
    assert isinstance(short, NothingToTrain)
    assert short.reason == "8 new scored episodes, 9 needed (trainer.min_new_episodes)"

"""`trainer.loss_on = "decision"`: the loss covers the final prediction's direction and confidence only.

Checked on the dataset TRL actually trains on (its `labels` column), with the SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import add_block, every_episode

from policy.model_files import load_tokenizer
from rewards.config import RewardsConfig
from store.db import session_scope
from trainer.config import TrainerConfig
from trainer.dataset import build_examples, plan_round
from trainer.decision import decision_row, decision_rows
from trainer.errors import TrainerError

CFG = every_episode(replay_size=0, min_new_episodes=1, max_length=4096, lora_r=2, lora_alpha=4, loss_on="decision",
                    boost_top_fraction=0.0, balance_directions=False)  # one example per episode


def chats(engine) -> dict[int, list[dict[str, str]]]:
    with session_scope(engine) as s:
        plan = plan_round(s, CFG, RewardsConfig())
        return {e.episode_id: e.messages for e in build_examples(s, plan.episodes, RewardsConfig(), plan.edges)}


def with_final(chat: list[dict[str, str]], **fields) -> list[dict[str, str]]:
    pred = {"direction": "down", "magnitude_pct": 1.2, "confidence": 0.75,
            "rationale": 'the headline says "direction": "up" is likely', "citations": [1]} | fields
    return [*chat[:-1], {"role": "assistant", "content": json.dumps({"prediction": pred})}]


def one_row(engine, model_dir, tmp_path, cfg: TrainerConfig):
    """One scored episode ending in a fixed prediction, as the trainer's first dataset row under cfg.loss_on."""
    from trainer.sft import build_trainer, load_trainable_model, sft_config

    _, ids = add_block(engine, [0.3])
    chat = with_final(chats(engine)[ids[0]])
    tok = load_tokenizer(model_dir)
    model = load_trainable_model(model_dir, None, cfg, "cpu")
    trainer = build_trainer(model, tok, [chat], sft_config(cfg, tmp_path / "run", "cpu"), loss_on=cfg.loss_on,
                            decision_weight=cfg.decision_weight)
    return tok, chat, trainer.train_dataset[0]


def trained_text(tok, row) -> list[str]:
    return [tok.decode([t]) for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]


def test_only_the_direction_and_confidence_tokens_carry_the_loss(sqlite_db, tiny_model_dir, tmp_path):
    """The tool call, the JSON keys, the magnitude and the rationale (which quotes another direction) are all
    -100; the direction value and the confidence digits are labels, with their own token ids."""
    tok, chat, row = one_row(sqlite_db, tiny_model_dir, tmp_path, CFG)
    assert row["input_ids"] == list(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert "".join(trained_text(tok, row)) == "down0.75"
    assert all(lab in (-100, tid) for tid, lab in zip(row["input_ids"], row["labels"], strict=True))


def test_malformed_answers_are_left_out_and_counted(sqlite_db, tiny_model_dir):
    """A parse failure (here `"direction": "sideways"`, cut off) has no decision: it is skipped, not trained
    as one; the round goes on with the rest."""
    _, ids = add_block(sqlite_db, [0.3, 0.8, None], invalid=[2])
    by_id = chats(sqlite_db)
    tok = load_tokenizer(tiny_model_dir)
    out = decision_rows(tok, [by_id[i] for i in ids], max_length=4096)
    assert (len(out.rows), out.skipped) == (2, 1)
    assert all(sum(r["assistant_masks"]) >= 2 for r in out.rows)


def test_a_round_with_no_decision_at_all_fails_clearly(sqlite_db, tiny_model_dir):
    add_block(sqlite_db, [None, None], invalid=[0, 1])
    by_id = chats(sqlite_db)
    with pytest.raises(TrainerError, match="no decision to train on"):
        decision_rows(load_tokenizer(tiny_model_dir), list(by_id.values()), max_length=4096)


def test_a_decision_cut_off_by_max_length_is_left_out(sqlite_db, tiny_model_dir):
    _, ids = add_block(sqlite_db, [0.5])
    chat = chats(sqlite_db)[ids[0]]
    tok = load_tokenizer(tiny_model_dir)
    assert decision_row(tok, chat, max_length=64) is None
    assert decision_row(tok, chat, max_length=4096) is not None


# trainer.loss_on = "weighted": every assistant token trains, the decision's tokens count decision_weight times.

WEIGHTED = CFG.model_copy(update={"loss_on": "weighted", "decision_weight": 20.0})


def test_weighted_rows_weight_the_decision_and_keep_the_rest_of_the_answer(sqlite_db, tiny_model_dir, tmp_path):
    """Prompt and tool results: -100 and weight 0. Every assistant token (the tool call, the JSON keys, the
    rationale that quotes another direction): its own id and weight 1. The direction and confidence: 20."""
    tok, chat, row = one_row(sqlite_db, tiny_model_dir, tmp_path, WEIGHTED)
    enc = tok.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert row["input_ids"] == list(enc["input_ids"])
    assert [lab != -100 for lab in row["labels"]] == [bool(a) for a in enc["assistant_masks"]]
    heavy = "".join(tok.decode([t]) for t, w in zip(row["input_ids"], row["loss_weights"], strict=True) if w == 20.0)
    assert heavy == "down0.75"
    assert {w for w, lab in zip(row["loss_weights"], row["labels"], strict=True) if lab == -100} == {0.0}
    assert sum(w == 1.0 for w in row["loss_weights"]) > 20  # the tool call and the rest of the answer


def test_a_decision_left_out_gets_weight_zero_and_the_rest_of_the_answer_still_trains(sqlite_db, tiny_model_dir,
                                                                                      tmp_path):
    """trainer.decision_from = "correct": a wrong direction's tokens are -100 with weight 0, every other assistant
    token as before; on the decision-only loss such a chat has nothing left and is counted as skipped."""
    from trainer.decision import leave_decision_out, weighted_row

    tok, chat, row = one_row(sqlite_db, tiny_model_dir, tmp_path, WEIGHTED)
    off = weighted_row(tok, leave_decision_out(chat), 4096, 20.0)
    assert off["input_ids"] == row["input_ids"]
    changed = [i for i, (a, b) in enumerate(zip(row["loss_weights"], off["loss_weights"], strict=True)) if a != b]
    assert "".join(tok.decode([row["input_ids"][i]]) for i in changed) == "down0.75"
    assert all(off["loss_weights"][i] == 0.0 and off["labels"][i] == -100 for i in changed)
    assert sum(w == 1.0 for w in off["loss_weights"]) == sum(w == 1.0 for w in row["loss_weights"])
    assert decision_row(tok, leave_decision_out(chat), 4096) is None
    assert decision_rows(tok, [chat, leave_decision_out(chat)], 4096).skipped == 1


def test_weighted_loss_at_weight_one_is_the_models_own_loss(sqlite_db, tiny_model_dir, tmp_path):
    """Through the trainer's own collator and compute_loss, on two chats of different lengths (padding):
    with every weight 1 the loss is the model's token-mean loss over the same labels; at weight 20 it is
    the weighted mean of the same per-token cross-entropies."""
    import torch

    from trainer.sft import build_trainer, load_trainable_model, sft_config

    _, ids = add_block(sqlite_db, [0.3, 0.8])
    by_id = chats(sqlite_db)
    pair = [with_final(by_id[ids[0]]), with_final(by_id[ids[1]], rationale="short")]
    tok = load_tokenizer(tiny_model_dir)
    model = load_trainable_model(tiny_model_dir, None, WEIGHTED, "cpu")
    model.eval()
    losses = {}
    for weight in (1.0, 20.0):
        cfg = WEIGHTED.model_copy(update={"decision_weight": weight})
        trainer = build_trainer(model, tok, pair, sft_config(cfg, tmp_path / f"run{weight}", "cpu"),
                                loss_on="weighted", decision_weight=weight)
        batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
        assert batch["input_ids"].shape == batch["loss_weights"].shape
        with torch.no_grad():
            losses[weight] = float(trainer.compute_loss(model, dict(batch)))
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            logits = out.logits[:, :-1].float()
            target, w = batch["labels"][:, 1:], batch["loss_weights"][:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
        if weight == 1.0:
            assert losses[weight] == pytest.approx(float(out.loss), rel=1e-5)
        assert losses[weight] == pytest.approx(float((ce * w).sum() / w.sum()), rel=1e-5)
    assert losses[1.0] != pytest.approx(losses[20.0], rel=1e-3)


def test_weighted_keeps_malformed_answers_at_weight_one(sqlite_db, tiny_model_dir):
    """Unlike loss_on = decision, an answer with no parseable prediction is not dropped: it has no decision
    to weight but still teaches the format."""
    from trainer.decision import weighted_rows

    _, ids = add_block(sqlite_db, [0.3, None], invalid=[1])
    by_id = chats(sqlite_db)
    out = weighted_rows(load_tokenizer(tiny_model_dir), [by_id[i] for i in ids], 4096, 20.0)
    assert (len(out.rows), out.skipped) == (2, 0)
    assert 20.0 in out.rows[0]["loss_weights"] and 20.0 not in out.rows[1]["loss_weights"]
    assert max(out.rows[1]["loss_weights"]) == 1.0


def test_tool_choice_weight_weights_the_name_of_every_tool_call_and_nothing_else(sqlite_db, tiny_model_dir):
    """trainer.tool_choice_weight: the research choice is a decision too. The tool names of the assistant's
    calls (not the tool results, not a tool named inside the rationale) get the weight; at 1 (the default)
    the rows are exactly the decision-weighted ones."""
    from trainer.decision import weighted_row

    _, ids = add_block(sqlite_db, [0.4])
    chat = with_final(chats(sqlite_db)[ids[0]], rationale='did not call "tool": "search_news"')
    chat = [*chat[:-1], {"role": "assistant", "content": json.dumps({"tool": "search_news", "args": {}})},
            {"role": "tool", "content": '"tool": "get_market_context" [3] headline'}, chat[-1]]
    tok = load_tokenizer(tiny_model_dir)
    row = weighted_row(tok, chat, 4096, 20.0, tool_weight=5.0)
    tokens = [(tok.decode([t]), w) for t, w in zip(row["input_ids"], row["loss_weights"], strict=True)]
    assert "".join(t for t, w in tokens if w == 5.0) == "get_pricessearch_news"
    assert "".join(t for t, w in tokens if w == 20.0) == "down0.75"
    assert weighted_row(tok, chat, 4096, 20.0, tool_weight=1.0) == weighted_row(tok, chat, 4096, 20.0)
    assert 5.0 not in weighted_row(tok, chat, 4096, 20.0)["loss_weights"]


def test_a_planned_call_that_the_system_prompt_lists_verbatim_is_weighted_in_the_assistant_turn(tiny_model_dir):
    """The agent's system prompt lists each tool as a call, the very text of a planned `get_prices` call, and an
    episode may repeat a call. Each tool name is found in its own assistant turn: every call of the episode
    gets the weight, nothing in the system prompt does (a search from the previous assistant turn alone
    matched the system prompt's copy, so only search_news calls were ever weighted: run N)."""
    from datetime import UTC, datetime

    from agent.prompts import system_prompt, user_prompt
    from agent.schema import planned_call
    from trainer.decision import weighted_row

    prices = planned_call("get_prices", "SYN01")[1]
    assert prices in system_prompt()
    chat = [{"role": "system", "content": system_prompt()},
            {"role": "user", "content": user_prompt("SYN01", datetime(2023, 5, 22, 20, 1, tzinfo=UTC), 5,
                                                    "Quantile: 5/5")},
            {"role": "assistant", "content": prices},
            {"role": "tool", "content": "SYN01 closes, oldest first: 10.0 10.2"},
            {"role": "assistant", "content": prices},
            {"role": "tool", "content": "SYN01 closes, oldest first: 10.0 10.2"},
            {"role": "assistant", "content": planned_call("get_market_context", "SYN01")[1]}]
    tok = load_tokenizer(tiny_model_dir)
    row = weighted_row(tok, chat, 4096, 20.0, tool_weight=5.0)
    tokens = [(tok.decode([t]), w) for t, w in zip(row["input_ids"], row["loss_weights"], strict=True)]
    assert "".join(t for t, w in tokens if w == 5.0) == "get_pricesget_pricesget_market_context"
    first_answer = next(i for i, (_, w) in enumerate(tokens) if w > 0)
    assert first_answer > len(tok(system_prompt(), add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("loss_on", ["decision", "weighted"])
def test_a_round_trains_and_records_its_loss(sqlite_db, tiny_model_dir, tmp_path, loss_on):
    """The product path: train_round with a decision-focused loss, one optimizer step on the tiny model,
    publishes an adapter; the run's stored hyperparameters say which loss (and weight) made it."""
    from sqlalchemy import select

    from store.models import TrainingRun
    from trainer.round import train_round

    add_block(sqlite_db, [0.2, 0.9, 0.4, 0.7])
    cfg = WEIGHTED.model_copy(update={"adapters_dir": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs"),
                                      "batch_size": 4, "loss_on": loss_on})
    res = train_round(sqlite_db, cfg, RewardsConfig(), tiny_model_dir, device="cpu")
    assert res.n_examples == 4 and res.path.endswith("v1")
    assert res.loss_curve and all(p["loss"] > 0 for p in res.loss_curve)
    with session_scope(sqlite_db) as s:
        hp = s.scalars(select(TrainingRun.hyperparams)).one()
    assert hp["loss_on"] == loss_on and hp.get("decision_weight") == (20.0 if loss_on == "weighted" else None)


def test_the_plain_trainer_loss_reads_only_the_loss_positions_and_equals_the_models_own(sqlite_db, tiny_model_dir,
                                                                                         tmp_path):
    """The CPU trainer (PlainLossSFTTrainer) projects only the positions whose next token is a label onto the
    vocabulary (`logits_to_keep`); its loss is still the model's own causal-LM loss, with and without the
    Trainer's token count across accumulated micro-batches."""
    import torch

    from trainer.sft import build_trainer, load_trainable_model, loss_positions, sft_config

    _, ids = add_block(sqlite_db, [0.3, 0.8])
    by_id = chats(sqlite_db)
    pair = [with_final(by_id[ids[0]]), with_final(by_id[ids[1]], rationale="short")]
    tok = load_tokenizer(tiny_model_dir)
    cfg = CFG.model_copy(update={"loss_on": "assistant"})
    model = load_trainable_model(tiny_model_dir, None, cfg, "cpu")
    model.eval()
    trainer = build_trainer(model, tok, pair, sft_config(cfg, tmp_path / "run", "cpu"), loss_on="assistant",
                            fused_lm_head=False)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    keep = loss_positions(batch["labels"])
    assert 0 < len(keep) < batch["input_ids"].shape[1] // 2  # the prompt and the tool results are skipped
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        plain = trainer.compute_loss(model, dict(batch))
        halved = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * n))
    assert float(plain) == pytest.approx(float(own.loss), rel=1e-5)
    assert float(halved) == pytest.approx(float(own.loss) / 2, rel=1e-5)


def test_a_weighted_round_cut_to_nothing_by_max_length_fails_clearly(sqlite_db, tiny_model_dir):
    """Bad configuration: a max_length that leaves no assistant token in any chat is refused in one line naming
    the setting; a chat that keeps part of its answer is trained on (its decision may be cut, the rest stays)."""
    from trainer.decision import weighted_row, weighted_rows

    _, ids = add_block(sqlite_db, [0.5])
    chat = chats(sqlite_db)[ids[0]]
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(TrainerError, match="trainer.max_length = 64"):
        weighted_rows(tok, [chat], 64, 20.0)
    full = weighted_row(tok, chat, 4096, 20.0)
    first_answer = full["loss_weights"].index(1.0)
    cut = weighted_row(tok, chat, first_answer + 3, 20.0)
    assert cut is not None and len(cut["input_ids"]) == first_answer + 3 and 20.0 not in cut["loss_weights"]

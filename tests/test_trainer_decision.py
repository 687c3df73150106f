"""`trainer.loss_on = "decision"`: the loss covers the final prediction's direction and confidence only.

Checked on the dataset TRL actually trains on (its `labels` column), with the SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest
from trainer_fixtures import add_block

from policy.model_files import load_tokenizer
from rewards.config import RewardsConfig
from store.db import session_scope
from trainer.config import TrainerConfig
from trainer.dataset import build_examples, plan_round
from trainer.decision import decision_row, decision_rows
from trainer.errors import TrainerError

CFG = TrainerConfig(replay_size=0, min_new_episodes=1, max_length=4096, lora_r=2, lora_alpha=4, loss_on="decision")


def chats(engine) -> dict[int, list[dict[str, str]]]:
    with session_scope(engine) as s:
        plan = plan_round(s, CFG, RewardsConfig())
        return {e.episode_id: e.messages for e in build_examples(s, plan.episodes, RewardsConfig(), plan.edges)}


def with_final(chat: list[dict[str, str]], **fields) -> list[dict[str, str]]:
    pred = {"direction": "down", "magnitude_pct": 1.2, "confidence": 0.75,
            "rationale": 'the headline says "direction": "up" is likely', "citations": [1]} | fields
    return [*chat[:-1], {"role": "assistant", "content": json.dumps({"prediction": pred})}]


def trained_text(tok, row) -> list[str]:
    return [tok.decode([t]) for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]


def test_only_the_direction_and_confidence_tokens_carry_the_loss(sqlite_db, tiny_model_dir, tmp_path):
    """The tool call, the JSON keys, the magnitude and the rationale (which quotes another direction) are all
    -100; the direction value and the confidence digits are labels, with their own token ids."""
    from trainer.sft import build_trainer, load_trainable_model, sft_config

    _, ids = add_block(sqlite_db, [0.3])
    chat = with_final(chats(sqlite_db)[ids[0]])
    tok = load_tokenizer(tiny_model_dir)
    model = load_trainable_model(tiny_model_dir, None, CFG, "cpu")
    trainer = build_trainer(model, tok, [chat], sft_config(CFG, tmp_path / "run", "cpu"), loss_on="decision")
    row = trainer.train_dataset[0]
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


def test_a_round_trains_on_decisions_and_publishes_an_adapter(sqlite_db, tiny_model_dir, tmp_path):
    """The product path: train_round with loss_on = decision, one optimizer step on the tiny model."""
    from trainer.round import train_round

    add_block(sqlite_db, [0.2, 0.9, 0.4, 0.7])
    cfg = CFG.model_copy(update={"adapters_dir": str(tmp_path / "adapters"), "runs_dir": str(tmp_path / "runs"),
                                 "batch_size": 4})
    res = train_round(sqlite_db, cfg, RewardsConfig(), tiny_model_dir, device="cpu")
    assert res.n_examples == 4 and res.path.endswith("v1")
    assert res.loss_curve and all(p["loss"] > 0 for p in res.loss_curve)

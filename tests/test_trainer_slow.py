"""The real SmolLM2-135M on CPU: one short round lowers the assistant-token loss on its own examples."""

from __future__ import annotations

import pytest
from trainer_fixtures import add_block, every_episode

from policy.model_files import load_tokenizer
from rewards.config import RewardsConfig
from store.db import session_scope
from trainer.dataset import build_examples, plan_round
from trainer.round import train_round
from trainer.sft import assistant_loss

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # a shared 2-core CPU can take many minutes


def test_one_round_lowers_training_loss_on_smollm2(sqlite_db, smollm2_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = every_episode(adapters_dir=str(tmp_path / "adapters"), runs_dir=str(tmp_path / "runs"), lora_r=8,
                        lora_alpha=16, batch_size=4, max_length=192, epochs=3, learning_rate=2e-3,
                        min_new_episodes=1, save_steps=100, grad_accum=1, boost_top_fraction=0.0,
                        balance_directions=False, loss_on="assistant")  # one example per episode, the loss measured
    add_block(sqlite_db, [0.15, 0.55, 0.95, 0.05], invalid=[3])
    with session_scope(sqlite_db) as s:
        plan = plan_round(s, cfg, RewardsConfig())
        chats = [e.messages for e in build_examples(s, plan.episodes, RewardsConfig(), plan.edges)]
    tok = load_tokenizer(smollm2_dir)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    before = assistant_loss(base, tok, chats, cfg.max_length)

    result = train_round(sqlite_db, cfg, RewardsConfig(), smollm2_dir, device="cpu")
    assert result.n_examples == 4 and len(result.loss_curve) == 3

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_dir), result.path)
    after = assistant_loss(tuned, tok, chats, cfg.max_length)
    print(f"assistant-token loss on the round's examples: before {before:.3f}, after {after:.3f}")
    assert after < 0.8 * before

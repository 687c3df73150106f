"""`[trainer]` settings: LoRA SFT hyperparameters, replay size, gate and adapters folder."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TrainerConfig(BaseModel):
    """Score-conditioned LoRA SFT that resumes from the serving adapter each round."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["sft", "dpo"] = Field("sft", description="sft = reward-conditioned SFT; dpo = optional.")
    adapters_dir: str = Field("adapters", description="Folder of published adapter versions.")
    runs_dir: str = Field("runs", description="Folder of per-round checkpoints.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    learning_rate: float = Field(2e-4, gt=0)
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=64, description="Examples are truncated to this many tokens.")
    replay_size: int = Field(100, ge=0, description="Older episodes mixed into each round (fixed size).")
    min_new_episodes: int = Field(100, ge=1, description="Scored episodes needed before a round starts.")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N optimizer steps.")
    gate_margin: float = Field(0.02, ge=0, description="A candidate may be this much worse and still serve.")
    gate_items: int = Field(20, ge=0, description="Held-out items the gate evaluates (0 = no gate).")
    heldout_every: int = Field(5, ge=2, description="Every k-th block is held out from training.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory (on for big GPU models).")
    seed: int = Field(0)
    filter_top_fraction: float = Field(
        1.0, gt=0, le=1, description="Train only on each block's best-scoring fraction of episodes "
        "(0.25 = RAFT-style top quartile; 1.0 = all episodes)."
    )

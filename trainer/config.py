"""`[trainer]` settings: LoRA SFT hyperparameters, replay size, gate and adapters folder.

Every field has a one-line help, as TRL's configs do; where a default differs from TRL's, the
help says why.
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainerConfig(BaseModel):
    """Score-conditioned LoRA SFT (or DPO) that resumes from the serving adapter each round."""

    model_config = ConfigDict(extra="forbid")

    objective: Literal["sft", "dpo"] = Field(
        "sft", description="sft = reward-conditioned SFT; dpo = preference pairs of the same item (optional).")
    adapters_dir: str = Field("adapters", description="Folder of adapter versions (one v{N} folder each).")
    runs_dir: str = Field("runs", description="Folder of per-round checkpoints (removed when a round ends).")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = lora_alpha / lora_r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules that get a LoRA: every projection of a Llama-style block, attention and MLP, as in "
        "the measured recipe (bench/learning_curve.py; the attention-only default was never measured to learn).")
    learning_rate: float = Field(
        1e-3, gt=0, description="Constant learning rate (no decay: each round continues the adapter). 1e-3, the "
        "measured recipe's: one round of ~90 updates moves a rank-16 LoRA on a 135M model; 2e-4 (TRL's) did not.")
    epochs: float = Field(
        2.0, gt=0, description="Passes over each round's examples (2: the measured recipe's passes over its top "
        "quartile, ~30 updates per 320 scored episodes; bench/results/replication.md).")
    batch_size: int = Field(4, ge=1, description="Examples per device per optimizer step.")
    grad_accum: int = Field(
        2, ge=1, description="Micro-batches accumulated per optimizer step (2 x batch_size 4 = 8 episodes per "
        "update, as measured, with a micro-batch's activations small enough for a laptop CPU).")
    max_length: int = Field(1024, ge=64, description="Examples are truncated to this many tokens.")
    replay_size: int = Field(100, ge=0, description="Older episodes mixed into each round (fixed size).")
    min_new_episodes: int | None = Field(
        None, ge=1, description="New scored episodes needed before a round starts (unset = one block's worth: "
        "the size of the block that just finished, else agent.block_size).")
    save_steps: int = Field(20, ge=1, description="Checkpoint every N optimizer steps (a killed round resumes there).")
    gate_margin: float = Field(
        0.02, ge=0, description="Mean reward gain over the serving adapter a candidate must also show to serve "
        "(on top of a gate_level interval above 0; trainer/gate.py).")
    gate_level: float = Field(
        0.90, gt=0, lt=1, description="Two-sided level of the gate's paired bootstrap interval (0.90 = one-sided "
        "5% each way).")
    gate_items: int = Field(
        100, ge=0, description="Gate items drawn from the gate region, answered by both adapters (0 = no gate). "
        "100 pairs detect a ~0.05 mean gain at a per-pair spread of 0.2; 20 only ~0.11.")
    confidence_map: bool = Field(
        True, description="Fit the candidate's confidence map on its gate items (isotonic, rewards/calibration.py) "
        "and publish mapped confidences while it serves; a score-conditioned adapter states ~0.95 on everything.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory (off by default, unlike TRL: on a CPU it only costs time).")
    balance_directions: bool = Field(
        True, description="Copy episodes so `up` and `down` are equally common at every score level (quartile "
        "bins), after boosting: the score label then says nothing about the direction by itself, only together "
        "with the evidence (trainer.dataset.balanced; without it a small model learned the majority direction: run E "
        "wrote `down` on 298 of 300 items, run F with it beat the untrained model, learning_history.md). With "
        "decision_from = 'correct' it counts and copies the right calls only, the directions that carry loss.")
    loss_on: Literal["assistant", "decision", "weighted"] = Field(
        "weighted", description="Which tokens carry the loss: every assistant token (TRL's assistant_only_loss); "
        "only the final prediction's direction and confidence (trainer/decision.py), the tokens a score label "
        "can steer, about 1 in 70 of an answer, episodes without a parseable prediction left out; or every "
        "assistant token with the decision's weighted trainer.decision_weight times (the format stays trained; the "
        "default, the measured recipe's: `assistant` spends ~69 of 70 tokens' loss on wording).")
    decision_weight: float = Field(
        20.0, ge=1, description="With loss_on = 'weighted': the decision tokens' weight against 1 for the rest of "
        "the answer (20 puts about half of a ~60-token answer's loss on its 2-3 decision tokens).")
    tool_choice_weight: float = Field(
        1.0, ge=1, description="With loss_on = 'weighted': the weight of each tool call's tool name (1 = as any "
        "answer token). Above 1 the research choice is trained as a decision, so a score label can steer it "
        "(bench/research_sets.py's steer arm).")
    decision_from: Literal["all", "correct"] = Field(
        "all", description="Which episodes' decisions carry loss (with loss_on = 'weighted' or 'decision'): all, "
        "each under its label; or only those whose direction came true (the others keep their label, research "
        "and wording, with weight 0 on the direction and confidence). 'correct' suits `rewards.label_format = "
        "\"rank\"`: a rank among an item's episodes says nothing about the direction (they share it), so its wrong "
        "directions teach only noise, while the right ones teach headline -> direction, the two-way mapping the "
        "filtered arms learned within a round (bench/research_sets.py's rank arm).")
    seed: int = Field(0, description="Seed for the LoRA init and the data order.")
    filter_top_fraction: float = Field(
        0.25, gt=0, le=1, description="Train only on each block's best-scoring fraction of episodes, each still "
        "under its score label (0.25 = RAFT-style top quartile, the default; 1.0 = all episodes). Why the default: "
        "a 135M model ignores the label within a CPU round, so training on every episode teaches their average; "
        "the top quartile's accuracy gain was positive on all 5 train draws it was measured on (3 without the label, "
        "2 with it), every episode's on 1 of 3 (bench/results/learning_history.md, runs S-W).")
    boost_top_fraction: float = Field(
        0.0, ge=0, le=1, description="Repeat each block's best-scoring fraction of episodes under their own "
        "label (0 = off; 0.25 = the top quartile): RAFT inside score conditioning, so the label-independent "
        "pull of the data points the way the top episodes went while the low ones still teach what scores low.")
    boost_passes: int = Field(
        2, ge=0, description="Extra copies of each boosted episode in a round (with boost_top_fraction > 0).")

    @model_validator(mode="after")
    def _decision_from_needs_decision_tokens(self) -> "TrainerConfig":
        if self.decision_from == "correct" and self.loss_on == "assistant":
            raise ValueError("trainer.decision_from = 'correct' needs loss_on = 'weighted' or 'decision' (the "
                             "decision tokens must be located to leave the wrong ones out)")
        return self

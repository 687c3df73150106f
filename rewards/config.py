"""`[rewards]` settings: component weights, flat band and the conditioning label format."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RewardWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    direction: float = Field(0.4, ge=0)
    magnitude: float = Field(0.2, ge=0)
    calibration: float = Field(0.3, ge=0)
    data_use: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _positive_total(self) -> "RewardWeights":
        if self.direction + self.magnitude + self.calibration + self.data_use <= 0:
            raise ValueError("rewards.weights must not all be zero")
        return self


class RewardsConfig(BaseModel):
    """How a resolved prediction is scored and how a score becomes a training label."""

    model_config = ConfigDict(extra="forbid")

    weights: RewardWeights = Field(default_factory=RewardWeights)
    flat_band_pct: float = Field(0.5, ge=0, description="|return| below this (in %) counts as flat.")
    flat_band_mode: Literal["pct", "vol"] = Field(
        "pct", description="Flat band in percent, or in units of the ticker's recent horizon volatility."
    )
    label_format: Literal["score", "quantile", "rank", "goal", "none"] = Field(
        "score", description="Conditioning label: `Score: 0.83`, Quark-style quantile bin, `Rank: k/n` (the "
        "episode's reward rank among the episodes run on the same item in its block, group-relative as in GRPO; "
        "for blocks with `agent.explore_tool_mode = 'each'`), `Goal: ...`, or none (one fixed line whatever the "
        "score: plain, unconditioned SFT as a baseline arm)."
    )
    quantile_bins: int = Field(5, ge=2, description="Bins for the quantile and rank label formats (rank: an item's "
                               "episodes are spread over 1..bins, so with 3 tools 3 bins leave no label unseen).")
    goal_threshold: float = Field(0.8, ge=0, le=1, description="Threshold for the goal label format.")

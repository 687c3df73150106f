"""`[agent]` settings: the serving model (fields of policy.config.PolicyConfig), conditioning target and
block shape. One `[agent]` section for users; the policy package owns what it needs to serve."""

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from policy.config import PolicyConfig


class AgentConfig(PolicyConfig):
    """The forecaster: which model answers, how it is conditioned, how a block runs."""

    model_config = ConfigDict(extra="forbid")

    target_score: float = Field(0.95, ge=0, le=1, description="Score the agent is conditioned on at inference.")
    block_size: int = Field(100, ge=1, description="Predictions per block.")
    concurrency: int = Field(8, ge=1, description="Episodes in flight at once (they share forward passes).")
    max_steps: int = Field(4, ge=1, description="Tool-call budget before a final prediction is forced.")
    min_tool_calls: int = Field(
        1, ge=0, description="Tool calls before a prediction is accepted: without research a forecast is a guess "
        "(a small model otherwise copies the prompt's example answer); 0 lets it answer at once.")
    explore_rate: float = Field(
        0.3, ge=0, le=1, description="Share of train-block episodes whose prediction direction is drawn at random "
        "(the model writes the rest, greedily at the default temperature 0): the scored data then holds both "
        "directions for items the model would always call one way. 0.3 is the measured recipe (run F in "
        "bench/results/learning_history.md). Gate/eval blocks never explore; v_predictions.explored_direction "
        "marks the drawn ones.")
    research_plan: list[Literal["get_prices", "search_news", "get_market_context"]] = Field(
        default_factory=lambda: ["search_news"], description="Tool calls the graph makes first, in order, before the "
        "model chooses: the default puts the item's recent headlines in context (a small model left to choose "
        "mostly read prices, where the synthetic market plants no signal); [] = the model chooses every call.")
    news_days: int = Field(
        7, ge=1, description="search_news shows news from the last N calendar days: older headlines no longer move "
        "the price over the horizon, and a small model cannot tell a stale headline from a fresh one.")
    explore_flat_rate: float = Field(
        0.1, ge=0, le=1, description="Share of explored directions that are `flat`: about how often flat is right "
        "(|5-day move| inside the 0.5% band at 30% annual volatility); the rest split evenly between up and down.")
    explore_tool_rate: float = Field(
        0.0, ge=0, le=1, description="Share of train-block episodes whose research plan is one uniformly drawn tool "
        "(or none), so scored data shows which research earns reward. Gate/eval blocks never explore.")
    explore_tool_mode: Literal["draw", "each"] = Field(
        "draw", description="How an item picked for tool exploration is explored: `draw` = one episode whose plan is "
        "one uniformly drawn tool (or none); `each` = one episode per tool, each tool alone as the plan, on the same "
        "item and with the same explored direction, so the reward of each research choice is compared on the same "
        "item (the block holds more episodes than items). A drawn plan is compared across different items, where "
        "the item's luck hides a research gap of ~0.1 reward (run K1 in bench/results/learning_history.md).")
    label_each_turn: bool = Field(
        True, description="Repeat the conditioning label as a user turn after every tool result, so it sits right "
        "before each decision it steers (return-to-go placement); false keeps it only in the task turn, 150-400 "
        "tokens before the prediction, where a 135M model did not learn it.")
    guidance: float = Field(
        0.0, ge=0, description="Classifier-free guidance weight w for the prediction's direction (agent/guidance.py): "
        "score the directions under the target label and under `guidance_against`'s, choose by (1 + w) * target - "
        "w * against, then decode the rest with that direction; 0 = off. Needs a backend with choice_logprobs "
        "(the local one). Applies to a forced prediction (the tool budget spent: every prediction when max_steps "
        "equals the research plan's length, as in the learning bench); explored episodes keep their drawn direction.")
    guidance_against: float = Field(
        0.0, ge=0, le=1, description="The score whose label guidance steers away from.")
    max_new_tokens: int = Field(160, ge=8, description="Token budget for one model turn.")
    temperature: float = Field(
        0.0, ge=0, description="Sampling temperature of train blocks (0 = greedy; gate and eval blocks are always "
        "greedy). Greedy answers plus explore_rate made better train data than sampling at 0.7: accuracy 0.48 vs "
        "0.42, every answer valid vs 0.97, the headline followed 0.55 vs 0.44 (learning_history.md, stop 18).")
    max_repairs: int = Field(1, ge=0, description="Repair attempts for an invalid model output.")
    tool_timeout_s: float = Field(20.0, gt=0, description="A tool call slower than this is a recorded tool error.")
    news_max_results: int = Field(6, ge=1, le=20, description="News items one search_news call shows the model.")

    @model_validator(mode="after")
    def _research_fits_budget(self) -> "AgentConfig":
        if len(self.research_plan) > self.max_steps:
            raise ValueError(f"research_plan has {len(self.research_plan)} calls, more than max_steps ({self.max_steps})")
        if self.min_tool_calls > self.max_steps:
            raise ValueError(f"min_tool_calls ({self.min_tool_calls}) must not exceed max_steps ({self.max_steps})")
        if self.guidance > 0 and self.backend != "local":
            raise ValueError(f"guidance = {self.guidance} needs backend = 'local' (it scores the directions' "
                             f"log-probabilities in-process); backend is {self.backend!r}: set guidance = 0")
        return self

"""The JSON the model writes: tool-call actions and the final prediction, validated by pydantic.

The ticker and as_of are bound by the runner, never written by the model, so the model's
prediction object (`PredictionBody`) has no ticker; `Prediction` is that body plus the ticker.
`ACTION_SCHEMA` (any action) and `FINAL_SCHEMA` (prediction only, once the tool budget is spent)
are self-contained JSON schemas (no $ref) for constrained decoding backends.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from agent.sanitize import storable_text

MAX_MAGNITUDE_PCT = 100.0
MAX_RATIONALE_CHARS = 240  # keeps a whole prediction inside a small model's token budget
MAX_CITATIONS = 8
MAX_LOOKBACK_DAYS = 250
MAX_QUERY_CHARS = 80

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

# The decoding schemas carry a grid of allowed values: not every guided decoder enforces numeric
# bounds (llguidance does; some vLLM backends and lm-format-enforcer do not), and a grid keeps
# numbers a few tokens long. Validation itself accepts any number in range.
CONFIDENCE_STEPS = [round(0.05 * i, 2) for i in range(21)]
MAGNITUDE_STEPS = [round(0.1 * i, 1) for i in range(101)] + [12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0]
LOOKBACK_STEPS = [1, 2, 3, 5, 10, 15, 20, 30, 40, 60, 90, 120, 250]
DECODE_RATIONALE_CHARS = 80  # bounded when decoding: a whole prediction stays ~50 tokens (decode cost, issue #13)


class PredictionBody(BaseModel):
    """What the model writes as its final answer."""

    model_config = _STRICT

    direction: Literal["up", "down", "flat"]
    magnitude_pct: float = Field(ge=0, le=MAX_MAGNITUDE_PCT, description="Expected absolute move in %.",
                                 json_schema_extra={"enum": MAGNITUDE_STEPS})
    confidence: float = Field(ge=0, le=1, description="Probability that the direction is right.",
                              json_schema_extra={"enum": CONFIDENCE_STEPS})
    rationale: str = Field(max_length=MAX_RATIONALE_CHARS, json_schema_extra={"maxLength": DECODE_RATIONALE_CHARS})
    citations: list[int] = Field(max_length=MAX_CITATIONS, description="Snippet ids of the news used.")


class Prediction(PredictionBody):
    """A validated prediction for the episode's ticker (the contract other packages read)."""

    ticker: str = Field(min_length=1)


class PricesArgs(BaseModel):
    model_config = _STRICT
    lookback_days: int = Field(ge=1, le=MAX_LOOKBACK_DAYS, json_schema_extra={"enum": LOOKBACK_STEPS})


class NewsArgs(BaseModel):
    model_config = _STRICT
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS, json_schema_extra={"maxLength": 60})


class GetPrices(BaseModel):
    """Recent daily closes of the episode's ticker."""

    model_config = _STRICT
    tool: Literal["get_prices"]
    args: PricesArgs


class SearchNews(BaseModel):
    """News about the episode's ticker matching a query."""

    model_config = _STRICT
    tool: Literal["search_news"]
    args: NewsArgs


class GetMarketContext(BaseModel):
    """Market-wide context: the universe's average move and market news."""

    model_config = _STRICT
    tool: Literal["get_market_context"]
    args: PricesArgs


class Final(BaseModel):
    model_config = _STRICT
    prediction: PredictionBody


ToolAction = GetPrices | SearchNews | GetMarketContext
Action = Annotated[GetPrices | SearchNews | GetMarketContext | Final, Field(union_mode="left_to_right")]
TOOL_NAMES = ("get_prices", "search_news", "get_market_context")

_ACTION = TypeAdapter(Action)
_FINAL = TypeAdapter(Final)
_TOOL = TypeAdapter(Annotated[ToolAction, Field(union_mode="left_to_right")])


class ActionError(ValueError):
    """The model's text is not a valid action; the message is shown to it in a repair turn."""


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace pydantic's $ref/$defs with the definitions themselves (some decoders reject refs)."""
    defs = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].split("/")[-1]])
            return {k: walk(v) for k, v in node.items() if k not in ("$defs", "title", "description")}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


ACTION_SCHEMA: dict[str, Any] = _inline_refs(_ACTION.json_schema())
FINAL_SCHEMA: dict[str, Any] = _inline_refs(_FINAL.json_schema())
TOOL_SCHEMA: dict[str, Any] = _inline_refs(_TOOL.json_schema())  # research first (AgentConfig.min_tool_calls)


DIRECTIONS = ("up", "down", "flat")

# What a planned research call asks (AgentConfig.research_plan): the ticker as the news query (it
# matches every item tagged with the ticker), and a month of prices or market context.
_PLANNED_ARGS: dict[str, Any] = {"get_prices": {"lookback_days": 20}, "get_market_context": {"lookback_days": 20}}


def planned_call(tool: str, ticker: str) -> tuple[ToolAction, str]:
    """The validated action and its JSON text for a research-plan call, as if the model had written it."""
    args = _PLANNED_ARGS.get(tool, {"query": ticker.lower() or "latest"})
    text = json.dumps({"tool": tool, "args": args})
    action = parse_action(text, tools_only=True)
    if isinstance(action, Final):
        raise TypeError(f"a research plan step must be a tool call, got {text}")
    return action, text


def with_direction(schema: dict[str, Any], direction: str) -> dict[str, Any]:
    """A copy of `schema` whose prediction may only take `direction`: exploration through the decoder.

    Every constrained decoder (llguidance, vLLM json_schema) then makes the model write its own
    magnitude, confidence and rationale for that direction.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return _with_prediction_field(schema, "direction", {"type": "string", "enum": [direction]})


def _with_prediction_field(schema: dict[str, Any], name: str, bound: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` with field `name` of every prediction object (in any union branch) replaced by `bound`."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            props = out.get("properties")
            if isinstance(props, dict) and "direction" in props and "magnitude_pct" in props:
                props[name] = dict(bound)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def with_citations(schema: dict[str, Any], snippet_ids: list[int]) -> dict[str, Any]:
    """A copy of `schema` whose prediction may cite only `snippet_ids` (the news this episode was shown), at
    most MAX_CITATIONS ids and no more than were shown (llguidance has no uniqueItems); none at all when it
    was shown none.

    Why: under a decision-focused loss the LoRA drifted on the answer's other tokens and 44% of held-out
    answers ran away inside `citations` (`[1000000...`) until the token budget cut them (run D,
    bench/results/learning_history.md). With the ids as an enum, no weights can make the decoder write
    an id the episode never saw or a number that does not end.
    """
    ids = sorted(dict.fromkeys(int(i) for i in snippet_ids))
    bound: dict[str, Any] = ({"type": "array", "items": {"type": "integer", "enum": ids},
                              "maxItems": min(MAX_CITATIONS, len(ids))} if ids else {"type": "array", "maxItems": 0})
    return _with_prediction_field(schema, "citations", bound)


def _first_json_object(text: str) -> str:
    """The first balanced {...} in `text`: models often add prose or code fences around the JSON."""
    start = text.find("{")
    if start < 0:
        raise ActionError("no JSON object found; reply with one JSON object")
    try:
        # strict=False: constrained decoders let raw tabs/newlines into strings; they are harmless here.
        _, end = json.JSONDecoder(strict=False).raw_decode(text[start:])
    except json.JSONDecodeError as err:
        raise ActionError(f"invalid JSON: {err.msg} at char {err.pos}") from None
    except (RecursionError, ValueError) as err:  # nesting thousands deep; an int over 4300 digits
        raise ActionError(f"invalid JSON: {type(err).__name__}: {str(err)[:120]}") from None
    return text[start:start + end]


def _storable(node: Any) -> Any:
    """Decoded JSON with every string (keys too) made storable (agent.sanitize.storable_text)."""
    if isinstance(node, str):
        return storable_text(node)
    if isinstance(node, dict):
        return {storable_text(k): _storable(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_storable(v) for v in node]
    return node


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-")))
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts)


def parse_action(text: str, *, final_only: bool = False, tools_only: bool = False
                 ) -> GetPrices | SearchNews | GetMarketContext | Final:
    """Validate the model's text as its next action: a prediction only once the budget is spent, a
    tool call only while the research minimum is not met."""
    raw = _first_json_object(text)
    try:
        # "\u0000" and lone "\ud800" escapes decode to characters no database column stores
        data = _storable(json.loads(raw, strict=False))
        if final_only:
            return _FINAL.validate_python(data)
        if tools_only and isinstance(data, dict) and "prediction" in data:
            raise ActionError(f"research first: call one of {', '.join(TOOL_NAMES)} before predicting")
        # Pick the branch by its key so the error names the right fields, not every union member's.
        if isinstance(data, dict) and "prediction" in data:
            return _FINAL.validate_python(data)
        if isinstance(data, dict) and data.get("tool") in TOOL_NAMES:
            cls = {"get_prices": GetPrices, "search_news": SearchNews, "get_market_context": GetMarketContext}
            return cls[data["tool"]].model_validate(data)
        if isinstance(data, dict) and "tool" in data:
            raise ActionError(f"unknown tool {data['tool']!r}; use one of {', '.join(TOOL_NAMES)}")
        return _ACTION.validate_python(data)
    except ValidationError as err:
        raise ActionError(_short(err)) from None

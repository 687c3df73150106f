"""The episode graph (LangGraph): plan -> policy -> tool -> policy ... -> finalize.

The research plan (`AgentConfig.research_plan`, default: search_news) runs first, written by the
graph as the assistant's tool calls, so every episode reads the item's recent headlines before it
predicts: a 135M model left to choose mostly called get_prices, repeatedly, and never saw the
news that moves the synthetic market (issue #13). An identical repeat of an earlier tool call is
answered from the episode's earlier result instead of running the source again.

Only validated JSON actions drive control flow, so text inside tool results (a news snippet
saying "ignore your instructions") is never obeyed. Once `max_steps` tools have run, the model is
told so and decoding is restricted to the prediction-only schema; before `min_tool_calls` tools
have run, to the tool-only schema (a prediction is refused with "research first"). An invalid reply gets at most
`max_repairs` re-asks with the validation error; after that a tool turn is forced to predict and a
prediction turn ends as a recorded parse failure, never an exception.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from langgraph.graph import END, START, StateGraph

from agent.config import AgentConfig
from agent.guidance import guided_direction
from agent.prompts import BUDGET_MESSAGE, REPAIR_TEMPLATE, label_turn, system_prompt, user_prompt
from agent.recorder import EpisodeRecorder
from agent.sanitize import storable_text
from agent.schema import (
    ACTION_SCHEMA,
    FINAL_SCHEMA,
    TOOL_NAMES,
    TOOL_SCHEMA,
    ActionError,
    Final,
    PredictionBody,
    ToolAction,
    parse_action,
    planned_call,
    with_citations,
    with_direction,
)
from agent.tools import EpisodeTools
from policy.protocol import Policy, release_cache


class EpisodeStopped(Exception):
    """The block's stop event was set: the episode stops after its current step."""


class State(TypedDict, total=False):
    messages: list[dict[str, str]]
    tool_calls: int
    repairs: int
    forced: bool
    turns: int
    action: Any
    error: str | None
    raw: str
    prediction: PredictionBody | None
    parse_error: str | None


@dataclass
class EpisodeResult:
    prediction: PredictionBody | None
    parse_error: str | None
    raw_output: str | None
    tool_calls: int
    turns: int

    @property
    def valid(self) -> bool:
        return self.prediction is not None


def _seed(base: int, episode_id: int, attempt: int, turn: int) -> int:
    return (base * 1_000_003 + episode_id * 10_007 + attempt * 101 + turn) % (2**31 - 1)


def build_graph(policy: Policy, tools: EpisodeTools, recorder: EpisodeRecorder, cfg: AgentConfig, *,
                seed: int = 0, stop: threading.Event | None = None, explore_direction: str | None = None,
                plan: list[str] | None = None, ticker: str = "", label: str = "", guidance_label: str | None = None):
    """Compile the graph for one episode attempt (nodes close over its tools and recorder).

    With `explore_direction` the prediction schemas allow only that direction (exploration);
    `plan` overrides `cfg.research_plan` (tool exploration draws it per item). With `cfg.guidance` > 0 and a
    `guidance_label`, a forced prediction's direction is chosen by guidance between `label` and it.
    """
    research = list(cfg.research_plan if plan is None else plan)
    unknown = [t for t in research if t not in TOOL_NAMES]
    if unknown:
        raise ValueError(f"unknown tool(s) in the research plan: {unknown}; use {', '.join(TOOL_NAMES)}")
    final_schema, action_schema = FINAL_SCHEMA, ACTION_SCHEMA
    if explore_direction is not None:
        final_schema = with_direction(FINAL_SCHEMA, explore_direction)
        action_schema = with_direction(ACTION_SCHEMA, explore_direction)

    def check_stop() -> None:
        if stop is not None and stop.is_set():
            raise EpisodeStopped()

    def policy_node(state: State) -> State:
        check_stop()
        forced = state.get("forced", False)
        must_research = not forced and state.get("tool_calls", 0) < cfg.min_tool_calls
        turn = state.get("turns", 0)
        schema = final_schema if forced else TOOL_SCHEMA if must_research else action_schema
        if forced and explore_direction is None and cfg.guidance > 0 and guidance_label is not None:
            direction, _ = guided_direction(policy, state["messages"], label, guidance_label, cfg.guidance)
            schema = with_direction(FINAL_SCHEMA, direction)
        schema = with_citations(schema, tools.shown_snippets)  # a no-op on the tool-only schema
        out = policy.complete(
            state["messages"], json_schema=schema,
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            seed=_seed(seed, recorder.episode_id, recorder.attempt, turn),
        )
        recorder.step("assistant", out.text, prompt_tokens=out.prompt_tokens,
                      completion_tokens=out.completion_tokens, latency_ms=out.latency_ms)
        messages = [*state["messages"], {"role": "assistant", "content": out.text}]
        try:
            action = parse_action(out.text, final_only=forced, tools_only=must_research)
            error = None
        except ActionError as err:
            action, error = None, str(err)
            if forced and '"tool"' in out.text:
                error = f"the tool budget is used up, reply with a prediction ({error})"
        # the raw output is stored with the prediction: NUL / lone surrogates as U+FFFD (agent.sanitize)
        return {"messages": messages, "action": action, "error": error, "raw": storable_text(out.text),
                "turns": turn + 1}

    def route(state: State) -> Literal["tool", "finalize", "repair", "force", "fail"]:
        if state.get("error") is None:
            return "finalize" if isinstance(state["action"], Final) else "tool"
        if state.get("repairs", 0) < cfg.max_repairs:
            return "repair"
        return "fail" if state.get("forced", False) else "force"

    def call_tool(state: State, action: ToolAction, messages: list[dict[str, str]]) -> State:
        text = tools.run(action)
        messages = [*messages, {"role": "tool", "content": text}]
        n = state.get("tool_calls", 0) + 1
        update: State = {"messages": messages, "tool_calls": n, "repairs": 0, "action": None}
        budget_used = n >= cfg.max_steps
        turn = label_turn(label if cfg.label_each_turn else "", budget_used=budget_used)
        if turn:
            recorder.step("user", turn)
            update["messages"] = [*messages, {"role": "user", "content": turn}]
            update["forced"] = budget_used
        return update

    def tool_node(state: State) -> State:
        check_stop()
        return call_tool(state, state["action"], state["messages"])

    def plan_node(state: State) -> State:
        """The research plan's calls, written as the assistant's turns (no decoding: nothing to choose)."""
        for name in research[: cfg.max_steps]:
            check_stop()
            action, text = planned_call(name, ticker)
            recorder.step("assistant", text)  # no token counts: written by the graph, not decoded
            state = {**state, **call_tool(state, action, [*state["messages"], {"role": "assistant", "content": text}])}
        return state

    def repair_node(state: State) -> State:
        msg = REPAIR_TEMPLATE.format(error=state["error"])
        recorder.step("user", msg)
        return {"messages": [*state["messages"], {"role": "user", "content": msg}],
                "repairs": state.get("repairs", 0) + 1}

    def force_node(state: State) -> State:
        msg = f"{REPAIR_TEMPLATE.format(error=state['error'])} {BUDGET_MESSAGE}"
        recorder.step("user", msg)
        return {"messages": [*state["messages"], {"role": "user", "content": msg}], "forced": True, "repairs": 0}

    def finalize_node(state: State) -> State:
        return {"prediction": state["action"].prediction, "parse_error": None}

    def fail_node(state: State) -> State:
        return {"prediction": None, "parse_error": state["error"]}

    g = StateGraph(State)
    g.add_node("plan", plan_node)
    g.add_node("policy", policy_node)
    g.add_node("tool", tool_node)
    g.add_node("repair", repair_node)
    g.add_node("force", force_node)
    g.add_node("finalize", finalize_node)
    g.add_node("fail", fail_node)
    g.add_edge(START, "plan")
    g.add_edge("plan", "policy")
    g.add_conditional_edges("policy", route)
    g.add_edge("tool", "policy")
    g.add_edge("repair", "policy")
    g.add_edge("force", "policy")
    g.add_edge("finalize", END)
    g.add_edge("fail", END)
    return g.compile()


def run_episode(policy: Policy, tools: EpisodeTools, recorder: EpisodeRecorder, cfg: AgentConfig, *,
                ticker: str, as_of, horizon: int, label: str, seed: int = 0,
                stop: threading.Event | None = None, explore_direction: str | None = None,
                plan: list[str] | None = None, guidance_label: str | None = None) -> EpisodeResult:
    """Commit the system and user turns, then run the graph to a prediction or a recorded failure."""
    system = system_prompt()
    user = user_prompt(ticker, as_of, horizon, label)
    recorder.step("system", system)
    recorder.step("user", user)
    graph = build_graph(policy, tools, recorder, cfg, seed=seed, stop=stop, explore_direction=explore_direction,
                        plan=plan, ticker=ticker, label=label, guidance_label=guidance_label)
    # Each turn visits at most 2 nodes; turns are bounded by tools + repairs + forcing.
    limit = 4 * (cfg.max_steps + 2) * (cfg.max_repairs + 2) + 12
    final = graph.invoke(
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
         "tool_calls": 0, "repairs": 0, "forced": False, "turns": 0},
        config={"recursion_limit": limit},
    )
    release_cache(policy, final["messages"])  # the episode is over: a caching backend drops its KV cache
    return EpisodeResult(prediction=final.get("prediction"), parse_error=final.get("parse_error"),
                         raw_output=final.get("raw"), tool_calls=final.get("tool_calls", 0),
                         turns=final.get("turns", 0))

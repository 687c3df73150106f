"""Loss on the decision only: token masks that cover the final prediction's direction and confidence.

Why: in a scored episode the tokens that can depend on the score label are the decision's, the
direction and the stated confidence. Everything else the model writes (tool calls, JSON keys, the
rationale, citations) is the same whatever the label says, and the JSON schema enforces its form at
decoding anyway. With the loss over every assistant token the direction is about 1 token in 70, so
the label x headline x direction interaction that score conditioning must learn gets a small share
of each update, and the capacity check (bench/results/capacity.md) saw it not learned at 135M.
`trainer.loss_on = "decision"` puts the whole loss on those few tokens. That learned the interaction on
the capacity set (bench/results/capacity_gpu.md) but, with the rest of the answer untrained, broke 44%
of answers on the product path (learning_history.md, run D). `trainer.loss_on = "weighted"` keeps the
loss on every assistant token and weights the decision's tokens `trainer.decision_weight` times, so the
format stays anchored while the decision gets most of each update. The research is a decision too: with
`trainer.tool_choice_weight` above 1 the tool name of every tool call is weighted likewise, so a label can
steer which research the agent does (on every-tool blocks the reward ranks the tools per item; run N in
bench/results/learning_history.md). With `trainer.decision_from = "correct"` an episode whose direction did
not come true carries its final message flagged `train_decision: false` (leave_decision_out): its decision
tokens get weight 0, the rest of it trains as before.

The chat is tokenized once with the model's chat template (as TRL would); the decision's character
spans in the rendered text are mapped to tokens through the fast tokenizer's offsets.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.errors import TrainerError

DECISION_FIELDS = ("direction", "confidence")
DIRECTIONS = ("up", "down", "flat")
TOOL_CALL = re.compile(r'\{\s*"tool"\s*:\s*"([A-Za-z_]+)"')  # a tool call opens with its tool's name
_VALUE = {
    "direction": re.compile(r'"direction"\s*:\s*"([a-z]+)"'),
    "confidence": re.compile(r'"confidence"\s*:\s*(-?[0-9][0-9.eE+-]*)'),
}


TRAIN_DECISION = "train_decision"  # key on a chat's last assistant message; False = its decision is not trained


def last_assistant(messages: Sequence[dict]) -> int | None:
    """Index of the chat's last assistant message (the final answer), None when it has none."""
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)


def leave_decision_out(messages: Sequence[dict]) -> list[dict]:
    """A copy of the chat whose last assistant message says its decision tokens carry no loss. The flag
    travels with the example (and into the round's dataset fingerprint); chat templates ignore it."""
    out = [dict(m) for m in messages]
    last = last_assistant(out)
    if last is not None:
        out[last][TRAIN_DECISION] = False
    return out


def decision_trained(messages: Sequence[dict]) -> bool:
    """Whether this chat's last decision carries loss (see leave_decision_out)."""
    last = last_assistant(messages)
    return last is None or messages[last].get(TRAIN_DECISION, True) is not False


@dataclass(frozen=True)
class DecisionRows:
    """Tokenized examples for a decision-focused loss, and how many chats were left out."""

    rows: list[dict[str, list]]
    skipped: int


def decision_spans(text: str, fields: Sequence[str] = DECISION_FIELDS) -> list[tuple[int, int]]:
    """Character spans of the values of `fields` in one assistant message: the first match of each, since
    the schema writes direction and confidence before the free-text rationale."""
    spans = []
    for name in fields:
        found = _VALUE[name].search(text)
        if found:
            spans.append(found.span(1))
    return spans


def parsed_decision(content: str) -> bool:
    """Whether an assistant message is a prediction object with a valid direction and a numeric confidence
    (a malformed answer has no decision to learn; it still teaches under the all-assistant loss)."""
    try:
        pred = json.loads(content).get("prediction")
    except (ValueError, AttributeError):
        return False
    return (isinstance(pred, dict) and pred.get("direction") in DIRECTIONS
            and isinstance(pred.get("confidence"), (int, float)) and not isinstance(pred.get("confidence"), bool))


def spans_to_tokens(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The rendered chat's token ids and a 0/1 mask on the tokens that overlap any character span."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [int(any(s < hi and lo < e for lo, hi in spans)) for s, e in enc["offset_mapping"]]


def decision_mask(tokenizer, messages: Sequence[dict[str, str]],
                  fields: Sequence[str] = DECISION_FIELDS) -> tuple[list[int], list[int]] | None:
    """The chat's token ids and a 0/1 mask on its last prediction's decision tokens (untruncated); None
    when the last assistant message is not a parseable prediction."""
    last = last_assistant(messages)
    if last is None:
        return None
    content = messages[last]["content"]
    if not parsed_decision(content):
        return None
    spans = decision_spans(content, fields)
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    start = text.rfind(content)
    if start < 0:
        raise TrainerError("the chat template does not render the last assistant message verbatim, so its "
                           "decision tokens cannot be located; use trainer.loss_on = 'assistant'")
    return spans_to_tokens(tokenizer, text, [(start + a, start + b) for a, b in spans])


def decision_row(tokenizer, messages: list[dict[str, str]], max_length: int,
                 fields: Sequence[str] = DECISION_FIELDS) -> dict[str, list[int]] | None:
    """`input_ids` and `assistant_masks` (1 on the decision's tokens) for one chat; None when its last
    assistant message is not a parseable prediction or its decision is left out (nothing to learn on this loss)."""
    if not decision_trained(messages):
        return None
    found = decision_mask(tokenizer, messages, fields)
    if found is None:
        return None
    ids, mask = found[0][:max_length], found[1][:max_length]
    if 1 not in mask:
        return None  # the decision was cut off by max_length
    return {"input_ids": ids, "assistant_masks": mask}


def tool_choice_mask(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The chat's token ids and a 0/1 mask on the tool name of every assistant tool call (`{"tool": "..."`):
    the research choice, the first place where one episode of an item differs from another."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans, cursor = [], 0
    for msg in messages:
        # Every message moves the cursor past itself, not only the assistant's: the system prompt lists the
        # tools as calls (`{"tool": "get_prices", "args": {"lookback_days": 20}}`), the very text of a planned
        # call, and an earlier identical call precedes a repeat; searching from the previous assistant turn
        # alone found those and weighted the wrong tokens.
        at = text.find(msg["content"], cursor)
        if msg["role"] != "assistant":
            if at >= 0:  # a template may rewrite a prompt or tool message; the assistant's must be verbatim
                cursor = at + len(msg["content"])
            continue
        if at < 0:
            raise TrainerError("the chat template does not render an assistant message verbatim, so its tool "
                               "choice cannot be located; use trainer.tool_choice_weight = 1")
        cursor = at + len(msg["content"])
        found = TOOL_CALL.match(msg["content"].lstrip())
        if found:
            lead = len(msg["content"]) - len(msg["content"].lstrip())
            spans.append((at + lead + found.start(1), at + lead + found.end(1)))
    return spans_to_tokens(tokenizer, text, spans)


def weighted_row(tokenizer, messages: list[dict[str, str]], max_length: int, weight: float,
                 tool_weight: float = 1.0) -> dict[str, list] | None:
    """`input_ids`, `labels` (-100 off the assistant's tokens) and `loss_weights` (1 on assistant tokens,
    `weight` on the last prediction's decision tokens (0 where leave_decision_out flagged them), `tool_weight` on
    each tool call's tool name) for one chat; None when truncation leaves no assistant token. A chat without a parseable prediction keeps weight
    1 on its answer: it still teaches the format, as under the all-assistant loss."""
    enc = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, assistant = list(enc["input_ids"]), list(enc["assistant_masks"])
    found = decision_mask(tokenizer, messages)
    if found is not None and found[0] != ids:
        raise TrainerError("the chat template tokenizes differently with and without character offsets, so the "
                           "decision tokens cannot be weighted; use trainer.loss_on = 'assistant'")
    decision = found[1] if found is not None else [0] * len(ids)
    tools = [0] * len(ids)
    if tool_weight != 1.0:
        tool_ids, tools = tool_choice_mask(tokenizer, messages)
        if tool_ids != ids:
            raise TrainerError("the chat template tokenizes differently with and without character offsets, so "
                               "the tool choice cannot be weighted; use trainer.tool_choice_weight = 1")
        if any(t and not a for a, t in zip(assistant, tools, strict=True)):
            raise TrainerError("a tool call's name was located outside the assistant's tokens (the chat template "
                               "renders it differently), so the tool choice cannot be weighted; use "
                               "trainer.tool_choice_weight = 1")
    if not decision_trained(messages):
        weight = 0.0
    weights = [weight if d else tool_weight if (t and a) else float(a)
               for a, d, t in zip(assistant, decision, tools, strict=True)][:max_length]
    ids = ids[:max_length]
    if not any(weights):
        return None
    return {"input_ids": ids, "labels": [t if w > 0 else -100 for t, w in zip(ids, weights, strict=True)],
            "loss_weights": weights}


def weighted_rows(tokenizer, chats: Sequence[list[dict[str, str]]], max_length: int, weight: float,
                  tool_weight: float = 1.0) -> DecisionRows:
    """Every chat as a decision-weighted example; chats whose answer was cut off entirely are counted."""
    if not getattr(tokenizer, "is_fast", False):
        raise TrainerError("trainer.loss_on = 'weighted' needs a fast tokenizer (character offsets); this "
                           f"model's is {type(tokenizer).__name__}")
    rows, skipped = [], 0
    for chat in chats:
        row = weighted_row(tokenizer, chat, max_length, weight, tool_weight)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    if not rows:
        raise TrainerError(f"trainer.loss_on = 'weighted': no episode keeps an assistant token within "
                           f"trainer.max_length = {max_length}")
    return DecisionRows(rows, skipped)


def decision_rows(tokenizer, chats: Sequence[list[dict[str, str]]], max_length: int) -> DecisionRows:
    """Every chat as a decision-only example; chats without a (trained) decision are left out and counted."""
    if not getattr(tokenizer, "is_fast", False):
        raise TrainerError("trainer.loss_on = 'decision' needs a fast tokenizer (character offsets); this "
                           f"model's is {type(tokenizer).__name__}")
    rows, skipped = [], 0
    for chat in chats:
        row = decision_row(tokenizer, chat, max_length)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    if not rows:
        raise TrainerError("trainer.loss_on = 'decision': none of the round's episodes ends in a parseable "
                           "prediction, so there is no decision to train on")
    return DecisionRows(rows, skipped)

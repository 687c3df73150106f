"""Classifier-free guidance between two score labels, for the prediction's direction.

Why: a small model that half-ignores its conditioning label answers one way on most items: a bias
shared by every item outweighs its item-by-item reading of the evidence. Scoring the direction under
the target label and again under a low label, and stepping past the target by `weight` times their
difference, amplifies what the label changes and leaves what it does not (Ho & Salimans' guidance,
as Sanchez et al. used it for language models). The capacity check (bench/results/capacity.md) saw
it lift the untrained SmolLM2's agreement with the Bayes direction from 0.645 to 0.735. The direction
is chosen this way; the rest of the prediction is then decoded with that direction fixed, exactly as
exploration fixes one (agent.schema.with_direction).
"""

from __future__ import annotations

from collections.abc import Sequence

from policy.protocol import Policy, PolicyError

PREDICTION_PREFIX = '{"prediction": {"direction": "'
DIRECTIONS = ("down", "flat", "up")


def swap_label(messages: Sequence[dict[str, str]], label: str, other: str) -> list[dict[str, str]]:
    """The chat with the conditioning label replaced in every system and user turn (tool data untouched)."""
    out = []
    for m in messages:
        if m["role"] in ("system", "user") and label:
            m = {**m, "content": m["content"].replace(label, other)}
        out.append(dict(m))
    return out


def guided_direction(policy: Policy, messages: Sequence[dict[str, str]], label: str, against: str,
                     weight: float) -> tuple[str, dict[str, float]]:
    """The direction with the highest guided log-probability, (1 + w) * lp(target) - w * lp(against), and
    every direction's guided score."""
    score = getattr(policy, "choice_logprobs", None)
    if score is None:
        raise PolicyError(f"agent.guidance needs a backend that scores choices (choice_logprobs); "
                          f"{type(policy).__name__} does not: set agent.guidance = 0")
    if not label or label == against:
        raise PolicyError(f"agent.guidance needs a conditioning label that differs from the one it guides "
                          f"against (got {label!r} and {against!r})")
    high = score(list(messages), PREDICTION_PREFIX, DIRECTIONS)
    low = score(swap_label(messages, label, against), PREDICTION_PREFIX, DIRECTIONS)
    guided = {d: (1 + weight) * high[d] - weight * low[d] for d in DIRECTIONS}
    return max(DIRECTIONS, key=lambda d: guided[d]), guided

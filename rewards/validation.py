"""The scoring boundary: whatever reached the store (even a NaN) is checked before it is scored.

agent/schema.py validates model output; this module defends the scorer against rows that
slipped past it (older code, manual edits, a NaN that got into the DB). Nothing here raises:
bad values come back as a list of readable errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rewards.outcomes import DIRECTIONS, Direction

# Largest believable |h-day move| in %: a 10x move in a week is already absurd for this universe.
MAX_MAGNITUDE_PCT = 1000.0
# A snippet id has at most this many digits; a longer digit string stays an unresolvable string
# (int() refuses over 4300 digits, and no table holds 10^18 snippets).
MAX_ID_DIGITS = 18


@dataclass(frozen=True)
class CheckedPrediction:
    """A prediction whose values are safe to score; citations are snippet ids or unresolvable strings."""

    direction: Direction
    magnitude_pct: float
    confidence: float
    citations: tuple[int | str, ...]


def validate_prediction(
    direction: object, magnitude_pct: object, confidence: object, citations: object
) -> tuple[CheckedPrediction | None, list[str]]:
    """(checked prediction, []) or (None, errors)."""
    errors: list[str] = []
    if direction not in DIRECTIONS:
        errors.append(f"direction must be one of up/down/flat, got {direction!r}")
    mag = _number(magnitude_pct, "magnitude_pct", errors)
    if mag is not None and not 0.0 <= mag <= MAX_MAGNITUDE_PCT:
        errors.append(f"magnitude_pct must be in [0, {MAX_MAGNITUDE_PCT:g}], got {mag!r}")
    conf = _number(confidence, "confidence", errors)
    if conf is not None and not 0.0 <= conf <= 1.0:
        errors.append(f"confidence must be in [0, 1], got {conf!r}")
    cites = _citations(citations, errors)
    if errors:
        return None, errors
    assert mag is not None and conf is not None and cites is not None
    return CheckedPrediction(direction, mag, conf, cites), []  # type: ignore[arg-type]


def _number(x: object, name: str, errors: list[str]) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        errors.append(f"{name} must be a number, got {type(x).__name__} {x!r}"[:200])
        return None
    try:
        value = float(x)  # an int beyond a float's range (10**400) overflows: a bad value, not a crash
    except OverflowError:
        errors.append(f"{name} is out of range: {str(x)[:40]}...")
        return None
    if not math.isfinite(value):
        errors.append(f"{name} must be finite, got {x!r}")
        return None
    return value


def _citations(x: object, errors: list[str]) -> tuple[int | str, ...] | None:
    if x is None:
        return ()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        errors.append(f"citations must be a list of snippet ids, got {type(x).__name__}")
        return None
    out: list[int | str] = []
    for c in x:
        if isinstance(c, bool) or not isinstance(c, (int, str)):
            errors.append(f"citation {c!r} is not a snippet id (int or string)"[:200])
            return None
        out.append(_snippet_id(c))
    return tuple(out)


def _snippet_id(c: int | str) -> int | str:
    """"12" is the id 12; any other string ("²", "[3]", a 5000-digit run) stays a string that resolves
    to nothing. ASCII digits only: str.isdigit() accepts "²", which int() then refuses."""
    if isinstance(c, str):
        s = c.strip()
        return int(s) if s.isascii() and s.isdigit() and len(s) <= MAX_ID_DIGITS else c
    return c

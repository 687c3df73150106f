"""Tool text made inert: nothing in a news snippet, title or tool error can become a chat control token.

A single regex pass is not enough: removing `<|x|>` from `<|im_<|x|>start|>` leaves `<|im_start|>`.
So the cleaner works in three steps:

1. Unicode NFKC folds look-alikes onto ASCII (fullwidth `＜｜im_start｜＞`, small-form `﹤`), and
   invisible format characters (zero-width spaces and joiners, bidi marks, the BOM) are dropped,
   so an obfuscated token is seen, and removed, as the token it imitates.
2. Tag-shaped runs (`<|...|>`, `<...>`, `[INST]`-style markers) are removed again and again until
   nothing changes: a fixpoint, so no removal can leave a new token behind.
3. Structural escape: every `<` and `>` still left becomes `‹` / `›`. ChatML, SmolLM2's `<filename>`
   family, Llama 3's `<|eot_id|>` and Gemma's `<start_of_turn>` all begin with `<`, so the cleaned
   text can not spell one, and neither can cleaned pieces joined together or cut short.

The result is one line (newlines would fake message structure in a small model's eyes).
"""

from __future__ import annotations

import re
import unicodedata

# A control token's shape: `<|...|>` or `<word>` / `</word>` (SmolLM2's `<file_sep>`, Gemma's
# `<start_of_turn>`), plus the bracket markers of Llama 2 / Mistral templates.
_TAG = re.compile(
    r"<\|[^<>|]{0,64}\|>"  # <|im_start|>, <|endoftext|>, <|eot_id|>
    r"|<\|?/?[A-Za-z_][\w.:-]{0,63}\|?>"  # <im_start>, <filename>, </s>, <|im_end>, <im_end|>
    r"|\[/?(?:INST|SYS|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS)\]"  # [INST] [/INST]
    r"|<</?SYS>>",
    re.IGNORECASE,
)
_ESCAPES = str.maketrans({"<": "‹", ">": "›"})
_SPACE = re.compile(r"\s+")
# NUL (PostgreSQL text refuses it) and lone UTF-16 surrogates (no UTF-8 encoding: every driver refuses
# them; a JSON "\ud800" escape from a model server decodes to one).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Text every database accepts: NUL and lone surrogates become U+FFFD, the rest is kept verbatim.

    Model output is recorded as it came; only these characters, which no UTF-8 column can hold, are
    replaced, so the trace still shows where they were.
    """
    return _UNSTORABLE.sub("\ufffd", text)


def _visible(ch: str) -> bool:
    """False for invisible format characters (Cf: U+200B..U+200F, U+2060.., U+FEFF, bidi controls)."""
    return unicodedata.category(ch) != "Cf"


def strip_control_tokens(text: str) -> str:
    """Remove every control-token shape until none is left (a fixpoint; terminates as each pass shortens)."""
    while True:
        cleaned = _TAG.sub("", text)
        if cleaned == text:
            return text
        text = cleaned


def clean_text(text: str) -> str:
    """Fold, strip to a fixpoint, escape angle brackets, one line: safe to place in any chat template."""
    folded = "".join(ch for ch in unicodedata.normalize("NFKC", storable_text(text)) if _visible(ch))
    # C0/C1 controls (NUL, ESC, \r, \n, \x85 ...) become spaces before the strip, so
    # `<|im_\nstart|>` is not left split across what later collapses into one line.
    folded = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in folded)
    out = strip_control_tokens(folded).translate(_ESCAPES)
    return _SPACE.sub(" ", out).strip()


def clean_snippet(text: str, limit: int | None = None) -> str:
    """`clean_text`, then cut to `limit` characters with an ellipsis (cutting cannot create a token)."""
    out = clean_text(text)
    if limit is not None and len(out) > limit:
        out = out[: limit - 1].rstrip() + "…"
    return out

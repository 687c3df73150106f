"""Structured daemon logs: one line per event, `ts=... event=... key=value`, easy to grep and parse."""

from __future__ import annotations

import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("scoreloop")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    s = str(value)
    if s == "" or any(c.isspace() or c in '"=' for c in s):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return s


def format_event(event: str, **fields: Any) -> str:
    parts = [f"event={event}"] + [f"{k}={_fmt(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"
        msg = record.getMessage()
        if not msg.startswith("event="):  # a library's plain message: keep it one line and quoted
            msg = format_event("log", logger=record.name, msg=msg)
        line = f"ts={ts} level={record.levelname.lower()} {msg}"
        if record.exc_info:
            line += " exc=" + _fmt(self.formatException(record.exc_info).splitlines()[-1])
        return line


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """Send scoreloop's and APScheduler's logs to stderr as key=value lines (idempotent).

    APScheduler's own warnings ("maximum number of running instances reached") are expected with
    one worker and a long block, so only its errors are shown."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    for name, lvl in (("scoreloop", level), ("apscheduler", logging.ERROR)):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(lvl)
        lg.propagate = False


# Libraries whose own log lines (and Python warnings) a daemon turns into logfmt `event=log` lines.
LIBRARY_LOGGERS = ("py.warnings", "transformers", "datasets", "peft", "trl", "accelerate", "huggingface_hub",
                   "httpx", "urllib3", "alembic", "langgraph")


def setup_daemon_output(level: int = logging.INFO, stream=None) -> None:
    """Daemon mode: every line on stderr is logfmt. Libraries log through our formatter at WARNING,
    Python warnings become log lines, and the tqdm bars of transformers and datasets are off."""
    import datasets
    import transformers

    setup_logging(level, stream)
    handler = logging.getLogger("scoreloop").handlers[0]
    logging.captureWarnings(True)
    # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps; a
    # library-internal rename that no setting of ours can avoid or fix.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_default_handler()
    datasets.disable_progress_bars()
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(logging.WARNING)
        lg.propagate = False


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, format_event(event, **fields))

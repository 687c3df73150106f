"""The `scoreloop` command line: one verb per library function, errors as one line and exit 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from scheduler.settings import Settings, SettingsError, load_settings
from store.db import StoreError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Semi-online reward-conditioned training "
                  "of a tool-using forecasting agent.")
block_app = typer.Typer(no_args_is_help=True, help="Run or trigger a block of predictions.")
app.add_typer(block_app, name="block")

console = Console()
err_console = Console(stderr=True)

# Typed errors that mean "the user asked for something that cannot be done"; each becomes one line.
USER_ERRORS: tuple[type[BaseException], ...] = (SettingsError, StoreError)


def register_user_error(exc_type: type[BaseException]) -> None:
    global USER_ERRORS
    if exc_type not in USER_ERRORS:
        USER_ERRORS = (*USER_ERRORS, exc_type)


class _State:
    db: str | None = None
    config: Path | None = None


state = _State()

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the project's typed errors into `error: ...` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings(**overrides: Any) -> Settings:
    """Settings with the global --db/--config flags and per-command overrides applied."""
    if state.db:
        overrides["database_url"] = state.db
    return load_settings(state.config, **overrides)


def not_built(name: str, issue: str) -> None:
    err_console.print(f"`scoreloop {name}` is not built yet ({issue}).")
    raise typer.Exit(2)


@app.callback()
def main(
    db: str | None = typer.Option(None, "--db", help="Database URL (overrides SCORELOOP_DATABASE_URL)."),
    config: Path | None = typer.Option(None, "--config", help="Path to scoreloop.toml."),
) -> None:
    state.db = db
    state.config = config


@app.command()
@user_errors
def init() -> None:
    """Create or upgrade the database to the newest schema (idempotent)."""
    from store.db import open_store, current_revision

    s = settings()
    engine = open_store(s.database_url, s.store)
    console.print(f"database ready at migration {current_revision(engine)}: "
                  f"{engine.url.render_as_string(hide_password=True)}")


@app.command()
@user_errors
def daemon() -> None:
    """Run the long-lived scheduler: blocks, resolution, training, manual triggers."""
    not_built("daemon", "scheduler issue")


@block_app.command("run")
@user_errors
def block_run() -> None:
    """Run one block of predictions in the foreground."""
    not_built("block run", "agent issue")


@block_app.command("trigger")
@user_errors
def block_trigger() -> None:
    """Ask the running daemon for a refresh block."""
    not_built("block trigger", "scheduler issue")


@app.command()
@user_errors
def resolve() -> None:
    """Resolve outcomes whose horizon has passed and score them."""
    not_built("resolve", "rewards issue")


@app.command()
@user_errors
def train() -> None:
    """Run one score-conditioned LoRA SFT round on the newly scored episodes."""
    not_built("train", "trainer issue")


@app.command()
@user_errors
def loop() -> None:
    """Replay mode: block -> resolve -> train -> publish, several rounds back to back."""
    not_built("loop", "scheduler issue")


@app.command()
@user_errors
def status() -> None:
    """Daemon, last block, serving adapter, pending predictions, queued triggers."""
    not_built("status", "scheduler issue")


@app.command()
@user_errors
def trace(episode_id: int = typer.Argument(..., help="Episode id (see v_episode_trace).")) -> None:
    """Print one episode's trace readably."""
    not_built("trace", "agent issue")


@app.command()
@user_errors
def report() -> None:
    """Write plots and an index.html of blocks, adapters, calibration and controllability."""
    not_built("report", "evaluation issue")


@app.command()
@user_errors
def export() -> None:
    """Write the offline training set as JSONL in chat `messages` format."""
    not_built("export", "trainer issue")


@app.command("eval")
@user_errors
def eval_() -> None:
    """Evaluate an adapter on held-out items at several target scores."""
    not_built("eval", "evaluation issue")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

"""The `scoreloop` command line: one verb per library function, errors as one line and exit 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from scheduler.settings import Settings, SettingsError, load_settings
from store.errors import ScoreloopError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Semi-online reward-conditioned training "
                  "of a tool-using forecasting agent.")
block_app = typer.Typer(no_args_is_help=True, help="Run or trigger a block of predictions.")
app.add_typer(block_app, name="block")

console = Console()
err_console = Console(stderr=True)

class _State:
    db: str | None = None
    config: Path | None = None


state = _State()

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a ScoreloopError (the user asked for something that cannot be done) into `error: ...` on
    stderr and exit code 1; any other exception is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScoreloopError as err:
            from store.db import mask_url  # no database URL reaches the terminal with its password

            err_console.print(f"[red]error:[/red] {mask_url(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def settings(**overrides: Any) -> Settings:
    """Settings with the global --db/--config flags and per-command overrides applied."""
    if state.db:
        overrides["database_url"] = state.db
    return load_settings(state.config, **overrides)


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
    from store.db import current_revision, open_store

    s = settings()
    engine = open_store(s.database_url, s.store)
    console.print(f"database ready at migration {current_revision(engine)}: "
                  f"{engine.url.render_as_string(hide_password=True)}")


@app.command()
@user_errors
def daemon(
    wait: bool = typer.Option(False, "--wait", help="If another daemon holds the database, wait for it to stop."),
    mode: str | None = typer.Option(None, "--mode", help="replay | live (default scheduler.mode)."),
    block_size: int | None = typer.Option(None, "--block-size", min=1, help="Items per scheduled block (agent.block_size)."),
    max_blocks: int | None = typer.Option(None, "--max-blocks", min=0, help="Stop after this many blocks."),
    train_every: int | None = typer.Option(
        None, "--train-every", min=1, help="Train once this many new episodes are scored (trainer.min_new_episodes)."),
    gate_items: int | None = typer.Option(
        None, "--gate-items", min=0, help="Held-out items per side of the promotion gate (0 = publish ungated)."),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Show a progress bar per block."),
) -> None:
    """Run the long-lived scheduler: blocks, resolution, training, manual triggers."""
    from scheduler.daemon import run_daemon

    sched = {k: v for k, v in {"mode": mode, "max_blocks": max_blocks}.items() if v is not None}
    trainer = {k: v for k, v in {"min_new_episodes": train_every, "gate_items": gate_items}.items() if v is not None}
    agent = {"block_size": block_size} if block_size is not None else None
    code = run_daemon(settings(scheduler=sched or None, trainer=trainer or None, agent=agent), wait=wait,
                      progress=progress)
    if code:
        raise typer.Exit(code)


@block_app.command("run")
@user_errors
def block_run(
    size: int | None = typer.Option(None, "--size", min=1, help="Predictions in the block (default agent.block_size)."),
    market: str | None = typer.Option(None, "--market", help="synthetic | yahoo | csv (default market.source)."),
    as_of: str | None = typer.Option(None, "--as-of", help="Replay from this date (YYYY-MM-DD); yahoo without it = live."),
    tickers: str | None = typer.Option(None, "--tickers", help="Comma-separated tickers (default: the universe)."),
    target_score: float | None = typer.Option(None, "--target-score", min=0, max=1, help="Conditioning target."),
    resume: int | None = typer.Option(None, "--resume", help="Continue this interrupted block instead."),
    replay_outputs: Path | None = typer.Option(
        None, "--replay-outputs", help="Answer from recorded model outputs (JSONL) instead of a model."),
) -> None:
    """Run one block of predictions in the foreground."""
    import time
    from datetime import datetime
    from datetime import time as dtime

    from agent.runner import BlockError, plan_items, resume_block, run_block
    from market.sources import build_market
    from scheduler.daemon import command_lock
    from store import traces
    from store.db import open_store, session_scope

    s = settings(market={"source": market} if market else None)
    when = None
    if as_of:
        try:
            when = datetime.fromisoformat(as_of)
        except ValueError:
            raise BlockError(f"--as-of {as_of!r} is not a date (YYYY-MM-DD)") from None
        if len(as_of) <= 10:  # a bare date means that session (replay sees its close)
            when = datetime.combine(when.date(), dtime(12), tzinfo=UTC)
        elif when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    names = [t for t in tickers.split(",")] if tickers is not None else None
    engine = open_store(s.database_url, s.store)
    with command_lock(engine, s, "block run" + (" --resume" if resume is not None else ""),
                      hint="or ask the daemon for a block with `scoreloop block trigger` (an interrupted block "
                           "it resumes by itself)"):
        mkt = build_market(s.market, engine)
        mode = "live" if s.market.source == "yahoo" and when is None else "replay"
        if resume is None:
            # Plan (and so validate tickers, universe and dates) before a model is loaded.
            with session_scope(engine) as sess:
                plan_items(sess, mkt, mode=mode, size=size or s.agent.block_size, horizon=s.market.horizon_days,
                           kind="train", as_of=when, tickers=names)
        policy = _build_policy(s, engine, replay_outputs)
        t0 = time.perf_counter()
        try:
            if resume is not None:
                block_id = resume_block(engine, resume, policy, mkt, s.agent, s.rewards)
            else:
                block_id = run_block(engine, policy, mkt, s.agent, s.rewards, mode=mode, size=size, as_of=when,
                                     tickers=names, target_score=target_score, horizon=s.market.horizon_days)
        finally:
            policy.close()
    with session_scope(engine) as sess:
        block = traces.get_block(sess, block_id)
        n, valid = traces.block_prediction_counts(sess, block_id)
        console.print(f"block {block_id} {block.status}: {n}/{block.size} predictions, {valid} valid, "
                      f"{time.perf_counter() - t0:.1f}s (episodes in v_episode_trace, `scoreloop trace ID`)")


def _build_policy(s: Settings, engine, replay_outputs: Path | None):
    """The serving adapter on the configured backend, or recorded outputs when asked."""
    from policy.protocol import PolicyError

    if replay_outputs is not None:
        from policy.scripted import ScriptedPolicy

        if not replay_outputs.exists():
            raise PolicyError(f"recorded outputs not found: {replay_outputs}")
        return ScriptedPolicy.from_jsonl(replay_outputs)
    from policy.backends import build_policy
    from store.db import session_scope
    from trainer.registry import serving_adapter

    with session_scope(engine) as sess:
        serving = serving_adapter(sess)
    return build_policy(s.agent, serving)


@block_app.command("trigger")
@user_errors
def block_trigger(
    size: int | None = typer.Option(None, "--size", min=1, help="Predictions in the block (default: the daemon's)."),
) -> None:
    """Ask the running daemon for a refresh block (queued; it runs next, exactly once)."""
    from scheduler.status import daemon_state
    from store.db import open_store
    from store.triggers import enqueue_trigger

    s = settings()
    engine = open_store(s.database_url, s.store)
    tid = enqueue_trigger(engine, "block", {"size": size} if size else {})
    d = daemon_state(engine, s.scheduler.lock_ttl_s)
    console.print(f"trigger {tid} queued (block of {size or 'the daemon default'} items)")
    if d is not None and d["alive"]:
        console.print(f"daemon pid {d['pid']} on {d['host']} will run it next (now: {d['current_job'] or 'idle'}); "
                      f"follow it with `scoreloop status`", soft_wrap=True, highlight=False)
    else:
        cmd = "scoreloop block run" + (f" --size {size}" if size else "")
        err_console.print("[yellow]no daemon is running on this database[/yellow]: the trigger waits until "
                          f"`scoreloop daemon` starts; to run a block now use `{cmd}`", soft_wrap=True,
                          highlight=False)


@app.command()
@user_errors
def resolve(
    market: str | None = typer.Option(None, "--market", help="synthetic | yahoo | csv (default market.source)."),
    now: str | None = typer.Option(None, "--now", help="Resolve as of this UTC time (ISO 8601; default: now)."),
) -> None:
    """Resolve outcomes whose horizon has passed and score them."""
    from datetime import datetime

    from rich.table import Table

    from market.sources import build_market
    from scheduler.daemon import command_lock
    from scoring.resolve import resolve_pending
    from store.db import open_store, session_scope
    from store.status import block_summaries

    when = None
    if now is not None:
        try:
            when = datetime.fromisoformat(now)
        except ValueError:
            raise SettingsError(f"--now {now!r} is not an ISO 8601 time (e.g. 2024-03-08T21:05:00Z)") from None
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
    s = settings(market={"source": market} if market else None)
    engine = open_store(s.database_url, s.store)
    with command_lock(engine, s, "resolve", hint="the daemon resolves on its own schedule"):
        report = resolve_pending(engine, build_market(s.market, engine), s.rewards, now=when)

    console.print(f"reward version [bold]{report.reward_version}[/bold]: {report.considered} unscored, "
                  f"{report.resolved} scored ({report.invalid_scored} invalid, scored 0), "
                  f"{report.not_due} not due, {report.still_pending} pending", highlight=False, soft_wrap=True)
    if report.pending_reasons:
        console.print("pending: " + ", ".join(f"{k} {v}" for k, v in report.pending_reasons.most_common()))
        for pid, reason in report.examples:
            console.print(f"  prediction {pid}: {reason}", highlight=False, soft_wrap=True)
    if report.blocks_updated:
        table = Table("block", "n", "valid", "accuracy", "reward", "brier", "ece", "skill", "up acc", "mom acc",
                      title="blocks scored")
        with session_scope(engine) as sess:
            for b, m in sorted(block_summaries(sess, report.blocks_updated).items()):
                table.add_row(str(b), *(_fmt(v) for v in m.pick(("n", "n_valid", "accuracy", "mean_composite",
                              "brier", "ece", "skill", "always_up_accuracy", "momentum_accuracy")).values()))
        console.print(table)


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


@app.command()
@user_errors
def train(
    objective: str | None = typer.Option(None, "--objective", help="sft (default from [trainer]) or dpo."),
    publish: bool = typer.Option(False, "--publish", help="Serve the candidate at once, without the gate."),
) -> None:
    """Run one score-conditioned LoRA SFT round on the newly scored episodes."""
    from policy.model_files import resolve_model
    from scheduler.daemon import command_lock
    from scheduler.status import counted
    from scheduler.steps import train_threshold
    from store.db import open_store
    from trainer.registry import publish as publish_adapter
    from trainer.round import NothingToTrain, train_round

    s = settings(**({"trainer": {"objective": objective}} if objective else {}))
    engine = open_store(s.database_url, s.store)
    # Under the lock: a round (or a resumed one) and a daemon would otherwise both take the next adapter version.
    with command_lock(engine, s, "train", hint="the daemon trains, gates and publishes by itself once "
                      "trainer.min_new_episodes new episodes are scored"):
        result = train_round(engine, s.trainer, s.rewards, resolve_model(s.agent.model, s.agent.model_cache_dir),
                             device=s.agent.device, min_new_episodes=train_threshold(s))
        if isinstance(result, NothingToTrain):
            console.print(f"nothing to train: {result.reason}")
            return
        last = result.loss_curve[-1]["loss"] if result.loss_curve else float("nan")
        console.print(f"adapter v{result.adapter_version} (parent {result.parent_version}): "
                      f"{counted(result.n_examples, 'example')} from blocks {result.block_ids} + "
                      f"{len(result.replay_episode_ids)} replayed, {counted(len(result.loss_curve), 'step')}, "
                      f"final loss {last:.4f}, {result.seconds:.1f}s -> {result.path}")
        if publish:
            publish_adapter(engine, result.adapter_version)
            console.print(f"adapter v{result.adapter_version} is serving")


@app.command()
@user_errors
def loop(
    rounds: int = typer.Option(3, "--rounds", "-k", min=1, help="Rounds to run."),
    size: int | None = typer.Option(None, "--size", min=1, help="Items per block (default agent.block_size)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the structured event log."),
) -> None:
    """Replay mode: block -> resolve -> train -> publish, several rounds back to back."""
    from scheduler.loop import run_loop

    run_loop(settings(), rounds, size=size, console=console, verbose=verbose)


@app.command()
@user_errors
def status(json_out: bool = typer.Option(False, "--json", help="Print the status as JSON.")) -> None:
    """Daemon, last block, serving adapter, pending predictions, queued triggers."""
    import json

    from scheduler.status import collect_status, render_status
    from store.db import open_store

    s = settings()
    engine = open_store(s.database_url, s.store, migrate=False)
    st = collect_status(engine, s.scheduler.lock_ttl_s)
    if json_out:
        print(json.dumps(st, default=str, indent=2))
    else:
        render_status(st, console)


@app.command()
@user_errors
def trace(episode_id: int = typer.Argument(..., help="Episode id (see v_episode_trace).")) -> None:
    """Print one episode's trace readably."""
    from rich.panel import Panel

    from store import traces
    from store.db import open_store, session_scope

    s = settings()
    engine = open_store(s.database_url, s.store, migrate=False)
    with session_scope(engine) as sess:
        tr = traces.episode_trace(sess, episode_id)
        ep, p = tr.episode, tr.prediction
        console.print(f"[bold]episode {ep.id}[/bold] block {ep.block_id} #{ep.idx}  {ep.ticker}  as_of "
                      f"{ep.as_of:%Y-%m-%d %H:%M} UTC  horizon {ep.horizon}  {ep.status}  attempt {ep.attempt}  "
                      f"adapter {ep.adapter_version if ep.adapter_version is not None else 'base'}  "
                      f"[{ep.conditioning}]"
                      + (f"  explored: direction {ep.explore_direction}" if ep.explore_direction else "")
                      + (f"  explored: research {ep.explore_tool}" if ep.explore_tool else ""),
                      highlight=False)
        colors = {"system": "dim", "user": "cyan", "assistant": "green", "tool": "yellow"}
        for st in tr.steps:
            title = f"{st.idx} {st.role}"
            if st.role == "assistant" and st.completion_tokens is not None:
                title += f"  {st.prompt_tokens}+{st.completion_tokens} tok  {st.latency_ms or 0:.0f} ms"
            if st.tool_name:
                title += f"  {st.tool_name}({', '.join(f'{k}={v!r}' for k, v in (st.tool_args or {}).items())})"
                title += f"  {st.tool_latency_ms or 0:.0f} ms"
                if st.cache_hit:
                    title += "  cached"
                if st.dropped_future:
                    title += f"  dropped {st.dropped_future} future"
                if st.snippet_ids:
                    title += f"  snippets {st.snippet_ids}"
            border = "red" if st.tool_error else colors.get(st.role, "white")
            console.print(Panel(st.content, title=title, title_align="left", border_style=border), highlight=False)
        if p is None:
            console.print("[dim]no prediction yet[/dim]")
        elif p.valid:
            console.print(f"[bold]prediction[/bold] {p.direction} {p.magnitude_pct:.2f}% confidence "
                          f"{p.confidence:.2f} citations {p.citations} resolve {p.resolve_at}\n  {p.rationale}",
                          highlight=False)
        else:
            console.print(f"[bold red]parse failure[/bold red] {p.parse_error}", highlight=False)


@app.command()
@user_errors
def report(
    out: Path = typer.Option(Path("report"), "--out", help="Folder for the PNG plots and index.html."),
) -> None:
    """Write plots and an index.html: blocks, learning by version, tool usage, calibration, controllability."""
    from evaluation.report import market_p_star, write_report
    from store.db import open_store

    s = settings()
    engine = open_store(s.database_url, s.store, migrate=False)  # reads only: never creates a database
    res = write_report(engine, out, p_star=market_p_star(s.market, s.rewards),
                       source=engine.url.render_as_string(hide_password=True))
    console.print(f"wrote {len(res.images)} plots and {res.index}", highlight=False)
    for name in res.empty_plots:
        console.print(f"  {name}: no data yet (the page says why)", highlight=False)


@app.command()
@user_errors
def browse(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8001, "--port", min=1, max=65535, help="Port to listen on."),
    immutable: bool = typer.Option(False, "--immutable", help="Open the file immutable (a copy nothing writes)."),
) -> None:
    """Browse the store read-only in a web browser (datasette); on PostgreSQL, how to connect a SQL client."""
    from store.browse import browse_store

    browse_store(settings().database_url, host=host, port=port, immutable=immutable,
                 echo=lambda line: console.print(line, highlight=False, soft_wrap=True))


@app.command()
@user_errors
def export(out: Path = typer.Option(..., "--out", help="JSONL file to write.")) -> None:
    """Write the offline training set as JSONL in chat `messages` format."""
    from scheduler.status import counted
    from store.db import open_store
    from trainer.dataset import export_jsonl

    s = settings()
    engine = open_store(s.database_url, s.store, migrate=False)  # reads only: never creates a database
    n = export_jsonl(engine, s.trainer, s.rewards, out)
    console.print(f"wrote {counted(n, 'example')} to {out} (load with datasets.load_dataset('json', data_files=...))")


@app.command("eval")
@user_errors
def eval_(
    adapter: str | None = typer.Option(None, "--adapter", help="Adapter version to evaluate, or `base` "
                                       "(default: the serving adapter)."),
    targets: str = typer.Option("0.2,0.4,0.6,0.8,1.0", "--targets", help="Comma-separated target scores."),
    market: str | None = typer.Option(None, "--market", help="synthetic | csv (a replayable history)."),
    items: int = typer.Option(24, "--items", min=1, help="Held-out items, run once per target."),
    seed: int = typer.Option(0, "--seed", help="Which draw of items from the eval region (same seed, same items)."),
) -> None:
    """Evaluate an adapter on held-out items at several target scores."""
    from evaluation.heldout import EvalError, parse_targets

    wanted = parse_targets(targets)
    s = settings(market={"source": market} if market else None)
    from store.db import open_store, session_scope
    from store.training import adapter_row
    from trainer.registry import serving_adapter

    engine = open_store(s.database_url, s.store)
    with session_scope(engine) as sess:
        if adapter is None:
            chosen = serving_adapter(sess)
        elif adapter.strip().lower() == "base":
            chosen = None
        else:
            try:
                version = int(adapter.lstrip("vV"))
            except ValueError:
                raise EvalError(f"--adapter {adapter!r}: give a version number or `base`") from None
            row = adapter_row(sess, version)
            if row is None:
                raise EvalError(f"no adapter version {version} in the registry (see the adapters table)")
            chosen = (row.path, row.version)

    from evaluation.heldout import run_eval
    from market.sources import build_market
    from policy.backends import build_policy
    from scheduler.daemon import command_lock

    with command_lock(engine, s, "eval"):
        mk = build_market(s.market, engine)
        label = "base" if chosen is None else f"v{chosen[1]}"
        console.print(f"evaluating adapter {label} on {items} held-out {mk.name} items at targets {wanted}")
        policy = build_policy(s.agent, chosen)
        try:
            res = run_eval(engine, policy, mk, s.agent, s.rewards, targets=wanted, n_items=items,
                           horizon=s.market.horizon_days, seed=seed)
        finally:
            policy.close()
    from rich.table import Table

    table = Table("target", "n", "valid", "mean reward", "accuracy", "Brier", title=f"eval run {res.eval_run_id}")
    for r in res.per_target:
        table.add_row(f"{r.target:.2f}", str(r.n), str(r.n_valid), _fmt(r.mean_reward), _fmt(r.accuracy),
                      _fmt(r.brier))
    console.print(table)
    console.print(f"controllability (Spearman target vs realized reward): {_fmt(res.spearman)}  "
                  f"status {res.status}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())

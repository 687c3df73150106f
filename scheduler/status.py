"""`scoreloop status`: is a daemon alive, what is it doing, how did the last block go, what serves."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from store.db import session_scope
from store.gate_decisions import latest as latest_gate
from store.lock import read_lock
from store.status import block_summary, last_block_id, pending_predictions
from store.training import latest_training_run, serving_adapter_row
from store.triggers import list_triggers

SUMMARY_KEYS = ("block_id", "kind", "status", "size", "n", "n_valid", "accuracy", "mean_composite", "brier", "ece",
                "always_up_accuracy", "momentum_accuracy", "adapter_version", "created_at", "finished_at")


def _iso(v: Any) -> Any:
    return v.isoformat(timespec="seconds") if isinstance(v, datetime) else v


def daemon_state(engine: Engine, ttl_s: float, now: datetime | None = None) -> dict[str, Any] | None:
    """The lock row with `alive` (heartbeat younger than the TTL); None if no daemon ever held it."""
    now = now or datetime.now(UTC)
    holder = read_lock(engine)
    if holder is None:
        return None
    return {"alive": holder.alive(ttl_s, now), "owner": holder.owner, "pid": holder.pid, "host": holder.host,
            "current_job": holder.current_job, "heartbeat_age_s": round(holder.age_s(now), 1),
            "acquired_at": _iso(holder.acquired_at)}


def collect_status(engine: Engine, ttl_s: float, *, recent_triggers: int = 5) -> dict[str, Any]:
    """Everything `scoreloop status` shows, as plain JSON-ready values."""
    now = datetime.now(UTC)
    with session_scope(engine) as s:
        # the loop's unit is the train block; gate/eval blocks in between would hide it
        bid = last_block_id(s, kind="train") or last_block_id(s)
        summ = block_summary(s, bid) if bid is not None else None
        serving = serving_adapter_row(s)
        gate = latest_gate(s)
        last_gate = None if gate is None else {
            "candidate_version": gate.candidate_version, "serving_version": gate.serving_version,
            "decision": gate.decision, "n_pairs": gate.n_pairs, "mean_diff": gate.mean_diff, "ci_low": gate.ci_low,
            "ci_high": gate.ci_high, "level": gate.level, "margin": gate.margin, "p_value": gate.p_value,
            "region": gate.region, "created_at": _iso(gate.created_at)}
        run = latest_training_run(s)
        last_training = None if run is None else {
            "id": run.id, "objective": run.objective, "status": run.status, "n_examples": run.n_examples,
            "adapter_version": run.adapter_version, "steps": len(run.loss_curve or []),
            "final_loss": (run.loss_curve or [{}])[-1].get("loss"), "error": run.error,
            "label_format": (run.hyperparams or {}).get("label_format"),
            "label_research": (run.hyperparams or {}).get("label_research"),
            "started_at": _iso(run.started_at), "finished_at": _iso(run.finished_at)}
        pending = pending_predictions(s)
        active = list_triggers(s, ("queued", "running"), limit=100)
        finished = [t for t in list_triggers(s, ("done", "failed"), limit=10_000)][-recent_triggers:]
    triggers = [
        {"id": t.id, "kind": t.kind, "status": t.status, "params": t.params,
         "age_s": round((now - t.created_at).total_seconds(), 1), "result": t.result, "error": t.error}
        for t in sorted(active + finished, key=lambda t: t.id)
    ]
    return {
        "database": engine.url.render_as_string(hide_password=True),
        "daemon": daemon_state(engine, ttl_s, now),
        "last_block": None if summ is None else {k: _iso(v) for k, v in summ.pick(SUMMARY_KEYS).items()},
        "serving_adapter": None if serving is None else {
            "version": serving.version, "path": serving.path, "parent_version": serving.parent_version,
            "published_at": _iso(serving.published_at)},
        "last_gate": last_gate,
        "last_training": last_training,
        "pending_predictions": pending,
        "triggers": triggers,
    }


def counted(n: int, noun: str) -> str:
    """`n` and its noun, singular for one: the default round trains a small block's top quartile, so "1 example"
    is a common line and "1 examples" read as a typo."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _num(v: Any, fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def render_status(st: dict[str, Any], console: Console) -> None:
    t = Table(title="scoreloop status", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("database", st["database"])
    d = st["daemon"]
    if d is None:
        t.add_row("daemon", "[yellow]not running[/yellow] (no daemon holds this database; start one with `scoreloop daemon`)")
    elif d["alive"]:
        t.add_row("daemon", f"[green]running[/green] pid {d['pid']} on {d['host']}, "
                            f"heartbeat {d['heartbeat_age_s']}s ago")
        t.add_row("current job", d["current_job"] or "idle")
    else:
        t.add_row("daemon", f"[red]not running[/red] (last heartbeat {d['heartbeat_age_s']}s ago from pid "
                            f"{d['pid']} on {d['host']}: stopped or killed)")
    b = st["last_block"]
    if b is None:
        t.add_row("last block", "none yet")
    else:
        t.add_row("last block", f"#{b['block_id']} {b['kind']} {b['status']}, {b['size']} items, adapter "
                                f"{'base' if b['adapter_version'] is None else 'v' + str(b['adapter_version'])}")
        if b["n"] is not None:
            t.add_row("  scored", f"n {b['n']} (valid {b['n_valid']}), accuracy {_num(b['accuracy'])}, "
                                  f"mean reward {_num(b['mean_composite'])}, Brier {_num(b['brier'])}, "
                                  f"ECE {_num(b['ece'])}, always-up acc {_num(b['always_up_accuracy'])}")
        else:
            t.add_row("  scored", "not yet")
    a = st["serving_adapter"]
    t.add_row("serving adapter", "base model (no adapter published yet)" if a is None else
              f"v{a['version']} (parent {a['parent_version'] if a['parent_version'] is not None else 'base'}, "
              f"published {a['published_at']}) {a['path']}")
    g = st.get("last_gate")
    if g is not None:
        color = {"accept": "green", "keep": "yellow", "reject": "red"}.get(g["decision"], "")
        interval = "-" if g["ci_low"] is None else f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        serving_label = "base" if g["serving_version"] is None else f"v{g['serving_version']}"
        t.add_row("last gate", f"v{g['candidate_version']} vs {serving_label}: [{color}]{g['decision']}[/{color}] on "
                               f"{g['n_pairs']} paired items, mean diff {_num(g['mean_diff'], '{:+.3f}')}, "
                               f"{g['level']:.0%} interval {interval}, margin {g['margin']}, sign-test p "
                               f"{_num(g['p_value'])} (gate region {g['region'].get('first')}.."
                               f"{g['region'].get('last')})")
    r = st.get("last_training")
    if r is not None:
        color = {"done": "green", "running": "cyan", "failed": "red"}.get(r["status"], "")
        made = f", adapter v{r['adapter_version']}" if r["adapter_version"] is not None else ""
        t.add_row("last training", f"run {r['id']} {r['objective']} [{color}]{r['status']}[/{color}]{made}: "
                                   f"{counted(r['n_examples'], 'example')}, {r['steps']} logged steps, final loss "
                                   f"{_num(r['final_loss'])}" + (f" ({r['error'][:120]})" if r["error"] else ""))
        info = r["label_research"]
        if info is not None:
            t.add_row("  labels", f"{r['label_format']}: {info['nats']:.3f} nats about the first tool call "
                                  "(0: the label cannot steer the research)")
    t.add_row("pending predictions", str(st["pending_predictions"]))
    console.print(t)
    if st["triggers"]:
        tt = Table(title="triggers", title_justify="left")
        for col in ("id", "status", "age", "size", "result / error"):
            tt.add_column(col)
        for tr in st["triggers"]:
            color = {"queued": "yellow", "running": "cyan", "done": "green", "failed": "red"}.get(tr["status"], "")
            res = tr["error"] or (f"block {tr['result'].get('block_id')}" if tr["result"] else "")
            tt.add_row(str(tr["id"]), f"[{color}]{tr['status']}[/{color}]", f"{tr['age_s']:.0f}s",
                       str(tr["params"].get("size", "default")), res)
        console.print(tt)
    else:
        console.print("triggers: none")

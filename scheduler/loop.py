"""`scoreloop loop --rounds K`: the semi-online loop in replay mode, K rounds back to back.

Each round: a block with the serving adapter -> resolve and score it -> one score-conditioned
training round -> gate on held-out items -> publish (or reject) -> the next block serves it.
Holds the daemon lock while it runs, so a daemon and a loop never write the same replay history.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from scheduler.daemon import LockKeeper, _install_signals
from scheduler.logs import log_event, setup_logging
from scheduler.recovery import recover
from scheduler.runtime import Runtime, Stopped, scheduled_block_size, version_label
from scheduler.settings import Settings
from scheduler.steps import CycleResult, cycle
from store.db import open_store


@dataclass
class RoundSummary:
    round: int
    block_id: int
    n: int | None
    accuracy: float | None
    mean_reward: float | None
    brier: float | None
    ece: float | None
    adapter_version: int | None  # serving after the round
    trained: bool
    seconds: float
    skipped: list[str] = field(default_factory=list)  # why a step did not run, in words

    @classmethod
    def of(cls, round_no: int, res: CycleResult, seconds: float) -> RoundSummary:
        def fig(name: str):  # a block whose outcomes are pending has no figures yet
            return None if res.summary is None else getattr(res.summary, name)

        return cls(round=round_no, block_id=res.block.block_id, n=fig("n"), accuracy=fig("accuracy"),
                   mean_reward=fig("mean_composite"), brier=fig("brier"), ece=fig("ece"),
                   adapter_version=res.serving_version, trained=res.trained, seconds=seconds, skipped=res.skipped)

    def line(self, total: int) -> str:
        def f(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        why = f" ({'; '.join(self.skipped)})" if self.skipped else ""
        return (f"round {self.round}/{total}  block {self.block_id}  n {self.n if self.n is not None else '-'}  "
                f"accuracy {f(self.accuracy)}  mean reward {f(self.mean_reward)}  Brier {f(self.brier)}  "
                f"ECE {f(self.ece)}  serving {version_label(self.adapter_version)}{why}  {self.seconds:.0f}s")


def run_loop(settings: Settings, rounds: int, *, size: int | None = None, console: Console | None = None,
             verbose: bool = False, stop: threading.Event | None = None) -> list[RoundSummary]:
    """Run `rounds` replay rounds; returns one summary per finished round."""
    console = console or Console()
    setup_logging(logging.INFO if verbose else logging.WARNING)
    if settings.scheduler.mode != "replay":
        settings = settings.model_copy(update={"scheduler": settings.scheduler.model_copy(update={"mode": "replay"})})
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        _install_signals(stop)
    sc = settings.scheduler
    engine = open_store(settings.database_url, settings.store)
    keeper = LockKeeper(engine, heartbeat_s=sc.heartbeat_s, ttl_s=sc.lock_ttl_s, stop=stop, role="loop")
    keeper.acquire(wait=False)
    rt = Runtime(settings=settings, engine=engine, stop=stop, owner=keeper.owner, progress=True)
    out: list[RoundSummary] = []
    try:
        with console.status(f"loading {settings.agent.model} ..."):
            rt.open()
        rt.set_job("recovering")
        recover(rt)
        n = size or scheduled_block_size(settings)
        console.print(f"[bold]scoreloop loop[/bold]: {rounds} rounds of {n} items, market "
                      f"{settings.market.source}, model {settings.agent.model}, serving "
                      f"{version_label(rt.serving_version)}")
        for r in range(1, rounds + 1):
            if stop.is_set():
                break
            console.rule(f"round {r}/{rounds}")
            t0 = time.monotonic()
            try:
                res = cycle(rt, size=n)
            except Stopped:
                break
            if not res.block.complete:
                console.print(f"[yellow]stopped during round {r}; `scoreloop daemon` or the next loop resumes "
                              f"block {res.block.block_id}[/yellow]")
                break
            s = RoundSummary.of(r, res, time.monotonic() - t0)
            out.append(s)
            console.print(s.line(rounds), highlight=False)
            log_event("round_done", round=r, block=s.block_id, accuracy=s.accuracy, mean_reward=s.mean_reward,
                      brier=s.brier, ece=s.ece, adapter=s.adapter_version, skipped="; ".join(s.skipped) or None)
    finally:
        rt.close()
        keeper.release()
        engine.dispose()
    if out:
        console.print(summary_table(out))
    return out


def summary_table(rounds: list[RoundSummary]) -> Table:
    t = Table(title="rounds", title_justify="left")
    for col in ("round", "block", "n", "accuracy", "mean reward", "Brier", "ECE", "serving", "seconds"):
        t.add_column(col, justify="right")

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for s in rounds:
        t.add_row(str(s.round), str(s.block_id), str(s.n if s.n is not None else "-"), f(s.accuracy),
                  f(s.mean_reward), f(s.brier), f(s.ece),
                  "base" if s.adapter_version is None else f"v{s.adapter_version}", f"{s.seconds:.0f}")
    return t

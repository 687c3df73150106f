"""Helpers for tests that run `scoreloop daemon` as a real subprocess on a fresh SQLite store with
the tiny random model and the synthetic market (the fastest real configuration)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model_dir: str, *, block_size: int = 4, concurrency: int = 4,
                 extra: str = "") -> Path:
    """A scoreloop.toml for a fast daemon: tiny model, one tool turn, short tokens, quick heartbeats."""
    db = tmp_path / "scoreloop.db"
    cfg = tmp_path / "scoreloop.toml"
    cfg.write_text(f"""
database_url = "sqlite:///{db}"

[agent]
model = "{model_dir}"
device = "cpu"
max_new_tokens = 8
max_steps = 1
max_repairs = 0
concurrency = {concurrency}
temperature = 0.0
block_size = {block_size}

[trainer]
adapters_dir = "{tmp_path / 'adapters'}"
runs_dir = "{tmp_path / 'runs'}"
min_new_episodes = 100000
gate_items = 0

[scheduler]
mode = "replay"
block_interval_s = 3600
resolve_interval_s = 3600
trigger_poll_s = 0.3
heartbeat_s = 0.5
lock_ttl_s = 5
{extra}
""")
    return cfg


def db_url(cfg: Path) -> str:
    return f"sqlite:///{cfg.parent / 'scoreloop.db'}"


def start_daemon(cfg: Path, log: Path, *args: str, kill_at: str | None = None) -> subprocess.Popen:
    """`scoreloop daemon` in a subprocess; with `kill_at` (see KILL_POINTS) it SIGKILLs itself there."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SCORELOOP_DATABASE_URL", None)
    entry = ["-m", "scheduler.cli"] if kill_at is None else [str(Path(__file__)), "--kill-at", kill_at]
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *entry, "--config", str(cfg), "daemon", *args],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)


def cli(cfg: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler.cli", "--config", str(cfg), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(pred: Callable[[], object], timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, interval: float = 0.1):
    """Poll `pred` until truthy; fail with the daemon's log tail if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) while waiting for {what}\n{tail(log)}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{tail(log)}")


def tail(log: Path | None, n: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def stop(proc: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM and wait for a clean exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


# ---- kill points -------------------------------------------------------------------------------
# Points a random wall-clock kill (test_daemon_fault's block kills) would almost never hit: each is
# a window of milliseconds inside one function. The daemon runs unchanged; the real function named
# here is wrapped so that the process SIGKILLs itself at that instant, before or after the call.
# `name:N` fires on the N-th call (resolve) or for adapter version N (publish).
KILL_POINTS = {
    "resolve": "after the N-th (default 2nd) reward of a resolve pass committed, the rest not yet",
    "adapter_save": "adapter files written and fsynced in a temp folder, not yet renamed to v{N}",
    "adapter_saved": "adapter folder v{N} in place, its registry row not yet written",
    "gate": "the serving side's gate block ran, the candidate's side not started",
    "publish": "the publish transaction flipped the serving row (version N), not yet committed",
}
FAULT_MARK = "fault_injected"


def _die(point: str) -> None:
    sys.stderr.write(f"{FAULT_MARK} kill_at={point} pid={os.getpid()}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill_point(point: str) -> None:
    """Wrap the real function behind `point` so the process kills itself there."""
    name, _, arg = point.partition(":")
    if name not in KILL_POINTS:
        raise SystemExit(f"unknown kill point {point!r}: one of {sorted(KILL_POINTS)}")
    n = int(arg) if arg else None
    if name == "resolve":
        from scoring import resolve as mod

        real, calls = mod._score_and_write, [0]

        def after_nth_reward(*a, **kw):
            real(*a, **kw)
            calls[0] += 1
            if calls[0] == (n or 2):
                _die(point)

        mod._score_and_write = after_nth_reward
    elif name == "adapter_save":
        from trainer import registry

        real_fsync = registry._fsync_tree

        def after_fsync(root):
            real_fsync(root)
            _die(point)

        registry._fsync_tree = after_fsync
    elif name == "adapter_saved":
        from trainer import round as round_mod

        real_save = round_mod.save_adapter

        def after_save(*a, **kw):
            path = real_save(*a, **kw)
            _die(point)
            return path

        round_mod.save_adapter = after_save
    elif name == "gate":
        from scheduler import steps

        real_replay = steps._replay_items

        def before_candidate_side(*a, **kw):
            _die(point)
            return real_replay(*a, **kw)

        steps._replay_items = before_candidate_side
    else:  # publish
        from trainer import registry

        real_flip = registry.flip_serving

        def after_flip(session, version):
            real_flip(session, version)
            if n is None or version == n:
                session.flush()  # the UPDATEs reach the database inside the open transaction
                _die(point)

        registry.flip_serving = after_flip


if __name__ == "__main__":  # python tests/daemon_process.py --kill-at POINT <scoreloop args>
    sys.path.insert(0, str(REPO))
    if len(sys.argv) < 3 or sys.argv[1] != "--kill-at":
        raise SystemExit("usage: daemon_process.py --kill-at POINT <scoreloop arguments>")
    install_kill_point(sys.argv[2])
    from scheduler.cli import app

    sys.argv = ["scoreloop", *sys.argv[3:]]
    app()

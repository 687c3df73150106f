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


def start_daemon(cfg: Path, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SCORELOOP_DATABASE_URL", None)
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "scheduler.cli", "--config", str(cfg), "daemon", *args],
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

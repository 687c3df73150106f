"""The README's CSV replay walkthrough runs as written, on the example folder it ships."""

from __future__ import annotations

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from market.csv_replay import CsvReplay
from market.sources import build_market
from scheduler.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = ROOT / "examples" / "csv"


def walkthrough_commands() -> list[str]:
    """The first ```bash block of the README's CSV walkthrough section."""
    text = README.read_text()
    section = text[text.index("### CSV replay walkthrough"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("```", start)]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def run(cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    """A `scoreloop ...` line of the README, as the installed entry point would run it."""
    argv = shlex.split(cmd)
    assert argv[0] == "scoreloop", cmd
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"}
    env = {k: v for k, v in env.items() if not k.startswith("SCORELOOP_")}  # only the README's flags count
    return subprocess.run([sys.executable, "-m", "scheduler.cli", *argv[1:]], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300, check=False)  # the test reads the code


def test_readme_csv_walkthrough_runs_as_written(tmp_path):
    # From "the repository root": a copy of the example, so the database lands in tmp_path.
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "csv")
    commands = walkthrough_commands()
    assert [shlex.split(c)[5:7] for c in commands] == [["block", "run"], ["resolve"], ["trace", "3"]]
    outputs = []
    for cmd in commands:
        res = run(cmd, tmp_path)
        assert res.returncode == 0, f"{cmd}\n{res.stdout}\n{res.stderr}"
        outputs.append(res.stdout)
    block, resolve, trace = outputs
    assert "6/6 predictions, 6 valid" in block
    assert "6 scored" in resolve
    assert "CRUX" in trace and "No news found." in trace  # the ticker without news
    db = sqlite3.connect(tmp_path / "csv-demo.db")
    rows = db.execute("SELECT ticker, substr(as_of, 1, 10), state FROM v_predictions ORDER BY episode_id").fetchall()
    assert rows == [(t, d, "scored") for d in ("2024-02-14", "2024-02-15") for t in ("ACME", "BOLT", "CRUX")]
    # ACME's contract headline reached its episodes; the guidance headline published later did not
    acme_news = [c for (c,) in db.execute(
        "SELECT content FROM v_episode_trace WHERE ticker = 'ACME' AND tool_name = 'search_news' AND role = 'tool'")]
    assert acme_news and all("supply contract" in c and "guidance" not in c for c in acme_news)
    db.close()


def test_example_folder_matches_what_the_readme_says_about_it():
    s = load_settings(EXAMPLE / "scoreloop.toml")
    assert s.market.source == "csv" and s.market.csv.dir == "examples/csv"
    replay = CsvReplay(EXAMPLE)
    assert replay.tickers == {"ACME", "BOLT", "CRUX"} and replay.nan_rows == 0
    assert [d.isoformat() for d in replay.span] == ["2024-01-02", "2024-05-09"]
    # the universe: the default (20 large caps) has none of them, so every ticker of prices.csv, sorted
    cfg = s.market.model_copy(update={"csv": s.market.csv.model_copy(update={"dir": str(EXAMPLE)})})
    assert build_market(cfg).tickers == ["ACME", "BOLT", "CRUX"]
    picked = build_market(cfg.model_copy(update={"universe": ["CRUX", "MSFT", "ACME"]})).tickers
    assert picked == ["CRUX", "ACME"]  # universe ∩ file, in the universe's order

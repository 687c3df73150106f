"""`scoreloop browse`: the canned queries on a real trace store, the PostgreSQL hint, bad input, and
(opt-in, `-m browse`, needs the [browse] extra) the datasette server itself over HTTP, with a
Chromium screenshot where /usr/bin/chromium exists.
"""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from trace_store import build_trace_store
from typer.testing import CliRunner

from scheduler.cli import app
from store.browse import canned_queries, gate_query, has_table, postgres_instructions
from store.db import open_store, session_scope
from store.models import Episode, Prediction, Reward, Step, ToolCall

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("browse") / "scoreloop.db"
    engine = open_store(f"sqlite:///{path}")
    ts = build_trace_store(engine, with_eval=False)
    engine.dispose()
    return path, ts, engine


def run_query(path: Path, sql: str, params: dict[str, str] | None = None) -> list[dict]:
    """Run SQL the way datasette does: a read-only connection, named parameters as strings."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params or {}).fetchall()]
    finally:
        conn.close()


def by_name(has_gate_table: bool = True) -> dict:
    return {q.name: q for q in canned_queries(has_gate_table)}


def test_worst_predictions_are_the_blocks_lowest_rewards_with_rationale(store):
    path, ts, _ = store
    rows = run_query(path, by_name()["worst_predictions"].sql, {"block_id": str(ts.base_block)})
    engine = open_store(f"sqlite:///{path}", migrate=False)
    with session_scope(engine) as s:
        rewards = sorted(round(r, 3) for r in s.scalars(
            select(Reward.composite).join(Prediction).where(Prediction.block_id == ts.base_block)))
    engine.dispose()
    assert [r["reward"] for r in rows] == rewards[:20]
    assert all(r["block_id"] == ts.base_block and r["rationale"].startswith("base:") for r in rows)
    assert run_query(path, by_name()["worst_predictions"].sql, {"block_id": "999"}) == []


def test_episode_trace_is_in_turn_order(store):
    path, ts, _ = store
    engine = open_store(f"sqlite:///{path}", migrate=False)
    with session_scope(engine) as s:
        ep = s.scalars(select(Episode).where(Episode.block_id == ts.v1_block).order_by(Episode.idx)).first()
        steps = s.scalars(select(Step).where(Step.episode_id == ep.id).order_by(Step.attempt, Step.idx)).all()
        expected = [(st.idx, st.role, st.tool_name) for st in steps]
    engine.dispose()
    rows = run_query(path, by_name()["episode_trace"].sql, {"episode_id": str(ep.id)})
    assert [(r["step"], r["role"], r["tool_name"]) for r in rows] == expected
    # v1's script: system, user, then three tool calls each answered, then the prediction
    assert [r["tool_name"] for r in rows if r["role"] == "tool"] == ["search_news", "get_prices",
                                                                     "get_market_context"]
    assert rows[0]["role"] == "system" and rows[-1]["role"] == "assistant"


def test_tool_usage_share_matches_a_count_of_the_tool_calls(store):
    path, _, _ = store
    rows = run_query(path, by_name()["tool_usage_by_adapter"].sql)
    engine = open_store(f"sqlite:///{path}", migrate=False)
    with session_scope(engine) as s:
        finished = s.execute(select(Episode.id, Episode.adapter_version, Episode.attempt)
                             .join(Prediction, Prediction.episode_id == Episode.id)).all()
        calls = s.execute(select(ToolCall.episode_id, ToolCall.name, ToolCall.attempt)).all()
    engine.dispose()
    attempt = {e: a for e, _, a in finished}
    episodes = Counter("base" if v is None else f"v{v}" for _, v, _ in finished)
    version = {e: ("base" if v is None else f"v{v}") for e, v, _ in finished}
    calling = Counter((version[e], name) for e, name in {(e, n) for e, n, a in calls if attempt.get(e) == a})
    got = {(r["adapter"], r["tool"]): r for r in rows}
    assert set(got) == set(calling)
    for (v, tool), n in calling.items():
        assert got[(v, tool)]["episodes"] == episodes[v]
        assert got[(v, tool)]["share_of_episodes"] == pytest.approx(n / episodes[v], abs=1e-3)
    assert got[("v1", "get_market_context")]["share_of_episodes"] == 1.0  # v1 calls it every episode
    assert ("base", "get_market_context") not in got  # the base script never does


def test_calibration_bins_cover_every_resolved_non_eval_prediction(store):
    path, _, _ = store
    rows = run_query(path, by_name()["calibration"].sql)
    total = run_query(path, "SELECT COUNT(*) AS n FROM v_predictions WHERE correct IS NOT NULL "
                            "AND confidence IS NOT NULL AND block_kind != 'eval'")[0]["n"]
    assert total > 0 and sum(r["n"] for r in rows) == total
    v1 = [r for r in rows if r["adapter"] == "v1"]
    assert [(r["confidence_bin"], r["mean_confidence"]) for r in v1] == [("0.7-0.8", 0.7)]  # v1 always says 0.7
    for r in rows:
        assert r["gap"] == pytest.approx(r["accuracy"] - r["mean_confidence"], abs=2e-3)


def test_gate_decisions_from_the_table_and_from_older_adapter_records(store):
    path, ts, _ = store
    legacy = run_query(path, gate_query(False).sql)
    assert len(legacy) == 1
    g = legacy[0]
    assert (g["candidate_version"], g["serving"], g["recorded_in"]) == (1, "base", "adapters.metrics")
    assert (g["serving_block_id"], g["candidate_block_id"]) == ts.gate_blocks
    assert g["mean_diff"] == pytest.approx(g["candidate_reward"] - g["serving_reward"], abs=2e-3)  # each rounded
    assert g["decision"] == ("accept" if g["mean_diff"] >= -g["margin"] else "reject")
    if not has_table(path, "gate_decisions"):
        pytest.skip("this store predates migration 0003 (gate_decisions)")
    # A later gate on v2 recorded in gate_decisions: both show, the table's row with its interval.
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO gate_decisions (candidate_version, serving_version, candidate_block_id, serving_block_id, "
            "decision, passed, rule, level, margin, n_pairs, mean_diff, ci_low, ci_high, p_value, statistic, items, "
            "region, created_at) VALUES (2, 1, ?, ?, 'keep', 0, 'paired_bootstrap_mean', 0.9, 0.0, 4, 0.01, "
            "-0.05, 0.07, 0.6, '{}', '[]', '{}', '2099-01-01 00:00:00')", ts.gate_blocks[::-1])
    conn.close()
    rows = run_query(path, gate_query(True).sql)
    assert [(r["candidate_version"], r["recorded_in"]) for r in rows] == [(1, "adapters.metrics"),
                                                                          (2, "gate_decisions")]
    new = rows[1]
    assert (new["serving"], new["decision"], new["ci_low"], new["ci_high"]) == ("v1", "keep", -0.05, 0.07)
    assert new["candidate_reward"] is not None  # joined from the gate block's metrics


def test_postgres_store_prints_how_to_connect_with_the_read_only_role(monkeypatch):
    monkeypatch.delenv("SCORELOOP_READONLY_USER", raising=False)
    res = CliRunner().invoke(app, ["--db", "postgresql+psycopg://admin:secret@db.example:6543/prod", "browse"])
    assert res.exit_code == 0, res.output
    assert 'psql "postgresql://scoreloop_ro:$SCORELOOP_READONLY_PASSWORD@db.example:6543/prod"' in res.output
    assert "secret" not in res.output and "v_episode_trace" in res.output
    assert "//reader:$SCORELOOP_READONLY_PASSWORD@h:5432/db" in postgres_instructions("postgresql://x@h/db", readonly_user="reader")


@pytest.mark.parametrize("url, message", [
    ("sqlite:///{tmp}/missing.db", "no store at"),
    ("sqlite://", "in-memory"),
    ("sqlite:///{tmp}/other.db", "not a scoreloop store"),
    ("sqlite:///{tmp}/junk.db", "not a SQLite database"),
])
def test_bad_stores_get_one_clear_line(tmp_path, url, message):
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    (tmp_path / "junk.db").write_text("this is not a database, just text " * 50)
    res = CliRunner().invoke(app, ["--db", url.format(tmp=tmp_path), "browse"])
    assert res.exit_code == 1
    assert message in res.output


# -- the server itself (opt-in) ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(store):
    pytest.importorskip("datasette", reason="install the [browse] extra: pip install -e '.[browse]'")
    path, ts, _ = store
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "--db", f"sqlite:///{path}", "browse",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/-/versions.json", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"scoreloop browse did not come up: {out}")
            time.sleep(0.3)
        yield base, path, ts
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.browse
def test_canned_query_pages_over_http_link_block_episode_and_steps(server):
    base, path, ts = server
    db = path.stem
    episode = run_query(path, "SELECT MIN(episode_id) AS e FROM v_predictions WHERE block_id = :b",
                        {"b": ts.base_block})[0]["e"]
    pages = {
        "worst_predictions": f"{base}/{db}/worst_predictions?block_id={ts.base_block}",
        "episode_trace": f"{base}/{db}/episode_trace?episode_id={episode}",
        "tool_usage_by_adapter": f"{base}/{db}/tool_usage_by_adapter",
        "calibration": f"{base}/{db}/calibration",
        "gate_decisions": f"{base}/{db}/gate_decisions",
    }
    html = {}
    for name, url in pages.items():
        r = httpx.get(url, timeout=30)
        assert r.status_code == 200, (name, r.text[:500])
        html[name] = r.text
        rows = httpx.get(url.replace(f"/{name}", f"/{name}.json") + ("&" if "?" in url else "?") + "_shape=array",
                         timeout=30).json()
        assert rows, f"{name}: no rows"
    assert by_name()["worst_predictions"].title.replace("'", "&#39;") in html["worst_predictions"]
    assert "base: headline looked positive" in html["worst_predictions"]
    # block -> episode -> steps: ids in query results are links
    assert f'href="/{db}/blocks/{ts.base_block}"' in html["worst_predictions"]
    assert f'href="/{db}/episode_trace?episode_id={episode}"' in html["worst_predictions"]
    assert f'href="/{db}/blocks/{ts.gate_blocks[1]}"' in html["gate_decisions"]
    # ... and table rows through their foreign keys: a block lists its episodes, an episode its steps
    block_page = httpx.get(f"{base}/{db}/blocks/{ts.base_block}", timeout=30).text
    assert f"/{db}/episodes?block_id={ts.base_block}" in block_page
    episode_page = httpx.get(f"{base}/{db}/episodes/{episode}", timeout=30).text
    assert f"/{db}/steps?episode_id={episode}" in episode_page
    # read-only: a write through the SQL box is refused and changes nothing
    before = run_query(path, "SELECT COUNT(*) AS n FROM blocks")[0]["n"]
    r = httpx.get(f"{base}/{db}.json", params={"sql": "DELETE FROM blocks"}, timeout=30)
    assert r.status_code == 400
    assert run_query(path, "SELECT COUNT(*) AS n FROM blocks")[0]["n"] == before


@pytest.mark.browse
@pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
def test_screenshot_of_the_worst_predictions_page_is_a_rendered_table(server, tmp_path):
    from matplotlib.image import imread

    base, path, ts = server
    shot = tmp_path / "worst.png"
    url = f"{base}/{path.stem}/worst_predictions?block_id={ts.base_block}"
    subprocess.run([str(CHROMIUM), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", f"--screenshot={shot}", url], check=True, timeout=120,
                   capture_output=True)
    img = imread(shot)
    assert img.shape[:2] == (1000, 1400)
    # a rendered page has text and a header bar: far from one flat colour
    assert img[..., :3].std() > 0.1
    if os.environ.get("SCORELOOP_SCREENSHOT_DIR"):  # keep it for a human to look at
        shutil.copy(shot, Path(os.environ["SCORELOOP_SCREENSHOT_DIR"]) / "browse_worst_predictions.png")

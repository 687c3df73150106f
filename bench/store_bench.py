"""Store benchmark: fill N predictions (with episodes, outcomes, rewards, block metrics) and time
the inspection queries users run, on SQLite and PostgreSQL. Prints figures; it is not a test.

    .venv/bin/python bench/store_bench.py --n 1000000 [--pg postgresql://postgres@127.0.0.1:5432/test]

Rows are generated inside the database (recursive CTE / generate_series) so filling 1M rows
takes seconds, not the time of a Python loop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text

from store.db import open_store

PER_BLOCK = 100
TICKERS = 20

QUERIES = {
    "v_block_summary (all blocks)": "SELECT * FROM v_block_summary",
    "per-ticker accuracy": (
        "SELECT ticker, COUNT(correct) AS n, AVG(correct) AS accuracy FROM outcomes GROUP BY ticker"
    ),
    "per-ticker accuracy (join, for contrast)": (
        "SELECT p.ticker, COUNT(*) AS n, "
        "AVG(CASE WHEN p.direction = o.realized_direction THEN 1.0 ELSE 0.0 END) AS accuracy "
        "FROM predictions p JOIN outcomes o ON o.prediction_id = p.id GROUP BY p.ticker"
    ),
    "v_predictions, one block": "SELECT * FROM v_predictions WHERE block_id = {blk}",
    "v_episode_trace, one episode": "SELECT * FROM v_episode_trace WHERE episode_id = {ep} ORDER BY step",
}


def _series(dialect: str, n: int) -> str:
    if dialect == "postgresql":
        return f"SELECT g AS i FROM generate_series(1, {n}) AS g"
    return f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) SELECT i FROM s"


def fill(engine, n: int) -> float:
    """Insert n predictions in blocks of 100; returns seconds taken."""
    d = engine.dialect.name
    n_blocks = max(1, n // PER_BLOCK)
    ts = "'2024-01-02 21:01:00+00:00'" if d == "postgresql" else "'2024-01-02 21:01:00.000000'"
    day = "DATE '2024-01-09'" if d == "postgresql" else "'2024-01-09'"
    true, false = ("TRUE", "FALSE") if d == "postgresql" else ("1", "0")
    t0 = time.perf_counter()
    with engine.begin() as c:
        c.execute(text(
            f"INSERT INTO blocks (id, kind, mode, market, size, horizon, status, seed, created_at, as_of) "
            f"SELECT i, 'train', 'replay', 'synthetic', {PER_BLOCK}, 5, 'complete', 0, {ts}, {ts} "
            f"FROM ({_series(d, n_blocks)}) s"))
        c.execute(text(
            f"INSERT INTO episodes (id, block_id, idx, ticker, as_of, horizon, status, attempt) "
            f"SELECT i, (i - 1) / {PER_BLOCK} + 1, (i - 1) % {PER_BLOCK}, "
            f"'SYN' || CAST(i % {TICKERS} AS TEXT), {ts}, 5, 'done', 0 FROM ({_series(d, n)}) s"))
        c.execute(text(
            f"INSERT INTO predictions (id, episode_id, block_id, ticker, as_of, horizon, resolve_at, direction, "
            f"magnitude_pct, confidence, rationale, citations, valid, created_at) "
            f"SELECT i, i, (i - 1) / {PER_BLOCK} + 1, 'SYN' || CAST(i % {TICKERS} AS TEXT), {ts}, 5, {day}, "
            f"CASE WHEN i % 3 = 0 THEN 'down' ELSE 'up' END, 1.5, 0.6, 'r', '[]', "
            f"CASE WHEN i % 50 = 0 THEN {false} ELSE {true} END, {ts} FROM ({_series(d, n)}) s"))
        c.execute(text(
            f"INSERT INTO outcomes (id, prediction_id, ticker, correct, close_as_of, close_resolve, as_of_date, "
            f"resolve_date, realized_return_pct, realized_direction, resolved_at) "
            f"SELECT i, i, 'SYN' || CAST(i % {TICKERS} AS TEXT), "
            f"CASE WHEN i % 50 = 0 THEN NULL WHEN (i % 3 = 0) = (i % 7 < 3) THEN 1 ELSE 0 END, "
            f"100.0, 101.0, {day}, {day}, 1.0, "
            f"CASE WHEN i % 7 < 3 THEN 'down' ELSE 'up' END, {ts} FROM ({_series(d, n)}) s"))
        c.execute(text(
            f"INSERT INTO rewards (id, prediction_id, reward_version, direction, magnitude, calibration, data_use, "
            f"composite, created_at) SELECT i, i, 'v1', 1.0, 0.5, 0.84, 0.0, 0.7, {ts} FROM ({_series(d, n)}) s"))
        for name in ("model", "always_up", "momentum_20d", "coin_flip"):
            c.execute(text(
                f"INSERT INTO block_metrics (block_id, name, reward_version, n, n_valid, accuracy, mean_composite, "
                f"brier, ece, mean_abs_magnitude_error, coverage, skill, computed_at) "
                f"SELECT i, '{name}', 'v1', {PER_BLOCK}, 98, 0.55, 0.6, 0.24, 0.05, 1.2, 0.98, 0.02, {ts} "
                f"FROM ({_series(d, n_blocks)}) s"))
        c.execute(text(
            f"INSERT INTO steps (episode_id, attempt, idx, role, content, created_at) "
            f"SELECT {min(n, 424242)}, 0, i, CASE WHEN i = 0 THEN 'system' ELSE 'assistant' END, 'x', {ts} "
            f"FROM ({_series(d, 6)}) s"))
    if d == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("VACUUM ANALYZE"))
    else:
        with engine.connect() as c:
            c.exec_driver_sql("ANALYZE")
    return time.perf_counter() - t0


def time_query(engine, sql: str, repeat: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        with engine.connect() as c:
            t0 = time.perf_counter()
            rows = len(c.execute(text(sql)).fetchall())
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, rows


def run(url: str, label: str, n: int, repeat: int) -> None:
    engine = open_store(url)
    secs = fill(engine, n)
    print(f"\n{label}: filled {n:,} predictions (+episodes, outcomes, rewards, metrics) in {secs:.1f} s")
    for name, sql in QUERIES.items():
        sql = sql.format(ep=min(n, 424242), blk=max(1, min(n // PER_BLOCK, 4242)))
        ms, rows = time_query(engine, sql, repeat)
        flag = "" if "contrast" in name else ("ok" if ms <= 200 else "OVER 200 ms")
        print(f"  {name:32s} {ms:8.1f} ms  ({rows:,} rows)  {flag}")
    engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                    help="admin URL; a scratch database is created and dropped")
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run(f"sqlite:///{Path(tmp) / 'bench.db'}", "SQLite", args.n, args.repeat)

    if not args.skip_pg:
        name = f"scoreloop_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            run(args.pg.rsplit("/", 1)[0] + f"/{name}", "PostgreSQL", args.n, args.repeat)
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()

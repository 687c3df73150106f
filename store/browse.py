"""`scoreloop browse`: the store in a web browser through datasette, read-only.

What lives here: the canned queries (a block's worst predictions, an episode's trace in turn
order, tool usage by adapter version, a calibration table, the gate decisions), the datasette
metadata that labels tables and sets their facets, a small render_cell plugin that turns
`block_id` / `episode_id` / `prediction_id` cells of views and queries into links (tables link
through their foreign keys already), and the server start. datasette is an optional extra
(`pip install 'scoreloop[browse]'`); the SQL and the metadata need only the standard library.

SQLite only: datasette reads SQLite files. On PostgreSQL, `browse` prints how to connect a SQL
client with the read-only role instead.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from store.db import StoreError

PLUGIN_NAME = "scoreloop-browse"
READONLY_USER_ENV = "SCORELOOP_READONLY_USER"
DEFAULT_READONLY_USER = "scoreloop_ro"  # docker/initdb/10-roles.sh creates it
WORST_LIMIT = 20


class BrowseError(StoreError):
    """The store cannot be browsed as asked; the message says what to do."""


@dataclass(frozen=True)
class CannedQuery:
    name: str
    title: str
    description: str
    sql: str
    example: dict[str, str]  # parameter -> a value to try (the printed URL uses the newest id)


WORST_PREDICTIONS = CannedQuery(
    "worst_predictions",
    "A block's worst predictions",
    f"The {WORST_LIMIT} lowest-reward scored predictions of one block, with the rationale the agent gave, "
    "what happened and each reward component. Click an episode_id for its trace.",
    f"""
SELECT prediction_id, episode_id, block_id, ticker, substr(as_of, 1, 16) AS as_of, ROUND(reward, 3) AS reward,
       direction, confidence, realized_direction, ROUND(realized_return_pct, 2) AS realized_return_pct,
       rationale, parse_error, ROUND(reward_direction, 3) AS r_direction, ROUND(reward_magnitude, 3) AS r_magnitude,
       ROUND(reward_calibration, 3) AS r_calibration, ROUND(reward_data_use, 3) AS r_data_use, magnitude_pct,
       adapter_version, reward_reason
FROM v_predictions
WHERE block_id = CAST(:block_id AS INTEGER) AND state = 'scored'
ORDER BY reward ASC, prediction_id
LIMIT {WORST_LIMIT}
""",
    {"block_id": "1"},
)

EPISODE_TRACE = CannedQuery(
    "episode_trace",
    "An episode's trace in turn order",
    "Every step of one episode (system, user, assistant, tool) in the order it happened; an attempt "
    "restarted after a crash shows its earlier steps with current_attempt = 0.",
    """
SELECT episode_id, block_id, ticker, as_of, attempt, current_attempt, step, role, tool_name, tool_args,
       content, tool_error, cache_hit, dropped_future, prompt_tokens, completion_tokens, latency_ms, created_at
FROM v_episode_trace
WHERE episode_id = CAST(:episode_id AS INTEGER)
ORDER BY attempt, step
""",
    {"episode_id": "1"},
)

# Portable SQL (SQLite and PostgreSQL): the report's tool-usage panel reads the same rows.
# A finished episode is one with a prediction (valid or a recorded parse failure); only the
# tool calls of its final attempt count, so a crash-and-resume does not count twice.
TOOL_USAGE_SQL = """
WITH finished AS (
    SELECT e.id, e.attempt, COALESCE(e.adapter_version, -1) AS version
    FROM episodes e JOIN predictions p ON p.episode_id = e.id
),
per_version AS (
    SELECT version, COUNT(*) AS episodes FROM finished GROUP BY version
),
per_tool AS (
    SELECT f.version, tc.name AS tool, COUNT(DISTINCT tc.episode_id) AS episodes_calling, COUNT(*) AS calls,
           SUM(CASE WHEN tc.error IS NOT NULL THEN 1 ELSE 0 END) AS errors, AVG(tc.latency_ms) AS mean_latency_ms
    FROM tool_calls tc JOIN finished f ON f.id = tc.episode_id AND tc.attempt = f.attempt
    GROUP BY f.version, tc.name
)
SELECT CASE WHEN v.version = -1 THEN NULL ELSE v.version END AS adapter_version, t.tool, v.episodes,
       COALESCE(t.episodes_calling, 0) AS episodes_calling,
       1.0 * COALESCE(t.episodes_calling, 0) / v.episodes AS share_of_episodes,
       COALESCE(t.calls, 0) AS calls, 1.0 * COALESCE(t.calls, 0) / v.episodes AS calls_per_episode,
       COALESCE(t.errors, 0) AS errors, t.mean_latency_ms
FROM per_version v LEFT JOIN per_tool t ON t.version = v.version
ORDER BY v.version, t.tool
"""

TOOL_USAGE = CannedQuery(
    "tool_usage_by_adapter",
    "Tool usage by adapter version",
    "For each adapter version (empty = the base model): its finished episodes, and per tool the share of "
    "them that called it, calls per episode, errors and mean latency (final attempts only).",
    f"""
SELECT CASE WHEN adapter_version IS NULL THEN 'base' ELSE 'v' || adapter_version END AS adapter, tool, episodes,
       episodes_calling, ROUND(share_of_episodes, 3) AS share_of_episodes, calls,
       ROUND(calls_per_episode, 2) AS calls_per_episode, errors, ROUND(mean_latency_ms, 1) AS mean_latency_ms
FROM ({TOOL_USAGE_SQL}) AS usage
""",
    {},
)

CALIBRATION = CannedQuery(
    "calibration",
    "Calibration table",
    "Resolved valid predictions of train and gate blocks in 10 equal-width confidence bins, per adapter "
    "version: stated confidence vs realized direction accuracy (gap > 0 = underconfident). Eval blocks are "
    "left out: they are conditioned on deliberately low targets too.",
    """
SELECT CASE WHEN adapter_version IS NULL THEN 'base' ELSE 'v' || adapter_version END AS adapter,
       (bin / 10.0) || '-' || ((bin + 1) / 10.0) AS confidence_bin, COUNT(*) AS n,
       ROUND(AVG(confidence), 3) AS mean_confidence, ROUND(AVG(correct), 3) AS accuracy,
       ROUND(AVG(correct) - AVG(confidence), 3) AS gap
FROM (SELECT adapter_version, confidence, correct,
             CASE WHEN confidence >= 1 THEN 9 ELSE CAST(confidence * 10 AS INTEGER) END AS bin
      FROM v_predictions
      WHERE correct IS NOT NULL AND confidence IS NOT NULL AND block_kind != 'eval') AS binned
GROUP BY adapter_version, bin
ORDER BY COALESCE(adapter_version, -1), bin
""",
    {},
)

# Gates recorded on the candidate's adapters.metrics["gate"] (before migration 0003's gate_decisions
# table): both sides' mean reward on the same gate items, the margin and whether it was published.
_GATE_FROM_ADAPTERS = """
SELECT a.version AS candidate_version,
       CASE WHEN json_extract(a.metrics, '$.gate.serving.adapter_version') IS NULL THEN 'base'
            ELSE 'v' || json_extract(a.metrics, '$.gate.serving.adapter_version') END AS serving,
       CASE WHEN json_extract(a.metrics, '$.gate.passed') THEN 'accept' ELSE 'reject' END AS decision,
       json_extract(a.metrics, '$.gate.candidate.n') AS n_items,
       json_extract(a.metrics, '$.gate.candidate.mean_composite') AS candidate_reward,
       json_extract(a.metrics, '$.gate.serving.mean_composite') AS serving_reward,
       json_extract(a.metrics, '$.gate.candidate.mean_composite')
         - json_extract(a.metrics, '$.gate.serving.mean_composite') AS mean_diff,
       NULL AS ci_low, NULL AS ci_high, NULL AS level, json_extract(a.metrics, '$.gate.margin') AS margin,
       NULL AS p_value, 'candidate >= serving - margin' AS rule,
       json_extract(a.metrics, '$.gate.candidate.block_id') AS candidate_block_id,
       json_extract(a.metrics, '$.gate.serving.block_id') AS serving_block_id,
       a.created_at, 'adapters.metrics' AS recorded_in
FROM adapters a
WHERE json_extract(a.metrics, '$.gate') IS NOT NULL
"""

# The gate_decisions table (migration 0003): the paired statistic of each gate, its interval and call.
_GATE_FROM_TABLE = """
SELECT g.candidate_version,
       CASE WHEN g.serving_version IS NULL THEN 'base' ELSE 'v' || g.serving_version END AS serving,
       g.decision, g.n_pairs AS n_items, cs.mean_composite AS candidate_reward, ss.mean_composite AS serving_reward,
       g.mean_diff, g.ci_low, g.ci_high, g.level, g.margin, g.p_value, g.rule,
       g.candidate_block_id, g.serving_block_id, g.created_at, 'gate_decisions' AS recorded_in
FROM gate_decisions g
LEFT JOIN v_block_summary cs ON cs.block_id = g.candidate_block_id
LEFT JOIN v_block_summary ss ON ss.block_id = g.serving_block_id
"""


def gate_query(has_gate_table: bool) -> CannedQuery:
    """Gate decisions from gate_decisions where the store has it, plus older gates kept on adapters."""
    if has_gate_table:
        rows = (f"{_GATE_FROM_TABLE}\nUNION ALL\nSELECT * FROM ({_GATE_FROM_ADAPTERS}) AS old\n"
                "WHERE old.candidate_version NOT IN (SELECT candidate_version FROM gate_decisions)")
    else:
        rows = _GATE_FROM_ADAPTERS
    sql = ("SELECT candidate_version, serving, decision, n_items, ROUND(candidate_reward, 3) AS candidate_reward, "
           "ROUND(serving_reward, 3) AS serving_reward, ROUND(mean_diff, 3) AS mean_diff, ROUND(ci_low, 3) AS ci_low, "
           "ROUND(ci_high, 3) AS ci_high, level, margin, ROUND(p_value, 3) AS p_value, rule, candidate_block_id, "
           f"serving_block_id, created_at, recorded_in\nFROM ({rows}) AS gates\nORDER BY created_at, candidate_version")
    return CannedQuery(
        "gate_decisions",
        "Gate decisions",
        "Each promotion gate: the candidate and the serving adapter on the same gate items, their mean "
        "rewards, the difference (with its interval where the gate computed one), the decision and the two "
        "gate blocks (click a block id for the items).",
        sql,
        {},
    )


# Cells of views and canned queries that name a row elsewhere: column -> (table, or a query to open).
LINKS: dict[str, tuple[str, str]] = {
    "block_id": ("table", "blocks"),
    "candidate_block_id": ("table", "blocks"),
    "serving_block_id": ("table", "blocks"),
    "prediction_id": ("table", "predictions"),
    "episode_id": ("query", EPISODE_TRACE.name),
}


def canned_queries(has_gate_table: bool) -> list[CannedQuery]:
    """The five canned queries; the gate one reads gate_decisions when the store has that table."""
    return [WORST_PREDICTIONS, EPISODE_TRACE, TOOL_USAGE, CALIBRATION, gate_query(has_gate_table)]


def browse_metadata(db_name: str, has_gate_table: bool) -> dict[str, Any]:
    """datasette metadata: titles, how to navigate, facets, label columns and the canned queries."""
    return {
        "title": "scoreloop store (read-only)",
        "description_html": (
            "Start from <b>blocks</b> (a row lists its episodes and predictions), an <b>episodes</b> row (its "
            "steps in turn order), or a canned query below. In views and queries, block, episode and prediction "
            "ids are links; an episode id opens its trace."
        ),
        "databases": {
            db_name: {
                "tables": {
                    "blocks": {"label_column": "kind", "sort_desc": "id", "facets": ["kind", "status"],
                               "description": "One row per block; open a row for its episodes and predictions."},
                    "episodes": {"label_column": "ticker", "facets": ["status", "ticker"],
                                 "description": "One forecast each; open a row for its steps and tool calls."},
                    "steps": {"sort": "id", "facets": ["role", "tool_name"],
                              "description": "Messages of every episode, in the order they were committed."},
                    "predictions": {"label_column": "ticker", "facets": ["direction", "valid"]},
                    "adapters": {"sort_desc": "version", "facets": ["status"]},
                    "alembic_version": {"hidden": True},
                    "daemon_lock": {"hidden": True},
                    "v_predictions": {"description": "Every prediction with its outcome, reward and adapter."},
                    "v_episode_trace": {"description": "Every step with its episode; filter on episode_id."},
                    "v_block_summary": {"description": "Per block: the model's metrics and the baselines'."},
                    "v_tool_usage": {"description": "Tool calls per block and tool."},
                },
                "queries": {
                    q.name: {"sql": q.sql.strip(), "title": q.title, "description": q.description,
                             "hide_sql": True}
                    for q in canned_queries(has_gate_table)
                },
            }
        },
        "plugins": {PLUGIN_NAME: {"database": db_name}},
    }


def sqlite_file(url: str) -> Path | None:
    """The SQLite file of a database URL; None for PostgreSQL. Errors for URLs datasette cannot open."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise BrowseError(f"bad database URL {url!r}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        return None
    if backend != "sqlite":
        raise BrowseError(f"cannot browse a {backend!r} database: use sqlite or postgresql")
    if not parsed.database or parsed.database == ":memory:":
        raise BrowseError("an in-memory SQLite database cannot be browsed: point --db at a file")
    path = Path(parsed.database).expanduser()
    if not path.is_file():
        raise BrowseError(f"no store at {path}: run `scoreloop init` (or a block) first, or pass --db")
    try:
        ours = has_table(path, "blocks")
    except sqlite3.DatabaseError as err:
        raise BrowseError(f"{path} is not a SQLite database ({err})") from None
    if not ours:
        raise BrowseError(f"{path} is not a scoreloop store (no blocks table): run `scoreloop init` on it first")
    return path


def has_table(path: Path, name: str) -> bool:
    """Whether the SQLite file has this table, read without taking any lock a writer would wait on."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() \
            is not None
    finally:
        conn.close()


def postgres_instructions(url: str, readonly_user: str | None = None) -> str:
    """How to read a PostgreSQL store with a SQL client as the read-only role (datasette reads SQLite only)."""
    parsed = make_url(url)
    user = readonly_user or os.environ.get(READONLY_USER_ENV) or DEFAULT_READONLY_USER
    host, port, db = parsed.host or "127.0.0.1", parsed.port or 5432, parsed.database or "scoreloop"
    lines = [
        (f"The store is PostgreSQL ({parsed.render_as_string(hide_password=True)}); `browse` serves SQLite "
         "files only. Connect any SQL client with the read-only role:"),
        f'  psql "postgresql://{user}:$SCORELOOP_READONLY_PASSWORD@{host}:{port}/{db}"',
        "(docker/initdb/10-roles.sh creates the role; it can SELECT every table and view, nothing else.)",
        "Start from the views v_block_summary, v_predictions, v_episode_trace and v_tool_usage, e.g.",
        ("  SELECT block_id, kind, adapter_version, n, accuracy, mean_composite, brier FROM v_block_summary "
         "ORDER BY block_id;"),
        ("  SELECT step, role, tool_name, substr(content, 1, 120) FROM v_episode_trace WHERE episode_id = 42 "
         "ORDER BY attempt, step;"),
        ("  SELECT prediction_id, ticker, direction, confidence, realized_direction, reward, rationale "
         "FROM v_predictions WHERE block_id = 7 AND state = 'scored' ORDER BY reward LIMIT 20;"),
    ]
    return "\n".join(lines)


def _link_plugin(db_name: str) -> object:
    """A datasette plugin object whose render_cell links id cells of views and queries of this database."""
    from datasette import hookimpl
    from markupsafe import Markup, escape

    class Links:
        @hookimpl
        def render_cell(self, value, column, table, database, datasette):
            if database != db_name or column not in LINKS or value in (None, ""):
                return None
            if table is not None and not table.startswith("v_"):
                return None  # real tables link through their foreign keys already
            try:
                row_id = int(value)
            except (TypeError, ValueError):
                return None
            kind, target = LINKS[column]
            if kind == "table":
                href = datasette.urls.row(database, target, str(row_id))
            else:
                href = f"{datasette.urls.query(database, target)}?{column}={row_id}"
            return Markup(f'<a href="{escape(href)}">{row_id}</a>')

    links = Links()
    links.__name__ = PLUGIN_NAME  # datasette lists plugins by module name; this one is an object
    return links


def build_datasette(path: Path, *, immutable: bool = False) -> Any:
    """A datasette instance over the store file, read-only, with the metadata and the link plugin.

    Default mode opens the file `mode=ro`, which sees a running daemon's WAL writes as they commit;
    `immutable` (`?immutable=1`) skips locking and change checks and suits a copy no process writes.
    """
    try:
        from datasette.app import Datasette
        from datasette.plugins import pm
    except ImportError:
        raise BrowseError("datasette is not installed: pip install 'scoreloop[browse]'") from None
    db_name = path.stem
    if pm.get_plugin(PLUGIN_NAME) is not None:
        pm.unregister(name=PLUGIN_NAME)
    pm.register(_link_plugin(db_name), name=PLUGIN_NAME)
    metadata = browse_metadata(db_name, has_table(path, "gate_decisions"))
    files = {"immutables": [str(path)]} if immutable else {"files": [str(path)]}
    # Canned queries and the SQL box only read: the connection is mode=ro / immutable either way.
    return Datasette(**files, metadata=metadata, settings={"sql_time_limit_ms": 5000})


def query_urls(base: str, db_name: str, has_gate_table: bool) -> list[tuple[str, str]]:
    """(title, URL) of each canned query, with its example parameters filled in."""
    out = []
    for q in canned_queries(has_gate_table):
        qs = "&".join(f"{k}={v}" for k, v in q.example.items())
        out.append((q.title, f"{base}/{db_name}/{q.name}" + (f"?{qs}" if qs else "")))
    return out


def serve(path: Path, *, host: str = "127.0.0.1", port: int = 8001, immutable: bool = False,
          echo: Callable[[str], None] = print) -> None:
    """Serve the store until interrupted; prints the address and each canned query's URL first."""
    ds = build_datasette(path, immutable=immutable)
    import uvicorn  # a datasette dependency

    base = f"http://{host}:{port}"
    newest = _newest_ids(path)
    echo(f"browsing {path} read-only{' (immutable)' if immutable else ''} at {base}/{path.stem}  (Ctrl-C stops)")
    for title, url in query_urls(base, path.stem, has_table(path, "gate_decisions")):
        for key, value in newest.items():
            url = url.replace(f"{key}=1", f"{key}={value}")
        echo(f"  {title}: {url}")
    uvicorn.run(ds.app(), host=host, port=port, log_level="warning", lifespan="on")


def _newest_ids(path: Path) -> dict[str, int]:
    """The newest scored block and finished episode, so the printed example URLs show something."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        block = conn.execute("SELECT MAX(block_id) FROM v_predictions WHERE state = 'scored'").fetchone()[0]
        episode = conn.execute("SELECT MAX(episode_id) FROM predictions").fetchone()[0]
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return {k: v for k, v in (("block_id", block), ("episode_id", episode)) if v is not None}


def browse_store(url: str, *, host: str = "127.0.0.1", port: int = 8001, immutable: bool = False,
                 echo: Callable[[str], None] = print) -> None:
    """`scoreloop browse`: serve a SQLite store, or print how to read a PostgreSQL one."""
    path = sqlite_file(url)
    if path is None:
        echo(postgres_instructions(url))
        return
    serve(path, host=host, port=port, immutable=immutable, echo=echo)

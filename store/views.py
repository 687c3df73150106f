"""SQL views: the user interface for traces. Portable SQL, identical on SQLite and PostgreSQL."""

VIEWS: dict[str, str] = {
    "v_predictions": """
SELECT p.id AS prediction_id, p.block_id, b.kind AS block_kind, p.episode_id, p.ticker,
       p.as_of, p.horizon, p.resolve_at, p.direction, p.magnitude_pct, p.confidence,
       p.stated_confidence, p.valid, p.parse_error, p.rationale, p.citations, p.adapter_version,
       p.target_score, p.conditioning, p.pending_reason,
       CASE WHEN r.id IS NULL THEN 'pending' ELSE 'scored' END AS state,
       o.close_as_of, o.close_resolve, o.realized_return_pct, o.realized_direction,
       CASE WHEN o.id IS NULL OR p.direction IS NULL THEN NULL
            WHEN p.direction = o.realized_direction THEN 1 ELSE 0 END AS correct,
       r.direction AS reward_direction, r.magnitude AS reward_magnitude,
       r.calibration AS reward_calibration, r.data_use AS reward_data_use,
       r.composite AS reward, r.reward_version, r.reason AS reward_reason,
       a.status AS adapter_status, e.explore_direction AS explored_direction, e.explore_tool AS explored_tool
FROM predictions p
JOIN blocks b ON b.id = p.block_id
LEFT JOIN episodes e ON e.id = p.episode_id
LEFT JOIN outcomes o ON o.prediction_id = p.id
LEFT JOIN rewards r ON r.id = (SELECT MAX(r2.id) FROM rewards r2 WHERE r2.prediction_id = p.id)
LEFT JOIN adapters a ON a.version = p.adapter_version
""",
    "v_episode_trace": """
SELECT e.block_id, s.episode_id, e.ticker, e.as_of, e.status AS episode_status,
       s.attempt, CASE WHEN s.attempt = e.attempt THEN 1 ELSE 0 END AS current_attempt,
       s.idx AS step, s.role, s.tool_name, s.tool_args, s.content,
       tc.error AS tool_error, tc.cache_hit, tc.dropped_future,
       s.prompt_tokens, s.completion_tokens, s.latency_ms, s.created_at
FROM steps s
JOIN episodes e ON e.id = s.episode_id
LEFT JOIN tool_calls tc ON tc.step_id = s.id
""",
    "v_block_summary": """
SELECT b.id AS block_id, b.kind, b.mode, b.market, b.status, b.as_of, b.size,
       b.adapter_version, b.target_score, b.created_at, b.finished_at,
       m.n, m.n_valid, m.coverage, m.accuracy, m.mean_composite, m.brier, m.ece,
       m.mean_abs_magnitude_error, m.skill, m.reward_version,
       up.accuracy AS always_up_accuracy, up.brier AS always_up_brier,
       mo.accuracy AS momentum_accuracy, mo.brier AS momentum_brier,
       cf.accuracy AS coin_flip_accuracy, cf.brier AS coin_flip_brier
FROM blocks b
LEFT JOIN block_metrics m ON m.block_id = b.id AND m.name = 'model'
LEFT JOIN block_metrics up ON up.block_id = b.id AND up.name = 'always_up'
LEFT JOIN block_metrics mo ON mo.block_id = b.id AND mo.name = 'momentum_20d'
LEFT JOIN block_metrics cf ON cf.block_id = b.id AND cf.name = 'coin_flip'
""",
    "v_tool_usage": """
SELECT e.block_id, tc.name AS tool, COUNT(*) AS calls,
       SUM(CASE WHEN tc.error IS NOT NULL THEN 1 ELSE 0 END) AS errors,
       AVG(tc.latency_ms) AS mean_latency_ms,
       AVG(CASE WHEN tc.cache_hit THEN 1.0 ELSE 0.0 END) AS cache_hit_rate,
       SUM(tc.dropped_future) AS dropped_future
FROM tool_calls tc
JOIN episodes e ON e.id = tc.episode_id
GROUP BY e.block_id, tc.name
""",
}


# A view's earlier text, under the revision that replaced it. Each migration builds views as they were
# at its own revision (`views_at`), so a fresh database upgrades step by step: revision 0001 cannot
# create a view over a column that 0006 adds.
REPLACED: dict[str, dict[str, str]] = {
    "0008": {"v_predictions": """
SELECT p.id AS prediction_id, p.block_id, b.kind AS block_kind, p.episode_id, p.ticker,
       p.as_of, p.horizon, p.resolve_at, p.direction, p.magnitude_pct, p.confidence,
       p.stated_confidence, p.valid, p.parse_error, p.rationale, p.citations, p.adapter_version,
       p.target_score, p.conditioning, p.pending_reason,
       CASE WHEN r.id IS NULL THEN 'pending' ELSE 'scored' END AS state,
       o.close_as_of, o.close_resolve, o.realized_return_pct, o.realized_direction,
       CASE WHEN o.id IS NULL OR p.direction IS NULL THEN NULL
            WHEN p.direction = o.realized_direction THEN 1 ELSE 0 END AS correct,
       r.direction AS reward_direction, r.magnitude AS reward_magnitude,
       r.calibration AS reward_calibration, r.data_use AS reward_data_use,
       r.composite AS reward, r.reward_version, r.reason AS reward_reason,
       a.status AS adapter_status
FROM predictions p
JOIN blocks b ON b.id = p.block_id
LEFT JOIN outcomes o ON o.prediction_id = p.id
LEFT JOIN rewards r ON r.id = (SELECT MAX(r2.id) FROM rewards r2 WHERE r2.prediction_id = p.id)
LEFT JOIN adapters a ON a.version = p.adapter_version
"""},  # before explored episodes were marked
    "0007": {"v_predictions": """
SELECT p.id AS prediction_id, p.block_id, b.kind AS block_kind, p.episode_id, p.ticker,
       p.as_of, p.horizon, p.resolve_at, p.direction, p.magnitude_pct, p.confidence,
       p.valid, p.parse_error, p.rationale, p.citations, p.adapter_version, p.target_score,
       p.conditioning, p.pending_reason,
       CASE WHEN r.id IS NULL THEN 'pending' ELSE 'scored' END AS state,
       o.close_as_of, o.close_resolve, o.realized_return_pct, o.realized_direction,
       CASE WHEN o.id IS NULL OR p.direction IS NULL THEN NULL
            WHEN p.direction = o.realized_direction THEN 1 ELSE 0 END AS correct,
       r.direction AS reward_direction, r.magnitude AS reward_magnitude,
       r.calibration AS reward_calibration, r.data_use AS reward_data_use,
       r.composite AS reward, r.reward_version, r.reason AS reward_reason,
       a.status AS adapter_status
FROM predictions p
JOIN blocks b ON b.id = p.block_id
LEFT JOIN outcomes o ON o.prediction_id = p.id
LEFT JOIN rewards r ON r.id = (SELECT MAX(r2.id) FROM rewards r2 WHERE r2.prediction_id = p.id)
LEFT JOIN adapters a ON a.version = p.adapter_version
"""},  # before predictions.stated_confidence was shown
}


def views_at(revision: str) -> dict[str, str]:
    """Every view's SQL as of `revision` (zero-padded ids compare as strings)."""
    out = dict(VIEWS)
    for rev in sorted(REPLACED, reverse=True):  # the oldest replacement is applied last and wins
        if revision < rev:
            out.update(REPLACED[rev])
    return out


def create_views_sql(revision: str | None = None) -> list[str]:
    """CREATE VIEW statements for the head definitions, or for those as of `revision`."""
    views = VIEWS if revision is None else views_at(revision)
    return [f"CREATE VIEW {name} AS {sql}" for name, sql in views.items()]


def replace_view_sql(name: str, revision: str) -> list[str]:
    """Statements that swap one view for its text as of `revision`: a view-only migration's whole body
    (no view reads another, so one can be dropped alone)."""
    return [f"DROP VIEW IF EXISTS {name}", f"CREATE VIEW {name} AS {views_at(revision)[name]}"]


def drop_views_sql() -> list[str]:
    return [f"DROP VIEW IF EXISTS {name}" for name in reversed(list(VIEWS))]

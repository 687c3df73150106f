"""Reads behind `scoreloop report`: block and adapter summaries with baselines, reliability inputs,
eval runs with their scored items, tool usage per adapter version and training loss curves.
Read-only; works the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from store.browse import TOOL_USAGE_SQL
from store.models import EvalRun, GateDecision, TrainingRun

BASELINES = ("always_up", "momentum_20d", "coin_flip")


@dataclass(frozen=True)
class BlockRow:
    """One block from v_block_summary (figures are None until the block's metrics are computed)."""

    block_id: int
    kind: str
    status: str
    adapter_version: int | None
    target_score: float | None
    n: int | None
    n_valid: int | None
    accuracy: float | None
    mean_reward: float | None
    brier: float | None
    ece: float | None
    skill: float | None
    always_up_accuracy: float | None
    momentum_accuracy: float | None
    coin_flip_accuracy: float | None
    always_up_brier: float | None
    momentum_brier: float | None
    coin_flip_brier: float | None


@dataclass(frozen=True)
class AdapterRow:
    """Figures of one (adapter version, block kind), n_valid-weighted over its scored blocks."""

    adapter_version: int | None
    kind: str
    blocks: int
    n: int
    n_valid: int
    accuracy: float | None
    mean_reward: float | None
    brier: float | None
    baselines: dict[str, dict[str, float | None]] = field(default_factory=dict)  # name -> accuracy, brier


@dataclass(frozen=True)
class ScoredConfidence:
    adapter_version: int | None
    kind: str
    confidence: float
    correct: int


@dataclass(frozen=True)
class EvalRunRow:
    id: int
    adapter_version: int | None
    targets: list[float]
    market: str
    n_items: int
    status: str
    results: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class TrainingRunRow:
    id: int
    status: str
    parent_version: int | None
    adapter_version: int | None
    n_examples: int
    loss_curve: list[dict[str, float]]


@dataclass(frozen=True)
class EvalItemRow:
    """One scored prediction of an eval block: which run, version and target, and how it did."""

    eval_run_id: int
    adapter_version: int | None
    target: float | None
    block_id: int
    ticker: str
    as_of: Any  # datetime on PostgreSQL, text on SQLite: only compared within one store
    valid: bool
    correct: int | None  # None for an invalid prediction
    confidence: float | None
    reward: float


@dataclass(frozen=True)
class ToolUsageRow:
    """One (adapter version, tool): how many of the version's finished episodes called it."""

    adapter_version: int | None
    tool: str | None  # None: the version has finished episodes but none called a tool
    episodes: int
    episodes_calling: int
    share_of_episodes: float
    calls: int
    calls_per_episode: float


@dataclass(frozen=True)
class GateRow:
    """One promotion gate (table gate_decisions): the paired comparison and the call."""

    candidate_version: int
    serving_version: int | None
    decision: str
    n_pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    level: float
    margin: float
    p_value: float | None
    serving_mean: float | None
    candidate_mean: float | None
    region: dict[str, Any]


@dataclass
class ReportData:
    blocks: list[BlockRow]
    adapters: list[AdapterRow]
    confidences: list[ScoredConfidence]
    eval_runs: list[EvalRunRow]
    training_runs: list[TrainingRunRow]
    eval_items: list[EvalItemRow] = field(default_factory=list)
    tool_usage: list[ToolUsageRow] = field(default_factory=list)
    gates: list[GateRow] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.blocks or self.eval_runs or self.training_runs)


def block_rows(session: Session) -> list[BlockRow]:
    rows = session.execute(text(
        "SELECT block_id, kind, status, adapter_version, target_score, n, n_valid, accuracy, mean_composite, "
        "brier, ece, skill, always_up_accuracy, momentum_accuracy, coin_flip_accuracy, always_up_brier, "
        "momentum_brier, coin_flip_brier FROM v_block_summary ORDER BY block_id"
    )).all()
    return [BlockRow(*r) for r in rows]


def adapter_rows(session: Session) -> list[AdapterRow]:
    """Model and baseline rows of block_metrics pooled per (adapter version, block kind)."""
    rows = session.execute(text(
        "SELECT b.adapter_version, b.kind, m.name, COUNT(*) AS blocks, SUM(m.n) AS n, SUM(m.n_valid) AS n_valid, "
        "SUM(m.accuracy * m.n_valid) AS acc_w, SUM(CASE WHEN m.accuracy IS NULL THEN 0 ELSE m.n_valid END) AS acc_n, "
        "SUM(m.brier * m.n_valid) AS brier_w, SUM(CASE WHEN m.brier IS NULL THEN 0 ELSE m.n_valid END) AS brier_n, "
        "SUM(m.mean_composite * m.n) AS rew_w, SUM(CASE WHEN m.mean_composite IS NULL THEN 0 ELSE m.n END) AS rew_n "
        "FROM block_metrics m JOIN blocks b ON b.id = m.block_id "
        "GROUP BY b.adapter_version, b.kind, m.name"
    )).all()
    pooled: dict[tuple[int | None, str], dict[str, Any]] = {}
    for version, kind, name, blocks, n, n_valid, acc_w, acc_n, brier_w, brier_n, rew_w, rew_n in rows:
        figs = {"blocks": int(blocks), "n": int(n or 0), "n_valid": int(n_valid or 0),
                "accuracy": _ratio(acc_w, acc_n), "brier": _ratio(brier_w, brier_n),
                "mean_reward": _ratio(rew_w, rew_n)}
        pooled.setdefault((version, kind), {})[name] = figs
    out = []
    for (version, kind), by_name in pooled.items():
        model = by_name.get("model")
        if model is None:
            continue
        out.append(AdapterRow(
            adapter_version=version, kind=kind, blocks=model["blocks"], n=model["n"], n_valid=model["n_valid"],
            accuracy=model["accuracy"], mean_reward=model["mean_reward"], brier=model["brier"],
            baselines={b: {"accuracy": by_name[b]["accuracy"], "brier": by_name[b]["brier"]}
                       for b in BASELINES if b in by_name},
        ))
    return sorted(out, key=lambda r: (-1 if r.adapter_version is None else r.adapter_version, r.kind))


def scored_confidences(session: Session) -> list[ScoredConfidence]:
    """Every valid, resolved prediction's stated confidence and whether its direction was right."""
    rows = session.execute(text(
        "SELECT adapter_version, block_kind, confidence, correct FROM v_predictions "
        "WHERE confidence IS NOT NULL AND correct IS NOT NULL ORDER BY prediction_id"
    )).all()
    return [ScoredConfidence(v, k, float(c), int(ok)) for v, k, c, ok in rows]


def eval_run_rows(session: Session) -> list[EvalRunRow]:
    runs = session.scalars(select(EvalRun).order_by(EvalRun.id)).all()
    return [EvalRunRow(r.id, r.adapter_version, list(r.targets or []), r.market, r.n_items, r.status,
                       dict(r.results or {}), r.created_at) for r in runs]


def training_run_rows(session: Session) -> list[TrainingRunRow]:
    runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id)).all()
    return [TrainingRunRow(r.id, r.status, r.parent_version, r.adapter_version, r.n_examples,
                           [dict(p) for p in (r.loss_curve or [])]) for r in runs]


def eval_item_rows(session: Session) -> list[EvalItemRow]:
    """Every scored prediction of the eval blocks of eval runs (invalid ones score their reward, 0)."""
    rows = session.execute(text(
        "SELECT b.eval_run_id, b.adapter_version, b.target_score, p.block_id, p.ticker, p.as_of, p.valid, "
        "p.correct, p.confidence, p.reward FROM v_predictions p JOIN blocks b ON b.id = p.block_id "
        "WHERE b.kind = 'eval' AND b.eval_run_id IS NOT NULL AND p.state = 'scored' "
        "ORDER BY b.eval_run_id, p.block_id, p.prediction_id"
    )).all()
    return [EvalItemRow(int(run), v, None if t is None else float(t), int(b), tk, a, bool(valid),
                        None if ok is None else int(ok), None if c is None else float(c), float(r or 0.0))
            for run, v, t, b, tk, a, valid, ok, c, r in rows]


def tool_usage_rows(session: Session) -> list[ToolUsageRow]:
    """Per adapter version and tool: the share of finished episodes that called it (final attempts)."""
    rows = session.execute(text(TOOL_USAGE_SQL)).mappings().all()
    return [ToolUsageRow(r["adapter_version"], r["tool"], int(r["episodes"]), int(r["episodes_calling"]),
                         float(r["share_of_episodes"]), int(r["calls"]), float(r["calls_per_episode"]))
            for r in rows]


def gate_rows(session: Session) -> list[GateRow]:
    """Every recorded gate decision, oldest first."""
    rows = session.scalars(select(GateDecision).order_by(GateDecision.id))
    return [GateRow(g.candidate_version, g.serving_version, g.decision, g.n_pairs, g.mean_diff, g.ci_low, g.ci_high,
                    g.level, g.margin, g.p_value, (g.statistic or {}).get("serving_mean"),
                    (g.statistic or {}).get("candidate_mean"), g.region or {}) for g in rows]


def report_data(session: Session) -> ReportData:
    return ReportData(block_rows(session), adapter_rows(session), scored_confidences(session),
                      eval_run_rows(session), training_run_rows(session), eval_item_rows(session),
                      tool_usage_rows(session),
                      gates=gate_rows(session))


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return float(num) / float(den)

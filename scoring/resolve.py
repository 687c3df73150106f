"""The resolution job: read realized closes for due predictions, score them, refresh block metrics.

Idempotent: rows are keyed by prediction and reward version, so a second run writes nothing. A
prediction whose close is missing stays pending with the reason in predictions.pending_reason (it
is never scored against a guess). Bad prediction values are scored 0 with the reason recorded,
never raised. Anything else one row raises (a source's bug, a value no check foresaw) is caught
per row: the row stays pending with `error: ...` as its reason, the report counts it, and the
pass goes on; only losing the database itself stops the pass.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from market.last_price import last_price
from market.protocols import MarketError
from rewards.composite import RewardBreakdown, parse_failure_reward, reward_version, score_prediction
from rewards.config import RewardsConfig
from rewards.metrics import BlockItem, MetricItem, block_report
from rewards.outcomes import (
    MIN_TYPICAL_MOVE_PCT,
    TYPICAL_WINDOW,
    flat_band_pct,
    realized_direction,
    realized_return_pct,
    typical_move_pct,
)
from store.db import session_scope
from store.lock import LockLost
from store.scoring import (
    OutcomeRow,
    PendingPrediction,
    ScoredPrediction,
    blocks_needing_metrics,
    pending_predictions,
    retrieved_snippets,
    scored_predictions,
    set_pending_reason,
    upsert_block_metric,
    write_outcome,
    write_reward,
)

if TYPE_CHECKING:
    from market.sources import Market

# How many pending (id, reason) pairs the report keeps for display; the counts cover all of them.
REPORT_EXAMPLES = 20
# The database itself is gone or locked, or another process took the lock over (a fenced write was
# refused): every later row would fail the same way, so stop the pass.
_FATAL = (OperationalError, InterfaceError, LockLost)

log = logging.getLogger(__name__)


@dataclass
class ResolveReport:
    reward_version: str
    considered: int = 0
    resolved: int = 0  # newly scored at this version (invalid ones included)
    invalid_scored: int = 0  # of those, scored 0 for a parse failure or a bad value
    not_due: int = 0  # live predictions whose resolve session has not closed yet
    still_pending: int = 0  # due, but a price or the calendar is missing
    failed: int = 0  # rows (or block metrics) whose processing raised; recorded, the pass went on
    pending_reasons: Counter[str] = field(default_factory=Counter)  # category -> count
    examples: list[tuple[int, str]] = field(default_factory=list)  # (prediction id, reason)
    blocks_updated: list[int] = field(default_factory=list)


class _Pending(Exception):
    """Internal: this prediction cannot be resolved now; carries a category and a reason."""

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason


def resolve_pending(
    engine: Engine, market: Market, rewards_cfg: RewardsConfig, *, now: datetime | None = None
) -> ResolveReport:
    """Score every due prediction that has no reward at the current version; refresh finished blocks.

    Live blocks are due once their resolve session has closed (compared with `now`); replay blocks
    as soon as the market has the close.
    """
    now = (now or datetime.now(UTC)).astimezone(UTC)
    version = reward_version(rewards_cfg)
    report = ResolveReport(version)
    history = _History(market)
    with session_scope(engine) as s:
        todo = pending_predictions(s, version)
    report.considered = len(todo)
    for p in todo:
        try:
            _resolve_one(engine, p, market, history, rewards_cfg, now, report)
        except _FATAL:
            raise
        except Exception as err:  # one bad row must not abort the pass (module doc)
            log.exception("resolving prediction %s failed", p.id)
            report.failed += 1
            reason = f"error: {type(err).__name__}: {err}"
            try:
                _keep_pending(engine, p, _Pending("error", reason), report)
            except _FATAL:
                raise
            except Exception:  # the reason is best effort; count and log remain
                log.exception("could not record the failure of prediction %s", p.id)
    report.blocks_updated = _refresh_metrics(engine, history, rewards_cfg, version, report)
    return report


def _resolve_one(engine: Engine, p: PendingPrediction, market: Market, history: _History, cfg: RewardsConfig,
                 now: datetime, report: ResolveReport) -> None:
    try:
        outcome = p.outcome or _fetch_outcome(p, market, history, cfg, now)
    except _Pending as why:
        if why.category == "not_due" or p.valid:
            _keep_pending(engine, p, why, report)
            return
        outcome = None  # a parse failure scores 0 whatever the market did; no price needed
    _score_and_write(engine, p, outcome, cfg, report)


class _History:
    """Point-in-time closes before an as_of (what the agent could see), fetched once per run."""

    def __init__(self, market: Market) -> None:
        self.market = market
        self._cache: dict[tuple[str, datetime, int], list[float]] = {}

    def closes(self, ticker: str, as_of: datetime, horizon: int) -> list[float]:
        key = (ticker, as_of, horizon)
        if key not in self._cache:
            try:
                bars = self.market.prices.bars(ticker, as_of, TYPICAL_WINDOW + horizon).items
            except MarketError as err:
                raise _Pending("no_history", f"no price history for {ticker} before {as_of:%Y-%m-%d}: {err}")
            self._cache[key] = [b.adj_close for b in sorted(bars, key=lambda b: b.date)]
        return self._cache[key]


def _fetch_outcome(
    p: PendingPrediction, market: Market, history: _History, cfg: RewardsConfig, now: datetime
) -> OutcomeRow:
    cal = market.calendar
    try:
        base = cal.base_session(p.as_of)
        resolve_day = cal.resolve_session(p.as_of, p.horizon)
        closes_at = cal.close_of(resolve_day)
    except MarketError as err:
        raise _Pending("calendar", f"calendar: {err}") from None
    if p.block_mode == "live" and now <= closes_at:
        raise _Pending("not_due", f"waiting for the close of {resolve_day}")
    try:
        # Resolve day first: a fresh fetch re-adjusts the cached history (splits, dividends),
        # so the base price read afterwards is on the same adjustment basis. The base is the last
        # price visible at as_of (market.last_price): for a live block inside a session that is
        # today's price, not the previous close, so the overnight move the agent saw is not scored.
        c1 = market.prices.close_on(p.ticker, resolve_day)
        visible = last_price(market.prices, cal, p.ticker, p.as_of)
        c0, base = visible.price, visible.session
    except MarketError as err:
        raise _Pending("no_price", f"no close for {p.ticker} ({base} -> {resolve_day}): {err}") from None
    try:
        ret = realized_return_pct(c0, c1)
    except ValueError as err:
        raise _Pending("bad_price", f"unusable close for {p.ticker}: {err}") from None
    typical = typical_move_pct(history.closes(p.ticker, p.as_of, p.horizon), p.horizon)
    if typical is None:
        raise _Pending("no_history", f"fewer than {p.horizon + 1} closes of {p.ticker} before as_of: "
                                     "cannot size a typical move")
    realized = realized_direction(ret, flat_band_pct(cfg, typical))
    return OutcomeRow(c0, c1, base, resolve_day, ret, realized, typical)


def _keep_pending(engine: Engine, p: PendingPrediction, why: _Pending, report: ResolveReport) -> None:
    with session_scope(engine) as s:
        set_pending_reason(s, p.id, why.reason[:2000])
    if why.category == "not_due":
        report.not_due += 1
    else:
        report.still_pending += 1
        report.pending_reasons[why.category] += 1
    if len(report.examples) < REPORT_EXAMPLES:
        report.examples.append((p.id, why.reason))


def _score_and_write(
    engine: Engine, p: PendingPrediction, outcome: OutcomeRow | None, cfg: RewardsConfig, report: ResolveReport
) -> None:
    with session_scope(engine) as s:
        if outcome is None:
            r: RewardBreakdown = parse_failure_reward(p.parse_error, cfg)
        else:
            r = score_prediction(
                direction=p.direction, magnitude_pct=p.magnitude_pct, confidence=p.confidence,
                citations=p.citations, realized_return_pct=outcome.realized_return_pct,
                typical_move_pct=outcome.typical_move_pct or MIN_TYPICAL_MOVE_PCT,
                retrieved=retrieved_snippets(s, p.episode_id), as_of=p.as_of, cfg=cfg,
                valid=p.valid, parse_error=p.parse_error,
            )
            if p.outcome is None:
                write_outcome(s, p.id, ticker=p.ticker, correct=r.correct, outcome=outcome)
        wrote = write_reward(s, p.id, reward_version=r.reward_version, direction=r.direction,
                             magnitude=r.magnitude, calibration=r.calibration, data_use=r.data_use,
                             composite=r.composite, reason=r.reason)
        set_pending_reason(s, p.id, None)
    if wrote:
        report.resolved += 1
        report.invalid_scored += not r.valid


def _refresh_metrics(engine: Engine, history: _History, cfg: RewardsConfig, version: str,
                     report: ResolveReport) -> list[int]:
    """Metrics for finished blocks that became fully scored at this version (model + baselines);
    a block whose metrics raise is logged, counted and retried on the next pass."""
    with session_scope(engine) as s:
        block_ids = blocks_needing_metrics(s, version)
    done: list[int] = []
    for block_id in block_ids:
        try:
            with session_scope(engine) as s:
                rows = scored_predictions(s, block_id, version)
            items = [_block_item(r, history, cfg) for r in rows]
            metrics = block_report(items, cfg)
            with session_scope(engine) as s:
                for name, m in metrics.items():
                    upsert_block_metric(s, block_id, name, version, asdict(m))
        except _FATAL:
            raise
        except Exception:  # one block's metrics must not stop the others
            log.exception("metrics of block %s failed", block_id)
            report.failed += 1
            continue
        done.append(block_id)
    return done


def _block_item(r: ScoredPrediction, history: _History, cfg: RewardsConfig) -> BlockItem:
    o = r.outcome
    valid = r.scored_valid and o is not None
    typical = (o.typical_move_pct if o else None) or MIN_TYPICAL_MOVE_PCT
    ret = o.realized_return_pct if o else 0.0
    # Recomputed under the current band: the outcome row keeps the band of its first resolution.
    realized = realized_direction(ret, flat_band_pct(cfg, typical)) if o else ""
    closes: list[float] = []
    if valid:
        try:
            closes = history.closes(r.ticker, r.as_of, r.horizon)
        except _Pending:
            closes = []  # baselines fall back to their no-history forecasts
    item = MetricItem(r.direction if valid else None, r.confidence if valid else None,
                      r.magnitude_pct if valid else None, ret, realized, r.composite, valid)
    return BlockItem(item, closes, r.horizon, typical, key=f"prediction:{r.id}")

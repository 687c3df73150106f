"""The resolution job on a real synthetic market and a real database (SQLite and PostgreSQL).

Expected returns come straight from the synthetic market's generated close arrays (indexed by its
own session list), not from the calendar path the resolver takes, so a wrong base/resolve session
would show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text

from market.config import MarketConfig, SyntheticConfig
from market.last_price import last_price
from market.sources import build_market
from rewards.composite import reward_version
from rewards.config import RewardsConfig, RewardWeights
from rewards.outcomes import typical_move_pct
from scoring.resolve import resolve_pending
from store.db import session_scope
from store.models import (
    Block,
    BlockMetric,
    Episode,
    Outcome,
    Prediction,
    Reward,
    Snippet,
    ToolCall,
    ToolCallSnippet,
)

H = 5
CFG = RewardsConfig()


@pytest.fixture(scope="module")
def market():
    return build_market(MarketConfig(source="synthetic", synthetic=SyntheticConfig(n_tickers=3, n_days=120)))


def syn(market):
    return market.prices  # the SyntheticMarket itself: its arrays are the ground truth


def truth(market, ticker: str, day_idx: int) -> tuple[float, float]:
    """(realized return %, typical move %) straight from the generated closes."""
    s = syn(market)
    t = s.tickers.index(ticker)
    closes = [float(c) for c in s.close[t]]
    ret = 100.0 * (closes[day_idx + H] / closes[day_idx] - 1.0)
    return ret, typical_move_pct(closes[max(0, day_idx + 1 - (60 + H)): day_idx + 1], H)


@dataclass
class Item:
    ticker: str
    day_idx: int
    direction: str | None = "up"
    magnitude_pct: float | None = 1.0
    confidence: float | None = 0.6
    citations: object = ()
    valid: bool = True
    parse_error: str | None = None
    retrieved: tuple[int, ...] = ()  # snippet keys retrieved in the current attempt
    old_attempt: tuple[int, ...] = ()  # snippet keys retrieved only in an earlier attempt
    as_of: datetime | None = None  # default: one minute after the close of day_idx (replay)


def add_block(engine, market, items: list[Item], *, mode="replay", status="complete",
              snippets: dict[int, timedelta] | None = None) -> tuple[int, list[int], dict[int, int]]:
    """Block, episodes, predictions, tool calls and snippets rows as the runner would write them.

    `snippets` maps a key to published_at relative to the item's as_of; returns (block id,
    prediction ids, key -> snippet id). Citations given as ("snip", key) become that snippet's id.
    """
    cal = market.calendar
    days = syn(market).days
    with session_scope(engine) as s:
        block = Block(market="synthetic", size=len(items), mode=mode, horizon=H, status=status)
        s.add(block)
        s.flush()
        pred_ids, snip_ids = [], {}
        for idx, it in enumerate(items):
            as_of = it.as_of or (cal.replay_as_of(days[it.day_idx]) if it.day_idx < len(days) else
                                 cal.replay_as_of(cal.add_sessions(days[-1], it.day_idx - len(days) + 1)))
            ep = Episode(block_id=block.id, idx=idx, ticker=it.ticker, as_of=as_of, horizon=H, status="done",
                         attempt=1)
            s.add(ep)
            s.flush()
            for attempt, keys in ((1, it.retrieved), (0, it.old_attempt)):
                if not keys:
                    continue
                tc = ToolCall(episode_id=ep.id, attempt=attempt, name="search_news", args={"query": "x"},
                              as_of=as_of)
                s.add(tc)
                s.flush()
                for rank, key in enumerate(keys):
                    if (block.id, idx, key) not in snip_ids:
                        sn = Snippet(content_hash=f"{block.id}-{idx}-{key}", source="synthetic-wire", title="t",
                                     text="x", ticker=it.ticker, published_at=as_of + snippets[key])
                        s.add(sn)
                        s.flush()
                        snip_ids[(block.id, idx, key)] = sn.id
                    s.add(ToolCallSnippet(tool_call_id=tc.id, snippet_id=snip_ids[(block.id, idx, key)], rank=rank))
            cites = it.citations
            if isinstance(cites, (list, tuple)):
                cites = [snip_ids[(block.id, idx, c[1])] if isinstance(c, tuple) else c for c in cites]
            p = Prediction(episode_id=ep.id, block_id=block.id, ticker=it.ticker, as_of=as_of, horizon=H,
                           resolve_at=(as_of + timedelta(days=7)).date(), direction=it.direction,
                           magnitude_pct=it.magnitude_pct, confidence=it.confidence, citations=cites,
                           valid=it.valid, parse_error=it.parse_error)
            s.add(p)
            s.flush()
            pred_ids.append(p.id)
    return block.id, pred_ids, {k[2]: v for k, v in snip_ids.items()}


def snapshot(engine) -> dict[str, list]:
    with session_scope(engine) as s:
        return {
            "outcomes": [tuple(r) for r in s.execute(text("SELECT * FROM outcomes ORDER BY id"))],
            "rewards": [tuple(r) for r in s.execute(text("SELECT * FROM rewards ORDER BY id"))],
            "block_metrics": [tuple(r) for r in s.execute(text("SELECT * FROM block_metrics ORDER BY id"))],
            "predictions": [tuple(r) for r in s.execute(text("SELECT id, pending_reason FROM predictions ORDER BY id"))],
        }


def realized_dir(ret: float, band: float = 0.5) -> str:
    return "flat" if abs(ret) < band else "up" if ret > 0 else "down"


def test_replay_resolution_known_returns_and_idempotent(fresh_db, market):
    day = 80
    r0, typ0 = truth(market, "SYN00", day)
    r1, _ = truth(market, "SYN01", day)
    right0, wrong1 = realized_dir(r0), {"up": "down", "down": "up", "flat": "up"}[realized_dir(r1)]
    past, future = -timedelta(hours=2), timedelta(hours=3)
    items = [
        # a perfect call that cites what it retrieved before as_of
        Item("SYN00", day, right0, abs(r0), 1.0, [("snip", 1)], retrieved=(1, 2)),
        # a confident wrong call citing a future snippet, a fabricated id and one from an old attempt
        Item("SYN01", day, wrong1, 0.0, 0.9, [("snip", 3), 999_999, ("snip", 4)], retrieved=(3,), old_attempt=(4,)),
        Item("SYN02", day, None, None, None, None, valid=False, parse_error="no JSON object"),
        Item("SYN00", day + 1, "up", 1.0, math.nan, [1]),
        Item("SYN01", day + 1, "down", 1e9, 0.5, []),
        Item("SYN02", day + 1, "up", 1.0, 0.5, [1.5]),
    ]
    block_id, ids, _snips = add_block(fresh_db, market, items, snippets={1: past, 2: past, 3: future, 4: past})

    rep = resolve_pending(fresh_db, market, CFG)
    assert (rep.considered, rep.resolved, rep.invalid_scored, rep.still_pending, rep.not_due) == (6, 6, 4, 0, 0)
    assert rep.blocks_updated == [block_id]

    with session_scope(fresh_db) as s:
        out = {o.prediction_id: o for o in s.scalars(select(Outcome))}
        rew = {r.prediction_id: r for r in s.scalars(select(Reward))}
    # realized returns and typical moves equal the generated closes
    assert out[ids[0]].realized_return_pct == pytest.approx(r0, abs=1e-9)
    assert out[ids[1]].realized_return_pct == pytest.approx(r1, abs=1e-9)
    assert out[ids[0]].typical_move_pct == pytest.approx(typ0, rel=1e-9)
    assert out[ids[0]].as_of_date == syn(market).days[day]
    assert out[ids[0]].resolve_date == syn(market).days[day + H]
    assert (out[ids[0]].ticker, out[ids[0]].correct, out[ids[1]].correct) == ("SYN00", 1, 0)

    perfect = rew[ids[0]]
    assert (perfect.direction, perfect.calibration, perfect.data_use) == (1.0, 1.0, 1.0)
    assert perfect.magnitude == pytest.approx(1.0) and perfect.composite >= 0.95 and perfect.reason is None
    wrong = rew[ids[1]]
    # direction 0; magnitude 2^(-|r1| / typical); calibration 1 - 0.9^2; data use 0 (future, fabricated, stale)
    _, typ1 = truth(market, "SYN01", day)
    assert (wrong.direction, wrong.data_use) == (0.0, 0.0)
    assert wrong.calibration == pytest.approx(1 - 0.81)
    assert wrong.magnitude == pytest.approx(2 ** (-abs(r1) / typ1))
    assert wrong.composite == pytest.approx(0.2 * wrong.magnitude + 0.3 * 0.19)
    # bad inputs: composite 0 with a reason, never an exception
    assert rew[ids[2]].composite == 0 and rew[ids[2]].reason == "parse failure: no JSON object"
    assert rew[ids[3]].composite == 0 and "confidence" in rew[ids[3]].reason  # NaN (NULL on SQLite)
    assert rew[ids[4]].composite == 0 and "magnitude_pct must be in [0, 1000]" in rew[ids[4]].reason
    assert rew[ids[5]].composite == 0 and "citation 1.5 is not a snippet id" in rew[ids[5]].reason
    assert {r.reward_version for r in rew.values()} == {reward_version(CFG)}
    assert out[ids[3]].correct is None  # outcome kept for the record; correctness undefined

    with session_scope(fresh_db) as s:
        names = set(s.scalars(select(BlockMetric.name).where(BlockMetric.block_id == block_id)))
        summary = s.execute(text("SELECT * FROM v_block_summary WHERE block_id = :b"), {"b": block_id}).mappings().one()
    assert names == {"model", "always_up", "momentum_20d", "coin_flip"}
    assert (summary["n"], summary["n_valid"], summary["coverage"]) == (6, 2, pytest.approx(2 / 6))
    assert summary["accuracy"] == 0.5
    assert summary["brier"] == pytest.approx((0.0 + 0.81) / 2)
    assert summary["mean_composite"] == pytest.approx((perfect.composite + wrong.composite) / 6)
    assert summary["coin_flip_brier"] == pytest.approx(0.25)
    assert summary["always_up_accuracy"] is not None and summary["momentum_accuracy"] is not None

    before = snapshot(fresh_db)
    again = resolve_pending(fresh_db, market, CFG)
    assert (again.considered, again.resolved, again.blocks_updated) == (0, 0, [])
    assert snapshot(fresh_db) == before


def test_missing_prices_stay_pending_live_waits_and_new_version_rescores(fresh_db, market):
    cal, days = market.calendar, syn(market).days
    last = len(days) - 1
    items = [
        Item("SYN00", 90),                       # resolves
        Item("SYN01", last - 2),                 # resolve session is past the synthetic history
        Item("SYN02", last - 2, valid=False, parse_error="bad json"),  # invalid: scored 0 without a price
    ]
    _block_id, ids, _ = add_block(fresh_db, market, items)
    _unknown_block, unknown_ids, _ = add_block(fresh_db, market, [Item("NOPE", 90)])
    live_block, live_ids, _ = add_block(fresh_db, market, [Item("SYN00", 95)], mode="live")

    resolve_close = cal.close_of(days[95 + H])
    rep = resolve_pending(fresh_db, market, CFG, now=resolve_close - timedelta(hours=1))
    assert (rep.resolved, rep.invalid_scored, rep.still_pending, rep.not_due) == (2, 1, 2, 1)
    assert rep.pending_reasons == {"no_price": 2}
    with session_scope(fresh_db) as s:
        reasons = dict(s.execute(select(Prediction.id, Prediction.pending_reason)).all())
        scored = set(s.scalars(select(Reward.prediction_id)))
        outcomes = set(s.scalars(select(Outcome.prediction_id)))
        metric_blocks = set(s.scalars(select(BlockMetric.block_id)))
    assert "no close for SYN01" in reasons[ids[1]] and "no synthetic bar" in reasons[ids[1]]
    assert "no close for NOPE" in reasons[unknown_ids[0]] and "unknown ticker" in reasons[unknown_ids[0]]
    assert reasons[live_ids[0]] == f"waiting for the close of {days[95 + H]}"
    assert scored == {ids[0], ids[2]} and outcomes == {ids[0]}  # no wrong score, no made-up outcome
    assert reasons[ids[0]] is None and reasons[ids[2]] is None
    assert metric_blocks == set()  # no block is fully scored yet

    # the session closes: the live prediction resolves; its block is complete and gets metrics
    rep = resolve_pending(fresh_db, market, CFG, now=resolve_close + timedelta(minutes=5))
    assert (rep.resolved, rep.not_due, rep.still_pending, rep.blocks_updated) == (1, 0, 2, [live_block])

    # new weights -> new reward version: rescored from stored outcomes, old rows kept
    cfg2 = RewardsConfig(weights=RewardWeights(direction=1, magnitude=0, calibration=0, data_use=0))
    rep2 = resolve_pending(fresh_db, market, cfg2, now=resolve_close + timedelta(minutes=5))
    assert rep2.resolved == 3 and rep2.reward_version != rep.reward_version
    with session_scope(fresh_db) as s:
        versions = s.execute(select(Reward.reward_version, Reward.composite, Reward.direction)
                             .where(Reward.prediction_id == live_ids[0])).all()
        live_metric = s.scalar(select(BlockMetric.reward_version).where(BlockMetric.block_id == live_block,
                                                                        BlockMetric.name == "model"))
    assert len(versions) == 2
    new = next(v for v in versions if v[0] == rep2.reward_version)
    assert new[1] == new[2]  # composite is the direction component alone
    assert live_metric == rep2.reward_version


def test_cli_resolve_prints_the_report(sqlite_url, market, monkeypatch):
    from typer.testing import CliRunner

    from scheduler.cli import app
    from store.db import open_store

    engine = open_store(sqlite_url)
    days = syn(market).days
    add_block(engine, market, [Item("SYN00", 80, "up", 1.0, 0.7), Item("SYN01", len(days) - 2)])
    add_block(engine, market, [Item("SYN02", 85, "down", 2.0, 0.6)])
    # the CLI builds the same synthetic market from settings
    monkeypatch.setenv("SCORELOOP_MARKET__SYNTHETIC__N_TICKERS", "3")
    monkeypatch.setenv("SCORELOOP_MARKET__SYNTHETIC__N_DAYS", "120")
    monkeypatch.setenv("COLUMNS", "160")
    res = CliRunner().invoke(app, ["--db", sqlite_url, "resolve"])
    assert res.exit_code == 0, res.output
    assert "3 unscored, 2 scored (0 invalid, scored 0), 0 not due, 1 pending" in res.output
    assert "no_price 1" in res.output and "no close for SYN01" in res.output
    assert "blocks scored" in res.output  # the second block is fully scored: its metrics row is shown
    again = CliRunner().invoke(app, ["--db", sqlite_url, "resolve"])
    assert "1 unscored, 0 scored" in again.output
    bad = CliRunner().invoke(app, ["--db", sqlite_url, "resolve", "--now", "yesterday"])
    assert bad.exit_code == 1 and "--now 'yesterday' is not an ISO 8601 time" in bad.output


def test_live_return_is_measured_from_the_price_visible_at_as_of(fresh_db, market):
    """A 10:00 live block starts from that session's price, not the previous close (overnight news is known)."""
    cal, s, d = market.calendar, syn(market), 80
    t = s.tickers.index("SYN01")
    day, prev = s.days[d], s.days[d - 1]
    ten_am = cal.open_of(day) + timedelta(minutes=30)
    before_open = cal.open_of(day) - timedelta(hours=1)
    evening = cal.close_of(day) + timedelta(hours=3)
    _, ids, _ = add_block(fresh_db, market, [Item("SYN01", d, as_of=ten_am), Item("SYN01", d, as_of=before_open),
                                             Item("SYN01", d, as_of=evening)], mode="live")
    rep = resolve_pending(fresh_db, market, CFG, now=cal.close_of(s.days[d + H]) + timedelta(hours=1))
    assert rep.resolved == 3
    with session_scope(fresh_db) as ses:
        got = {o.prediction_id: o for o in ses.scalars(select(Outcome))}
    open_d, close = float(s.open[t, d]), [float(c) for c in s.close[t]]
    during, early, late = got[ids[0]], got[ids[1]], got[ids[2]]
    # inside the session: the session's open (the latest price a daily bar holds that was public at 10:00)
    assert (during.close_as_of, during.as_of_date, during.resolve_date) == (open_d, day, s.days[d - 1 + H])
    assert during.realized_return_pct == pytest.approx(100 * (close[d - 1 + H] / open_d - 1))
    assert open_d != close[d - 1]  # the old base: the previous close, gap included
    # before the open and after the close nothing new trades: the last close is the last price
    assert (early.close_as_of, early.as_of_date) == (close[d - 1], prev)
    assert (late.close_as_of, late.as_of_date, late.resolve_date) == (close[d], day, s.days[d + H])
    assert last_price(market.prices, cal, "SYN01", ten_am).kind == "open"
    assert last_price(market.prices, cal, "SYN01", cal.open_of(day)).kind == "close"  # strictly before as_of


class BrokenForOneTicker:
    """The real synthetic prices, except one ticker whose lookup hits a bug (not a MarketError)."""

    def __init__(self, inner, ticker: str):
        self.inner, self.ticker, self.name = inner, ticker, inner.name

    def bars(self, ticker, as_of, lookback_days):
        return self.inner.bars(ticker, as_of, lookback_days)

    def close_on(self, ticker, day):
        if ticker == self.ticker:
            raise ZeroDivisionError("float division by zero in a vendor adjustment")
        return self.inner.close_on(ticker, day)


def test_one_bad_row_is_recorded_and_the_pass_goes_on(fresh_db, market):
    """A row that raises (a source bug) stays pending with its error; odd stored citations score, not raise."""
    items = [
        Item("SYN00", 70),
        Item("SYN01", 70),  # its source raises
        Item("SYN02", 70, citations=["²", "9" * 5000, " 12 ", "[3]"]),  # stored by older code or by hand
    ]
    block_id, ids, _ = add_block(fresh_db, market, items)
    broken = replace(market, prices=BrokenForOneTicker(market.prices, "SYN01"))
    rep = resolve_pending(fresh_db, broken, CFG)
    assert (rep.resolved, rep.failed, rep.still_pending) == (2, 1, 1)
    assert rep.pending_reasons == {"error": 1}
    with session_scope(fresh_db) as s:
        reasons = dict(s.execute(select(Prediction.id, Prediction.pending_reason)).all())
        rewards = dict(s.execute(select(Reward.prediction_id, Reward.data_use)).all())
    assert reasons[ids[1]] == "error: ZeroDivisionError: float division by zero in a vendor adjustment"
    assert set(rewards) == {ids[0], ids[2]} and rewards[ids[2]] == 0.0  # no citation resolves
    assert rep.blocks_updated == []  # the block is not fully scored: no metrics from a partial block
    # the source is fixed: the next pass picks the row up and the block gets its metrics
    rep2 = resolve_pending(fresh_db, market, CFG)
    assert (rep2.resolved, rep2.failed, rep2.blocks_updated) == (1, 0, [block_id])


def test_a_pass_whose_lock_was_taken_over_stops_at_once(fresh_db, market):
    """Fenced by a lock another process took over, the first refused write ends the pass (LockLost) instead
    of being recorded as a per-row error on every row; nothing of it is written."""
    import threading

    from scheduler.daemon import LockKeeper
    from store.db import make_engine
    from store.lock import LockLost, age_lock, try_acquire_lock

    add_block(fresh_db, market, [Item("SYN00", 70), Item("SYN01", 70), Item("SYN02", 70)])
    stale = LockKeeper(fresh_db, heartbeat_s=3600, ttl_s=5, stop=threading.Event())
    stale.acquire()
    heir = make_engine(fresh_db.url.render_as_string(hide_password=False))
    try:
        age_lock(heir, 60)
        assert try_acquire_lock(heir, "heir", ttl_s=5) is None
        with pytest.raises(LockLost):
            resolve_pending(fresh_db, market, CFG)
        assert snapshot(heir)["rewards"] == [] and snapshot(heir)["outcomes"] == []
        with session_scope(heir) as s:
            assert s.scalars(select(Prediction.pending_reason)).all() == [None, None, None]
    finally:
        stale.release()
        heir.dispose()

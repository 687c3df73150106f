"""`scoreloop report`: files from a small real store, every plot labelled and carrying data."""

from __future__ import annotations

import html
import random
from datetime import UTC, date, datetime, timedelta

import pytest
from typer.testing import CliRunner

from evaluation.report import PLOT_SENTENCES, build_plots, write_report
from store.db import session_scope
from store.models import (
    Adapter,
    Block,
    BlockMetric,
    Episode,
    EvalRun,
    Outcome,
    Prediction,
    Reward,
    ToolCall,
    TrainingRun,
)
from store.report_data import report_data

T0 = datetime(2021, 3, 1, 21, 1, tzinfo=UTC)


def add_block(s, *, kind: str, adapter: int | None, n: int, hit_rate: float, rng: random.Random,
              eval_run_id: int | None = None, target: float = 0.95, tools: tuple[str, ...] = ("search_news",)
              ) -> int:
    """A scored block of `n` items: episodes (each calling `tools`), predictions, outcomes, rewards and
    its block_metrics rows."""
    block = Block(kind=kind, mode="replay", market="synthetic", size=n, horizon=5, status="complete",
                  adapter_version=adapter, target_score=target, conditioning=f"Score: {target:.2f}",
                  eval_run_id=eval_run_id)
    s.add(block)
    s.flush()
    correct_n, rewards, sq = 0, [], []
    for i in range(n):
        as_of = T0 + timedelta(days=i // 4)
        ep = Episode(block_id=block.id, idx=i, ticker=f"SYN{i % 4:02d}", as_of=as_of, horizon=5, status="done",
                     adapter_version=adapter, target_score=target, conditioning=block.conditioning)
        s.add(ep)
        s.flush()
        for tool in tools:
            s.add(ToolCall(episode_id=ep.id, attempt=ep.attempt, name=tool, args={}, as_of=as_of, latency_ms=3.0))
        conf = round(rng.uniform(0.5, 0.95), 2)
        ok = rng.random() < hit_rate
        realized = "up" if rng.random() < 0.5 else "down"
        direction = realized if ok else ("down" if realized == "up" else "up")
        p = Prediction(episode_id=ep.id, block_id=block.id, ticker=ep.ticker, as_of=as_of, horizon=5,
                       resolve_at=date(2021, 3, 8), direction=direction, magnitude_pct=1.0, confidence=conf,
                       rationale="r", citations=[], valid=True, adapter_version=adapter, target_score=target)
        s.add(p)
        s.flush()
        s.add(Outcome(prediction_id=p.id, ticker=p.ticker, correct=int(ok), close_as_of=100.0,
                      close_resolve=101.0 if realized == "up" else 99.0, as_of_date=as_of.date(),
                      resolve_date=date(2021, 3, 8), realized_return_pct=1.0 if realized == "up" else -1.0,
                      realized_direction=realized))
        composite = 0.4 * ok + 0.3 * (1 - (conf - ok) ** 2) + 0.1
        s.add(Reward(prediction_id=p.id, reward_version="r1", direction=float(ok), magnitude=0.5,
                     calibration=1 - (conf - ok) ** 2, data_use=0.0, composite=composite))
        correct_n += ok
        rewards.append(composite)
        sq.append((conf - ok) ** 2)
    s.add(BlockMetric(block_id=block.id, name="model", reward_version="r1", n=n, n_valid=n, accuracy=correct_n / n,
                      mean_composite=sum(rewards) / n, brier=sum(sq) / n, ece=0.1, coverage=1.0, skill=0.05))
    for name, acc in (("always_up", 0.5), ("momentum_20d", 0.52), ("coin_flip", 0.49)):
        s.add(BlockMetric(block_id=block.id, name=name, reward_version="r1", n=n, n_valid=n, accuracy=acc,
                          mean_composite=0.4, brier=0.25, ece=0.02, coverage=1.0, skill=0.0))
    return block.id


def build_small_store(engine) -> None:
    """Three train blocks (base, v1, v2), two training runs, adapters and one eval run with its blocks."""
    rng = random.Random(0)
    with session_scope(engine) as s:
        add_block(s, kind="train", adapter=None, n=12, hit_rate=0.5, rng=rng)
        for v, parent in ((1, None), (2, 1)):
            run = TrainingRun(status="done", parent_version=parent, adapter_version=v, block_ids=[v],
                              n_examples=12, loss_curve=[{"step": k, "loss": 2.0 / (k + v)} for k in range(1, 6)])
            s.add(run)
            s.flush()
            s.add(Adapter(version=v, parent_version=parent, path=f"adapters/v{v}", base_model="tiny",
                          status="serving" if v == 2 else "retired", training_run_id=run.id))
            add_block(s, kind="train", adapter=v, n=12, hit_rate=0.5 + 0.1 * v, rng=rng)
        for v in (1, 2):  # both versions on the same 8 held-out items
            run = EvalRun(adapter_version=v, targets=[0.2, 0.6, 1.0], market="synthetic", n_items=8, status="done")
            s.add(run)
            s.flush()
            per_target = []
            for t in run.targets:
                bid = add_block(s, kind="eval", adapter=v, n=8, hit_rate=0.3 + 0.1 * v + 0.3 * t, rng=rng,
                                eval_run_id=run.id, target=t, tools=("search_news", "get_prices")[:v])
                per_target.append({"target": t, "block_id": bid, "n": 8, "n_valid": 8,
                                   "mean_reward": 0.3 + 0.3 * t, "accuracy": 0.4 + 0.3 * t, "brier": 0.2})
            run.results = {"per_target": per_target, "spearman": 1.0}


def axes_problems(fig) -> list[str]:
    """What makes a figure unreadable: an axes without a title, axis labels or any plotted data."""
    out = []
    for i, ax in enumerate(fig.axes):
        for what, value in (("title", ax.get_title()), ("xlabel", ax.get_xlabel()), ("ylabel", ax.get_ylabel())):
            if not value.strip():
                out.append(f"axes {i}: empty {what}")
        has_data = (any(len(line.get_xdata()) > 0 for line in ax.lines if not line.get_label().startswith("_"))
                    or any(p.get_height() > 0 for p in ax.patches)
                    or any(len(c.get_offsets()) > 0 for c in ax.collections))
        if not has_data:
            out.append(f"axes {i} ({ax.get_title()!r}): no data")
    return out


def test_every_plot_has_labelled_axes_and_data(fresh_db):
    build_small_store(fresh_db)
    with session_scope(fresh_db) as s:
        data = report_data(s)
    assert [a.adapter_version for a in data.adapters if a.kind == "train"] == [None, 1, 2]
    plots = build_plots(data, bayes_accuracy=0.62)
    assert [p.name for p in plots] == ["blocks", "learning_by_version", "tool_usage", "reliability",
                                       "controllability", "training_loss"]
    for p in plots:
        assert p.figure is not None, f"{p.name}: {p.empty_reason}"
        assert p.figure.axes, p.name
        assert axes_problems(p.figure) == [], p.name
    # The adapter table pools model and baselines per (adapter, kind): eval blocks are their own row.
    v2_eval = next(a for a in data.adapters if a.adapter_version == 2 and a.kind == "eval")
    assert v2_eval.blocks == 3 and v2_eval.n == 24
    # the blocks panel: integer block ids, one model series per block kind, gate/eval not joined by a line
    acc = plots[0].figure.axes[0]
    assert all(float(t).is_integer() for t in acc.get_xticks())
    series = {ln.get_label(): ln for ln in acc.lines}
    assert {"model, train blocks", "model, eval blocks"} <= set(series)
    assert series["model, train blocks"].get_linestyle() == "-"
    assert series["model, eval blocks"].get_linestyle() == "None"
    assert "Bayes limit p* = 0.620" in series
    assert v2_eval.baselines["momentum_20d"]["accuracy"] == pytest.approx(0.52)


def test_report_writes_pngs_and_an_index_that_shows_them(sqlite_db, tmp_path):
    build_small_store(sqlite_db)
    res = write_report(sqlite_db, tmp_path / "rep", bayes_accuracy=0.62)
    names = sorted(p.name for p in res.images)
    assert names == ["blocks.png", "controllability.png", "learning_by_version.png", "reliability.png",
                     "tool_usage.png", "training_loss.png"]
    page = res.index.read_text()
    for p in res.images:
        assert p.stat().st_size > 5000  # a real rendered image, not an empty canvas
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"src='{p.name}'" in page
    assert res.empty_plots == []
    assert "p*" in page and "0.620" in page
    assert "momentum" in page and "Spearman" in page


def test_empty_store_gives_a_clear_page_not_a_crash(sqlite_db, tmp_path):
    out = tmp_path / "rep"
    (out).mkdir()
    (out / "reliability.png").write_bytes(b"stale")
    res = write_report(sqlite_db, out)
    page = res.index.read_text()
    assert res.images == []
    assert "The store is empty" in page
    assert sorted(res.empty_plots) == ["blocks", "controllability", "learning_by_version", "reliability",
                                       "tool_usage", "training_loss"]
    assert page.count("No data for this plot") == 6
    # every picture says what it shows, and its empty note says what to run
    for sentence in PLOT_SENTENCES.values():
        assert html.escape(sentence, quote=True) in page
    assert "run `scoreloop eval --adapter base`" in html.unescape(page)
    assert "<img" not in page
    assert not (out / "reliability.png").exists()  # a stale image would contradict the page


def test_partial_store_draws_what_it_has_and_says_what_is_missing(sqlite_db, tmp_path):
    rng = random.Random(1)
    with session_scope(sqlite_db) as s:
        add_block(s, kind="train", adapter=None, n=10, hit_rate=0.6, rng=rng)
    res = write_report(sqlite_db, tmp_path / "rep")
    assert sorted(p.name for p in res.images) == ["blocks.png", "reliability.png", "tool_usage.png"]
    page = res.index.read_text()
    assert "run `scoreloop eval`" in page.replace("&#x27;", "'").replace("`", "`")
    assert "No data for this plot: no training round has logged a loss yet" in page


def test_cli_report(sqlite_url, tmp_path):
    from scheduler.cli import app
    from store.db import open_store

    engine = open_store(sqlite_url)
    build_small_store(engine)
    engine.dispose()
    out = tmp_path / "cli-rep"
    res = CliRunner().invoke(app, ["--db", sqlite_url, "report", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "index.html").exists() and (out / "blocks.png").exists()
    assert "index.html" in res.output
    bad = CliRunner().invoke(app, ["--db", sqlite_url, "report", "--out", str(out / "index.html")])
    assert bad.exit_code == 1 and "is a file" in bad.output


def test_blocks_with_only_invalid_outputs_draw_only_the_reward_panel(sqlite_db):
    """A model that never produced a valid answer has a mean reward (0) but no accuracy or Brier."""
    with session_scope(sqlite_db) as s:
        for _ in range(2):
            b = Block(kind="train", mode="replay", market="synthetic", size=4, horizon=5, status="complete")
            s.add(b)
            s.flush()
            s.add(BlockMetric(block_id=b.id, name="model", reward_version="r1", n=4, n_valid=0, mean_composite=0.0,
                              coverage=0.0))
    with session_scope(sqlite_db) as s:
        data = report_data(s)
    plots = {p.name: p for p in build_plots(data)}
    fig = plots["blocks"].figure
    assert [ax.get_title() for ax in fig.axes] == ["Mean composite reward per block (invalid predictions count 0)"]
    assert axes_problems(fig) == []
    assert plots["reliability"].figure is None


# -- learning by version and tool usage on a store the runner, resolver and `run_eval` wrote ----------


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """Base and adapter v1 through train, gate and eval blocks (tests/trace_store.py), plus one more base
    eval run on a different seed, i.e. on other held-out items."""
    from trace_store import agent_cfg, base_policy, build_trace_store

    from evaluation.heldout import run_eval
    from rewards.config import RewardsConfig
    from store.db import open_store

    engine = open_store(f"sqlite:///{tmp_path_factory.mktemp('traced') / 'scoreloop.db'}")
    ts = build_trace_store(engine)
    other = run_eval(engine, base_policy(), ts.market, agent_cfg(), RewardsConfig(), targets=[0.5, 1.0],
                     n_items=12, progress=False, seed=1)
    with session_scope(engine) as s:
        data = report_data(s)
    return engine, ts, other.eval_run_id, data


def test_learning_by_version_compares_versions_on_the_same_held_out_items(traced):
    from sqlalchemy import text

    from evaluation.report import learning_by_version, learning_plot

    engine, ts, other_run, data = traced
    lv = learning_by_version(data.eval_items)
    assert [v.adapter_version for v in lv.versions] == [None, 1]
    assert [v.eval_run_id for v in lv.versions] == list(ts.eval_runs)
    assert lv.n_items == 12 and lv.runs_left_out == 1  # the seed=1 run drew other items
    assert other_run not in [v.eval_run_id for v in lv.versions]
    items = {v.eval_run_id: {(r.ticker, str(r.as_of)) for r in data.eval_items
                             if r.eval_run_id == v.eval_run_id and r.target == 1.0} for v in lv.versions}
    assert items[ts.eval_runs[0]] == items[ts.eval_runs[1]] and len(items[ts.eval_runs[0]]) == 12
    with session_scope(engine) as s:
        for v in lv.versions:
            acc, reward, n = s.execute(text(
                "SELECT AVG(p.correct), AVG(p.reward), COUNT(*) FROM v_predictions p JOIN blocks b ON b.id = p.block_id "
                "WHERE b.eval_run_id = :r AND b.target_score = 1.0"), {"r": v.eval_run_id}).one()
            assert v.n == n == 12 and v.target == 1.0
            assert v.accuracy.value == pytest.approx(acc) and v.reward.value == pytest.approx(reward)
            for est in (v.accuracy, v.reward, v.brier, v.ece):
                assert est.low <= est.value <= est.high and est.level == 0.95
    plot = learning_plot(data)
    assert plot.figure is not None and len(plot.figure.axes) == 4
    assert axes_problems(plot.figure) == []
    assert [t.get_text() for t in plot.figure.axes[0].get_xticklabels()] == ["base\n(n=12)", "v1\n(n=12)"]


def test_tool_usage_panel_shows_each_versions_share_of_episodes_calling_each_tool(traced):
    from evaluation.report import tool_usage_plot

    _, _, _, data = traced
    share = {(r.adapter_version, r.tool): r.share_of_episodes for r in data.tool_usage}
    # v1's script calls all three tools every episode; the base script never asks for the market context
    assert share[(1, "get_market_context")] == share[(1, "get_prices")] == share[(1, "search_news")] == 1.0
    assert (None, "get_market_context") not in share
    assert share[(None, "search_news")] + share[(None, "get_prices")] == pytest.approx(1.0)
    plot = tool_usage_plot(data)
    ax = plot.figure.axes[0]
    assert axes_problems(plot.figure) == []
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    expected = sorted(round(share.get((v, t), 0.0), 6) for v in (None, 1)
                      for t in ("get_market_context", "get_prices", "search_news"))
    assert heights == expected


def test_band_aware_p_star_goes_to_the_report(sqlite_db, tmp_path):
    from evaluation.report import market_p_star
    from market.config import MarketConfig
    from market.synthetic import SyntheticMarket
    from rewards.config import RewardsConfig

    ps = market_p_star(MarketConfig(), RewardsConfig(flat_band_pct=0.5))
    syn = SyntheticMarket()
    assert ps.value == pytest.approx(syn.bayes_accuracy_band(5, 0.5)) and ps.value < ps.sign_only
    assert ps.sign_only == pytest.approx(syn.bayes_accuracy(5))
    assert market_p_star(MarketConfig(), RewardsConfig(flat_band_mode="vol")) is None  # no single exact figure
    assert market_p_star(MarketConfig(source="yahoo"), RewardsConfig()) is None
    build_small_store(sqlite_db)
    res = write_report(sqlite_db, tmp_path / "rep", p_star=ps)
    page = html.unescape(res.index.read_text())
    assert f"{ps.value:.3f}" in page and "±0.5% count as flat" in page and f"{ps.sign_only:.3f}" in page
    plots = {p.name: p for p in build_plots(report_data_of(sqlite_db), p_star=ps)}
    labels = [ln.get_label() for ln in plots["blocks"].figure.axes[0].lines]
    assert f"p* = {ps.value:.3f} (Bayes limit, flat band ±0.5%)" in labels


def report_data_of(engine):
    with session_scope(engine) as s:
        return report_data(s)

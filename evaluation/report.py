"""`scoreloop report`: PNG plots and one index.html of blocks, learning by adapter version, tool usage,
calibration, controllability and training loss.

Figures are plain `matplotlib.figure.Figure` objects (no pyplot global state, Agg when saved), built
from `store.report_data.ReportData`, so a test can inspect them before they are written. A plot
with no data is not drawn: the page says what is missing and how to produce it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sqlalchemy import Engine

from rewards.evaluation import ece_from_bins, reliability_bins
from rewards.intervals import Estimate, bootstrap_interval, wilson_interval
from rewards.metrics import expected_calibration_error
from store.db import session_scope
from store.errors import ScoreloopError
from store.report_data import AdapterRow, BlockRow, EvalItemRow, GateRow, ReportData, report_data

if TYPE_CHECKING:
    from market.config import MarketConfig
    from rewards.config import RewardsConfig

BASELINE_STYLE = {
    "always_up": ("always up", "tab:orange"),
    "momentum_20d": ("momentum 20d", "tab:green"),
    "coin_flip": ("coin flip", "tab:gray"),
}
# Block kinds as separate series: train blocks walk forward (a line), gate and eval blocks are
# separate draws on their own items (markers only; a line through them would suggest a trend).
KIND_STYLE = {
    "train": ("train blocks", "tab:blue", "o", "-"),
    "gate": ("gate blocks", "tab:purple", "s", "none"),
    "eval": ("eval blocks", "tab:brown", "^", "none"),
}
MAX_RELIABILITY_LINES = 6  # all items plus the newest adapters; more lines are unreadable
INTERVAL_LEVEL = 0.95

# One sentence per picture for index.html: what it shows. The empty reason says what to run.
PLOT_SENTENCES = {
    "blocks": "Each block's direction accuracy, mean reward and Brier score against price-only baselines on "
              "the same items, with train, gate and eval blocks as separate series and the best accuracy any "
              "forecaster can reach (p*) where the market knows it.",
    "learning_by_version": "Each adapter version's accuracy, mean reward, Brier score and calibration error on "
                           "the very same held-out items, with 95% intervals: the answer to \"does each version "
                           "do better than the last?\"",
    "tool_usage": "The share of each adapter version's finished episodes that called each research tool.",
    "reliability": "Stated confidence against realized direction accuracy in confidence bins (train and gate "
                   "blocks); points on the diagonal are well calibrated.",
    "controllability": "For each evaluation run, the target score in the prompt against the reward the agent "
                       "then earned; a rising line means the conditioning steers the agent.",
    "training_loss": "The SFT loss of every training round, step by step and per round.",
}


class ReportError(ScoreloopError, RuntimeError):
    """The report cannot be written where asked (e.g. the output path is a file)."""


@dataclass
class Plot:
    """One figure of the report, or the reason it has none."""

    name: str  # file stem: `<name>.png`
    title: str
    figure: Figure | None
    empty_reason: str | None = None


@dataclass(frozen=True)
class ReportResult:
    out_dir: Path
    index: Path
    images: list[Path]
    empty_plots: list[str]


@dataclass(frozen=True)
class PStar:
    """The market's Bayes-optimal direction accuracy: with the rewards' flat band, and counting the sign only."""

    value: float
    sign_only: float
    band_pct: float
    horizon: int


def market_p_star(market: MarketConfig, rewards: RewardsConfig) -> PStar | None:
    """p* of the configured synthetic market under the rewards' fixed flat band.

    None for real sources (the generating process is unknown) and for `flat_band_mode = vol`, whose
    band differs per ticker and week, so no single exact figure exists.
    """
    if market.source != "synthetic" or rewards.flat_band_mode != "pct":
        return None
    from market.sources import build_market

    mk = build_market(market)
    syn = mk.prices  # the SyntheticMarket itself: it is both sources
    h = market.horizon_days
    return PStar(syn.bayes_accuracy_band(h, rewards.flat_band_pct), syn.bayes_accuracy(h), rewards.flat_band_pct, h)


@dataclass(frozen=True)
class VersionFigures:
    """One adapter version on the shared held-out items: each figure with its interval."""

    adapter_version: int | None
    eval_run_id: int
    target: float | None
    n: int
    n_valid: int
    accuracy: Estimate
    reward: Estimate
    brier: Estimate
    ece: Estimate


@dataclass(frozen=True)
class LearningByVersion:
    versions: list[VersionFigures]
    n_items: int
    runs_left_out: int  # done eval runs on other item sets (a different --items or seed)


def version_label(version: int | None) -> str:
    return "base" if version is None else f"v{version}"


def _version_key(version: int | None) -> int:
    return -1 if version is None else version


# -- plots ------------------------------------------------------------------------------------

def blocks_plot(blocks: Sequence[BlockRow], bayes_accuracy: float | None = None, *,
                p_star: PStar | None = None) -> Plot:
    """Accuracy, mean reward and Brier per block against the baselines on the same items.

    Train, gate and eval blocks are separate series; block ids are integers on the x axis. A panel
    is drawn only when some block has its figure (blocks whose outputs were all invalid have a mean
    reward but no accuracy or Brier), so no panel is an empty frame.
    """
    title = "Per block: model vs baselines"
    rows = [b for b in blocks if b.n_valid is not None and (b.accuracy is not None or b.mean_reward is not None)]
    if not rows:
        return Plot("blocks", title, None, "no scored blocks yet: run `scoreloop block run` (or `scoreloop loop`), "
                                           "then `scoreloop resolve`")
    x = [b.block_id for b in rows]
    panels = [name for name, has in (("accuracy", any(_finite(b.accuracy) for b in rows)),
                                     ("reward", any(_finite(b.mean_reward) for b in rows)),
                                     ("brier", any(_finite(b.brier) for b in rows))) if has]
    limit = p_star.value if p_star is not None else bayes_accuracy
    fig = Figure(figsize=(11, 3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "accuracy":
            _kind_series(ax, rows, lambda b: b.accuracy)
            _baseline_marks(ax, x, [b.always_up_accuracy for b in rows], "always_up")
            _baseline_marks(ax, x, [b.momentum_accuracy for b in rows], "momentum_20d")
            _baseline_marks(ax, x, [b.coin_flip_accuracy for b in rows], "coin_flip")
            if limit is not None:
                label = (f"p* = {limit:.3f} (Bayes limit, flat band ±{p_star.band_pct:g}%)" if p_star is not None
                         else f"Bayes limit p* = {limit:.3f}")
                ax.axhline(limit, color="tab:red", lw=1, label=label)
            ax.set(title="Direction accuracy per block", ylabel="direction accuracy", ylim=(0, 1))
            ax.legend(loc="lower right", fontsize=8, ncol=2)
        elif panel == "reward":
            _kind_series(ax, rows, lambda b: b.mean_reward)
            ax.set(title="Mean composite reward per block (invalid predictions count 0)", ylabel="mean reward",
                   ylim=(0, 1))
            ax.legend(loc="lower right", fontsize=8)
        else:
            _kind_series(ax, rows, lambda b: b.brier)
            _baseline_marks(ax, x, [b.always_up_brier for b in rows], "always_up")
            _baseline_marks(ax, x, [b.momentum_brier for b in rows], "momentum_20d")
            _baseline_marks(ax, x, [b.coin_flip_brier for b in rows], "coin_flip")
            ax.set(title="Brier score per block (lower is better; 0.25 = coin flip at 0.5)", ylabel="Brier score")
            ax.legend(loc="upper right", fontsize=8, ncol=2)
        ax.set_xlabel("block id")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_tick_params(labelbottom=True)
    return Plot("blocks", title, fig)


def _kind_series(ax, rows: Sequence[BlockRow], value) -> None:
    """The model's figure per block, one series per block kind present."""
    for kind in [k for k in KIND_STYLE if any(b.kind == k for b in rows)] + sorted(
            {b.kind for b in rows} - set(KIND_STYLE)):
        label, color, marker, ls = KIND_STYLE.get(kind, (f"{kind} blocks", "tab:olive", "D", "none"))
        these = [b for b in rows if b.kind == kind]
        _series(ax, [b.block_id for b in these], [value(b) for b in these], f"model, {label}", color,
                ls=ls, marker=marker)


def _baseline_marks(ax, x: Sequence[int], ys: Sequence[float | None], name: str) -> None:
    """A baseline's figure on each block's own items: a short tick per block, not a line across blocks."""
    label, color = BASELINE_STYLE[name]
    _series(ax, x, ys, label, color, ls="none", marker="_")


def learning_by_version(items: Sequence[EvalItemRow], *, level: float = INTERVAL_LEVEL) -> LearningByVersion:
    """Each adapter version's figures on one shared set of held-out items, from its newest eval run.

    An eval run contributes its block at its highest target (the agent serves conditioned on a high
    score). Runs are grouped by their exact (ticker, as_of) item set; the set that most versions ran
    is shown (ties: the newest), so every version is compared on the very same items.
    """
    by_run: dict[int, list[EvalItemRow]] = {}
    for it in items:
        by_run.setdefault(it.eval_run_id, []).append(it)
    groups: dict[frozenset, dict[int | None, list[EvalItemRow]]] = {}
    for run_id in sorted(by_run):
        rows = by_run[run_id]
        top = max((r.target for r in rows if r.target is not None), default=None)
        chosen = [r for r in rows if r.target == top]
        key = frozenset((r.ticker, str(r.as_of)) for r in chosen)
        groups.setdefault(key, {})[chosen[0].adapter_version] = chosen  # a newer run of a version replaces older
    if not groups:
        return LearningByVersion([], 0, 0)
    best = max(groups, key=lambda k: (len(groups[k]), max(r[0].eval_run_id for r in groups[k].values())))
    versions = []
    for version in sorted(groups[best], key=_version_key):
        rows = groups[best][version]
        valid = [r for r in rows if r.valid and r.correct is not None and r.confidence is not None]
        versions.append(VersionFigures(
            adapter_version=version, eval_run_id=rows[0].eval_run_id, target=rows[0].target, n=len(rows),
            n_valid=len(valid),
            accuracy=wilson_interval(sum(r.correct for r in valid), len(valid), level),
            reward=bootstrap_interval([r.reward for r in rows], _mean, level=level),
            brier=bootstrap_interval(valid, lambda rs: _mean([(r.confidence - r.correct) ** 2 for r in rs]),
                                     level=level),
            ece=bootstrap_interval(valid, lambda rs: expected_calibration_error(
                [r.confidence for r in rs], [bool(r.correct) for r in rs]), level=level),
        ))
    left_out = len({r.eval_run_id for k, g in groups.items() if k != best for rows in g.values() for r in rows})
    return LearningByVersion(versions, len(best), left_out)


def learning_plot(data: ReportData, p_star: PStar | None = None) -> Plot:
    """Accuracy, reward, Brier and ECE per adapter version on the same held-out items, with intervals."""
    title = "Learning by version (same held-out items)"
    lv = learning_by_version(data.eval_items)
    if not lv.versions:
        return Plot("learning_by_version", title, None,
                    "no finished eval runs yet: run `scoreloop eval --adapter base`, then `scoreloop eval` after "
                    "each new adapter with the same --items, so every version answers the same held-out items")
    labels = [version_label(v.adapter_version) for v in lv.versions]
    xs = list(range(len(lv.versions)))
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    target = lv.versions[-1].target
    fig.suptitle(f"Each adapter version on the same {lv.n_items} held-out items (target "
                 f"{'-' if target is None else f'{target:g}'}), {INTERVAL_LEVEL:.0%} intervals")
    panels = [
        ("accuracy", "Direction accuracy (Wilson interval)", "direction accuracy", (0, 1)),
        ("reward", "Mean composite reward (bootstrap interval)", "mean reward", (0, 1)),
        ("brier", "Brier score, lower is better (bootstrap interval)", "Brier score", None),
        ("ece", "Expected calibration error, lower is better (bootstrap)", "ECE", None),
    ]
    for ax, (field, panel_title, ylabel, ylim) in zip(axes, panels, strict=True):
        ests: list[Estimate] = [getattr(v, field) for v in lv.versions]
        pts = [(x, e) for x, e in zip(xs, ests, strict=True) if e.value is not None]
        if pts:
            px = [x for x, _ in pts]
            py = [e.value for _, e in pts]
            lo = [e.value - e.low if e.low is not None else 0.0 for _, e in pts]
            hi = [e.high - e.value if e.high is not None else 0.0 for _, e in pts]
            ax.errorbar(px, py, yerr=[lo, hi], fmt="none", ecolor="tab:blue", capsize=5, lw=1.5)
            ax.plot(px, py, marker="o", color="tab:blue", label="model")
        if field == "accuracy" and p_star is not None:
            ax.axhline(p_star.value, color="tab:red", lw=1, label=f"p* = {p_star.value:.3f}")
        ax.set(title=panel_title, xlabel="adapter version", ylabel=ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xticks(xs, [f"{lab}\n(n={v.n})" for lab, v in zip(labels, lv.versions, strict=True)])
        ax.set_xlim(-0.5, len(xs) - 0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    return Plot("learning_by_version", title, fig)


def tool_usage_plot(data: ReportData) -> Plot:
    """Share of each version's finished episodes that called each tool (grouped bars)."""
    title = "Tool usage by version"
    rows = [r for r in data.tool_usage if r.tool is not None]
    if not rows:
        return Plot("tool_usage", title, None, "no finished episode has called a tool yet: run a block "
                                               "(`scoreloop block run`)")
    versions = sorted({r.adapter_version for r in data.tool_usage}, key=_version_key)
    tools = sorted({r.tool for r in rows})
    episodes = {r.adapter_version: r.episodes for r in data.tool_usage}
    share = {(r.adapter_version, r.tool): r.share_of_episodes for r in rows}
    fig = Figure(figsize=(max(7, 1.6 * len(versions) * max(1, len(tools)) / 2 + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        xs = [k + (i - (len(tools) - 1) / 2) * width for k in range(len(versions))]
        ax.bar(xs, [share.get((v, tool), 0.0) for v in versions], width=width, label=tool)
    ax.set_xticks(range(len(versions)), [f"{version_label(v)}\n({episodes[v]} episodes)" for v in versions])
    ax.set(title="Share of finished episodes that called each tool, per adapter version", xlabel="adapter version",
           ylabel="share of episodes", ylim=(0, 1.2))  # headroom for the legend above full bars
    ax.legend(loc="upper center", fontsize=8, ncol=len(tools))
    return Plot("tool_usage", title, fig)


def reliability_plot(data: ReportData, bins: int = 10) -> Plot:
    """Stated confidence vs realized accuracy in equal-width bins (non-eval blocks), with counts."""
    title = "Reliability diagram"
    scored = [c for c in data.confidences if c.kind != "eval"]
    if not scored:
        return Plot("reliability", title, None, "no resolved valid predictions with a confidence yet")
    groups: list[tuple[str, list]] = [("all items", scored)]
    versions = sorted({c.adapter_version for c in scored}, key=lambda v: -1 if v is None else v)
    if len(versions) > 1:
        for v in versions[-(MAX_RELIABILITY_LINES - 1):]:
            groups.append((f"adapter {version_label(v)}", [c for c in scored if c.adapter_version == v]))
    fig = Figure(figsize=(8, 9), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1.3))
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="perfect calibration")
    width = 1.0 / bins / (len(groups) + 1)
    for gi, (name, cs) in enumerate(groups):
        bs = reliability_bins([c.confidence for c in cs], [c.correct for c in cs], bins)
        full = [b for b in bs if b.n]
        ece = ece_from_bins(bs)
        line = ax.plot([b.mean_confidence for b in full], [b.accuracy for b in full], marker="o",
                       lw=2 if gi == 0 else 1, label=f"{name} (n={len(cs)}, ECE={ece:.3f})")[0]
        if gi == 0:
            for b in full:
                ax.annotate(str(b.n), (b.mean_confidence, b.accuracy), fontsize=7, xytext=(4, -10),
                            textcoords="offset points")
        ax_n.bar([b.lo + width * (gi + 0.5) for b in bs], [b.n for b in bs], width=width,
                 color=line.get_color(), align="edge", label=name)
    ax.set(title="Reliability: stated confidence vs realized direction accuracy (labels = items per bin)",
           xlabel="mean stated confidence in bin", ylabel="realized direction accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    ax_n.set(title="Predictions per confidence bin", xlabel="stated confidence", ylabel="predictions", xlim=(0, 1))
    return Plot("reliability", title, fig)


def controllability_plot(data: ReportData) -> Plot:
    """Target score vs realized mean reward for each finished eval run (one line per adapter)."""
    title = "Controllability"
    runs = [r for r in data.eval_runs if r.status == "done" and _target_points(r.results)]
    if not runs:
        return Plot("controllability", title, None, "no finished eval runs yet: run `scoreloop eval`")
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="realized = target")
    for r in runs:
        pts = _target_points(r.results)
        rho = r.results.get("spearman")
        rho_s = "n/a" if rho is None else f"{rho:.2f}"
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="o",
                label=f"adapter {version_label(r.adapter_version)} (eval {r.id}, {r.n_items} items, "
                      f"Spearman {rho_s})")
    ax.set(title="Controllability: conditioning target vs realized mean reward (held-out items)",
           xlabel="target score in the prompt", ylabel="realized mean reward", xlim=(0, 1.02), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return Plot("controllability", title, fig)


def loss_plot(data: ReportData) -> Plot:
    """Loss curve of every training round, and each round's mean and final loss."""
    title = "Training loss"
    runs = [r for r in data.training_runs if any(_finite(p.get("loss")) for p in r.loss_curve)]
    if not runs:
        return Plot("training_loss", title, None, "no training round has logged a loss yet: run `scoreloop train`")
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_curve, ax_round = fig.subplots(1, 2)
    for r in runs:
        pts = [(p.get("step", i), p["loss"]) for i, p in enumerate(r.loss_curve) if _finite(p.get("loss"))]
        ax_curve.plot([s for s, _ in pts], [loss for _, loss in pts], marker=".",
                      label=f"run {r.id} -> {version_label(r.adapter_version)}")
    ax_curve.set(title="SFT loss per optimizer step, per round", xlabel="optimizer step (within the round)",
                 ylabel="training loss")
    ax_curve.legend(fontsize=8)
    rounds = list(range(1, len(runs) + 1))
    losses = [[p["loss"] for p in r.loss_curve if _finite(p.get("loss"))] for r in runs]
    ax_round.plot(rounds, [sum(ls) / len(ls) for ls in losses], marker="o", label="mean loss of the round")
    ax_round.plot(rounds, [ls[-1] for ls in losses], marker="s", label="last logged loss")
    ax_round.set(title="Training loss per round", xlabel="training round", ylabel="training loss")
    ax_round.set_xticks(rounds)
    ax_round.legend(fontsize=8)
    return Plot("training_loss", title, fig)


def build_plots(data: ReportData, bayes_accuracy: float | None = None, *, p_star: PStar | None = None) -> list[Plot]:
    return [blocks_plot(data.blocks, bayes_accuracy, p_star=p_star), learning_plot(data, p_star),
            tool_usage_plot(data), reliability_plot(data), controllability_plot(data), loss_plot(data)]


# -- page ---------------------------------------------------------------------------------------

def write_report(engine: Engine, out_dir: str | Path, *, bayes_accuracy: float | None = None,
                 p_star: PStar | None = None, source: str = "") -> ReportResult:
    """Read the store, write `<plot>.png` files and `index.html` into `out_dir` (created if missing)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    with session_scope(engine) as s:
        data = report_data(s)
    plots = build_plots(data, bayes_accuracy, p_star=p_star)
    images = []
    for p in plots:
        target = out / f"{p.name}.png"
        if p.figure is not None:
            p.figure.savefig(target, dpi=110)
            images.append(target)
        elif target.exists():
            target.unlink()  # a stale image from an older report would contradict the page
    index = out / "index.html"
    index.write_text(render_html(data, plots, bayes_accuracy=bayes_accuracy, p_star=p_star, source=source),
                     encoding="utf-8")
    return ReportResult(out, index, images, [p.name for p in plots if p.figure is None])


def render_html(data: ReportData, plots: Sequence[Plot], *, bayes_accuracy: float | None = None,
                p_star: PStar | None = None, source: str = "") -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        ("<!doctype html><html><head><meta charset='utf-8'><title>scoreloop report</title><style>"
         "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}th{background:#eee}"
         ".empty{color:#a33;font-style:italic}img{max-width:100%}</style></head><body>"),
        "<h1>scoreloop report</h1>",
        f"<p>Generated {now}{' from ' + _e(source) if source else ''}.</p>",
    ]
    if data.empty:
        parts.append("<p class='empty'>The store is empty: no blocks, eval runs or training runs yet. Run "
                     "<code>scoreloop block run</code> (or <code>scoreloop loop</code>), then "
                     "<code>scoreloop resolve</code>, and write the report again.</p>")
    if p_star is not None:
        parts.append(f"<p>Market Bayes accuracy p* (the best direction accuracy any forecaster can reach on "
                     f"this synthetic market's planted signal at a {p_star.horizon}-day horizon, scored as the "
                     f"rewards score it: moves within ±{p_star.band_pct:g}% count as flat): "
                     f"<b>{p_star.value:.3f}</b> ({p_star.sign_only:.3f} if only the sign counted).</p>")
    elif bayes_accuracy is not None:
        parts.append(f"<p>Market Bayes accuracy p* (the best direction accuracy any forecaster can reach on "
                     f"this synthetic market's planted signal): <b>{bayes_accuracy:.3f}</b>.</p>")
    parts.append("<h2>Per adapter version</h2><p>Pooled over scored blocks of each kind (accuracy and Brier "
                 "weighted by valid items); baselines are scored on the same items as the model.</p>")
    parts.append(_adapter_table(data.adapters) if data.adapters else _empty("no scored blocks yet"))
    for p in plots:
        parts.append(f"<h2>{_e(p.title)}</h2>")
        if p.name in PLOT_SENTENCES:
            parts.append(f"<p>{_e(PLOT_SENTENCES[p.name])}</p>")
        if p.figure is not None:
            parts.append(f"<img src='{p.name}.png' alt='{_e(p.title)}'>")
        else:
            parts.append(_empty(f"No data for this plot: {p.empty_reason}."))
        if p.name == "learning_by_version" and p.figure is not None:
            parts.append(_learning_table(learning_by_version(data.eval_items)))
        if p.name == "controllability":
            parts.append(_eval_table(data) if data.eval_runs else "")
        if p.name == "training_loss" and data.training_runs:
            parts.append(_table(
                ["run", "status", "parent", "adapter", "examples", "logged steps", "first loss", "last loss"],
                [[r.id, r.status, version_label(r.parent_version), version_label(r.adapter_version),
                  r.n_examples, len(r.loss_curve), _first_loss(r.loss_curve), _last_loss(r.loss_curve)]
                 for r in data.training_runs]))
    parts.append("<h2>Promotion gates</h2><p>Candidate and serving adapter on the same gate-region items; "
                 "accept needs the paired bootstrap interval of mean(candidate - serving) above 0 and a mean "
                 "gain of at least the margin, reject an interval below 0, anything else keeps serving.</p>")
    parts.append(_gate_table(data.gates) if data.gates else _empty("no gate decisions yet"))
    parts.append("<h2>Per block</h2>")
    parts.append(_block_table(data.blocks) if data.blocks else _empty("no blocks yet"))
    parts.append("</body></html>")
    return "\n".join(parts)


def _gate_table(rows: Sequence[GateRow]) -> str:
    head = ["candidate", "serving", "decision", "pairs", "serving mean", "candidate mean", "mean diff", "interval",
            "level", "margin", "sign test p", "gate region"]
    return _table(head, [[version_label(g.candidate_version), version_label(g.serving_version), g.decision,
                          g.n_pairs, g.serving_mean, g.candidate_mean, g.mean_diff,
                          "–" if g.ci_low is None else f"[{g.ci_low:+.3f}, {g.ci_high:+.3f}]", g.level, g.margin,
                          g.p_value, f"{g.region.get('first', '?')}..{g.region.get('last', '?')}"] for g in rows])


def _adapter_table(rows: Sequence[AdapterRow]) -> str:
    head = ["adapter", "kind", "blocks", "n", "valid", "accuracy", "mean reward", "Brier"]
    for name, (label, _) in BASELINE_STYLE.items():
        head += [f"{label} acc", f"{label} Brier"]
    body = []
    for r in rows:
        row: list[object] = [version_label(r.adapter_version), r.kind, r.blocks, r.n, r.n_valid, r.accuracy,
                             r.mean_reward, r.brier]
        for name in BASELINE_STYLE:
            b = r.baselines.get(name, {})
            row += [b.get("accuracy"), b.get("brier")]
        body.append(row)
    return _table(head, body)


def _block_table(rows: Sequence[BlockRow]) -> str:
    head = ["block", "kind", "status", "adapter", "target", "n", "valid", "accuracy", "mean reward", "Brier",
            "ECE", "skill", "always up acc", "momentum acc", "coin flip acc"]
    return _table(head, [[b.block_id, b.kind, b.status, version_label(b.adapter_version), b.target_score, b.n,
                          b.n_valid, b.accuracy, b.mean_reward, b.brier, b.ece, b.skill, b.always_up_accuracy,
                          b.momentum_accuracy, b.coin_flip_accuracy] for b in rows])


def _learning_table(lv: LearningByVersion) -> str:
    def est(e: Estimate) -> str:
        if e.value is None:
            return "–"
        if e.low is None:
            return f"{e.value:.3f}"
        return f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"

    body = [[version_label(v.adapter_version), v.eval_run_id, v.target, v.n, v.n_valid, est(v.accuracy),
             est(v.reward), est(v.brier), est(v.ece)] for v in lv.versions]
    note = ""
    if len(lv.versions) == 1:
        note = _empty("Only one version has run these items so far: after the next adapter, run `scoreloop eval` "
                      "with the same --items to compare.")
    if lv.runs_left_out:
        note += (f"<p>{lv.runs_left_out} other finished eval run(s) used a different item set (another --items "
                 "or seed) and are not in this comparison; see the controllability table.</p>")
    return _table(["adapter", "eval run", "target", "items", "valid", "accuracy [95%]", "mean reward [95%]",
                   "Brier [95%]", "ECE [95%]"], body) + note


def _eval_table(data: ReportData) -> str:
    body = []
    for r in data.eval_runs:
        for t in r.results.get("per_target", []) or [{}]:
            body.append([r.id, version_label(r.adapter_version), r.status, r.n_items, t.get("target"),
                         t.get("n_valid"), t.get("mean_reward"), t.get("accuracy"), t.get("brier"),
                         r.results.get("spearman")])
    return _table(["eval", "adapter", "status", "items", "target", "valid", "mean reward", "accuracy", "Brier",
                   "Spearman"], body)


def _table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _cell(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return _e(str(v))


def _empty(msg: str) -> str:
    return f"<p class='empty'>{_e(msg)}</p>"


def _e(s: str) -> str:
    return html.escape(s, quote=True)


def _series(ax, x: Sequence[int], ys: Sequence[float | None], label: str, color: str, *, ls: str = "-",
            marker: str | None = None) -> None:
    pts = [(a, b) for a, b in zip(x, ys) if _finite(b)]
    if pts:
        ax.plot([a for a, _ in pts], [b for _, b in pts], ls=ls, color=color, marker=marker, label=label)


def _target_points(results: dict) -> list[tuple[float, float]]:
    pts = [(t.get("target"), t.get("mean_reward")) for t in results.get("per_target", []) or []]
    return sorted((float(t), float(m)) for t, m in pts if _finite(t) and _finite(m))


def _first_loss(curve: Sequence[dict]) -> float | None:
    return next((p["loss"] for p in curve if _finite(p.get("loss"))), None)


def _last_loss(curve: Sequence[dict]) -> float | None:
    return next((p["loss"] for p in reversed(curve) if _finite(p.get("loss"))), None)


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)



def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None

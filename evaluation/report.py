"""`scoreloop report`: PNG plots and one index.html of blocks, adapters, calibration, controllability, loss.

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

from matplotlib.figure import Figure
from sqlalchemy import Engine

from rewards.evaluation import ece_from_bins, reliability_bins
from store.db import session_scope
from store.report_data import AdapterRow, BlockRow, GateRow, ReportData, report_data

BASELINE_STYLE = {
    "always_up": ("always up", "tab:orange"),
    "momentum_20d": ("momentum 20d", "tab:green"),
    "coin_flip": ("coin flip", "tab:gray"),
}
MAX_RELIABILITY_LINES = 6  # all items plus the newest adapters; more lines are unreadable


class ReportError(RuntimeError):
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


def version_label(version: int | None) -> str:
    return "base" if version is None else f"v{version}"


# -- plots ------------------------------------------------------------------------------------

def blocks_plot(blocks: Sequence[BlockRow], bayes_accuracy: float | None = None) -> Plot:
    """Accuracy, mean reward and Brier per block against the baselines on the same items.

    A panel is drawn only when some block has its figure (blocks whose outputs were all invalid have
    a mean reward but no accuracy or Brier), so no panel is an empty frame.
    """
    title = "Per block: model vs baselines"
    rows = [b for b in blocks if b.n_valid is not None and (b.accuracy is not None or b.mean_reward is not None)]
    if not rows:
        return Plot("blocks", title, None, "no scored blocks yet: run blocks and `scoreloop resolve`")
    x = [b.block_id for b in rows]
    panels = [name for name, has in (("accuracy", any(_finite(b.accuracy) for b in rows)),
                                     ("reward", any(_finite(b.mean_reward) for b in rows)),
                                     ("brier", any(_finite(b.brier) for b in rows))) if has]
    fig = Figure(figsize=(11, 3 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "accuracy":
            _series(ax, x, [b.accuracy for b in rows], "model", "tab:blue", marker="o")
            _series(ax, x, [b.always_up_accuracy for b in rows], *BASELINE_STYLE["always_up"], ls="--")
            _series(ax, x, [b.momentum_accuracy for b in rows], *BASELINE_STYLE["momentum_20d"], ls="--")
            _series(ax, x, [b.coin_flip_accuracy for b in rows], *BASELINE_STYLE["coin_flip"], ls=":")
            if bayes_accuracy is not None:
                ax.axhline(bayes_accuracy, color="tab:red", lw=1, label=f"Bayes limit p* = {bayes_accuracy:.3f}")
            ax.set(title="Direction accuracy per block", ylabel="direction accuracy", ylim=(0, 1))
            ax.legend(loc="lower right", fontsize=8)
        elif panel == "reward":
            _series(ax, x, [b.mean_reward for b in rows], "model", "tab:blue", marker="o")
            for b in rows:
                if b.kind != "train" and b.mean_reward is not None:
                    ax.annotate(b.kind, (b.block_id, b.mean_reward), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            ax.set(title="Mean composite reward per block (invalid predictions count 0)", ylabel="mean reward",
                   ylim=(0, 1))
            ax.legend(loc="lower right", fontsize=8)
        else:
            _series(ax, x, [b.brier for b in rows], "model", "tab:blue", marker="o")
            _series(ax, x, [b.always_up_brier for b in rows], *BASELINE_STYLE["always_up"], ls="--")
            _series(ax, x, [b.momentum_brier for b in rows], *BASELINE_STYLE["momentum_20d"], ls="--")
            _series(ax, x, [b.coin_flip_brier for b in rows], *BASELINE_STYLE["coin_flip"], ls=":")
            ax.set(title="Brier score per block (lower is better; 0.25 = coin flip at 0.5)", ylabel="Brier score")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("block id")
        ax.xaxis.set_tick_params(labelbottom=True)
    return Plot("blocks", title, fig)


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


def build_plots(data: ReportData, bayes_accuracy: float | None = None) -> list[Plot]:
    return [blocks_plot(data.blocks, bayes_accuracy), reliability_plot(data), controllability_plot(data),
            loss_plot(data)]


# -- page ---------------------------------------------------------------------------------------

def write_report(engine: Engine, out_dir: str | Path, *, bayes_accuracy: float | None = None,
                 source: str = "") -> ReportResult:
    """Read the store, write `<plot>.png` files and `index.html` into `out_dir` (created if missing)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    out.mkdir(parents=True, exist_ok=True)
    with session_scope(engine) as s:
        data = report_data(s)
    plots = build_plots(data, bayes_accuracy)
    images = []
    for p in plots:
        target = out / f"{p.name}.png"
        if p.figure is not None:
            p.figure.savefig(target, dpi=110)
            images.append(target)
        elif target.exists():
            target.unlink()  # a stale image from an older report would contradict the page
    index = out / "index.html"
    index.write_text(render_html(data, plots, bayes_accuracy=bayes_accuracy, source=source), encoding="utf-8")
    return ReportResult(out, index, images, [p.name for p in plots if p.figure is None])


def render_html(data: ReportData, plots: Sequence[Plot], *, bayes_accuracy: float | None = None,
                source: str = "") -> str:
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
    if bayes_accuracy is not None:
        parts.append(f"<p>Market Bayes accuracy p* (the best direction accuracy any forecaster can reach on "
                     f"this synthetic market's planted signal): <b>{bayes_accuracy:.3f}</b>.</p>")
    parts.append("<h2>Per adapter version</h2><p>Pooled over scored blocks of each kind (accuracy and Brier "
                 "weighted by valid items); baselines are scored on the same items as the model.</p>")
    parts.append(_adapter_table(data.adapters) if data.adapters else _empty("no scored blocks yet"))
    for p in plots:
        parts.append(f"<h2>{_e(p.title)}</h2>")
        if p.figure is not None:
            parts.append(f"<img src='{p.name}.png' alt='{_e(p.title)}'>")
        else:
            parts.append(_empty(f"No data for this plot: {p.empty_reason}."))
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


"""The loop's steps as plain functions: run a block, resolve, train, gate, publish, evaluate, report.

Each step takes the Runtime, calls into agent / scoring / trainer / evaluation, logs one logfmt
line and returns a typed result that carries what it learned, so the next step does not read it
back from the database. `cycle()` is the semi-online loop itself.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.logs import log_event
from scheduler.runtime import Runtime, Stopped, scheduled_block_size, version_label
from scheduler.settings import Settings
from store.db import session_scope
from store.status import BlockSummary, block_items, block_row, block_summaries, scored_block_ids

if TYPE_CHECKING:
    from evaluation.heldout import EvalResult
    from evaluation.report import ReportResult
    from market.split import Region
    from rewards.calibration import ConfidenceMap
    from scoring.resolve import ResolveReport
    from trainer.round import RoundResult

# The block figures the gate records on the candidate's row, for both sides.
GATE_FIGURES = ("block_id", "n", "n_valid", "accuracy", "mean_composite", "brier", "ece")


# ---- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockResult:
    """A block that ran (complete, or left `running` because stop was set)."""

    block_id: int
    kind: str
    size: int
    status: str
    adapter_version: int | None
    predictions: int
    valid: int
    items: list[tuple[str, datetime]]  # (ticker, as_of) in episode order
    seconds: float

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass(frozen=True)
class ResolveResult:
    """A resolve pass: its report and the summaries of the blocks it finished scoring."""

    report: ResolveReport
    scored: dict[int, BlockSummary]
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """A training round's candidate, or why there is none."""

    candidate: RoundResult | None
    skipped: str | None = None  # the reason when candidate is None
    seconds: float = 0.0


@dataclass(frozen=True)
class GateResult:
    """Candidate and serving adapter on the same held-out items, and the decision."""

    candidate_version: int
    candidate_path: str | None
    serving_version: int | None
    serving_path: str | None
    passed: bool
    gated: bool = True  # False when trainer.gate_items = 0 (the candidate serves ungated)
    decision: str | None = None  # accept | keep | reject (trainer.gate.decide); None when ungated
    statistic: dict[str, object] | None = None  # the paired statistic the decision rests on
    candidate_figures: dict[str, object] | None = None
    serving_figures: dict[str, object] | None = None


@dataclass(frozen=True)
class PublishResult:
    """What the policy serves after the gate."""

    serving_version: int | None
    published: bool  # a new version started serving


@dataclass
class CycleResult:
    """One round of the loop; `skipped` says in words why a later step did not run."""

    block: BlockResult
    summary: BlockSummary | None = None
    train: TrainResult | None = None
    gate: GateResult | None = None
    serving_version: int | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def trained(self) -> bool:
        return self.train is not None and self.train.candidate is not None

    @property
    def published(self) -> bool:
        return self.gate is not None and self.gate.passed


# ---- the cycle ---------------------------------------------------------------------------------


def cycle(rt: Runtime, *, size: int | None = None) -> CycleResult:
    """One semi-online round: block -> resolve -> train -> gate -> publish. Stops between steps."""
    block = run_block_step(rt, size=size)
    out = CycleResult(block=block, serving_version=rt.serving_version)
    if not block.complete:
        out.skipped.append(f"block {block.block_id} stopped before it finished")
        return out
    resolved = resolve_step(rt)
    out.summary = resolved.scored.get(block.block_id)
    if out.summary is None:
        out.skipped.append(f"block {block.block_id} is not scored yet (outcomes pending)")
    if rt.stop.is_set():
        out.skipped.append("stopping: no training this round")
        return out
    out.train = train_step(rt, min_new=train_threshold(rt.settings, block.size))
    if out.train.candidate is None:
        out.skipped.append(f"no training: {out.train.skipped}")
        return out
    out.gate = gate_step(rt, out.train.candidate.adapter_version, out.train.candidate.path)
    if out.gate is None:
        out.skipped.append("stopping: gate interrupted (it resumes at the next start)")
        return out
    if not out.gate.passed:
        out.skipped.append(f"v{out.gate.candidate_version} rejected by the gate")
    out.serving_version = publish_step(rt, out.gate).serving_version
    return out


def train_and_publish(rt: Runtime, *, min_new: int | None = None) -> TrainResult:
    """train -> gate -> publish without a block first (live resolve jobs and recovery)."""
    trained = train_step(rt, min_new=min_new)
    if trained.candidate is not None and not rt.stop.is_set():
        gate = gate_step(rt, trained.candidate.adapter_version, trained.candidate.path)
        if gate is not None:
            publish_step(rt, gate)
    return trained


def train_threshold(settings: Settings, block_size: int | None = None) -> int:
    """New scored episodes a round needs: trainer.min_new_episodes if set, else one block's worth."""
    return settings.trainer.min_new_episodes or block_size or scheduled_block_size(settings)


# ---- block -------------------------------------------------------------------------------------


def run_block_step(rt: Runtime, *, size: int | None = None, kind: str = "train", trigger_id: int | None = None,
                   as_of: datetime | None = None, items: list[tuple[str, datetime]] | None = None) -> BlockResult:
    """Run one block with the policy's current adapter (train blocks: the published one, after any
    interrupted block has finished)."""
    from agent.runner import run_block
    from scheduler.recovery import resume_unfinished

    s = rt.settings
    if kind == "train":
        rt.serve_published()
        resume_unfinished(rt)  # one thing at a time, in order: an interrupted block finishes first
        if rt.stop.is_set():
            raise Stopped("stopped before the block started")
    n = size or scheduled_block_size(s)
    rt.set_job(f"block ({kind}, {n} items{f', trigger {trigger_id}' if trigger_id else ''})")
    log_event("block_start", kind=kind, size=n, trigger=trigger_id, adapter=version_label(rt.serving_version))
    t0 = time.monotonic()
    # Gate blocks replay past items even in live mode: their outcomes must be known at once.
    mode = "replay" if kind == "gate" else s.scheduler.mode
    if kind == "gate" and mode != s.scheduler.mode and as_of is None and items is None:
        as_of = _live_gate_as_of(rt, n)
    bid = run_block(rt.engine, rt.policy, rt.market, s.agent, s.rewards, mode=mode, size=n,
                    as_of=as_of, items=items, kind=kind, trigger_id=trigger_id, progress=rt.progress,
                    stop=rt.stop, horizon=s.market.horizon_days)
    res = finished_block(rt, bid, time.monotonic() - t0)
    if kind == "train" and trigger_id is None and res.complete:
        # A scheduled block is counted (for max_blocks and `daemon_stopped blocks=`) when the block itself
        # is done, not when its whole cycle is: a stop during the round's training must not forget it.
        rt.blocks_run += 1
    return res


def finished_block(rt: Runtime, block_id: int, seconds: float) -> BlockResult:
    """Read a block's state once after the runner returns, and log it."""
    from store.traces import block_prediction_counts

    with session_scope(rt.engine) as sess:
        row = block_row(sess, block_id)
        n_pred, n_valid = block_prediction_counts(sess, block_id)
        items = block_items(sess, block_id)
    status = row.status if row else "missing"
    log_event("block_done" if status == "complete" else "block_interrupted", block=block_id,
              kind=row.kind if row else None, status=status, size=row.size if row else None,
              predictions=n_pred, valid=n_valid, seconds=round(seconds, 1))
    return BlockResult(block_id=block_id, kind=row.kind if row else "?", size=row.size if row else 0,
                       status=status, adapter_version=row.adapter_version if row else None,
                       predictions=n_pred, valid=n_valid, items=items, seconds=seconds)


def _live_gate_as_of(rt: Runtime, size: int) -> datetime:
    """A past as_of whose replay block (consecutive sessions) resolves before today's close."""
    cal = rt.market.calendar
    names = rt.market.tickers or ["?"]
    days_needed = math.ceil(size / len(names)) + rt.settings.market.horizon_days + 1
    start = cal.add_sessions(cal.base_session(datetime.now(UTC)), -days_needed)
    return cal.replay_as_of(start)


# ---- resolve -----------------------------------------------------------------------------------


def resolve_step(rt: Runtime) -> ResolveResult:
    """Resolve and score what can be; the result carries the summaries of newly scored blocks."""
    from scoring.resolve import resolve_pending

    rt.set_job("resolve")
    t0 = time.monotonic()
    report = resolve_pending(rt.engine, rt.market, rt.settings.rewards)
    with session_scope(rt.engine) as s:
        scored = block_summaries(s, report.blocks_updated)
    seconds = time.monotonic() - t0
    log_event("resolve_done", seconds=round(seconds, 1), reward_version=report.reward_version,
              considered=report.considered, resolved=report.resolved, invalid_scored=report.invalid_scored,
              not_due=report.not_due, still_pending=report.still_pending)
    for b, m in scored.items():
        log_event("block_scored", block=b, kind=m.kind, n=m.n, valid=m.n_valid, accuracy=m.accuracy,
                  mean_reward=m.mean_composite, brier=m.brier, ece=m.ece, always_up_accuracy=m.always_up_accuracy,
                  adapter=version_label(m.adapter_version))
    return ResolveResult(report=report, scored=scored, seconds=seconds)


# ---- train -------------------------------------------------------------------------------------


def train_step(rt: Runtime, *, min_new: int | None = None) -> TrainResult:
    """One training round if at least `min_new` new scored episodes wait (or a round was interrupted).

    A failed round is recorded on its run row by the trainer and reported here; serving goes on.
    """
    from store.training import running_training_run
    from trainer.errors import TrainerError, TrainingStopped
    from trainer.round import NothingToTrain, train_round
    from trainer.sft import LossEvents, StopOnEvent

    s = rt.settings
    with session_scope(rt.engine) as sess:  # an empty offline set is the trainer's error, but not news here
        if not scored_block_ids(sess, kind="train") and running_training_run(sess, s.trainer.objective) is None:
            log_event("train_skipped", reason="no scored train blocks yet")
            return TrainResult(None, "no scored train blocks yet")
    need = min_new or train_threshold(s)
    rt.set_job("train")
    t0 = time.monotonic()
    try:
        result = train_round(rt.engine, s.trainer, s.rewards, rt.base_model_dir or s.agent.model,
                             device=s.agent.device, min_new_episodes=need,
                             callbacks=[StopOnEvent(rt.stop), LossEvents(_log_train_step)])
    except TrainingStopped as err:
        log_event("train_stopped", detail=str(err), seconds=round(time.monotonic() - t0, 1))
        raise Stopped() from None
    except TrainerError as err:
        log_event("train_failed", logging.ERROR, error=str(err), seconds=round(time.monotonic() - t0, 1))
        return TrainResult(None, f"round failed: {err}", time.monotonic() - t0)
    seconds = time.monotonic() - t0
    if isinstance(result, NothingToTrain):
        log_event("train_skipped", reason=result.reason)
        return TrainResult(None, result.reason, seconds)
    r = result
    losses = [p["loss"] for p in r.loss_curve if "loss" in p]
    log_event("train_done", candidate=version_label(r.adapter_version), run=r.run_id, examples=r.n_examples,
              blocks=r.block_ids, first_loss=losses[0] if losses else None,
              last_loss=losses[-1] if losses else None, resumed_from_step=r.resumed_from_step,
              restarted=r.restarted, seconds=round(seconds, 1))
    return TrainResult(r, None, seconds)


def _log_train_step(**fields: object) -> None:
    log_event("train_step", **fields)


# ---- gate and publish --------------------------------------------------------------------------


def gate_step(rt: Runtime, version: int, path: str | None = None) -> GateResult | None:
    """Run the serving adapter and candidate `version` on the same items drawn from the gate region
    (market.split) and let trainer.gate decide on the paired rewards; None when stop was set before
    both sides were scored."""
    from rewards.composite import reward_version
    from store.gate_decisions import paired_rewards
    from store.training import adapter_row, serving_adapter_row
    from trainer.gate import apply_verdict, decide

    s = rt.settings
    with session_scope(rt.engine) as sess:
        serving = serving_adapter_row(sess)
        serving_version, serving_path = (serving.version, serving.path) if serving else (None, None)
        if path is None:
            cand = adapter_row(sess, version)
            path = cand.path if cand is not None else None
    if s.trainer.gate_items == 0:
        return GateResult(version, path, serving_version, serving_path, passed=True, gated=False)
    rt.set_job(f"gate v{version}")
    region, items = gate_items(rt, s.trainer.gate_items, seed=version)
    rt.serve(serving_path, serving_version)
    serving_block = run_block_step(rt, size=len(items), kind="gate", items=items)
    if rt.stop.is_set():
        return None
    rt.serve(path, version)
    cand_block = _replay_items(rt, serving_block.items)
    if rt.stop.is_set():
        return None
    scored = resolve_step(rt).scored
    with session_scope(rt.engine) as sess:
        pairs = paired_rewards(sess, serving_block.block_id, cand_block.block_id, reward_version(s.rewards))
    verdict = decide([p.serving for p in pairs], [p.candidate for p in pairs], margin=s.trainer.gate_margin,
                     level=s.trainer.gate_level, seed=version)
    passed = apply_verdict(
        rt.engine, version, verdict, serving_version=serving_version, serving_block_id=serving_block.block_id,
        candidate_block_id=cand_block.block_id, region=region.record(),
        items=[[p.ticker, p.as_of.isoformat(), p.serving, p.candidate] for p in pairs])
    if s.trainer.confidence_map:
        fit_confidence_map_step(rt, version, cand_block.block_id)
    st = verdict.statistic
    log_event(f"gate_{verdict.decision}", candidate=version_label(version), serving=version_label(serving_version),
              pairs=st.n_pairs, serving_reward=st.serving_mean, candidate_reward=st.candidate_mean,
              mean_diff=st.mean_diff, ci_low=st.ci_low, ci_high=st.ci_high, ci_level=st.level,
              margin=verdict.margin, wins=st.wins, losses=st.losses, sign_p=st.p_value,
              region=f"{region.first}..{region.last}", items_from=min(a for _, a in items).date().isoformat(),
              items_to=max(a for _, a in items).date().isoformat())
    cand_fig = _gate_figures(scored.get(cand_block.block_id), cand_block.block_id)
    serving_fig = _gate_figures(scored.get(serving_block.block_id), serving_block.block_id) | {
        "adapter_version": serving_version}
    return GateResult(version, path, serving_version, serving_path, passed=passed,
                      candidate_figures=cand_fig, serving_figures=serving_fig, decision=verdict.decision,
                      statistic=verdict.record())


def fit_confidence_map_step(rt: Runtime, version: int, block_id: int) -> ConfidenceMap | None:
    """Candidate `version`'s confidence map from its gate block (trainer.gate), logged either way."""
    from rewards.calibration import MIN_POINTS
    from trainer.gate import fit_candidate_confidence_map

    cmap = fit_candidate_confidence_map(rt.engine, version, block_id)
    if cmap is None:
        log_event("confidence_map_skipped", candidate=version_label(version), block=block_id,
                  why=f"fewer than {MIN_POINTS} resolved gate predictions")
        return None
    log_event("confidence_map", candidate=version_label(version), n=cmap.n, accuracy=cmap.accuracy,
              knots=len(cmap.stated), low=cmap.calibrated[0], high=cmap.calibrated[-1])
    return cmap


def gate_items(rt: Runtime, n: int, *, seed: int) -> tuple[Region, list[tuple[str, datetime]]]:
    """`n` seeded (ticker, as_of) draws from the gate region: of the replay history, or in live mode of
    the resolved sessions no train item came near (market.split)."""
    from market.split import draw_items, timeline_split
    from store.gate_decisions import train_as_ofs

    s = rt.settings
    cal = rt.market.calendar
    if s.scheduler.mode == "live":
        with session_scope(rt.engine) as sess:
            trained = {cal.base_session(a) for a in train_as_ofs(sess, rt.market.name)}
        split = timeline_split(rt.market, s.market.horizon_days, mode="live", now=datetime.now(UTC), trained=trained)
    else:
        split = timeline_split(rt.market, s.market.horizon_days)
    drawn = draw_items(split.gate, rt.market.tickers, n, seed)
    return split.gate, [(t, cal.replay_as_of(d)) for t, d in drawn]


def _gate_figures(summary: BlockSummary | None, block_id: int) -> dict[str, object]:
    if summary is None:  # not scored (outcomes missing): the gate sees no figure
        return {k: None for k in GATE_FIGURES} | {"block_id": block_id}
    return summary.pick(GATE_FIGURES)


def _replay_items(rt: Runtime, items: list[tuple[str, datetime]]) -> BlockResult:
    """Run a gate block on exactly these (ticker, as_of) items (the serving side's draw)."""
    block = run_block_step(rt, size=len(items), kind="gate", items=items)
    if block.complete and block.items != items:  # the comparison would be meaningless on different items
        raise RuntimeError(f"gate block {block.block_id} did not reproduce the serving side's items")
    return block


def publish_step(rt: Runtime, gate: GateResult) -> PublishResult:
    """Serve what the gate decided: the candidate if it passed (published in the registry), else
    the adapter that served before the gate loaded the candidate."""
    from trainer import registry

    if gate.passed:
        registry.publish(rt.engine, gate.candidate_version)  # a no-op when the gate already published it
        rt.serve(gate.candidate_path, gate.candidate_version)
        log_event("adapter_published", adapter=version_label(gate.candidate_version),
                  gate=None if gate.gated else "off")
        return PublishResult(gate.candidate_version, published=True)
    rt.serve(gate.serving_path, gate.serving_version)
    return PublishResult(gate.serving_version, published=False)


# ---- evaluate and report -----------------------------------------------------------------------


def evaluate_step(rt: Runtime, *, targets: list[float], items: int) -> EvalResult:
    """Held-out evaluation of the serving adapter at several target scores (controllability)."""
    from evaluation.heldout import run_eval

    rt.set_job(f"eval {version_label(rt.serving_version)}")
    t0 = time.monotonic()
    res = run_eval(rt.engine, rt.policy, rt.market, rt.settings.agent, rt.settings.rewards, targets=targets,
                   n_items=items, horizon=rt.settings.market.horizon_days)
    log_event("eval_done", adapter=version_label(rt.serving_version), run=res.eval_run_id,
              spearman=res.spearman, status=res.status, seconds=round(time.monotonic() - t0, 1))
    return res


def report_step(rt: Runtime, out: Path) -> ReportResult:
    """Write the report's plots and index.html from the store."""
    from evaluation.report import market_p_star, write_report

    # p* as the rewards score it (flat band), not the sign-only figure
    res = write_report(rt.engine, out, p_star=market_p_star(rt.settings.market, rt.settings.rewards),
                       source=rt.engine.url.render_as_string(hide_password=True))
    log_event("report_written", index=str(res.index), plots=len(res.images), empty=len(res.empty_plots))
    return res

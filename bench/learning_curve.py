"""Does score-conditioned SFT make the tool-using agent better? One round of the product loop, measured with power.

The product path end to end, on the synthetic market (seed 7, unchanged):
  1. generate  the base SmolLM2 agent runs --train-items train-region items (independent (ticker, session)
               draws, the research plan reads this week's news first, every direction explored: up/down
               evenly, flat at its real rate), sampled at --temperature; `scoring.resolve` scores them.
  2. train     three arms on the same scored episodes with `trainer.round.train_round` (LoRA SFT, TRL):
                 score     every episode, its achieved score as the label (`Score: 0.83`), 1 epoch
                 filtered  each block's top quartile, no label (RAFT-style), 2 epochs (half the score arm's passes)
                 uncond    every episode, no label (the same fixed line for all), 1 epoch
                 boosted   uncond plus the score arm's boost (top quartile repeated twice): the score arm
                           without its label, so score - boosted is what the label itself adds
                 score_top the filtered arm's data (top quartile, 2 epochs), each example under its score label
                 filtered_r2, filtered_r3  later rounds of the loop: the parent arm's adapter writes a fresh
                           train block (items no earlier round had), and the round resumes its LoRA on that
                           block's top quartile; round minus parent is what one more turn of the loop adds
                 score_top_r2, score_top_r3  the same later rounds for the product's default (score_top)
               An optimizer step of 8 episodes (~500 tokens each) takes ~30 s on 2 cores in fp32, so one
               epoch over 320 episodes is ~20 min; micro-batches of 4 with 2 accumulation steps keep the
               eager-attention activations of a step under ~8 GB (batch 8 in one go was OOM-killed at 17 GB).
  3. evaluate  --eval-items eval-region items (disjoint in time from training, embargo >= horizon; independent
               draws), greedy, every arm on the same items at target 1.0; the score arm also on the first
               --ctrl-items of them at targets 0, 0.25, 0.5, 0.75 (controllability over 5 targets).
  4. analyse   paired differences item by item with 95% bootstrap intervals that resample *dates* (items on
               one date share the market factor, so the date is the unit of independence); accuracy split by
               whether the item has a visible signal headline; p* with the rewards' flat band; ECE; Spearman.

Each phase writes its results to --workdir/state.json before the next starts, so a run cut short keeps what
finished, and rerunning the same command resumes after the last finished phase. Run it from a git worktree
(`git worktree add /tmp/benchtree HEAD`), not the tree you edit: each eval phase opens a fresh database, and
Alembic loads the migration files from disk, so an edit mid-run can break a run hours in.

    .venv/bin/python bench/learning_curve.py --workdir /tmp/learn --arms score --temperature 0 --explore 0.3 \
        --loss-on weighted --balance   # the reported run (~1 h 50 min, 2 cores)
    .venv/bin/python bench/learning_curve.py --workdir /tmp/learnS --arms score --train-seed learn-train-2 \
        --temperature 0 --explore 0.3 --loss-on weighted --balance --out bench/results/learning_curve_score_s.md
        # run S: the reported run again on run I's independent train draw (learning_curve_seed2.md, filtered)
    .venv/bin/python bench/learning_curve.py --workdir /tmp/learn --arms filtered,filtered_r2,filtered_r3 \
        --temperature 0 --explore 0.3 --loss-on weighted --balance --out bench/results/learning_rounds.md
    .venv/bin/python bench/learning_curve.py --workdir /tmp/learnX --arms score_top,score_top_r2,score_top_r3 \
        --temperature 0 --explore 0.3 --loss-on weighted --balance --out bench/results/learning_rounds_score_top.md
        # run X: the default round on draw 1 (its base evaluation copied from learning_curve_state.json), then
        # its second and third rounds (~1 h 25 min)
    .venv/bin/python bench/learning_curve.py --workdir /tmp/learnZ --arms score_top,score_top_r2,score_top_r3 \
        --train-seed learn-train-3 --temperature 0 --explore 0.3 --loss-on weighted --balance \
        --out bench/results/learning_rounds_score_top_z.md
        # run Z: the same three turns on draw 3 (run V's state copied in without its score_top rows and training,
        # so round 1 regenerates V's block and adapter: the same answers on all 300 items)
    .venv/bin/python bench/learning_curve.py --tiny --train-items 16 --eval-items 12 --ctrl-items 4 --workdir /tmp/lt
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text

from agent.config import AgentConfig
from market.config import MarketConfig
from market.sources import build_market
from market.split import draw_items, timeline_split
from rewards.calibration import ConfidenceMap, fit_confidence_map
from rewards.components import calibration_score
from rewards.composite import normalised_weights
from rewards.config import RewardsConfig
from rewards.evaluation import spearman
from rewards.intervals import paired_difference
from rewards.metrics import brier_score, expected_calibration_error
from rewards.outcomes import realized_direction
from trainer.config import TrainerConfig

ARMS: dict[str, dict] = {
    "score": {"label_format": "score", "top": 1.0, "epochs": 1.0, "boost": 0.25, "passes": 2},
    "filtered": {"label_format": "none", "top": 0.25, "epochs": 2.0},
    "uncond": {"label_format": "none", "top": 1.0, "epochs": 1.0},
    "boosted": {"label_format": "none", "top": 1.0, "epochs": 1.0, "boost": 0.25, "passes": 2},
    # The filtered arm's data (top quartile, 2 epochs) under the score label: what the score arm's contract
    # (every example prefixed by its achieved score, the target at inference) costs on the data that replicates.
    "score_top": {"label_format": "score", "top": 0.25, "epochs": 2.0},
    # Later rounds of the loop: the parent's adapter serves a fresh train block (its own answers, explored as
    # the first round's), and the round resumes the parent's LoRA on that block alone, as the product does.
    "filtered_r2": {"label_format": "none", "top": 0.25, "epochs": 2.0, "parent": "filtered"},
    "filtered_r3": {"label_format": "none", "top": 0.25, "epochs": 2.0, "parent": "filtered_r2"},
    # The product's default round (score_top) turned twice more: its adapter serves each fresh block at the top
    # target, as `scheduler` does between rounds.
    "score_top_r2": {"label_format": "score", "top": 0.25, "epochs": 2.0, "parent": "score_top"},
    "score_top_r3": {"label_format": "score", "top": 0.25, "epochs": 2.0, "parent": "score_top_r2"},
}
CTRL_TARGETS = (0.0, 0.25, 0.5, 0.75)
SIGNAL_WORDS = ("estimates", "contract", "record revenue", "key customer", "recall")

ITEMS_SQL = """
SELECT p.id, p.ticker, p.as_of, p.direction, p.confidence, p.valid, o.correct, o.realized_return_pct,
       r.composite, e.id AS episode_id
FROM predictions p JOIN episodes e ON e.id = p.episode_id
LEFT JOIN outcomes o ON o.prediction_id = p.id
LEFT JOIN rewards r ON r.prediction_id = p.id
WHERE p.block_id = :b ORDER BY e.idx
"""
NEWS_SQL = "SELECT content FROM steps WHERE episode_id = :e AND role = 'tool' ORDER BY idx"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--train-items", type=int, default=320)
    p.add_argument("--train-seed", default="learn-train",
                   help="seed of the train-region draw: another value is a second, independent training set "
                        "(the held-out items do not change)")
    p.add_argument("--eval-items", type=int, default=300)
    p.add_argument("--ctrl-items", type=int, default=60)
    p.add_argument("--gate-items", type=int, default=100,
                   help="gate-region items each trained arm answers; its confidence map is fitted on them")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="tiny random model from tests/ (smoke run, numbers mean nothing)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the generated train data")
    p.add_argument("--explore", type=float, default=1.0, help="agent.explore_rate of the train items")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch; 2 accumulation steps make 8 per update")
    p.add_argument("--loss-on", choices=("assistant", "decision", "weighted"), default="assistant",
                   help="trainer.loss_on for every arm: all assistant tokens, the decision's only, or all with the "
                        "decision's weighted (--decision-weight)")
    p.add_argument("--decision-weight", type=float, default=20.0, help="trainer.decision_weight (loss_on weighted)")
    p.add_argument("--balance", action="store_true",
                   help="trainer.balance_directions for every arm: up and down equally common at every score level")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="also evaluate each arm with agent.guidance = W against Score 0.00 (arm name `<arm>+guided`)")
    shared_args(p, "learning_curve.md")
    return settle_out(p.parse_args(argv), "learning_curve.md")


def settle_out(args: argparse.Namespace, out: str) -> argparse.Namespace:
    """Default --out: the committed report in bench/results, except for a --tiny smoke run, whose numbers mean
    nothing and must never overwrite a real run's report (one did, unnoticed, at stop 24)."""
    if args.out is None:
        args.out = str(Path(args.workdir) / out if args.tiny else ROOT / "bench" / "results" / out)
    return args


def shared_args(p: argparse.ArgumentParser, out: str) -> None:
    """The LoRA, decoding and report options every learning bench takes (bench/research_rounds.py too)."""
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--targets-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    p.add_argument("--out", help=f"report path (default bench/results/{out}; a --tiny run's goes to its workdir)")
    p.add_argument("--report-only", action="store_true", help="rewrite --out from --workdir/state.json and stop")


# ---- state ---------------------------------------------------------------------------------------


class State:
    """The run's results so far, saved after every phase (resume = skip what is already there)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- phases --------------------------------------------------------------------------------------


def agent_cfg(args, model_dir: str, *, temperature: float, explore: float, guidance: float = 0.0) -> AgentConfig:
    return AgentConfig(model=model_dir, device="cpu", max_steps=1, min_tool_calls=1, temperature=temperature,
                       explore_rate=explore, max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                       max_batch_size=args.concurrency, max_repairs=1, guidance=guidance)


def as_of_items(market, items: list[tuple[str, date]]):
    return [(t, market.calendar.replay_as_of(d)) for t, d in items]


def region_items(market, split, region: str, n: int) -> list:
    """The first n items of a region's seeded draw (`learn-eval`, `learn-gate`): every bench that pairs with
    another answers these same items."""
    return as_of_items(market, draw_items(getattr(split, region), market.tickers, n, seed=f"learn-{region}"))


def block_rows(engine, block_id: int) -> list[dict]:
    with engine.connect() as c:
        rows = [dict(r) for r in c.execute(text(ITEMS_SQL), {"b": block_id}).mappings()]
        for r in rows:
            news = " ".join(x for (x,) in c.execute(text(NEWS_SQL), {"e": r["episode_id"]}))
            r["signal_in_context"] = any(w in news.lower() for w in SIGNAL_WORDS)
    return rows


def headline_link(market, rows: list[dict]) -> dict:
    """How often the generated episodes went the way their visible headline points, overall, in the top
    quartile by reward and below it: the link a label-ignoring model would learn from this data."""
    scored = [r for r in rows if r["composite"] is not None]
    q3 = top_cut(scored)
    out = {}
    for name, part in (("all", scored), ("top", [r for r in scored if r["composite"] >= q3]),
                       ("rest", [r for r in scored if r["composite"] < q3])):
        agree = n = 0
        for r in part:
            t, day = market.prices._ticker(r["ticker"]), date.fromisoformat(str(r["as_of"])[:10])
            b = market.prices.day_index(day)
            lean = market.prices.visible_drift(t, b, market.horizon_days) - market.prices.base_drift * market.horizon_days
            if abs(lean) > 1e-12:
                n += 1
                agree += r["direction"] == ("up" if lean > 0 else "down")
        out[name] = {"signal_items": n, "went_with_headline": agree}
    return out


def data_stats(market, rows: list[dict]) -> dict:
    """What a generated train block holds: how right it is, and how often it follows a visible headline."""
    return {"n": len(rows), "accuracy": mean([r["correct"] for r in rows if r["correct"] is not None]),
            "mean_reward": mean([r["composite"] for r in rows if r["composite"] is not None]),
            "valid": mean([float(bool(r["valid"])) for r in rows]),
            "signal_in_context": mean([float(r["signal_in_context"]) for r in rows]),
            "directions": {d: sum(r["direction"] == d for r in rows) for d in ("up", "down", "flat")},
            "headline_link": headline_link(market, rows)}


def write_block(args, engine, market, model_dir: str, items: list[tuple[str, date]], *,
                adapter: tuple[str, int] | None = None, label_format: str = "score",
                cfg: AgentConfig | None = None) -> tuple[int, list[dict], float]:
    """Run the agent (the base model, or `adapter` = (path, version)) over `items` as a train block at the
    run's temperature and exploration (or with `cfg`), score it with `scoring.resolve`; (block id, rows, seconds)."""
    from agent.runner import run_block
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending

    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, batch_wait_ms=20)
    if adapter is not None:
        policy.load_adapter(*adapter)
    t0 = time.perf_counter()
    try:
        cfg = cfg or agent_cfg(args, model_dir, temperature=args.temperature, explore=args.explore)
        bid = run_block(engine, policy, market, cfg,
                        RewardsConfig(label_format=label_format), kind="train", items=as_of_items(market, items),
                        size=len(items), target_score=0.95, progress=False, horizon=market.horizon_days)
    finally:
        policy.close()
    resolve_pending(engine, market, RewardsConfig())
    return bid, block_rows(engine, bid), time.perf_counter() - t0


def generate(args, st: State, market, split, model_dir: str, work: Path) -> None:
    from store.db import open_store

    db = work / "gen.db"
    if db.exists():
        db.unlink()
    engine = open_store(f"sqlite:///{db}")
    bid, rows, seconds = write_block(args, engine, market, model_dir, train_draw(args, market, split))
    engine.dispose()
    st.data["generate"] = {"block_id": bid, **data_stats(market, rows), "seconds": seconds}
    st.save()
    log(f"generate: {st.data['generate']}")


def lineage(arm: str) -> list[str]:
    """The round arms from the first later round down to `arm` (empty for a first-round arm)."""
    chain = []
    while "parent" in ARMS[arm]:
        chain.append(arm)
        arm = ARMS[arm]["parent"]
    return chain[::-1]


def train_draw(args, market, split, arm: str | None = None) -> list[tuple[str, date]]:
    """The train items an arm's generation runs on: the first round's seeded draw, and for each later round
    a fresh draw of --train-items from the same region that leaves out every earlier round's items, so a
    round never trains twice on one (ticker, session)."""
    items = draw_items(split.train, market.tickers, args.train_items, seed=args.train_seed)
    if arm is None:
        return items
    seen = set(items)
    for a in lineage(arm):
        items = fresh_draw(market, split, args.train_items, f"{args.train_seed}|{a}", seen)
        seen |= set(items)
    return items


def fresh_draw(market, split, n: int, seed: str, seen: set[tuple[str, date]]) -> list[tuple[str, date]]:
    """`n` train-region items (fewer if the region runs out) none of which is in `seen`, seeded, in session
    order: a later round's items, so a round never trains twice on one (ticker, session)."""
    order = {t: i for i, t in enumerate(market.tickers)}
    rest = [(t, d) for d in split.train.sessions for t in market.tickers if (t, d) not in seen]
    return sorted(random.Random(seed).sample(rest, min(n, len(rest))), key=lambda it: (it[1], order[it[0]]))


def top_cut(rows: list[dict]) -> float:
    """The reward at which a block's top quartile starts (what a filtered round trains on)."""
    scored = sorted(r["composite"] for r in rows if r["composite"] is not None)
    return scored[int(0.75 * len(scored))] if scored else 0.0


def generate_round(args, st: State, arm: str, market, split, model_dir: str, work: Path) -> None:
    """A later round's data: the parent arm's store, its adapter made the serving one, writes a new train block
    on fresh items (the same temperature and exploration as the first round) that `scoring.resolve` scores."""
    from store.db import open_store, session_scope
    from store.training import flip_serving

    parent = ARMS[arm]["parent"]
    trained = st.data["train"][parent]
    db = work / f"{arm}.db"
    shutil.copyfile(work / f"{parent}.db", db)
    engine = open_store(f"sqlite:///{db}")
    with session_scope(engine) as s:
        flip_serving(s, trained["version"])
    bid, rows, seconds = write_block(args, engine, market, model_dir, train_draw(args, market, split, arm),
                                     adapter=(trained["path"], trained["version"]),
                                     label_format=ARMS[parent]["label_format"])
    engine.dispose()
    st.data.setdefault("generate_rounds", {})[arm] = {"parent": parent, "block_id": bid, **data_stats(market, rows),
                                                      "seconds": seconds}
    st.save()
    log(f"generate {arm}: {st.data['generate_rounds'][arm]}")


def train(args, st: State, arm: str, model_dir: str, work: Path, *, spec: dict | None = None,
          source_db: Path | None = None) -> None:
    """Train `arm` (its ARMS entry, or `spec`) with the product's `train_round` in `work/<arm>.db`: a copy of
    `source_db` (default gen.db) for a first-round arm; a later round trains in the store its generation wrote
    (the parent's, resumed)."""
    from store.db import open_store
    from trainer.round import NothingToTrain, train_round

    spec = spec or ARMS[arm]
    db = work / f"{arm}.db"
    if "parent" not in spec:
        shutil.copyfile(source_db or work / "gen.db", db)
    engine = open_store(f"sqlite:///{db}")
    cfg = TrainerConfig(adapters_dir=str(work / f"adapters-{arm}"), runs_dir=str(work / f"runs-{arm}"),
                        objective=spec.get("objective", "sft"), learning_rate=spec.get("lr", args.lr),
                        epochs=spec["epochs"], batch_size=spec.get("batch_size", args.batch_size),
                        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, replay_size=0,
                        grad_accum=spec.get("grad_accum", 2),
                        target_modules=args.targets_modules.split(","), filter_top_fraction=spec["top"],
                        save_steps=10, boost_top_fraction=spec.get("boost", 0.0),
                        boost_passes=spec.get("passes", 0), loss_on=args.loss_on,
                        decision_weight=args.decision_weight, balance_directions=args.balance,
                        tool_choice_weight=spec.get("tool_weight", 1.0),
                        decision_from=spec.get("decision_from", "all"))
    t0 = time.perf_counter()
    rewards = RewardsConfig(label_format=spec["label_format"],
                            **({"quantile_bins": spec["bins"]} if "bins" in spec else {}))
    every = getattr(args, "snapshot_every", 0) or 0
    snap_dir = work / f"snapshots-{arm}"
    callbacks = [snapshot_callback(snap_dir, every)] if every > 0 else []
    res = train_round(engine, cfg, rewards, model_dir, device="cpu", min_new_episodes=1, callbacks=callbacks)
    engine.dispose()
    if isinstance(res, NothingToTrain):
        raise SystemExit(f"train {arm}: nothing to train: {res.reason}")
    losses = [p.get("loss") for p in getattr(res, "loss_curve", []) if p.get("loss") is not None]
    st.data.setdefault("train", {})[arm] = {
        "path": res.path, "version": res.adapter_version, "parent_version": res.parent_version,
        "n_examples": res.n_examples, "seconds": time.perf_counter() - t0,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "steps": len(losses)}
    if every > 0:
        st.data["train"][arm]["snapshots"] = snapshots(snap_dir)
    st.save()
    log(f"train {arm}: {st.data['train'][arm]}")


def snapshot_callback(folder: Path, every: int):
    """A TrainerCallback that saves the LoRA adapter every `every` optimizer updates to folder/step-N.

    The product's round keeps checkpoints only to resume and deletes them once its adapter is saved, so the
    adapter at update 90 of a 180-update round is otherwise lost: these snapshots are what lets a bench read
    where along a round a behaviour sets in (the research onset of runs Q and R). A resumed round keeps the
    snapshots already written and adds the later ones."""
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 and state.is_world_process_zero and model is not None:
                model.save_pretrained(str(folder / f"step-{state.global_step}"))

    return Snapshots()


def snapshots(folder: Path) -> dict[str, str]:
    """The adapter snapshots in folder, {updates: path}, in update order (only complete saves)."""
    found = [(int(d.name.split("-")[1]), d) for d in folder.glob("step-*") if (d / "adapter_config.json").exists()
             and any(d.glob("adapter_model.*"))]
    return {str(n): str(d) for n, d in sorted(found)}


def run_key(arm: str, target: float, region: str = "eval") -> str:
    return f"{arm}@{target:.2f}" + ("" if region == "eval" else f"|{region}")


def evaluate(args, st: State, market, split, model_dir: str, work: Path,
             runs: list[tuple[str, float, int] | tuple[str, float, int, str]]) -> None:
    """Each (arm, target, n_items[, region]) on the same items of its region (the first n of one seeded
    draw), greedy. Region `eval` is the held-out set; `gate` (disjoint from both, embargoed) is where a
    trained arm's confidence map is fitted, as the product's gate step does."""
    from agent.runner import run_block
    from policy.local import LocalPolicy
    from scoring.resolve import resolve_pending
    from store.db import open_store

    db = work / "eval.db"
    engine = open_store(f"sqlite:///{db}")
    items = region_items(market, split, "eval", args.eval_items)
    random.Random("learn-ctrl").shuffle(items)  # the controllability subset is a random part of the draw
    regions = {"eval": items}
    policy = LocalPolicy(model_dir, device="cpu", max_batch_size=args.concurrency, batch_wait_ms=20)
    done = st.data.setdefault("eval", {})
    try:
        for arm, target, n, *rest in runs:
            region = rest[0] if rest else "eval"
            key = run_key(arm, target, region)
            if key in done:
                continue
            if region not in regions:
                regions[region] = region_items(market, split, region, n)
            trained, _, how = arm.partition("+")  # `<arm>+guided`: the same adapter, direction by guidance
            path = None if trained == "base" else st.data["train"][trained]["path"]
            policy.load_adapter(path, None if path is None else 1)
            fmt = "score" if trained in ("base", "score") else ARMS[trained]["label_format"]
            guidance = args.guidance if how == "guided" else 0.0
            t0 = time.perf_counter()
            bid = run_block(engine, policy, market, agent_cfg(args, model_dir, temperature=0.0, explore=0.0,
                                                              guidance=guidance),
                            RewardsConfig(label_format=fmt), kind=region, items=regions[region][:n], size=n,
                            target_score=target, progress=False, horizon=market.horizon_days)
            resolve_pending(engine, market, RewardsConfig())
            rows = block_rows(engine, bid)
            done[key] = {"arm": arm, "target": target, "region": region, "block_id": bid, "seconds": time.perf_counter() - t0,
                         "rows": rows}
            st.save()
            log(f"eval {key}: n={len(rows)} acc={mean([r['correct'] for r in rows if r['correct'] is not None])} "
                f"reward={mean([r['composite'] for r in rows])} in {done[key]['seconds']:.0f}s")
    finally:
        policy.close()
        engine.dispose()


# ---- statistics ----------------------------------------------------------------------------------


def mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def item_key(r: dict) -> tuple[str, str]:
    return r["ticker"], str(r["as_of"])


def scored_points(rows: list[dict]) -> tuple[list[float], list[bool]]:
    pts = [(r["confidence"], bool(r["correct"])) for r in rows
           if r["correct"] is not None and r["confidence"] is not None]
    return [c for c, _ in pts], [y for _, y in pts]


def ece(rows: list[dict]) -> float | None:
    return expected_calibration_error(*scored_points(rows))


def brier(rows: list[dict]) -> float | None:
    return brier_score(*scored_points(rows))


def on_date(key: tuple[str, str]) -> str:
    return key[1][:10]


def visible_signal(market, r: dict) -> bool:
    return market.prices.signal_visible(r["ticker"], date.fromisoformat(str(r["as_of"])[:10]), market.horizon_days)


def bayes_rows(market, rows: list[dict]) -> list[dict]:
    """The Bayes rule on the same items: the likeliest of up / flat / down given every headline up to as_of
    (the generating process's exact class probabilities, as p*band uses), scored against the realized return
    with the rewards' flat band. The ceiling on *these* items, paired, where p*band is the whole history's."""
    syn, h, band = market.prices, market.horizon_days, RewardsConfig().flat_band_pct
    out = []
    for r in rows:
        if r["realized_return_pct"] is None:
            continue
        mu = syn.visible_drift(syn.tickers.index(r["ticker"]), syn.day_index(date.fromisoformat(str(r["as_of"])[:10])), h)
        probs = dict(zip(("up", "flat", "down"), syn.item_class_probs(mu, h, band), strict=True))
        best = max(probs, key=probs.get)
        out.append({"ticker": r["ticker"], "as_of": r["as_of"], "direction": best, "confidence": probs[best],
                    "correct": int(realized_direction(r["realized_return_pct"], band) == best), "composite": None,
                    "realized_return_pct": r["realized_return_pct"]})
    return out


def arm_confidence_map(st: State, arm: str) -> ConfidenceMap | None:
    """The arm's confidence map, fitted on its gate-region answers exactly as the product's gate does."""
    g = st.data.get("eval", {}).get(run_key(arm, 1.0, "gate"))
    return None if not g else fit_confidence_map(*scored_points(g["rows"]))


def as_published(rows: list[dict], cmap: ConfidenceMap | None) -> list[dict]:
    """The rows as the product publishes them while this adapter serves: the stated confidence through the
    map, and the composite rescored for the changed calibration component (nothing else moves)."""
    if cmap is None:
        return rows
    w = normalised_weights(RewardsConfig())["calibration"]
    out = []
    for r in rows:
        r = dict(r)
        if r["confidence"] is not None and r["correct"] is not None:
            new = cmap.apply(r["confidence"])
            if r["composite"] is not None:
                r["composite"] += w * (calibration_score(new, bool(r["correct"]))
                                       - calibration_score(r["confidence"], bool(r["correct"])))
            r["confidence"] = new
        out.append(r)
    return out


def fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def report(args, st: State, market) -> str:
    h = market.horizon_days
    band = RewardsConfig().flat_band_pct
    p_band = market.prices.bayes_accuracy_band(h, band)
    p_sign = market.prices.bayes_accuracy(h)
    ev = st.data.get("eval", {})
    lines = ["# Learning on the synthetic market: one round of the product loop, measured with power", ""]
    lines += [f"Command: `.venv/bin/python bench/learning_curve.py {st.data.get('command', '')}`", "",
              (f"Market: synthetic, seed {MarketConfig().synthetic.seed} (unchanged), horizon {h}, flat band {band}%: "
              f"p*band = {p_band:.3f} (sign-only p* = {p_sign:.3f}); target accuracy 0.9 x p*band = {0.9 * p_band:.3f}."),
              ""]
    g = st.data.get("generate")
    if g:
        lines += [(f"Generated train data: {g['n']} episodes by the base model (temperature {args.temperature}, "
                  f"explore {args.explore}), accuracy {fmt(g['accuracy'])}, mean reward {fmt(g['mean_reward'])}, "
                  f"valid {fmt(g['valid'])}, a signal headline in context on {fmt(g['signal_in_context'])} of them; "
                  f"{g['seconds'] / 60:.1f} min."), ""]
        link = g.get("headline_link")
        if link:
            k = ARMS["score"].get("passes", 0)
            every, top = link["all"], link["top"]
            boosted = (f"{every['went_with_headline'] + k * top['went_with_headline']}/"
                       f"{every['signal_items'] + k * top['signal_items']}")
            parts = "; ".join(f"{n} {v['went_with_headline']}/{v['signal_items']}" for n, v in link.items())
            lines += [(f"Went the way the visible headline points (signal items only; what a model that ignores the "
                       f"label can learn from this data): {parts} (top = the top quartile by reward). With the top "
                       f"quartile repeated {k} more times (the score arm's data): {boosted}."), ""]
    for arm, r in st.data.get("generate_rounds", {}).items():
        link = r["headline_link"]
        parts = "; ".join(f"{n} {v['went_with_headline']}/{v['signal_items']}" for n, v in link.items())
        dirs = ", ".join(f"{d} {n}" for d, n in r["directions"].items() if n)
        lines += [(f"Round `{arm}`: {r['n']} fresh train items written by `{r['parent']}`'s adapter (the same "
                   f"temperature and exploration), accuracy {fmt(r['accuracy'])}, mean reward {fmt(r['mean_reward'])}, "
                   f"valid {fmt(r['valid'])}, directions {dirs}; went the way the visible headline points: {parts}; "
                   f"{r['seconds'] / 60:.1f} min."), ""]
    for arm, t in st.data.get("train", {}).items():
        lines.append(f"- train `{arm}`: {t['n_examples']} examples, {t['steps']} logged steps, loss "
                     f"{fmt(t['loss_first'])} -> {fmt(t['loss_last'])}, {t['seconds'] / 60:.1f} min")
    lines.append("")
    base = ev.get("base@1.00")
    maps = {k.split("@")[0]: arm_confidence_map(st, k.split("@")[0]) for k in ev if k.endswith("@1.00|gate")}
    # (name, rows, minutes): each arm as stated, and as published (with its confidence map) where it has one
    views: dict[str, tuple[list[dict], float]] = {}
    for key, e in ev.items():
        if key.endswith("@1.00"):
            views[e["arm"]] = (e["rows"], e["seconds"] / 60)
            if maps.get(e["arm"]) is not None:
                views[e["arm"] + " (mapped)"] = (as_published(e["rows"], maps[e["arm"]]), e["seconds"] / 60)
    if base and hasattr(market.prices, "item_class_probs"):  # the synthetic market's exact ceiling, same items
        views["Bayes rule"] = (bayes_rows(market, base["rows"]), 0.0)
    if base:
        lines += ["## Held-out figures at target 1.0 (same items, greedy)", "",
                  ("`Bayes rule`: the likeliest of up / flat / down given every headline before as_of, from the "
                   "market's generating process (what p*band averages over the whole history), on the same items: "
                   "the ceiling an agent can reach on them. It writes no magnitude, so it has no reward."), "",
                  ("`(mapped)`: the same answers as the product publishes them once the arm's confidence map "
                  "(fitted on its gate-region answers, below) is applied; direction and accuracy do not change."), "",
                  ("| arm | n | accuracy | acc, signal visible | acc, no signal | mean reward | Brier | ECE | "
                  "acc / p*band | minutes |"), "|---|---|---|---|---|---|---|---|---|---|"]
        for name, (all_rows, minutes) in views.items():
            rows = [r for r in all_rows if r["correct"] is not None]
            vis = [r for r in rows if visible_signal(market, r)]
            inv = [r for r in rows if not visible_signal(market, r)]
            acc = mean([r["correct"] for r in rows])
            lines.append(f"| {name} | {len(all_rows)} | {fmt(acc)} | {fmt(mean([r['correct'] for r in vis]))} "
                         f"(n={len(vis)}) | {fmt(mean([r['correct'] for r in inv]))} (n={len(inv)}) | "
                         f"{fmt(mean([r['composite'] for r in all_rows]))} | {fmt(brier(rows))} | {fmt(ece(rows))} | "
                         f"{fmt(acc / p_band if acc is not None else None, 2)} | {minutes:.1f} |")
        always_up = mean([float((r["realized_return_pct"] or 0) > band) for r in base["rows"]
                          if r["realized_return_pct"] is not None])
        vis_rows = [r for r in base["rows"] if visible_signal(market, r)]
        covered = mean([float(r["signal_in_context"]) for r in vis_rows])
        dirs = {k: sorted({r["direction"] for r in e["rows"] if r["direction"]}) for k, e in ev.items()}
        lines += ["", (f"Always-up accuracy on these items (with the band): {fmt(always_up)}. Research reach: a signal "
                  f"headline was in the context of {fmt(covered)} of the {len(vis_rows)} items whose signal is visible "
                  "(the research plan's search_news over the last 7 days)."),
                  "Directions written (greedy): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in dirs.items()) + ".",
                  ""]
        if maps:
            lines += ["## Confidence maps, fitted on each arm's gate-region answers (as the product's gate does)", "",
                      "| arm | gate items | gate accuracy | stated confidence (mean) | map: stated -> published |",
                      "|---|---|---|---|---|"]
            for arm, cmap in maps.items():
                g = ev[run_key(arm, 1.0, "gate")]["rows"]
                conf, _ = scored_points(g)
                knots = "-" if cmap is None else ", ".join(
                    f"{x:.2f}->{y:.2f}" for x, y in zip(cmap.stated, cmap.calibrated, strict=True))
                lines.append(f"| {arm} | {len(g)} | {fmt(mean([r['correct'] for r in g if r['correct'] is not None]))} "
                             f"| {fmt(mean(conf))} | {knots} |")
            lines.append("")
        lines += ["## Paired differences (arm minus other, same items); 95% interval resampling dates", "",
                  "| comparison | figure | difference | 95% interval | items | dates |", "|---|---|---|---|---|---|"]
        names = list(views)
        pairs = [(a, "base") for a in names if a not in ("base", "Bayes rule")]
        pairs += [(a, "Bayes rule") for a in names if "(mapped)" not in a and a != "Bayes rule"]
        # score vs each unlabelled arm; boosted vs uncond is what the boost alone adds
        rounds = [(a, ARMS[a]["parent"]) for a in ARMS if "parent" in ARMS[a]]  # what each later round adds
        for one, other in [("score", "filtered"), ("score", "uncond"), ("score", "boosted"), ("boosted", "uncond"),
                           ("score_top", "score"), ("score_top", "filtered"), *rounds]:
            for suffix in ("", " (mapped)"):
                if one + suffix in views and other + suffix in views:
                    pairs.append((one + suffix, other + suffix))
        for a, b in pairs:
            ra = {item_key(r): r for r in views[a][0]}
            rb = {item_key(r): r for r in views[b][0]}
            common = sorted(set(ra) & set(rb))
            # the Bayes rule has no reward: against it, accuracy on all items and on those with a visible signal
            for fig in (("correct", "visible") if b == "Bayes rule" else ("correct", "composite")):
                if fig == "correct" and "(mapped)" in a and a.replace(" (mapped)", "") in views and (
                        b == "base" or "(mapped)" in b):
                    continue  # the map does not change a direction: same accuracy row as unmapped
                keys = [k for k in common if visible_signal(market, ra[k])] if fig == "visible" else common
                col = "correct" if fig == "visible" else fig
                d = paired_difference({k: ra[k][col] for k in keys}, {k: rb[k][col] for k in keys}, on_date,
                                      n_boot=args.boot)
                if d is None:
                    continue
                name = {"correct": "accuracy", "composite": "mean reward", "visible": "acc, signal visible"}[fig]
                lines.append(f"| {a} - {b} | {name} | {d.mean:+.3f} | "
                             f"[{d.low:+.3f}, {d.high:+.3f}] | {d.n_items} | {d.n_clusters} |")
        lines.append("")
    ctrl = [(t, ev.get(f"score@{t:.2f}")) for t in (*CTRL_TARGETS, 1.0)]
    if all(e is not None for _, e in ctrl):
        keys = {item_key(r) for r in ctrl[0][1]["rows"]}
        cmap = maps.get("score")
        lines += [("## Controllability: the score arm's realized mean reward per conditioned target "
                  f"({len(keys)} items, the same for every target)"), "",
                  "| target | mean reward, stated | mean reward, mapped | accuracy | directions | mean stated confidence |",
                  "|---|---|---|---|---|---|"]
        xs, ys, ym = [], [], []
        for t, e in ctrl:
            rows = [r for r in e["rows"] if item_key(r) in keys]
            mr = mean([r["composite"] for r in rows])
            mm = mean([r["composite"] for r in as_published(rows, cmap)]) if cmap else None
            counts = {d: sum(r["direction"] == d for r in rows) for d in ("up", "down", "flat")}
            lines.append(f"| {t:.2f} | {fmt(mr)} | {fmt(mm)} | "
                         f"{fmt(mean([r['correct'] for r in rows if r['correct'] is not None]))} | "
                         f"{' '.join(f'{d} {n}' for d, n in counts.items() if n)} | "
                         f"{fmt(mean([r['confidence'] for r in rows]))} |")
            xs.append(t)
            ys.append(mr or 0.0)
            ym.append(mm or 0.0)
        rho = spearman(xs, ys)
        answers = [[(r["direction"], r["confidence"]) for r in sorted(e["rows"], key=item_key) if item_key(r) in keys]
                   for _, e in ctrl]
        why = ""
        if len(set(ys)) == 1:
            why = " (undefined: the same reward at every target, the label is ignored)"
        elif all(a == answers[0] for a in answers):
            why = (f" (noise: every target got the same direction and confidence on every item; the rewards differ by "
                   f"{max(ys) - min(ys):.4f}, from magnitude digits only, so the label is ignored)")
        lines += ["", f"Spearman(target, realized mean reward) = {fmt(rho, 2)}{why} as stated"
                  + (f", {fmt(spearman(xs, ym), 2)} as published (mapped)" if cmap else "") + " (target >= 0.9).", ""]
    return "\n".join(lines) + "\n"


def bench_setup(args: argparse.Namespace) -> tuple[Path, object, object, str]:
    """What every learning bench starts from: its workdir (created), the synthetic market (seed 7), the
    timeline split, and the model folder (SmolLM2-135M, or a tiny random model for a --tiny smoke run)."""
    from policy.model_files import make_tiny_model, resolve_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    market = build_market(MarketConfig())
    split = timeline_split(market, market.horizon_days)
    model_dir = resolve_model(getattr(args, "model", "smollm2-135m"))
    if args.tiny:
        model_dir = str(make_tiny_model(work / "tiny", model_dir))
    return work, market, split, model_dir


def run_settings(args: argparse.Namespace, st: State) -> argparse.Namespace:
    """The settings a --report-only call reports: the run's own, parsed from the command its state stored, with
    this call's --out, --workdir and --boot. The header names the run's temperature, exploration and train draw,
    and a report-only call that left those flags out once wrote the defaults (0.7, 1.0) into run S's header."""
    command = st.data.get("command")
    if not command:
        return args
    run = parse_args(shlex.split(command))
    run.out, run.workdir, run.boot, run.report_only = args.out, args.workdir, args.boot, True
    return run


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work, market, split, model_dir = bench_setup(args)
    st = State(work / "state.json")
    if args.report_only:
        args = run_settings(args, st)
        g = st.data.get("generate")
        if g and "headline_link" not in g and (work / "gen.db").exists():  # runs from before it was recorded
            from store.db import open_store

            engine = open_store(f"sqlite:///{work / 'gen.db'}")
            g["headline_link"] = headline_link(market, block_rows(engine, g["block_id"]))
            engine.dispose()
            st.save()
        Path(args.out).write_text(report(args, st, market))
        return
    st.data.setdefault("command", " ".join(sys.argv[1:] if argv is None else argv))
    arms = [a for a in args.arms.split(",") if a]
    log(f"split: {split.record() if hasattr(split, 'record') else split}")

    def write() -> None:
        Path(args.out).write_text(report(args, st, market))

    # Most telling first (a run cut short keeps it): base, then each arm trained and evaluated in turn.
    if "generate" not in st.data:
        generate(args, st, market, split, model_dir, work)
    evaluate(args, st, market, split, model_dir, work, [("base", 1.0, args.eval_items)])
    write()
    if args.guidance > 0:  # the untrained model with guidance, and its confidence map from the gate region
        for run in [("base+guided", 1.0, args.eval_items), ("base+guided", 1.0, args.gate_items, "gate")]:
            evaluate(args, st, market, split, model_dir, work, [run])
            write()
    for arm in arms:
        if "parent" in ARMS[arm] and arm not in st.data.get("generate_rounds", {}):
            if ARMS[arm]["parent"] not in st.data.get("train", {}):
                raise SystemExit(f"{arm} continues {ARMS[arm]['parent']}: list that arm before it in --arms")
            generate_round(args, st, arm, market, split, model_dir, work)
        if arm not in st.data.get("train", {}):
            train(args, st, arm, model_dir, work)
        runs = [(arm, 1.0, args.eval_items), (arm, 1.0, args.gate_items, "gate")] + (
            [("score", t, args.ctrl_items) for t in CTRL_TARGETS] if arm == "score" else []) + (
            [(arm + "+guided", 1.0, args.eval_items), (arm + "+guided", 1.0, args.gate_items, "gate")]
            if args.guidance > 0 and arm == "score" else [])
        for run in runs:
            evaluate(args, st, market, split, model_dir, work, [run])
            write()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()

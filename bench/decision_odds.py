"""Reading or prior? Each adapter's up-against-down log-odds at the decision, scored on its own held-out traces.

Why: a round's adapters swing between draws from `up` on three items in four to `down` on nine in ten
(learning_history.md, run Y), while the blocks they trained on lean the same way (~230 `down`, ~75 `up`).
A greedy answer mixes two things: how the adapter ranks the items (does a bullish headline raise its odds of
`up`?) and where it puts the cut (a bias every item shares). This bench separates them without a new run:
for each arm of a finished `bench/learning_curve.py` workdir it rebuilds, from the trace in the workdir's
eval.db, the chat at the final answer up to `"direction": "`, and scores the three directions' first tokens
under that arm's adapter (`LocalPolicy.choice_logprobs`, one forward pass per item; ~1 s here). Then:

  - AUC of s = log p(up) - log p(down): against the realized direction (items that went up or down), and on
    items whose headline is visible, against the Bayes direction. The ranking alone, whatever the cut.
  - accuracy when the cut is matched on the gate region (disjoint in time, before the held-out weeks with an
    embargo, outcomes known when the held-out block is written): the offset that makes the adapter's share of
    `up` on the gate items equal the gate's realized share of `up` among up/down outcomes, applied unchanged to
    the held-out items. Paired against the same adapter's greedy answers and against the untrained agent's
    (the state's base rows), intervals resampling dates.

`base` is scored on the first adapter arm's traces (the research is plan-driven, so the contexts are the same
news and prices; the untrained agent's own traces are not in the workdir when its rows were copied in).
The greedy direction is the first token's argmax under a grammar that tokenizes the prefix its own way, so
the bench prints how often the scored argmax agrees with the recorded answer.

    .venv/bin/python bench/decision_odds.py --workdir /tmp/learnZ --arms base,score_top,score_top_r2,score_top_r3 \
        --out bench/results/decision_odds_z.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learning_curve as lc
from learning_curve import fmt
from sqlalchemy import text

from market.config import MarketConfig
from market.sources import build_market
from rewards.config import RewardsConfig
from rewards.intervals import paired_difference
from rewards.outcomes import realized_direction

DIRECTIONS = ("down", "flat", "up")
DIRECTION_AT = re.compile(r'"direction"\s*:\s*"')
STEPS_SQL = ("SELECT s.role, s.content FROM steps s JOIN episodes e ON e.id = s.episode_id "
             "WHERE s.episode_id = :e AND s.attempt = e.attempt ORDER BY s.idx")


def decision_context(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str] | None:
    """The chat before the final answer and the answer's text up to its direction's opening quote; None when
    the episode has no final answer with a direction (nothing to score)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    found = DIRECTION_AT.search(messages[last]["content"])
    if found is None:
        return None
    return messages[:last], messages[last]["content"][: found.end()]


def auc(pos: list[float], neg: list[float]) -> float | None:
    """P(a positive scores above a negative), ties half (the Mann-Whitney statistic, from ranks)."""
    from scipy.stats import rankdata  # scikit-learn's dependency

    if not pos or not neg:
        return None
    r = rankdata([*pos, *neg])
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def auc_difference(a: dict, b: dict, up: dict, *, n_boot: int = 2000, seed: int = 0) -> list[float] | None:
    """AUC(a) - AUC(b) on the items both scored ({item: s}, `up`: {item: realized up?}, up/down items only),
    with a 95% interval that resamples dates (items on one date share the market factor)."""
    items = [k for k in a if k in b and k in up]
    if not items:
        return None
    dates = sorted({k[1] for k in items})
    by_date = {d: [k for k in items if k[1] == d] for d in dates}

    def diff(keys):
        aucs = [auc([arm[k] for k in keys if up[k]], [arm[k] for k in keys if not up[k]]) for arm in (a, b)]
        return None if None in aucs else aucs[0] - aucs[1]

    rng = np.random.default_rng(seed)
    boots = [x for _ in range(n_boot)
             if (x := diff([k for d in rng.choice(dates, size=len(dates)) for k in by_date[d]])) is not None]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return [diff(items), float(lo), float(hi)]


def matched_offset(scores: list[float], up_share: float) -> float:
    """The offset d for which a share `up_share` of `scores` has s + d > 0 (the cut at that quantile)."""
    ranked = sorted(scores, reverse=True)
    k = round(up_share * len(ranked))
    if k <= 0:
        return -ranked[0] - 1e-6
    if k >= len(ranked):
        return -ranked[-1] + 1e-6
    return -(ranked[k - 1] + ranked[k]) / 2


def read_only(db: Path):
    """A read-only engine on a bench database. Not `store.db.open_store`: the store begins every transaction
    with BEGIN IMMEDIATE (the write lock), and a scorer holding it while the model runs locked out a
    learning_curve run writing the same eval.db."""
    from sqlalchemy import create_engine

    if not db.exists():
        raise SystemExit(f"{db} does not exist: point --workdir at a finished bench/learning_curve.py workdir")
    return create_engine(f"sqlite:///file:{db}?mode=ro&uri=true")


def score_rows(policy, engine, rows: list[dict]) -> list[dict]:
    """Each row with its directions' log-probabilities at the decision (rows without a decision left out).
    Each trace is read in its own short transaction, so no lock is held while the model runs."""
    out = []
    for r in rows:
        with engine.connect() as c:
            msgs = [dict(m) for m in c.execute(text(STEPS_SQL), {"e": r["episode_id"]}).mappings()]
        ctx = decision_context(msgs)
        if ctx is None or r["realized_return_pct"] is None:
            continue
        lp = policy.choice_logprobs(ctx[0], ctx[1], DIRECTIONS)
        out.append({**{k: r[k] for k in ("ticker", "as_of", "direction", "correct", "realized_return_pct")},
                    "lp": lp})
        if len(out) % 50 == 0:
            print(f"  scored {len(out)} of {len(rows)}", flush=True)
    return out


def key(r: dict) -> tuple[str, str]:
    return r["ticker"], str(r["as_of"])[:10]


def summarise(market, scored: dict[str, list[dict]], base_rows: list[dict], train_up: float, *,
              is_base: bool = False) -> dict:
    """AUCs, the gate-matched offset and the accuracies it gives, for one arm's eval and gate rows. The greedy
    answers are the scored rows' own, or for `base` (scored on another arm's traces) the untrained rows."""
    band = RewardsConfig().flat_band_pct
    syn, h = market.prices, market.horizon_days

    def s(r):
        return r["lp"]["up"] - r["lp"]["down"]

    def real(r):
        return realized_direction(r["realized_return_pct"], band)

    def bayes_probs(r) -> dict[str, float]:
        """The generating process's class probabilities given the headlines visible at as_of."""
        day = syn.day_index(date.fromisoformat(key(r)[1]))
        mu = syn.visible_drift(syn.tickers.index(r["ticker"]), day, h)
        return dict(zip(("up", "flat", "down"), syn.item_class_probs(mu, h, band), strict=True))

    def bayes(r):
        probs = bayes_probs(r)
        return max(probs, key=probs.get)

    def bayes_s(r):
        probs = bayes_probs(r)
        return math.log(probs["up"]) - math.log(probs["down"])

    ev, gate = scored["eval"], scored["gate"]
    gate_ud = [real(r) for r in gate if real(r) in ("up", "down")]
    gate_up = sum(d == "up" for d in gate_ud) / len(gate_ud)
    offset = matched_offset([s(r) for r in gate], train_up)
    offset_gate = matched_offset([s(r) for r in gate], gate_up)
    visible = [r for r in ev if lc.visible_signal(market, r)]
    untrained = {key(r): float(r["correct"] or 0) for r in base_rows if r["correct"] is not None}
    answers = {key(r): r["direction"] for r in (base_rows if is_base else ev)}
    greedy = untrained if is_base else {key(r): float(r["correct"] or 0) for r in ev}
    matched = {key(r): float(("up" if s(r) + offset > 0 else "down") == real(r)) for r in ev}
    matched_gate = {key(r): float(("up" if s(r) + offset_gate > 0 else "down") == real(r)) for r in ev}

    def diff(a, b):
        d = paired_difference(a, b, cluster=lambda k: k[1])
        return None if d is None else [d.mean, d.low, d.high]

    ups, downs = [r for r in ev if real(r) == "up"], [r for r in ev if real(r) == "down"]
    return {
        "n": len(ev), "n_gate": len(gate),
        "auc_realized_bayes": auc([bayes_s(r) for r in ups], [bayes_s(r) for r in downs]),
        "argmax_agrees": sum(max(r["lp"], key=r["lp"].get) == answers.get(key(r)) for r in ev) / len(ev),
        "auc_realized": auc([s(r) for r in ups], [s(r) for r in downs]),
        "auc_bayes_visible": auc([s(r) for r in visible if bayes(r) == "up"],
                                 [s(r) for r in visible if bayes(r) == "down"]),
        "mean_s": sum(s(r) for r in ev) / len(ev),
        "up_share_greedy": sum(answers.get(key(r)) == "up" for r in ev) / len(ev),
        "train_up_share": train_up, "gate_up_share": gate_up, "offset": offset, "offset_gate": offset_gate,
        "up_share_matched": sum(s(r) + offset > 0 for r in ev) / len(ev),
        "acc_greedy": sum(greedy[key(r)] for r in ev if key(r) in greedy) / sum(key(r) in greedy for r in ev),
        "acc_matched": sum(matched.values()) / len(matched),
        "acc_matched_visible": sum(matched[key(r)] for r in visible) / len(visible),
        "acc_matched_gate_share": sum(matched_gate.values()) / len(matched_gate),
        "matched_minus_greedy": diff(matched, greedy),
        "matched_minus_untrained": diff(matched, untrained),
        "greedy_minus_untrained": diff(greedy, untrained),
    }


def interval(d) -> str:
    return "-" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def report(st: dict, command: str) -> str:
    lines = ["# Reading or prior: the adapters' up-against-down log-odds at the decision", "",
             f"`.venv/bin/python bench/decision_odds.py {command}`", "",
             ("s = log p(up) - log p(down) at the answer's direction token, scored on each arm's own held-out traces "
             "(`base`: on the first adapter arm's). AUC: how s ranks the items, whatever the cut. Matched: `up` when "
             "s + offset > 0, the offset set on the gate items so that their share of `up` equals the train block's "
             f"realized share of `up` among up/down outcomes ({st.get('train_up_share', 0):.3f}); the gate's own "
             "realized share is the last but one column. Intervals: 95%, resampling dates. Untrained: the state's "
             "`base@1.00` rows (greedy). `argmax = answer`: how often the scored first-token argmax is the direction "
             "the agent wrote."), "",
             ("| arm | AUC vs realized | AUC vs Bayes (visible) | up share greedy / matched | accuracy greedy | "
             "accuracy matched (visible) | matched − greedy | matched − untrained | greedy − untrained | "
             "matched to gate share (gate up share) | argmax = answer |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    bayes = next((m.get("auc_realized_bayes") for m in st["arms"].values()), None)
    lines.append(f"| (Bayes rule: log-odds of up against down given the visible headlines) | {fmt(bayes)} | 1.000 | "
                 "- | - | - | - | - | - | - | - |")
    base = st["arms"].get("base")
    for arm, m in st["arms"].items():
        lines.append(
            f"| {arm} | {fmt(m['auc_realized'])} | {fmt(m['auc_bayes_visible'])} | {fmt(m['up_share_greedy'], 2)} / "
            f"{fmt(m['up_share_matched'], 2)} | {fmt(m['acc_greedy'])} | "
            f"{fmt(m['acc_matched'])} ({fmt(m['acc_matched_visible'])}) | {interval(m['matched_minus_greedy'])} | "
            f"{interval(m['matched_minus_untrained'])} | {interval(m['greedy_minus_untrained'])} | "
            f"{fmt(m['acc_matched_gate_share'])} ({fmt(m['gate_up_share'], 2)}) | {fmt(m['argmax_agrees'], 2)} |")
    if base is not None:
        lines += ["", ("The ranking against the untrained model's on the same items (AUC vs realized, 95% interval "
                  "resampling dates):"), "", "| arm | AUC − untrained AUC |", "|---|---|"]
        lines += [f"| {arm} | {interval(m.get('auc_minus_base'))} |" for arm, m in st["arms"].items() if arm != "base"]
    return "\n".join(lines) + "\n"


def rank_against_base(res: dict) -> None:
    """Each trained arm's AUC minus the untrained model's on the same items (when `base` was scored)."""
    base = res["arms"].get("base")
    if base is None:
        return
    band = RewardsConfig().flat_band_pct

    def odds(m):
        return {key(r): r["lp"]["up"] - r["lp"]["down"] for r in m["items"]["eval"]}

    moves = {key(r): realized_direction(r["realized_return_pct"], band) for r in base["items"]["eval"]}
    up = {k: d == "up" for k, d in moves.items() if d in ("up", "down")}
    for arm, m in res["arms"].items():
        if arm != "base":
            m["auc_minus_base"] = auc_difference(odds(m), odds(base), up)


def train_up_share(work: Path) -> float:
    """The realized share of `up` among the up/down outcomes of the workdir's first train block (gen.db):
    what the product knows of the base rate from its scored history when the round is gated."""
    engine = read_only(work / "gen.db")
    band = RewardsConfig().flat_band_pct
    with engine.connect() as c:
        moves = [x for (x,) in c.execute(text("SELECT o.realized_return_pct FROM outcomes o JOIN predictions p "
                                              "ON p.id = o.prediction_id WHERE p.block_id = 1")) if x is not None]
    engine.dispose()
    dirs = [realized_direction(x, band) for x in moves]
    ud = [d for d in dirs if d in ("up", "down")]
    if not ud:
        raise SystemExit(f"{work / 'gen.db'} has no resolved train outcomes to take the base rate from")
    return sum(d == "up" for d in ud) / len(ud)


def main(argv: list[str] | None = None) -> None:
    from policy.local import LocalPolicy
    from policy.model_files import resolve_model

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a finished bench/learning_curve.py workdir (state.json, eval.db)")
    p.add_argument("--arms", required=True, help="comma list of trained arms in the state; `base` = no adapter")
    p.add_argument("--out", default="bench/results/decision_odds.md")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--report-only", action="store_true", help="recompute the tables from the stored scores")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    st = json.loads((work / "state.json").read_text())
    arms = [a for a in args.arms.split(",") if a]
    trained = [a for a in arms if a != "base"]
    if not trained:
        raise SystemExit("--arms needs at least one trained arm: `base` is scored on its traces")
    for a in trained:
        if a not in st.get("train", {}) or f"{a}@1.00" not in st["eval"] or f"{a}@1.00|gate" not in st["eval"]:
            raise SystemExit(f"{a}: the state has no trained adapter with eval and gate rows for it")
    market = build_market(MarketConfig())
    out_state = work / "decision_odds.json"
    res = json.loads(out_state.read_text()) if out_state.exists() else {"arms": {}}
    res["train_up_share"] = train_up = train_up_share(work)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        for arm, m in res["arms"].items():
            m.update(summarise(market, m["items"], st["eval"]["base@1.00"]["rows"], train_up, is_base=arm == "base"))
        rank_against_base(res)
        out_state.write_text(json.dumps(res))
        Path(args.out).write_text(report(res, command.replace(" --report-only", "")))
        return
    engine = read_only(work / "eval.db")
    policy = LocalPolicy(resolve_model(args.model), device="cpu", max_batch_size=1)
    try:
        for arm in arms:
            if arm in res["arms"]:
                continue
            t0 = time.perf_counter()
            traces = trained[0] if arm == "base" else arm
            path = None if arm == "base" else st["train"][arm]["path"]
            policy.load_adapter(path, None if path is None else 1)
            scored = {region: score_rows(policy, engine, st["eval"][f"{traces}@1.00" + suffix]["rows"])
                      for region, suffix in (("eval", ""), ("gate", "|gate"))}
            res["arms"][arm] = {**summarise(market, scored, st["eval"]["base@1.00"]["rows"], train_up, is_base=arm == "base"),
                                "seconds": time.perf_counter() - t0, "items": scored}
            rank_against_base(res)
            out_state.write_text(json.dumps(res))
            Path(args.out).write_text(report(res, command))
            m = res["arms"][arm]
            print(f"{arm}: auc {fmt(m['auc_realized'])} / {fmt(m['auc_bayes_visible'])}, acc greedy "
                  f"{fmt(m['acc_greedy'])} matched {fmt(m['acc_matched'])} in {m['seconds']:.0f}s", flush=True)
    finally:
        policy.close()
        engine.dispose()


if __name__ == "__main__":
    main()

"""Does a learning result survive a new train draw? One arm across independent train draws, on the same held-out items.

Each bench/learning_curve.py run trains its arms on one draw of train-region items (`--train-seed`) and answers
the same 300 held-out items (the eval region's seeded draw does not depend on the train draw). A gain measured
on one draw mixes what the recipe does with the luck of that draw's data and of its training, and the interval
printed for it resamples only the held-out dates. This bench reads several runs' saved states and puts, per arm:

  per draw   accuracy, the paired difference against the untrained agent of that run (95% interval resampling
             dates), the published mean reward (the arm's confidence map fitted on its gate answers, as the
             product's gate does) minus the untrained agent's, and how often the arm's direction on items whose
             signal headline is visible is the Bayes rule's (the headline -> direction mapping a round can teach);
  pooled     per item, the arm's mean over draws minus the untrained agent's answer, with the same interval.
             It estimates the gain one expects from a fresh draw, but its interval still resamples only dates:
             with two or three draws the spread between draws (shown per draw) is the honest caution.

Nothing is rerun: the figures come from the states' rows. The untrained agent's rows should be the same answers in
every state (greedy, same items); the report counts the items where they differ.

    .venv/bin/python bench/replication.py \\
        --arm score=bench/results/learning_curve_state.json,bench/results/learning_curve_score_s_state.json,\
bench/results/learning_curve_score_u_state.json \\
        --arm filtered=bench/results/learning_curve_state.json,bench/results/learning_curve_score_s_state.json,\
bench/results/learning_curve_filtered_t_state.json \\
        --arm score_top=bench/results/learning_rounds_score_top_state.json,\
bench/results/learning_curve_score_top_w_state.json,bench/results/learning_curve_score_top_v_state.json,\
bench/results/learning_curve_score_top_y_state.json \\
        --arm boosted=bench/results/learning_curve_state.json \\
        --versus score,filtered --versus score_top,score --versus score_top,filtered
        # stop 34: runs H/F, S (I's filtered rows), T, U, V, W, X (score_top's first round on draw 1)
        # and Y (score_top on a fourth draw, learn-train-4)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import learning_curve as lc
import numpy as np

from market.config import MarketConfig
from market.sources import build_market
from rewards.intervals import paired_difference

FIGURES = (("correct", "accuracy"), ("composite", "mean reward (published)"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arm", action="append", required=True, metavar="ARM=STATE[,STATE...]",
                   help="an arm and the learning_curve states (one per train draw) that trained it; repeatable")
    p.add_argument("--versus", action="append", default=[], metavar="ARM,OTHER",
                   help="head to head: ARM minus OTHER on every train draw (train seed) both were given for; repeatable")
    p.add_argument("--boot", type=int, default=4000, help="bootstrap resamples")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "replication.md"))
    return p.parse_args(argv)


def parse_arm(spec: str) -> tuple[str, list[Path]]:
    """`score=a.json,b.json` -> ("score", [a.json, b.json]); a clear error for a malformed spec or a missing file."""
    arm, sep, paths = spec.partition("=")
    if not sep or not arm or not paths:
        raise SystemExit(f"--arm {spec!r}: expected ARM=STATE[,STATE...]")
    files = [Path(p) for p in paths.split(",") if p]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"--arm {arm}: no such state file: {', '.join(missing)}")
    return arm, files


def published(st: lc.State, arm: str) -> dict[tuple, dict]:
    """The arm's held-out rows at target 1 as the product publishes them (its gate-fitted map; as stated when the
    run has no gate answers, and always for the untrained agent, which the product publishes as stated)."""
    rows = st.data["eval"][lc.run_key(arm, 1.0)]["rows"]
    cmap = None if arm == "base" else lc.arm_confidence_map(st, arm)
    return {lc.item_key(r): r for r in lc.as_published(rows, cmap)}


def bayes_agreement(market, rows: dict[tuple, dict], bayes: dict[tuple, dict]) -> tuple[int, int]:
    """On the items whose signal headline is visible: how many of the arm's directions are the Bayes rule's."""
    vis = [r for r in rows.values() if r["direction"] and lc.visible_signal(market, r)]
    return sum(r["direction"] == bayes[lc.item_key(r)]["direction"] for r in vis), len(vis)


def where_they_differ(market, ra: dict[tuple, dict], rb: dict[tuple, dict]) -> str:
    """On the visible-signal items both answered: how many directions differ, and how many of those each arm got
    right. A gap between two recipes can come from reading the headline or from a shifted up/down prior on items
    with nothing to read; this column says which."""
    keys = [k for k in sorted(set(ra) & set(rb)) if lc.visible_signal(market, ra[k])]
    differ = [k for k in keys if ra[k]["direction"] != rb[k]["direction"]]
    right = [sum(bool(rows[k]["correct"]) for k in differ) for rows in (ra, rb)]
    return f"{len(differ)} of {len(keys)}: {right[0]} / {right[1]}"


def interval(a: dict, b: dict, boot: int) -> str:
    d = paired_difference(a, b, lc.on_date, n_boot=boot)
    if d is None or d.low is None:
        return "-"
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


def column(rows: dict[tuple, dict], field: str) -> dict[tuple, float]:
    """One figure per item, in sorted item order (the order learning_curve's report resamples in, so the same
    comparison gets the same interval in both reports)."""
    return {k: float(rows[k][field]) for k in sorted(rows) if rows[k][field] is not None}


def arm_lines(market, arm: str, files: list[Path], boot: int) -> list[str]:
    states = [lc.State(f) for f in files]
    for f, st in zip(files, states, strict=True):
        if lc.run_key(arm, 1.0) not in st.data.get("eval", {}):
            raise SystemExit(f"{f}: no held-out answers of `{arm}` at target 1 (key {lc.run_key(arm, 1.0)})")
    base = published(states[0], "base")
    bayes = {lc.item_key(r): r for r in lc.bayes_rows(market, list(base.values()))}
    lines = [f"## `{arm}` over {len(files)} train draw{'s' * (len(files) > 1)}", "",
             ("| draw (state) | train seed | accuracy | accuracy - untrained | published mean reward - untrained | "
              "Bayes direction, signal visible | untrained answers that differ from the first state's |"),
             "|---|---|---|---|---|---|---|"]
    arms = []
    for f, st in zip(files, states, strict=True):
        mine, own_base = published(st, arm), published(st, "base")
        arms.append(mine)
        seed = train_seed(st.data.get("command", ""))
        agree, n = bayes_agreement(market, mine, bayes)
        drift = sum(own_base[k]["direction"] != base[k]["direction"] or own_base[k]["confidence"] != base[k]["confidence"]
                    for k in base if k in own_base)
        lines.append(f"| `{f.name}` | `{seed}` | {lc.fmt(lc.mean(list(column(mine, 'correct').values())))} | "
                     f"{interval(column(mine, 'correct'), column(own_base, 'correct'), boot)} | "
                     f"{interval(column(mine, 'composite'), column(own_base, 'composite'), boot)} | "
                     f"{agree}/{n} = {lc.fmt(agree / n if n else None)} | {drift} |")
    agree, n = bayes_agreement(market, base, bayes)
    lines.append(f"| untrained (first state) | - | {lc.fmt(lc.mean(list(column(base, 'correct').values())))} | - | - | "
                 f"{agree}/{n} = {lc.fmt(agree / n if n else None)} | - |")
    lines += ["", (f"Pooled over the {len(files)} draws (per item, the arm's mean over draws minus the first state's "
                   "untrained answer; the interval resamples dates only, so it leaves out the spread between draws "
                   "seen above; the last column resamples draws too):"), "",
              "| figure | difference | 95% interval, dates | 95% interval, draws and dates |", "|---|---|---|---|"]
    for field, name in FIGURES:
        base_col = column(base, field)
        lines.append(pooled_line(name, [column(rows, field) for rows in arms], [base_col] * len(arms), boot))
    return [*lines, ""]


def pooled_line(name: str, arm_cols: list[dict], other_cols: list[dict], boot: int) -> str:
    """One pooled row: per item, the mean over draws of arm - other, with its date-resampled interval and the
    two-level one (draws, then dates, resampled)."""
    diffs = [{k: a[k] - o[k] for k in a if k in o} for a, o in zip(arm_cols, other_cols, strict=True)]
    common = sorted(set.intersection(*(set(d) for d in diffs)))
    pooled = {k: sum(d[k] for d in diffs) / len(diffs) for k in common}
    d = paired_difference(pooled, dict.fromkeys(common, 0.0), lc.on_date, n_boot=boot)
    if d is None or d.low is None:
        return f"| {name} | - | - | - |"
    lo, hi = two_level_interval([[dd[k] for k in common] for dd in diffs], [lc.on_date(k) for k in common], boot)
    two = "-" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
    return f"| {name} | {d.mean:+.3f} | [{d.low:+.3f}, {d.high:+.3f}] | {two} |"


def two_level_interval(per_draw: list[list[float]], dates: list, boot: int, *, level: float = 0.95,
                       seed: int = 0) -> tuple[float | None, float | None]:
    """A 95% interval for the mean item difference that resamples train draws (with replacement), then held-out
    dates: the spread between draws, which the date-only interval leaves out, enters it. With 2-3 draws the draw
    level has few distinct resamples, so this is a coarse but honest widening, not an exact interval."""
    groups = sorted(set(dates), key=str)
    if len(per_draw) < 2 or len(groups) < 2:
        return None, None
    g_index = {g: i for i, g in enumerate(groups)}
    sums = np.zeros((len(per_draw), len(groups)))
    counts = np.zeros(len(groups))
    for j, day in enumerate(dates):
        counts[g_index[day]] += 1
        for i, draw in enumerate(per_draw):
            sums[i, g_index[day]] += draw[j]
    rng = np.random.default_rng(seed)
    di = rng.integers(0, len(per_draw), size=(boot, len(per_draw)))
    gi = rng.integers(0, len(groups), size=(boot, len(groups)))
    per_date = sums[di].sum(axis=1) / len(per_draw)  # (boot, dates): the resampled draws' mean per date
    means = np.take_along_axis(per_date, gi, axis=1).sum(axis=1) / counts[gi].sum(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def versus_lines(market, one: str, other: str, arms: dict[str, list[Path]], boot: int) -> list[str]:
    """`one` minus `other` on each train draw both were trained on (matched by train seed), and pooled: which
    recipe to make the default, compared on the same train data and the same held-out items."""
    def by_seed(arm: str) -> dict[str, lc.State]:
        if arm not in arms:
            raise SystemExit(f"--versus {one},{other}: `{arm}` is not one of the --arm names ({', '.join(arms)})")
        return {train_seed(st.data.get("command", "")): st for st in map(lc.State, arms[arm])}

    a, b = by_seed(one), by_seed(other)
    seeds = [s for s in a if s in b]
    if not seeds:
        raise SystemExit(f"--versus {one},{other}: no train draw (train seed) holds both arms")
    lines = [f"## `{one}` minus `{other}`, on the {len(seeds)} train draw{'s' * (len(seeds) > 1)} both were trained on",
             "", (f"| train seed | accuracy | published mean reward | signal visible: directions that differ, right "
             f"({one} / {other}) | signal visible: Bayes direction ({one} / {other}) |"), "|---|---|---|---|---|"]
    cols = {s: (published(a[s], one), published(b[s], other)) for s in seeds}
    for s, (ra, rb) in cols.items():
        bayes = {lc.item_key(r): r for r in lc.bayes_rows(market, list(ra.values()))}
        (na, n), (nb, _) = bayes_agreement(market, ra, bayes), bayes_agreement(market, rb, bayes)
        lines.append(f"| `{s}` | {interval(column(ra, 'correct'), column(rb, 'correct'), boot)} | "
                     f"{interval(column(ra, 'composite'), column(rb, 'composite'), boot)} | "
                     f"{where_they_differ(market, ra, rb)} | {na} / {nb} of {n} |")
    lines += ["", "Pooled over those draws:", "",
              "| figure | difference | 95% interval, dates | 95% interval, draws and dates |", "|---|---|---|---|"]
    for field, name in FIGURES:
        lines.append(pooled_line(name, [column(ra, field) for ra, _ in cols.values()],
                                 [column(rb, field) for _, rb in cols.values()], boot))
    return [*lines, ""]


def train_seed(command: str) -> str:
    """The run's --train-seed as its saved command gives it (learning_curve's default when it names none)."""
    words = command.split()
    return next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "--train-seed"), "learn-train")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arms = [parse_arm(spec) for spec in args.arm]
    market = build_market(MarketConfig())
    lines = ["# One arm across independent train draws (the same 300 held-out items)", "",
             "Command: `.venv/bin/python bench/replication.py " + " ".join(f"--arm {s}" for s in args.arm)
             + "".join(f" --versus {v}" for v in args.versus) + "`", "",
             ("Each state is one bench/learning_curve.py run: one train draw, one round, greedy answers at target 1 "
              "on the same held-out items; differences are item by item against the untrained agent, 95% intervals "
              "resampling dates (items on a date share the market factor). Published = the arm's confidence map, "
              "fitted on its gate answers, applied as the product's gate does."), ""]
    for arm, files in arms:
        lines += arm_lines(market, arm, files, args.boot)
    for spec in args.versus:
        one, sep, other = spec.partition(",")
        if not sep or not one or not other:
            raise SystemExit(f"--versus {spec!r}: expected ARM,OTHER")
        lines += versus_lines(market, one, other, dict(arms), args.boot)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

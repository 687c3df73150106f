"""The train / gate / eval split of the timeline: the one place that decides which sessions each may use.

An item on session d has the outcome window d .. d + horizon sessions (its as_of close to its
resolve close). Two items can leak into each other when those windows overlap, so regions are
runs of sessions kept at least `embargo >= horizon` sessions apart: the last window of one
region closes before the first as_of of the next.

Replay (a bounded history), oldest first:

    warmup | train ... | embargo | gate | embargo | eval | horizon (the last outcomes)

Train blocks walk forward through `train` only; the gate and `scoreloop eval` draw independent
(ticker, session) items from their region with a seed. Live (an open-ended history): train items
sit at "now"; the gate and eval draw from the most recent *resolved* sessions that lie more than
`embargo` sessions from every session a train item was ever planned on, eval the newer ones, gate
the older ones, with an embargo between them too.

Pure: sessions and configuration in, regions out. The runner, the gate, eval and the benches call
`timeline_split` (or `split_sessions` / `live_split` directly) and nothing else decides.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Literal

from market.config import SplitConfig
from market.protocols import MarketError

if TYPE_CHECKING:
    from market.calendar import TradingCalendar
    from market.sources import Market

RegionName = Literal["train", "gate", "eval"]
REGIONS: tuple[RegionName, ...] = ("train", "gate", "eval")


class SplitError(MarketError):
    """The timeline cannot be split (or an item falls outside its region); the message says what to change."""


@dataclass(frozen=True)
class Region:
    """The as_of sessions one kind of item may use (sorted; contiguous in replay, possibly gapped in live)."""

    name: RegionName
    sessions: tuple[date, ...]
    _set: frozenset[date] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", frozenset(self.sessions))

    @property
    def first(self) -> date:
        return self.sessions[0]

    @property
    def last(self) -> date:
        return self.sessions[-1]

    def __contains__(self, day: object) -> bool:
        return day in self._set

    def __len__(self) -> int:
        return len(self.sessions)

    def record(self) -> dict[str, Any]:
        """What the store keeps about the region an item set was drawn from."""
        return {"region": self.name, "first": self.first.isoformat(), "last": self.last.isoformat(),
                "sessions": len(self.sessions)}


@dataclass(frozen=True)
class TimelineSplit:
    """Train, gate and eval regions over `timeline` (the sessions windows are counted on)."""

    mode: Literal["replay", "live"]
    horizon: int
    embargo: int
    timeline: tuple[date, ...]
    train: Region
    gate: Region
    eval: Region

    def region(self, kind: str) -> Region:
        if kind not in REGIONS:
            raise SplitError(f"unknown item kind {kind!r}: use one of {', '.join(REGIONS)}")
        return getattr(self, kind)

    def region_of(self, day: date) -> RegionName | None:
        """Which region `day` belongs to (None = warmup, embargo or the outcome tail)."""
        return next((r.name for r in (self.train, self.gate, self.eval) if day in r), None)

    def window(self, day: date) -> tuple[date, date]:
        """The outcome window of an item on session `day`: its as_of session and its resolve session."""
        i = bisect.bisect_left(self.timeline, day)
        if i >= len(self.timeline) or self.timeline[i] != day:
            raise SplitError(f"{day} is not a session of this timeline")
        if i + self.horizon >= len(self.timeline):
            raise SplitError(f"the outcome of an item on {day} resolves after the timeline ends ({self.timeline[-1]})")
        return day, self.timeline[i + self.horizon]

    def check(self, kind: str, days: Iterable[date]) -> None:
        """Refuse items of `kind` on sessions outside its region, naming the first such day."""
        region = self.region(kind)
        for d in days:
            if d not in region:
                where = self._where(d)
                raise SplitError(f"a {kind} item on {d} lies outside the {kind} region "
                                 f"({region.first}..{region.last}; {d} is in {where}), so it could share an outcome "
                                 f"window with {'training' if kind != 'train' else 'held-out'} items")

    def _where(self, day: date) -> str:
        region = self.region_of(day)
        if region is not None:
            return f"the {region} region"
        if self.mode == "replay" and day < self.train.first:
            return "the warmup before the train region"
        if self.mode == "replay" and day > self.eval.last:
            return f"the last sessions of the history, kept for the held-out items' outcomes (horizon {self.horizon})"
        return f"an embargo ({self.embargo} sessions between regions)"

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "horizon": self.horizon, "embargo": self.embargo,
                **{r.name: r.record() for r in (self.train, self.gate, self.eval)}}


def _embargo(horizon: int, cfg: SplitConfig) -> int:
    if horizon < 1:
        raise SplitError(f"horizon must be >= 1 session, got {horizon}")
    embargo = horizon if cfg.embargo_sessions is None else cfg.embargo_sessions
    if embargo < horizon:
        raise SplitError(f"market.split.embargo_sessions = {embargo} is shorter than the horizon ({horizon}): an "
                         "item's outcome window would reach into the next region; set it to at least the horizon")
    return embargo


def split_sessions(sessions: Sequence[date], *, horizon: int, cfg: SplitConfig | None = None) -> TimelineSplit:
    """Replay: cut a bounded history (all its sessions, oldest first) into embargoed train, gate, eval runs."""
    cfg = cfg or SplitConfig()
    embargo = _embargo(horizon, cfg)
    timeline = tuple(sessions)
    # Sizes come from the usable sessions; the fixed parts are warmup, two embargoes and the outcome tail.
    usable = len(timeline) - cfg.warmup_sessions - 2 * embargo - horizon
    n_gate, n_eval = int(usable * cfg.gate_fraction), int(usable * cfg.eval_fraction)
    n_train = usable - n_gate - n_eval
    if min(n_train, n_gate, n_eval) < 1:
        need = cfg.warmup_sessions + 2 * embargo + horizon + 3
        raise SplitError(f"a history of {len(timeline)} sessions is too short to split into train, gate and eval "
                         f"regions with {cfg.warmup_sessions} warmup, 2 x {embargo} embargo and {horizon} outcome "
                         f"sessions (needs well over {need}); use a longer history (market.synthetic.n_days) or "
                         "larger market.split fractions")
    t0 = cfg.warmup_sessions
    g0 = t0 + n_train + embargo
    e0 = g0 + n_gate + embargo
    return TimelineSplit(
        "replay", horizon, embargo, timeline,
        Region("train", timeline[t0:t0 + n_train]),
        Region("gate", timeline[g0:g0 + n_gate]),
        Region("eval", timeline[e0:e0 + n_eval]),
    )


def live_split(calendar_sessions: Sequence[date], *, today: date, trained: Iterable[date], horizon: int,
               cfg: SplitConfig | None = None) -> TimelineSplit:
    """Live: gate and eval regions of resolved sessions never within `embargo` of a trained session.

    `calendar_sessions` are the exchange's sessions (oldest first), `today` the base session of
    now (where new train items sit), `trained` the sessions of every train item planned so far.
    """
    cfg = cfg or SplitConfig()
    embargo = _embargo(horizon, cfg)
    timeline = tuple(calendar_sessions)
    index = {d: i for i, d in enumerate(timeline)}
    if today not in index:
        raise SplitError(f"{today} is not a session of the calendar")
    now_i = index[today]
    trained_i = sorted({index[d] for d in trained if d in index} | {now_i})

    def clear(i: int) -> bool:  # no trained session within `embargo` either way: windows cannot meet
        k = bisect.bisect_left(trained_i, i - embargo)
        return k == len(trained_i) or trained_i[k] > i + embargo

    def collect(start: int, n: int) -> list[int]:
        out: list[int] = []
        i = start
        while i >= cfg.warmup_sessions and len(out) < n:
            if clear(i):
                out.append(i)
            i -= 1
        return sorted(out)

    total = cfg.live_sessions
    n_eval = min(total - 1, max(1, round(total * cfg.eval_fraction / (cfg.eval_fraction + cfg.gate_fraction))))
    n_gate = total - n_eval
    eval_i = collect(now_i - embargo - 1, n_eval)  # resolved before today's train items' as_of
    gate_i = collect(eval_i[0] - embargo - 1, n_gate) if eval_i else []
    if not eval_i or not gate_i:
        raise SplitError(f"no resolved sessions before {today} lie more than {embargo} sessions from every trained "
                         "session, so the gate and eval have nothing held out; lower market.split.live_sessions")
    return TimelineSplit(
        "live", horizon, embargo, timeline,
        Region("train", tuple(timeline[i] for i in trained_i)),
        Region("gate", tuple(timeline[i] for i in gate_i)),
        Region("eval", tuple(timeline[i] for i in eval_i)),
    )


def timeline_split(market: Market, horizon: int, *, mode: str = "replay", now: datetime | None = None,
                   trained: Iterable[date] = ()) -> TimelineSplit:
    """The split for `market`: replay cuts its bounded history; live looks back from `now` past `trained`."""
    cal: TradingCalendar = market.calendar
    if mode == "replay":
        if market.span is None:
            raise SplitError(f"the {market.name} market has no bounded history to split: replay a synthetic or CSV "
                             "market, or use live mode")
        return split_sessions(cal.sessions(*market.span), horizon=horizon, cfg=market.split)
    if mode == "live":
        if now is None:
            raise SplitError("a live split needs `now`")
        today = cal.base_session(now)
        return live_split(cal.sessions(cal.first_session, cal.add_sessions(today, horizon)), today=today,
                          trained=trained, horizon=horizon, cfg=market.split)
    raise SplitError(f"unknown mode {mode!r}: use replay or live")


def draw_items(region: Region, tickers: Sequence[str], n: int, seed: int | str) -> list[tuple[str, date]]:
    """`n` distinct (ticker, session) items drawn uniformly from `region` x `tickers`, ordered by session.

    Independent draws across the whole region (not consecutive days), so their outcomes share
    less market noise; the same seed gives the same items, which is how paired runs line up.
    """
    names = list(dict.fromkeys(t.strip().upper() for t in tickers if t.strip()))
    if n < 1:
        raise SplitError(f"item count must be >= 1, got {n}")
    if not names:
        raise SplitError("no tickers to draw items for")
    pool = len(region) * len(names)
    if n > pool:
        raise SplitError(f"{n} items asked of the {region.name} region, which holds {len(region)} sessions x "
                         f"{len(names)} tickers = {pool}; ask for fewer or widen market.split.{region.name}_fraction")
    picks = random.Random(f"{region.name}|{seed}").sample(range(pool), n)
    items = [(names[k % len(names)], region.sessions[k // len(names)]) for k in picks]
    return sorted(items, key=lambda it: (it[1], names.index(it[0])))


def train_days(split: TimelineSplit, *, after: date | None, n_days: int, start: date | None = None) -> list[date]:
    """The sessions of the next replay train block: `n_days` consecutive train sessions.

    It starts at `start` when given (an explicit --as-of), else the session after `after` (the
    latest train item so far, so a resumed run continues), else at the train region's first.
    Refuses to leave the train region: its last item's outcome closes before the gate's first as_of.
    """
    region = split.train
    if start is not None:
        i = bisect.bisect_left(region.sessions, start)
        if i >= len(region) or region.sessions[i] != start:
            split.check("train", [start])
    elif after is not None:
        i = bisect.bisect_right(region.sessions, after)
    else:
        i = 0
    if n_days < 1:
        raise SplitError(f"a train block needs >= 1 session, got {n_days}")
    if i + n_days > len(region):
        raise SplitError(f"the train region ({region.first}..{region.last}) has {max(0, len(region) - i)} sessions "
                         f"left and the block needs {n_days}; the sessions after it are embargoed and held out for "
                         "the gate and eval, so training has used this history (use a longer one, or a fresh database)")
    return list(region.sessions[i:i + n_days])

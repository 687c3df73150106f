"""A small builder of realistic scored episodes, written straight through the store's ORM, so the
trainer can be tested without running the agent."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import Engine

from store.db import session_scope
from store.models import Block, Episode, Prediction, Reward, Step
from trainer.config import TrainerConfig

# The all-episode round (every episode once, each block's top quartile boosted twice) that the mechanics tests were
# written for. Labels, balance, loss masks, replay and resume work the same under the default's top-quartile filter,
# but with every episode kept each test's cases stay in the data (a filter of 0.25 keeps 1 of a 4-episode block).
EVERY_EPISODE = {"filter_top_fraction": 1.0, "epochs": 1.0, "boost_top_fraction": 0.25}


def every_episode(**kw) -> TrainerConfig:
    """TrainerConfig for the all-episode round, with `kw` on top."""
    return TrainerConfig(**{**EVERY_EPISODE, **kw})


TICKERS = ["AAPL", "MSFT", "NVDA", "AMZN", "GOOG", "META", "TSLA", "JPM"]


def system_prompt(label: str) -> str:
    return ("You are a careful equity analyst. Research the stock with the tools, then forecast its move.\n"
            f"{label}\n"
            'Reply with one JSON object per turn: {"tool": ..., "args": {...}} or {"prediction": {...}}.')


def trace(ticker: str, as_of: datetime, label: str, *, direction: str = "up", confidence: float = 0.6,
          raw_final: str | None = None, tool: str = "get_prices") -> list[tuple[str, str]]:
    final = raw_final if raw_final is not None else json.dumps({"prediction": {
        "ticker": ticker, "direction": direction, "magnitude_pct": 1.2, "confidence": confidence,
        "rationale": f"{ticker} closed above its 20-day mean on rising volume.", "citations": [1]}})
    return [
        ("system", system_prompt(label)),
        ("user", f"Forecast {ticker} over the next 5 trading days. Today is {as_of:%Y-%m-%d}."),
        ("assistant", json.dumps({"tool": tool, "args": {"ticker": ticker, "days": 20}})),
        ("tool", "date,close\n2024-03-01,101.20\n2024-03-04,102.05\n2024-03-05,101.70\n[1] 20d mean 100.4"),
        ("assistant", final),
    ]


def add_block(engine: Engine, scores: Iterable[float | None], *, kind: str = "train", status: str = "complete",
              target: float = 0.95, invalid: Iterable[int] = (), unscored: Iterable[int] = (),
              no_conditioning: Iterable[int] = (), retried: Iterable[int] = (),
              start: datetime | None = None, directions: Iterable[str] | None = None,
              items: Iterable[int] | None = None, wrong: Iterable[int] = (),
              tools: Iterable[str] | None = None) -> tuple[int, list[int]]:
    """A block with one episode per score; returns (block id, episode ids in order).

    invalid: indices that are parse failures (no reward row: the trainer counts them as 0);
    unscored: valid predictions still waiting for their outcome; retried: episodes whose current
    attempt is 1 and whose attempt-0 steps must be ignored; directions: each prediction's (default all up);
    items: each episode's item number (same number = same ticker and as_of; default one item per episode);
    wrong: indices whose direction did not come true (direction component 0 in the latest reward row only);
    tools: each episode's first (and only) tool call (default all get_prices).
    """
    scores = list(scores)
    dirs = list(directions) if directions is not None else ["up"] * len(scores)
    item_of = list(items) if items is not None else list(range(len(scores)))
    tool_of = list(tools) if tools is not None else ["get_prices"] * len(scores)
    invalid, unscored, no_cond, retried = set(invalid), set(unscored), set(no_conditioning), set(retried)
    label = f"Score: {target:.2f}"
    start = start or datetime(2024, 3, 5, 21, 1, tzinfo=UTC)
    with session_scope(engine) as s:
        block = Block(kind=kind, mode="replay", market="synthetic", size=len(scores), as_of=start,
                      status=status, target_score=target, conditioning=label)
        s.add(block)
        s.flush()
        ids = []
        for i, score in enumerate(scores):
            ticker = TICKERS[item_of[i] % len(TICKERS)]
            as_of = start + timedelta(days=item_of[i])
            attempt = 1 if i in retried else 0
            ep = Episode(block_id=block.id, idx=i, ticker=ticker, as_of=as_of, horizon=5, status="done",
                         attempt=attempt, target_score=target, conditioning=None if i in no_cond else label)
            s.add(ep)
            s.flush()
            bad = i in invalid
            raw = '{"prediction": {"ticker": "' + ticker + '", "direction": "sideways", confid' if bad else None
            if attempt == 1:
                for j, (role, content) in enumerate(trace(ticker, as_of, label, direction="down")[:3]):
                    s.add(Step(episode_id=ep.id, attempt=0, idx=j, role=role, content=content + " STALE"))
            for j, (role, content) in enumerate(trace(ticker, as_of, label, raw_final=raw, direction=dirs[i],
                                                           tool=tool_of[i])):
                s.add(Step(episode_id=ep.id, attempt=attempt, idx=j, role=role, content=content))
            pred = Prediction(episode_id=ep.id, block_id=block.id, ticker=ticker, as_of=as_of, horizon=5,
                              resolve_at=date(2024, 3, 12), direction=None if bad else dirs[i],
                              magnitude_pct=None if bad else 1.2, confidence=None if bad else 0.6,
                              valid=not bad, parse_error="invalid direction" if bad else None, raw_output=raw,
                              target_score=target, conditioning=label)
            s.add(pred)
            s.flush()
            if not bad and i not in unscored and score is not None:
                s.add(Reward(prediction_id=pred.id, reward_version="v0", direction=1.0, magnitude=0.5,
                             calibration=0.5, data_use=0.0, composite=0.0))
                s.flush()
                # A newer reward version supersedes the first: the trainer must use the latest row.
                s.add(Reward(prediction_id=pred.id, reward_version="v1", direction=0.0 if i in set(wrong) else 1.0,
                             magnitude=0.5,
                             calibration=0.5, data_use=0.0, composite=score))
            ids.append(ep.id)
        return block.id, ids

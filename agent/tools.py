"""The agent's tools, bound to one episode: the runner's ticker and as_of, never the model's.

Every call is recorded (arguments, result text or error, latency, cache use, future items the
point-in-time guard dropped, returned snippets). A tool that raises or times out becomes a
recorded tool error that the model sees as the tool message; the episode goes on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from agent.prompts import defuse, format_market, format_news, format_prices
from agent.recorder import EpisodeRecorder
from agent.schema import GetMarketContext, GetPrices, SearchNews, ToolAction
from market.protocols import MarketError
from store import market_cache, traces

if TYPE_CHECKING:
    from market.sources import Market
    from store.traces import ClaimedEpisode


class ToolTimeout(TimeoutError):
    pass


@dataclass
class ToolOutput:
    text: str
    dropped_future: int = 0
    cache_hit: bool = False
    snippet_ids: list[int] = field(default_factory=list)


def _with_timeout(fn: Callable[[], ToolOutput], timeout_s: float) -> ToolOutput:
    """Run `fn` in a daemon thread so a hung source cannot hang the episode (or interpreter exit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the caller below
            box["error"] = err

    t = threading.Thread(target=target, daemon=True, name="scoreloop-tool")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ToolTimeout(f"timed out after {timeout_s:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class EpisodeTools:
    """get_prices / search_news / get_market_context for one episode attempt."""

    def __init__(self, market: Market, recorder: EpisodeRecorder, episode: ClaimedEpisode, *,
                 news_max_results: int = 8, timeout_s: float = 20.0, news_days: int | None = None) -> None:
        self.market = market
        self.recorder = recorder
        self.episode = episode
        self.news_max_results = news_max_results
        self.timeout_s = timeout_s
        self.news_days = news_days
        self._seen: dict[str, ToolOutput] = {}  # identical calls of this episode -> their first result

    @property
    def shown_snippets(self) -> list[int]:
        """Ids of the news snippets this episode's tool results have shown so far (what it may cite)."""
        return list(dict.fromkeys(i for out in self._seen.values() for i in out.snippet_ids))

    def run(self, action: ToolAction) -> str:
        """Execute one tool call, commit the tool step and its tool_calls row; returns the tool text."""
        args = action.args.model_dump()
        key = json.dumps([action.tool, args], sort_keys=True)
        t0 = time.perf_counter()
        error: str | None = None
        try:
            if key in self._seen:  # a repeat learns nothing new: answer it from the first result
                first = self._seen[key]
                out = ToolOutput(text=f"(same call as before, same result) {first.text}", cache_hit=True,
                                 snippet_ids=list(first.snippet_ids))
            else:
                out = _with_timeout(lambda: self._dispatch(action), self.timeout_s)
                self._seen[key] = out
        except MarketError as err:
            error = f"{type(err).__name__}: {err}"
            out = ToolOutput(text="")
        except Exception as err:  # noqa: BLE001 - any tool failure is data for the model, not a crash
            error = f"{type(err).__name__}: {err}"
            out = ToolOutput(text="")
        latency_ms = 1000.0 * (time.perf_counter() - t0)
        text = f"error: {defuse(error, 300)}" if error else out.text
        rec = self.recorder
        idx = rec.next_idx

        def write(s) -> None:
            step_id = traces.add_step(s, episode_id=rec.episode_id, attempt=rec.attempt, idx=idx, role="tool",
                                      content=text, tool_name=action.tool, tool_args=args)
            traces.add_tool_call(
                s, episode_id=rec.episode_id, attempt=rec.attempt, step_id=step_id, name=action.tool, args=args,
                as_of=self.episode.as_of, result=None if error else text, error=error, latency_ms=latency_ms,
                cache_hit=out.cache_hit, dropped_future=out.dropped_future, snippet_ids=out.snippet_ids)

        rec.write(write)
        rec.next_idx += 1
        return text

    def _dispatch(self, action: ToolAction) -> ToolOutput:
        if isinstance(action, GetPrices):
            return self.get_prices(action.args.lookback_days)
        if isinstance(action, SearchNews):
            return self.search_news(action.args.query)
        if isinstance(action, GetMarketContext):
            return self.get_market_context(action.args.lookback_days)
        raise ValueError(f"unknown tool {action!r}")

    def get_prices(self, lookback_days: int) -> ToolOutput:
        ep = self.episode
        got = self.market.prices.bars(ep.ticker, ep.as_of, lookback_days)
        bars = sorted(got.items, key=lambda b: b.date)
        text = format_prices(ep.ticker, [b.date for b in bars], [b.adj_close for b in bars])
        return ToolOutput(text=text, dropped_future=got.dropped_future, cache_hit=got.cache_hit)

    def _save_news(self, got) -> list[int]:
        """Snippet ids of the returned items: from the cache layer if it stored them, else stored here."""
        if not got.items:
            return []
        ids = (got.meta or {}).get("snippet_ids")
        if ids and len(ids) == len(got.items):
            return list(ids)
        source = getattr(self.market.news, "name", self.market.name)
        return self.recorder.write(lambda s: market_cache.save_snippets(s, got.items, source))

    def search_news(self, query: str) -> ToolOutput:
        ep = self.episode
        got = self.market.news.search(query, ep.as_of, ticker=ep.ticker, max_results=self.news_max_results)
        pairs = list(zip(self._save_news(got), got.items))
        if self.news_days is not None:  # the recency window: older headlines are out of the horizon's reach
            since = ep.as_of - timedelta(days=self.news_days)
            pairs = [(sid, it) for sid, it in pairs if it.published_at >= since]
        text = format_news([(sid, it.published_at, it.title, it.snippet) for sid, it in pairs])
        return ToolOutput(text=text, dropped_future=got.dropped_future, cache_hit=got.cache_hit,
                          snippet_ids=[sid for sid, _ in pairs])

    def get_market_context(self, lookback_days: int) -> ToolOutput:
        ep = self.episode
        dropped, hits, calls = 0, 0, 0
        r1: list[float] = []
        rw: list[float] = []
        for t in self.market.tickers:
            try:
                got = self.market.prices.bars(t, ep.as_of, lookback_days + 1)
            except MarketError:
                continue  # one missing ticker must not hide the rest of the market
            calls += 1
            dropped += got.dropped_future
            hits += int(got.cache_hit)
            closes = [b.adj_close for b in sorted(got.items, key=lambda b: b.date)]
            if len(closes) >= 2 and closes[0] and closes[-2]:
                r1.append(100.0 * (closes[-1] / closes[-2] - 1.0))
                rw.append(100.0 * (closes[-1] / closes[0] - 1.0))
        news = self.market.news.search("stock market", ep.as_of, ticker=None, max_results=3)
        ids = self._save_news(news)
        news_text = format_news([(sid, it.published_at, it.title, it.snippet) for sid, it in zip(ids, news.items)]) \
            if news.items else ""
        dropped += news.dropped_future
        text = format_market(
            len(rw), sum(r1) / len(r1) if r1 else None, sum(rw) / len(rw) if rw else None, lookback_days,
            sum(1 for r in rw if r > 0) / len(rw) if rw else None, news_text)
        return ToolOutput(text=text, dropped_future=dropped, cache_hit=calls > 0 and hits == calls,
                          snippet_ids=ids)

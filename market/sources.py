"""One `Market` per config: the price and news sources, their calendar and ticker universe."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import Engine

from market.calendar import TradingCalendar
from market.config import MarketConfig, SplitConfig
from market.protocols import NewsSource, PriceSource


@dataclass
class Market:
    """What the agent's tools and the outcome resolver read; `span` is the replayable history, if bounded."""

    name: str
    prices: PriceSource
    news: NewsSource
    calendar: TradingCalendar
    tickers: list[str]
    span: tuple[date, date] | None = None
    p_star: Callable[[int], float] | None = field(default=None, repr=False)
    split: SplitConfig = field(default_factory=SplitConfig)  # how market.split cuts this timeline
    horizon_days: int = MarketConfig.model_fields["horizon_days"].default  # build_market sets market.horizon_days

    def bayes_accuracy(self, horizon: int) -> float | None:
        """p* of the synthetic market's planted signal at `horizon`; None for real sources (unknown)."""
        return self.p_star(horizon) if self.p_star else None


def build_market(cfg: MarketConfig, engine: Engine | None = None) -> Market:
    """Sources chosen by `cfg.source`; with `engine`, network sources are cached in the store."""
    if cfg.source == "synthetic":
        from market.synthetic import SyntheticMarket

        start = date.fromisoformat(cfg.synthetic.start)
        syn = SyntheticMarket(cfg.synthetic, TradingCalendar(cfg.exchange, start=start))
        prices: PriceSource = syn
        news: NewsSource = syn
        market = Market("synthetic", syn, syn, syn.calendar, list(syn.tickers), syn.span, syn.bayes_accuracy)
    elif cfg.source == "csv":
        from market.csv_replay import CsvReplay

        replay = CsvReplay(cfg.csv.dir, exchange=cfg.exchange)
        tickers = [t for t in cfg.universe if t in replay.tickers] or sorted(replay.tickers)
        market = Market("csv", replay, replay, replay.calendar, tickers, replay.span)
    else:
        from market.ddg_news import DdgNews
        from market.yahoo import YahooPrices

        calendar = TradingCalendar(cfg.exchange)
        prices = YahooPrices(calendar, timeout_s=cfg.timeout_s, retries=cfg.retries)
        news = DdgNews(timeout_s=cfg.timeout_s, retries=cfg.retries)
        market = Market("yahoo", prices, news, calendar, list(cfg.universe))
    if engine is not None and (cfg.source == "yahoo" or cfg.cache_offline):
        from market.cache import CachedNews, CachedPrices

        market.prices = CachedPrices(market.prices, engine, market.calendar)
        market.news = CachedNews(market.news, engine)
    market.split = cfg.split
    market.horizon_days = cfg.horizon_days
    return market

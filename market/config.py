"""`[market]` settings: which data sources the tools and the resolver read."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_UNIVERSE = [
    "AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "BRK-B", "JPM", "V", "UNH",
    "XOM", "JNJ", "PG", "MA", "HD", "COST", "AVGO", "LLY", "KO", "PEP",
]


class SyntheticConfig(BaseModel):
    """Seeded synthetic market: GBM prices plus headlines, some carrying a planted signal."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(7, description="Seed; the same seed gives the same market.")
    n_tickers: int = Field(12, ge=1, description="How many synthetic tickers (SYN00, SYN01, ...).")
    start: str = Field("2020-01-02", description="First trading day of the synthetic history.")
    n_days: int = Field(1000, ge=60, description="Trading days of history.")
    annual_vol: float = Field(0.30, gt=0, description="Annualised volatility of the noise.")
    signal_strength: float = Field(
        0.012, ge=0, description="Extra daily drift for `horizon` days after a signal headline."
    )
    signal_rate: float = Field(0.15, ge=0, le=1, description="Chance per ticker-day of a signal headline.")
    noise_rate: float = Field(0.25, ge=0, le=1, description="Chance per ticker-day of a noise headline.")
    signal_days: int = Field(
        5, ge=1, description="Sessions a signal headline's drift lasts, starting the session after it."
    )
    market_vol_share: float = Field(
        0.4, ge=0, le=1, description="Share of daily variance from a market factor common to all tickers."
    )
    market_news_rate: float = Field(0.3, ge=0, le=1, description="Chance per day of a market-wide noise headline.")
    annual_drift: float = Field(0.0, description="Baseline annual log drift (0 keeps always-up at a coin flip).")


class CsvConfig(BaseModel):
    """CSV replay: `prices.csv` and `news.csv` in one folder (format in the README)."""

    model_config = ConfigDict(extra="forbid")

    dir: str = Field("data/replay", description="Folder holding prices.csv and news.csv.")


class SplitConfig(BaseModel):
    """How market.split cuts the timeline into train, gate and eval regions (embargoed from each other)."""

    model_config = ConfigDict(extra="forbid")

    gate_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of the replay history's usable sessions "
                                 "the gate draws its items from.")
    eval_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of the usable sessions held out for "
                                 "`scoreloop eval` (the last ones).")
    embargo_sessions: int | None = Field(
        None, ge=1, description="Sessions between regions (None = the horizon; less than the horizon is refused, "
        "since an outcome window would then reach into the next region)."
    )
    warmup_sessions: int = Field(30, ge=0, description="Sessions at the start of the history left out so the "
                                 "price tool has bars to show.")
    live_sessions: int = Field(60, ge=2, description="Live mode: resolved, never-trained sessions the gate and "
                               "eval draw from (the most recent ones).")


class MarketConfig(BaseModel):
    """Data sources behind the price and news protocols."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["synthetic", "yahoo", "csv"] = Field(
        "synthetic", description="Price and news source: offline synthetic, live Yahoo+DuckDuckGo, or CSV."
    )
    universe: list[str] = Field(
        default_factory=lambda: list(DEFAULT_UNIVERSE),
        description="Tickers for live/CSV blocks (synthetic uses its own SYNxx tickers).",
    )
    exchange: str = Field("XNYS", description="exchange_calendars code for trading days.")
    horizon_days: int = Field(5, ge=1, description="Forecast horizon in trading days.")
    timeout_s: float = Field(15.0, gt=0, description="Network timeout for yfinance/ddgs calls.")
    retries: int = Field(3, ge=0, description="Retries with exponential backoff on rate limits.")
    news_max_results: int = Field(8, ge=1, description="News items returned per search.")
    cache_offline: bool = Field(
        False, description="Also cache synthetic/CSV data in the store (they replay exactly without it)."
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    csv: CsvConfig = Field(default_factory=CsvConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)

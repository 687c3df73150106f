"""A seeded synthetic market with a planted, measurable signal: the offline default.

Prices: daily log returns = baseline drift + a market factor + idiosyncratic noise + the planted
drift. Headlines: per ticker-day, a signal headline (a "beats estimates" kind adds +strength to
the log return of each of the next `signal_days` sessions, a "misses estimates" kind subtracts it)
and/or a neutral noise headline; plus market-wide noise headlines. Headlines are published during
the session's trading hours, so `replay_as_of(day)` sees that day's headlines.

Because the market knows its own generating process, it reports p* (`bayes_accuracy`), the
direction accuracy of the Bayes-optimal predictor that reads every headline before `as_of`, and
the band-aware p* (`bayes_accuracy_band`) for rewards that score small moves as `flat`.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from datetime import date, datetime, timedelta

import numpy as np

from market.calendar import TradingCalendar, require_utc
from market.config import SyntheticConfig
from market.guard import guard_bars
from market.keywords import keyword_search
from market.protocols import Bar, CalendarError, Fetched, NewsItem, NoDataError, UnknownTickerError

SOURCE = "synthetic-wire"

POSITIVE = [
    ("{t} beats estimates, raises guidance",
     "{t} reported quarterly results above analyst expectations and raised its full-year guidance."),
    ("{t} wins major contract, lifts outlook",
     "{t} said it won a multi-year contract and lifted its revenue outlook for the coming quarters."),
    ("{t} posts record revenue, raises forecast",
     "{t} posted record quarterly revenue on strong demand and raised its annual forecast."),
]
NEGATIVE = [
    ("{t} misses estimates, cuts outlook",
     "{t} reported quarterly results below analyst expectations and cut its full-year outlook."),
    ("{t} loses key customer, warns on sales",
     "{t} said a key customer will not renew and warned that sales will fall short of targets."),
    ("{t} recalls flagship product, cuts forecast",
     "{t} announced a recall of its flagship product and cut its annual forecast."),
]
NOISE = [
    ("{t} to present at industry conference", "{t} will present at an industry conference next month."),
    ("{t} names new board member", "{t} appointed a new independent director to its board."),
    ("{t} schedules annual shareholder meeting", "{t} set the date of its annual shareholder meeting."),
    ("Analyst reiterates neutral rating on {t}", "An analyst kept a neutral rating on {t}, citing a balanced outlook."),
    ("{t} opens new regional office", "{t} opened a new regional office to support existing customers."),
    ("{t} completes debt refinancing", "{t} completed a previously announced refinancing of its debt."),
]
MARKET = [
    ("Fed minutes show a divided committee", "Minutes of the last Fed meeting showed officials split on the rate path."),
    ("Oil prices drift as traders await data", "Crude prices moved little as traders waited for inventory data."),
    ("Treasury yields little changed ahead of auction", "Yields on Treasuries held steady ahead of an auction."),
    ("Dollar steady against major currencies", "The dollar was little changed against a basket of currencies."),
    ("Investors weigh fresh economic data", "Markets weighed a mixed set of economic releases."),
]

def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class SyntheticMarket:
    """Deterministic prices and headlines for SYN00.. over real exchange sessions; a PriceSource and a NewsSource."""

    name = "synthetic"

    def __init__(self, cfg: SyntheticConfig | None = None, calendar: TradingCalendar | None = None) -> None:
        self.cfg = cfg or SyntheticConfig()
        start = date.fromisoformat(self.cfg.start)
        self.calendar = calendar or TradingCalendar(start=start)
        self.days = self.calendar.sessions(start, self.calendar.last_session)[: self.cfg.n_days]
        if len(self.days) < self.cfg.n_days:
            raise CalendarError(
                f"synthetic market needs {self.cfg.n_days} sessions from {start}, the calendar has {len(self.days)}"
            )
        self._day_idx = {d: i for i, d in enumerate(self.days)}
        self.tickers = [f"SYN{i:02d}" for i in range(self.cfg.n_tickers)]
        self._future_cache: dict[int, tuple[tuple[int, float], ...]] = {}
        self._p_star: dict[int, float] = {}
        self._p_star_band: dict[tuple[int, float], float] = {}
        self._generate()

    # -- generation ---------------------------------------------------------------------------
    def _generate(self) -> None:
        c = self.cfg
        n_t, n_d, k = c.n_tickers, c.n_days, c.signal_days
        # Separate streams so changing one knob (say noise_rate) does not reshuffle the prices.
        price_rng, signal_rng, news_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(c.seed).spawn(3))

        has_signal = signal_rng.random((n_t, n_d)) < c.signal_rate
        self.signs = np.where(signal_rng.random((n_t, n_d)) < 0.5, 1, -1) * has_signal
        # Drift on day i is the sum of signs of signals on days i-k .. i-1.
        csum = np.concatenate([np.zeros((n_t, 1)), np.cumsum(self.signs, axis=1)], axis=1)
        idx = np.arange(n_d)
        drift_units = csum[:, idx] - csum[:, np.maximum(idx - k, 0)]
        self.sd_daily = c.annual_vol / math.sqrt(252)
        sd_mkt = math.sqrt(c.market_vol_share) * self.sd_daily
        sd_idio = math.sqrt(1.0 - c.market_vol_share) * self.sd_daily
        self.base_drift = c.annual_drift / 252
        logret = (
            self.base_drift
            + c.signal_strength * drift_units
            + price_rng.normal(0.0, sd_mkt, n_d)[None, :]
            + price_rng.normal(0.0, sd_idio, (n_t, n_d))
        )
        logret[:, 0] = 0.0
        p0 = price_rng.uniform(20.0, 300.0, n_t)[:, None]
        self.close = p0 * np.exp(np.cumsum(logret, axis=1))
        prev = np.concatenate([p0, self.close[:, :-1]], axis=1)
        self.open = prev * np.exp(price_rng.normal(0.0, 0.3 * self.sd_daily, (n_t, n_d)))
        wick = np.abs(price_rng.normal(0.0, 0.5 * self.sd_daily, (2, n_t, n_d)))
        self.high = np.maximum(self.open, self.close) * (1 + wick[0])
        self.low = np.minimum(self.open, self.close) * (1 - wick[1])
        self.volume = np.round(price_rng.lognormal(14.0, 0.4, (n_t, n_d)))

        self._news: dict[str | None, list[NewsItem]] = defaultdict(list)
        noise = news_rng.random((n_t, n_d)) < c.noise_rate
        mkt = news_rng.random(n_d) < c.market_news_rate
        for i, day in enumerate(self.days):
            open_, close_ = self.calendar.open_of(day), self.calendar.close_of(day)
            span = (close_ - open_).total_seconds() - 60

            def at(open_: datetime = open_, span: float = span) -> datetime:
                return open_ + timedelta(seconds=int(news_rng.random() * span))

            for t, ticker in enumerate(self.tickers):
                if self.signs[t, i]:
                    pool = POSITIVE if self.signs[t, i] > 0 else NEGATIVE
                    self._add(ticker, pool[int(news_rng.integers(len(pool)))], at(), i, "s")
                if noise[t, i]:
                    self._add(ticker, NOISE[int(news_rng.integers(len(NOISE)))], at(), i, "n")
            if mkt[i]:
                self._add(None, MARKET[int(news_rng.integers(len(MARKET)))], at(), i, "m")
        for items in self._news.values():
            items.sort(key=lambda it: it.published_at)
        self._news_times = {key: [it.published_at for it in items] for key, items in self._news.items()}
        self._all = sorted((it for items in self._news.values() for it in items), key=lambda it: it.published_at)
        self._all_times = [it.published_at for it in self._all]

    def _add(self, ticker: str | None, template: tuple[str, str], at: datetime, i: int, kind: str) -> None:
        title, body = (s.format(t=ticker or "") for s in template)
        key = ticker or "market"
        self._news[ticker].append(NewsItem(
            published_at=at, title=title, snippet=body,
            url=f"https://synthetic.example/news/{key.lower()}/{self.days[i].isoformat()}-{kind}",
            source=SOURCE, tickers=(ticker,) if ticker else (),
        ))

    # -- PriceSource --------------------------------------------------------------------------
    def _ticker(self, ticker: str) -> int:
        try:
            return self.tickers.index(ticker.upper())
        except ValueError:
            raise UnknownTickerError(
                f"unknown ticker {ticker!r} in the synthetic market (tickers: {self.tickers[0]}..{self.tickers[-1]})"
            ) from None

    def _bar(self, t: int, i: int) -> Bar:
        close = float(self.close[t, i])
        return Bar(self.tickers[t], self.days[i], float(self.open[t, i]), float(self.high[t, i]),
                   float(self.low[t, i]), close, close, float(self.volume[t, i]))

    def bars(self, ticker: str, as_of: datetime, lookback_days: int) -> Fetched[Bar]:
        t = self._ticker(ticker)
        as_of = require_utc(as_of)
        # Select by calendar date like a daily-bar API would (today's bar included), then guard.
        hi = bisect.bisect_right(self.days, as_of.date())
        lo = max(0, hi - lookback_days - 1)
        fetched = guard_bars([self._bar(t, i) for i in range(lo, hi)], as_of, self.calendar)
        fetched.items = fetched.items[-lookback_days:] if lookback_days > 0 else []
        if not fetched.items:
            raise NoDataError(f"no bars for {ticker} before {as_of.isoformat()} (synthetic history starts "
                              f"{self.days[0]})")
        return fetched

    def close_on(self, ticker: str, day: date) -> float:
        t = self._ticker(ticker)
        i = self._day_idx.get(day)
        if i is None:
            raise NoDataError(f"no synthetic bar for {ticker} on {day} (not a session in "
                              f"{self.days[0]}..{self.days[-1]})")
        return float(self.close[t, i])

    # -- NewsSource ---------------------------------------------------------------------------
    def search(self, query: str, as_of: datetime, ticker: str | None = None, max_results: int = 8
               ) -> Fetched[NewsItem]:
        as_of = require_utc(as_of)
        if ticker:
            self._ticker(ticker)
            items, times = self._news[ticker.upper()], self._news_times.get(ticker.upper(), [])
        else:
            items, times = self._all, self._all_times
        return keyword_search(items, times, query, as_of, max_results)

    # -- p* -----------------------------------------------------------------------------------
    def day_index(self, day: date) -> int:
        try:
            return self._day_idx[day]
        except KeyError:
            raise NoDataError(f"{day} is not a session of the synthetic history") from None

    def visible_drift(self, t: int, b: int, horizon: int) -> float:
        """Expected log return over sessions b+1..b+horizon given every headline up to session b."""
        k = self.cfg.signal_days
        units = 0
        for j in range(max(0, b - k + 1), b + 1):
            if self.signs[t, j]:
                units += self.signs[t, j] * max(0, min(j + k, b + horizon) - b)
        return self.base_drift * horizon + self.cfg.signal_strength * units

    def signal_visible(self, ticker: str, day: date, horizon: int) -> bool:
        """Whether a signal headline published by `day`'s as_of still moves the price over the horizon: the
        items where reading the news can beat a coin flip (evaluation reports accuracy on both kinds)."""
        drift = self.visible_drift(self._ticker(ticker), self.day_index(day), horizon)
        return abs(drift - self.base_drift * horizon) > 1e-12

    def _future_units(self, horizon: int) -> tuple[tuple[int, float], ...]:
        """Distribution of drift units from signals not yet published (sessions b+1..b+h-1)."""
        if horizon in self._future_cache:
            return self._future_cache[horizon]
        k, r = self.cfg.signal_days, self.cfg.signal_rate
        dist = {0: 1.0}
        for j in range(1, horizon):
            w = min(k, horizon - j)
            nxt: dict[int, float] = defaultdict(float)
            for u, p in dist.items():
                nxt[u] += p * (1 - r)
                nxt[u + w] += p * r / 2
                nxt[u - w] += p * r / 2
            dist = dict(nxt)
        self._future_cache[horizon] = tuple(sorted(dist.items()))
        return self._future_cache[horizon]

    def item_accuracy(self, mu: float, horizon: int) -> float:
        """P(sign of the realized return == sign of mu): Bayes accuracy of one item (0.5 when mu is 0)."""
        if mu == 0.0:
            return 0.5
        sd = self.sd_daily * math.sqrt(horizon)
        s = self.cfg.signal_strength
        return sum(p * _normal_cdf((abs(mu) + u * s) / sd) for u, p in self._future_units(horizon))

    def bayes_accuracy(self, horizon: int) -> float:
        """p*: mean Bayes-optimal direction accuracy over every (ticker, replay as_of) item of the history."""
        if horizon not in self._p_star:
            self._p_star[horizon] = self._bayes_accuracy(horizon)
        return self._p_star[horizon]

    def _visible_mu(self, horizon: int) -> np.ndarray:
        """mu[t, b]: expected horizon log return of every (ticker, session b) item given headlines up to b."""
        n_d, k = len(self.days), self.cfg.signal_days
        if horizon < 1 or horizon >= n_d:
            raise ValueError(f"horizon must be in 1..{n_d - 1}")
        # units[t, b] = sum over visible signals j = b-d of sign * (days of its drift inside b+1..b+h).
        units = np.zeros(self.signs.shape, dtype=np.int64)
        for d in range(k):
            units[:, d:] += self.signs[:, : n_d - d] * min(k - d, horizon)
        return self.base_drift * horizon + self.cfg.signal_strength * units[:, : n_d - horizon]

    def _bayes_accuracy(self, horizon: int) -> float:
        mu = self._visible_mu(horizon)
        values, counts = np.unique(mu, return_counts=True)
        acc = sum(c * self.item_accuracy(float(v), horizon) for v, c in zip(values, counts, strict=True))
        return float(acc / counts.sum())

    def item_class_probs(self, mu: float, horizon: int, band_pct: float) -> tuple[float, float, float]:
        """(P(up), P(flat), P(down)) of the realized return for an item whose visible drift is `mu`.

        The return counts as flat when |100 * (exp(L) - 1)| < band_pct (rewards.outcomes.realized_direction),
        i.e. when the horizon log return L lies in (log(1 - band/100), log(1 + band/100)).
        """
        sd = self.sd_daily * math.sqrt(horizon)
        s = self.cfg.signal_strength
        hi = math.log1p(band_pct / 100.0)
        lo = math.log1p(-band_pct / 100.0) if band_pct < 100.0 else -math.inf
        up = down = 0.0
        for u, p in self._future_units(horizon):
            m = mu + u * s
            up += p * (1.0 - _normal_cdf((hi - m) / sd))
            down += p * (_normal_cdf((lo - m) / sd) if lo > -math.inf else 0.0)
        return up, max(0.0, 1.0 - up - down), down

    def bayes_accuracy_band(self, horizon: int, band_pct: float) -> float:
        """p* under a flat band: mean over the history's items of max(P(up), P(flat), P(down)).

        `bayes_accuracy` counts the sign only, but the rewards score `flat` whenever |return| <
        `rewards.flat_band_pct`, so an up/down call on a small move is wrong there. The Bayes-optimal
        forecaster picks the likeliest of the three classes given every headline before as_of; its
        accuracy is exact from the generating process (Gaussian noise and the future-signal mixture).
        With band_pct = 0 this equals `bayes_accuracy`.
        """
        if band_pct < 0 or not math.isfinite(band_pct):
            raise ValueError(f"band_pct must be a finite number >= 0, got {band_pct!r}")
        key = (horizon, float(band_pct))
        if key not in self._p_star_band:
            mu = self._visible_mu(horizon)
            values, counts = np.unique(mu, return_counts=True)
            acc = sum(c * max(self.item_class_probs(float(v), horizon, band_pct))
                      for v, c in zip(values, counts, strict=True))
            self._p_star_band[key] = float(acc / counts.sum())
        return self._p_star_band[key]

    @property
    def span(self) -> tuple[date, date]:
        return self.days[0], self.days[-1]

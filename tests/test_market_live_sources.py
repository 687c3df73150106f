"""yfinance and ddgs sources on recorded responses (no network here), failure modes included.

Recorded payloads have the exact shapes the libraries return: the DataFrame of
`Ticker.history(auto_adjust=False)` / `yf.download`, and the list of dicts of `DDGS().news`
(produced by ddgs's own DuckDuckGo news parser from a recorded news.js body).
"""

import json
import time
from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pytest
from curl_cffi.requests.exceptions import Timeout as CurlTimeout
from ddgs.engines.duckduckgo_news import DuckduckgoNews
from ddgs.exceptions import DDGSException, RatelimitException, TimeoutException
from yfinance.exceptions import YFPricesMissingError, YFRateLimitError, YFTzMissingError
from yfinance.utils import empty_df

from market.cache import CachedNews, CachedPrices
from market.calendar import TradingCalendar
from market.config import MarketConfig
from market.ddg_news import DdgNews
from market.protocols import NoDataError, SourceUnavailableError, UnknownTickerError
from market.sources import build_market
from market.yahoo import YahooPrices, frame_to_bars

CAL = TradingCalendar("XNYS")
NY = "America/New_York"

# NVDA around its 10:1 split (2024-06-10), as Ticker.history(auto_adjust=False, actions=True) returns it:
# Close is split-adjusted by Yahoo, Adj Close also dividend-adjusted, tz-aware session-date index.
NVDA_ROWS = [
    ("2024-06-03", 113.62, 115.00, 112.00, 114.99, 114.96, 438_392_000, 0.0, 0.0),
    ("2024-06-04", 115.72, 116.60, 114.04, 116.43, 116.40, 403_324_000, 0.0, 0.0),
    ("2024-06-05", 118.37, 122.45, 117.47, 122.44, 122.41, 528_402_000, 0.0, 0.0),
    ("2024-06-06", 124.05, 125.59, 118.32, 120.99, 120.96, 664_696_000, 0.0, 0.0),
    ("2024-06-07", 119.77, 121.69, 118.02, 120.88, 120.85, 412_386_000, 0.0, 0.0),
    ("2024-06-10", 120.37, 123.10, 117.01, 121.79, 121.76, 314_162_700, 0.0, 10.0),
    ("2024-06-11", 121.77, 122.87, 118.74, 120.91, 120.88, 222_551_200, 0.01, 0.0),
    ("2024-06-12", 123.06, 126.88, 122.57, 125.20, 125.18, 299_595_000, 0.0, 0.0),
]


def history_frame(rows=NVDA_ROWS) -> pd.DataFrame:
    index = pd.DatetimeIndex([pd.Timestamp(r[0], tz=NY) for r in rows], name="Date")
    cols = ["Open", "High", "Low", "Close", "Adj Close", "Volume", "Dividends", "Stock Splits"]
    return pd.DataFrame([r[1:] for r in rows], index=index, columns=cols)


class Recorded:
    """Plays back responses at the yfinance boundary: frames, or exceptions yfinance raises."""

    def __init__(self, *responses) -> None:
        self.responses, self.calls = list(responses), []

    def __call__(self, ticker, start, end, timeout):
        self.calls.append((ticker, start, end, timeout))
        r = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        if isinstance(r, BaseException):
            raise r
        return r


def yahoo(*responses, retries=2):
    sleeps: list[float] = []
    src = YahooPrices(CAL, timeout_s=3, retries=retries, backoff_s=0.5, fetch=Recorded(*responses),
                      sleep=sleeps.append)
    return src, sleeps


def test_history_frame_parses_into_adjusted_bars_across_a_split():
    src, _ = yahoo(history_frame())
    got = src.bars("nvda", CAL.replay_as_of(date(2024, 6, 12)), 5)
    assert [b.date for b in got.items] == [date(2024, 6, 6), date(2024, 6, 7), date(2024, 6, 10),
                                          date(2024, 6, 11), date(2024, 6, 12)]
    assert got.items[-1].adj_close == 125.18 and got.items[-1].ticker == "NVDA"
    assert got.meta["nan_dropped"] == 0 and got.dropped_future == 0
    ticker, start, end, timeout = src.fetch.calls[0]
    assert (ticker, end, timeout) == ("NVDA", date(2024, 6, 13), 3) and start <= date(2024, 6, 6)


def test_todays_unfinished_bar_is_dropped_by_the_guard():
    src, _ = yahoo(history_frame())
    as_of = datetime(2024, 6, 12, 15, 0, tzinfo=UTC)  # 11:00 New York: Yahoo already shows a partial bar
    got = src.bars("NVDA", as_of, 3)
    assert got.dropped_future == 1 and got.items[-1].date == date(2024, 6, 11)


def test_nan_bars_are_dropped_and_counted():
    rows = list(NVDA_ROWS)
    rows[6] = ("2024-06-11", np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 0.0, 0.0)
    src, _ = yahoo(history_frame(rows))
    got = src.bars("NVDA", CAL.replay_as_of(date(2024, 6, 12)), 3)
    assert got.meta["nan_dropped"] == 1
    assert [b.date for b in got.items] == [date(2024, 6, 7), date(2024, 6, 10), date(2024, 6, 12)]
    with pytest.raises(NoDataError, match="missing or NaN"):
        yahoo(history_frame(rows))[0].close_on("NVDA", date(2024, 6, 11))


def test_yf_download_multiindex_frame():
    frame = history_frame().drop(columns=["Dividends", "Stock Splits"])
    frame.columns = pd.MultiIndex.from_product([frame.columns, ["NVDA"]], names=["Price", "Ticker"])
    bars, dropped = frame_to_bars(frame, "NVDA")
    assert len(bars) == 8 and dropped == 0 and bars[0].close == 114.99


def test_empty_frame_and_missing_ticker_are_unknown_ticker():
    with pytest.raises(UnknownTickerError, match="unknown or delisted"):
        yahoo(empty_df())[0].bars("ZZZZQ", datetime(2024, 6, 12, tzinfo=UTC), 5)
    with pytest.raises(UnknownTickerError, match="possibly delisted"):
        yahoo(YFTzMissingError("ZZZZQ"))[0].bars("ZZZZQ", datetime(2024, 6, 12, tzinfo=UTC), 5)
    with pytest.raises(UnknownTickerError):
        yahoo(YFPricesMissingError("OLD", "(1d 2024-06-01 -> 2024-06-12)"))[0].close_on("OLD", date(2024, 6, 11))
    src, _ = yahoo(history_frame())
    with pytest.raises(UnknownTickerError, match="not a ticker symbol"):
        src.bars("DROP TABLE;", datetime(2024, 6, 12, tzinfo=UTC), 5)
    assert src.fetch.calls == []


def test_rate_limits_back_off_then_succeed_or_give_up():
    src, sleeps = yahoo(YFRateLimitError(), YFRateLimitError(), history_frame())
    assert src.close_on("NVDA", date(2024, 6, 10)) == 121.76
    assert sleeps == [0.5, 1.0] and len(src.fetch.calls) == 3
    src, sleeps = yahoo(YFRateLimitError(), retries=2)
    with pytest.raises(SourceUnavailableError, match="rate-limited NVDA after 3 attempts"):
        src.bars("NVDA", datetime(2024, 6, 12, tzinfo=UTC), 5)
    assert sleeps == [0.5, 1.0]


def test_timeout_is_source_unavailable():
    src, sleeps = yahoo(CurlTimeout("Operation timed out after 3001 milliseconds"))
    with pytest.raises(SourceUnavailableError, match="unreachable .*Timeout"):
        src.bars("NVDA", datetime(2024, 6, 12, tzinfo=UTC), 5)
    assert sleeps == []


def test_cached_yahoo_answers_the_repeat_from_the_store(sqlite_db):
    recorded = Recorded(history_frame())
    cached = CachedPrices(YahooPrices(CAL, fetch=recorded), sqlite_db, CAL)
    as_of = CAL.replay_as_of(date(2024, 6, 12))
    first, again = cached.bars("NVDA", as_of, 5), cached.bars("NVDA", as_of, 5)
    assert again.cache_hit and again.items == first.items and len(recorded.calls) == 1
    assert cached.close_on("NVDA", date(2024, 6, 7)) == 120.85 and len(recorded.calls) == 1


# --- DuckDuckGo news ---------------------------------------------------------------------------

NEWS_JS = {"results": [  # a recorded duckduckgo.com/news.js body (dates are epoch seconds there)
    {"date": 1720015500, "title": "Apple stock hits record high ahead of WWDC follow-up",
     "excerpt": "Shares of <b>Apple</b> rose 2% to a record.", "url": "https://www.reuters.com/a",
     "image": "https://img/a.jpg", "source": "Reuters", "relative_time": "2 days ago"},
    {"date": 1719929100, "title": "Apple suppliers see stronger iPhone orders",
     "excerpt": "Suppliers expect more orders.", "url": "https://www.bloomberg.com/b",
     "image": "", "source": "Bloomberg", "relative_time": "3 days ago"},
    {"date": 1720101600, "title": "Apple shares slip after July 4th break",
     "excerpt": "Apple fell in early trade.", "url": "https://www.cnbc.com/c", "image": "", "source": "CNBC"},
]}


def recorded_news() -> list[dict]:
    """What DDGS().news returns for that body, produced by ddgs's own DuckDuckGo news parser."""
    return [r.__dict__ for r in DuckduckgoNews().extract_results(json.dumps(NEWS_JS))]


def ddgs_playing(*responses):
    calls: list[tuple] = []

    class RecordedDDGS:  # stands in for ddgs.DDGS at the library boundary
        def __init__(self, timeout=None, **_):
            self.timeout = timeout

        def news(self, query, **kwargs):
            calls.append((query, self.timeout, kwargs))
            r = responses[min(len(calls) - 1, len(responses) - 1)]
            if isinstance(r, BaseException):
                raise r
            return r

    return RecordedDDGS, calls


def ddg(*responses, retries=2):
    cls, calls = ddgs_playing(*responses)
    sleeps: list[float] = []
    return DdgNews(timeout_s=4, retries=retries, backoff_s=0.25, ddgs_class=cls, sleep=sleeps.append), calls, sleeps


def test_ddgs_news_parses_dates_and_guards_as_of():
    src, calls, _ = ddg(recorded_news())
    as_of = datetime(2024, 7, 4, 12, 0, tzinfo=UTC)
    got = src.search("stock", as_of, ticker="AAPL", max_results=5)
    assert [n.source for n in got.items] == ["Reuters", "Bloomberg"]  # newest first; CNBC (07-04 14:00) dropped
    assert got.dropped_future == 1 and got.items[0].published_at == datetime(2024, 7, 3, 14, 5, tzinfo=UTC)
    assert got.items[0].snippet == "Shares of Apple rose 2% to a record." and got.items[0].tickers == ("AAPL",)
    query, timeout, kwargs = calls[0]
    assert query == "AAPL stock" and timeout == 4
    assert kwargs == {"region": "us-en", "max_results": 10, "timelimit": "m"}


def test_undated_items_are_dropped_and_counted():
    results = recorded_news() + [{"date": "3 hours ago", "title": "Undated", "body": "", "url": "u", "image": "",
                                  "source": "X"}, {"date": "", "title": "No date", "body": "", "url": "v"}]
    got = ddg(results)[0].search("apple", datetime(2024, 7, 10, tzinfo=UTC))
    assert got.meta["undated"] == 2 and len(got.items) == 3


def test_empty_news_is_an_empty_result():
    src, _, _ = ddg(DDGSException("No results found."))
    assert src.search("obscure", datetime(2024, 7, 10, tzinfo=UTC)).items == []
    assert ddg([])[0].search("obscure", datetime(2024, 7, 10, tzinfo=UTC)).items == []
    assert ddg(recorded_news())[0].search("", datetime(2024, 7, 10, tzinfo=UTC)).items == []


def test_ddgs_rate_limit_timeout_and_failure_are_typed():
    src, calls, sleeps = ddg(RatelimitException("202 Ratelimit"), recorded_news())
    assert len(src.search("apple", datetime(2024, 7, 10, tzinfo=UTC)).items) == 3
    assert sleeps == [0.25] and len(calls) == 2
    src, calls, sleeps = ddg(RatelimitException("202 Ratelimit"), retries=1)
    with pytest.raises(SourceUnavailableError, match="rate-limited .* after 2 attempts"):
        src.search("apple", datetime(2024, 7, 10, tzinfo=UTC))
    with pytest.raises(SourceUnavailableError, match="timed out after 4"):
        ddg(TimeoutException("duckduckgo: timed out"))[0].search("apple", datetime(2024, 7, 10, tzinfo=UTC))
    with pytest.raises(SourceUnavailableError, match="DuckDuckGo news failed"):
        ddg(DDGSException("https://duckduckgo.com 403 Forbidden"))[0].search("a", datetime(2024, 7, 10, tzinfo=UTC))


def test_cached_ddg_replays_exactly(sqlite_db):
    cls, calls = ddgs_playing(recorded_news())
    cached = CachedNews(DdgNews(ddgs_class=cls), sqlite_db)
    as_of = datetime(2024, 7, 4, 12, 0, tzinfo=UTC)
    first = cached.search("stock", as_of, ticker="AAPL")
    again = cached.search("stock", as_of, ticker="AAPL")
    assert again.cache_hit and len(calls) == 1 and again.items == first.items
    assert again.meta["snippet_ids"] == first.meta["snippet_ids"] and again.dropped_future == 1


def test_without_network_real_calls_fail_fast_and_clearly():
    """No network in this sandbox: the real libraries must surface a typed error within seconds."""
    market = build_market(MarketConfig(source="yahoo", timeout_s=2, retries=0))
    assert market.name == "yahoo" and market.bayes_accuracy(5) is None and "AAPL" in market.tickers
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailableError):
        market.prices.bars("AAPL", datetime(2024, 7, 8, tzinfo=UTC), 5)
    with pytest.raises(SourceUnavailableError):
        market.news.search("Apple earnings", datetime.now(UTC), ticker="AAPL")
    assert time.monotonic() - t0 < 15

"""Market cache on real SQLite and PostgreSQL: repeated queries come from the store, snippets dedup, splits back-adjust."""

from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from market.cache import CachedNews, CachedPrices
from market.config import MarketConfig, SyntheticConfig
from market.protocols import Bar, NewsItem, NoDataError
from market.sources import build_market
from market.synthetic import SyntheticMarket
from store.db import session_scope
from store.market_cache import load_bars, save_bars, save_snippets
from store.models import PriceBar, Snippet

SMALL = SyntheticConfig(n_tickers=3, n_days=200)


@pytest.fixture(scope="module")
def syn() -> SyntheticMarket:
    return SyntheticMarket(SMALL)


class Counting:
    """The real synthetic source, counting how often the cache let a call through to it."""

    def __init__(self, inner: SyntheticMarket) -> None:
        self.inner, self.name, self.calls = inner, inner.name, 0

    def bars(self, *a, **k):
        self.calls += 1
        return self.inner.bars(*a, **k)

    def close_on(self, *a, **k):
        self.calls += 1
        return self.inner.close_on(*a, **k)

    def search(self, *a, **k):
        self.calls += 1
        return self.inner.search(*a, **k)


def count(engine, model) -> int:
    with session_scope(engine) as s:
        return s.scalar(select(func.count()).select_from(model))


def test_repeated_price_queries_come_from_the_store(fresh_db, syn):
    src = Counting(syn)
    cached = CachedPrices(src, fresh_db, syn.calendar)
    as_of = syn.calendar.replay_as_of(syn.days[100])
    first = cached.bars("SYN01", as_of, 20)
    again = cached.bars("SYN01", as_of, 20)
    shorter = cached.bars("SYN01", as_of - timedelta(days=3), 10)
    assert (first.cache_hit, again.cache_hit, shorter.cache_hit) == (False, True, True)
    assert again.items == first.items and src.calls == 1
    assert count(fresh_db, PriceBar) == 20
    assert cached.close_on("SYN01", syn.days[95]) == syn.close_on("SYN01", syn.days[95]) and src.calls == 1
    # A close not yet cached (the resolver asking after the horizon) is fetched once, then kept.
    later = syn.days[110]
    assert cached.close_on("SYN01", later) == syn.close_on("SYN01", later) and src.calls == 2
    assert cached.close_on("SYN01", later) == syn.close_on("SYN01", later) and src.calls == 2
    with pytest.raises(NoDataError, match="not a XNYS trading session"):
        cached.close_on("SYN01", date(2020, 7, 4))


def test_repeated_news_queries_replay_the_same_snippets(fresh_db, syn):
    src = Counting(syn)
    cached = CachedNews(src, fresh_db)
    as_of = syn.calendar.replay_as_of(syn.days[150])
    first = cached.search("SYN02", as_of, ticker="SYN02", max_results=6)
    again = cached.search("SYN02", as_of, ticker="SYN02", max_results=6)
    assert not first.cache_hit and again.cache_hit and src.calls == 1
    assert again.items == first.items and again.meta["snippet_ids"] == first.meta["snippet_ids"]
    assert len(set(first.meta["snippet_ids"])) == 6 == count(fresh_db, Snippet)
    # An overlapping search stores only the new items; shared ones keep their ids.
    other = cached.search("", as_of, ticker="SYN02", max_results=8)
    assert other.meta["snippet_ids"][:6] == first.meta["snippet_ids"]
    assert count(fresh_db, Snippet) == 8
    empty = cached.search("xyzzy", as_of, ticker="SYN02")
    assert empty.items == [] and cached.search("xyzzy", as_of, ticker="SYN02").cache_hit


def test_save_snippets_keeps_order_and_dedups(fresh_db):
    t = datetime(2024, 7, 3, 14, 5, tzinfo=UTC)
    items = [NewsItem(t, "A up", "text a", "https://x/a", "Reuters", ("AAA",)),
             NewsItem(t, "Fed", "text b", "", "", ())]
    with session_scope(fresh_db) as s:
        ids = save_snippets(s, items, "ddg")
        assert save_snippets(s, list(reversed(items)), "ddg") == list(reversed(ids))
    with session_scope(fresh_db) as s:
        rows = {r.id: r for r in s.scalars(select(Snippet))}
    assert len(rows) == 2 and rows[ids[1]].source == "ddg" and rows[ids[1]].ticker is None
    assert rows[ids[0]].published_at == t and rows[ids[0]].source == "Reuters"


def test_a_split_since_caching_back_adjusts_the_cached_series(fresh_db):
    days = [date(2024, 6, 3), date(2024, 6, 4), date(2024, 6, 5), date(2024, 6, 6), date(2024, 6, 7)]
    before = [Bar("NVDA", d, 1000 + i, 1010 + i, 990 + i, 1000.0 + i, 1000.0 + i, 100) for i, d in enumerate(days[:3])]
    # Fetched after a 10:1 split on 06-07: Yahoo re-expresses every earlier bar in post-split terms.
    after = [Bar("NVDA", d, (1000 + i) / 10, 101, 99, (1000.0 + i) / 10, (1000.0 + i) / 10, 1000)
             for i, d in enumerate(days) if i >= 2]
    with session_scope(fresh_db) as s:
        save_bars(s, "yahoo", before)
        save_bars(s, "yahoo", after)
    with session_scope(fresh_db) as s:
        rows = load_bars(s, "yahoo", "NVDA", days[0], days[-1])
    assert [r.adj_close for r in rows] == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert rows[4].adj_close / rows[0].adj_close == pytest.approx(1004 / 1000)  # a return, not a -90% crash


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(30, 190), minutes=st.integers(-600, 600), lookback=st.integers(1, 25))
def test_cached_sources_never_return_the_future(sqlite_db, syn, offset, minutes, lookback):
    market = build_market(MarketConfig(synthetic=SMALL, cache_offline=True), sqlite_db)
    assert isinstance(market.prices, CachedPrices) and isinstance(market.news, CachedNews)
    as_of = syn.calendar.close_of(syn.days[offset]) + timedelta(minutes=minutes)
    for _ in range(2):  # the fetch, then the replay from the store
        bars = market.prices.bars("SYN00", as_of, lookback)
        news = market.news.search("SYN00", as_of, ticker="SYN00", max_results=5)
        assert all(syn.calendar.close_of(b.date) < as_of for b in bars.items)
        assert all(n.published_at < as_of for n in news.items)
        assert bars.items[-1].date == syn.calendar.base_session(as_of)


def test_cache_and_agent_tool_layer_share_snippet_rows(sqlite_db, syn):
    """A cached search and the agent's tool layer (which saves uncached results with
    save_snippets) land on the same snippet rows, so citations resolve either way."""
    from store.market_cache import save_snippets

    cached = CachedNews(syn, sqlite_db)
    got = cached.search("SYN00", syn.calendar.replay_as_of(syn.days[60]), ticker="SYN00", max_results=4)
    with session_scope(sqlite_db) as s:
        assert save_snippets(s, got.items, syn.name) == got.meta["snippet_ids"]
    assert count(sqlite_db, Snippet) == 4
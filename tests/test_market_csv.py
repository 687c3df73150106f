"""CSV replay: the documented format loads, every malformed file names its line, point-in-time holds."""

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.calendar import TradingCalendar
from market.config import CsvConfig, MarketConfig
from market.csv_replay import CsvReplay
from market.protocols import CsvFormatError, NoDataError, UnknownTickerError
from market.sources import build_market

CAL = TradingCalendar("XNYS")
SESSIONS = CAL.sessions(date(2024, 6, 3), date(2024, 7, 31))  # includes the 2024-07-04 holiday gap
SPLIT_DAY = date(2024, 6, 10)  # NVDA's real 10:1 split, the way Yahoo exports it: raw close jumps, adj does not


def example_prices() -> str:
    """A small dataset like a Yahoo export: two tickers, one 10:1 split, one NaN row, one delisting."""
    rows = ["date,ticker,open,high,low,close,adj_close,volume"]
    for i, day in enumerate(SESSIONS):
        adj = 100.0 * (1.002 ** i)
        raw = adj * (10 if day < SPLIT_DAY else 1)
        rows.append(f"{day},NVDA,{raw:.4f},{raw * 1.01:.4f},{raw * 0.99:.4f},{raw:.4f},{adj:.4f},{1000 + i}")
        if day == date(2024, 6, 20):
            rows.append(f"{day},OLD,,,,,,")  # a gap in the export
        elif day < date(2024, 7, 1):  # OLD is delisted after June
            rows.append(f"{day},OLD,50,51,49,50,50,10")
    return "\n".join(rows) + "\n"


NEWS = """published_at,ticker,title,snippet,url,source
2024-06-07,NVDA,NVIDIA announces 10-for-1 stock split,The split takes effect June 10.,https://ex.com/a,Reuters
2024-06-20T14:30:00Z,NVDA,NVIDIA briefly becomes most valuable company,Shares rose.,https://ex.com/b,Reuters
2024-06-20T20:30:00+00:00,,Stocks close mixed,Markets were mixed.,https://ex.com/c,AP
2024-07-05T12:00:00,OLD,OLD Corp completes delisting,The shares no longer trade.,https://ex.com/d,
"""


@pytest.fixture
def replay_dir(tmp_path) -> Path:
    (tmp_path / "prices.csv").write_text(example_prices())
    (tmp_path / "news.csv").write_text(NEWS)
    return tmp_path


def test_loads_the_documented_format(replay_dir):
    r = CsvReplay(replay_dir, CAL)
    assert r.tickers == {"NVDA", "OLD"} and r.nan_rows == 1
    assert r.span == (SESSIONS[0], SESSIONS[-1])
    got = r.bars("NVDA", CAL.replay_as_of(date(2024, 7, 5)), 3)
    assert [b.date for b in got.items] == [date(2024, 7, 2), date(2024, 7, 3), date(2024, 7, 5)]
    # A split inside the window: raw closes drop 10x, adjusted closes (what outcomes use) do not.
    window = r.bars("NVDA", CAL.replay_as_of(date(2024, 6, 12)), 5).items
    assert window[0].close / window[-1].close > 9
    assert r.close_on("NVDA", date(2024, 6, 12)) / r.close_on("NVDA", date(2024, 6, 5)) == pytest.approx(
        1.002 ** 5, rel=1e-3)
    news = r.search("split", CAL.replay_as_of(date(2024, 6, 7)), ticker="NVDA")
    assert [n.title for n in news.items] == ["NVIDIA announces 10-for-1 stock split"]
    assert news.items[0].published_at == CAL.close_of(date(2024, 6, 7))  # a bare date is that day's close
    market_wide = r.search("stocks", datetime(2024, 6, 21, tzinfo=UTC))
    assert market_wide.items[0].tickers == () and market_wide.items[0].source == "AP"
    assert r.search("", datetime(2024, 7, 6, tzinfo=UTC), ticker="OLD").items[0].source == "csv"


def test_bad_tickers_holidays_gaps_and_delistings(replay_dir):
    r = CsvReplay(replay_dir, CAL)
    with pytest.raises(UnknownTickerError, match="unknown ticker 'AAPL'"):
        r.bars("AAPL", datetime(2024, 7, 1, tzinfo=UTC), 5)
    with pytest.raises(NoDataError, match="holiday, missing row, or delisted"):
        r.close_on("NVDA", date(2024, 7, 4))
    with pytest.raises(NoDataError):
        r.close_on("OLD", date(2024, 6, 20))  # the NaN row was skipped, not turned into a price
    with pytest.raises(NoDataError):
        r.close_on("OLD", date(2024, 7, 10))  # delisted
    with pytest.raises(NoDataError, match="no bars for NVDA"):
        r.bars("NVDA", datetime(2024, 6, 1, tzinfo=UTC), 5)
    assert r.search("anything", datetime(2024, 7, 1, tzinfo=UTC), ticker="ZZZZ").items == []


BAD_PRICES = {
    "date,ticker,open,high,low,close,volume\n2024-06-03,A,1,1,1,1,1\n": r"prices.csv:1: missing columns adj_close",
    "date,ticker,open,high,low,close,adj_close,volume\n2024-06-03,A,1,1,1,1,1,1\n06/04/2024,A,1,1,1,1,1,1\n":
        r"prices.csv:3: unparsable date '06/04/2024'",
    "date,ticker,open,high,low,close,adj_close,volume\n2024-06-03,A,1,1,1,-5,1,1\n":
        r"prices.csv:2: prices must be positive",
    "date,ticker,open,high,low,close,adj_close,volume\n2024-06-03,A,1,1,1,1,1,1\n2024-06-04,A,1,1,1,1,1,1\n"
    "2024-06-03,a,2,2,2,2,2,2\n": r"prices.csv:4: duplicate row for A on 2024-06-03 \(first on line 2\)",
    "date,ticker,open,high,low,close,adj_close,volume\n2024-07-04,A,1,1,1,1,1,1\n":
        r"prices.csv:2: 2024-07-04 is not a XNYS trading session",
    "date,ticker,open,high,low,close,adj_close,volume\n2024-06-03,A,x,1,1,1,1,1\n": r"prices.csv:2: .*not a number",
}


@pytest.mark.parametrize("content,message", list(BAD_PRICES.items()))
def test_malformed_prices_name_file_and_line(tmp_path, content, message):
    (tmp_path / "prices.csv").write_text(content)
    with pytest.raises(CsvFormatError, match=message):
        CsvReplay(tmp_path, CAL)


@pytest.mark.parametrize("content,message", [
    ("published_at,ticker,title\n", r"news.csv:1: missing columns snippet, url, source"),
    ("published_at,ticker,title,snippet,url,source\nyesterday,A,t,s,u,x\n", r"news.csv:2: unparsable published_at"),
    # a date alone is that day's close: 16:00 New York = 20:00 UTC in June
    ("published_at,ticker,title,snippet,url,source\n2024-06-03,A,t,s,u,x\n2024-06-03T20:00:00Z,A,t,s2,u,y\n",
     r"news.csv:3: duplicate news row \(first on line 2\)"),
])
def test_malformed_news_name_file_and_line(tmp_path, content, message):
    (tmp_path / "prices.csv").write_text("date,ticker,open,high,low,close,adj_close,volume\n")
    (tmp_path / "news.csv").write_text(content)
    with pytest.raises(CsvFormatError, match=message):
        CsvReplay(tmp_path, CAL)
    with pytest.raises(CsvFormatError, match="not found"):
        CsvReplay(tmp_path / "nowhere", CAL)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(minutes=st.integers(0, 60 * 24 * 62), lookback=st.integers(1, 30), query=st.sampled_from(["", "nvidia"]))
def test_point_in_time_for_random_as_of(replay_dir, minutes, lookback, query):
    r = CsvReplay(replay_dir, CAL)
    as_of = datetime(2024, 6, 3, tzinfo=UTC) + timedelta(minutes=minutes)
    try:
        bars = r.bars("NVDA", as_of, lookback).items
    except NoDataError:
        bars = []
        assert as_of <= CAL.close_of(SESSIONS[0])
    assert all(CAL.close_of(b.date) < as_of for b in bars)
    if bars:
        assert bars[-1].date == min(CAL.base_session(as_of), SESSIONS[-1])
    news = r.search(query, as_of, max_results=10).items
    assert all(n.published_at < as_of for n in news)
    assert len(news) == sum(1 for line in NEWS.splitlines()[1:] if (not query or query in line.lower())
                            and _published(line) < as_of)


def _published(line: str) -> datetime:
    from market.csv_replay import parse_published_at

    return parse_published_at(line.split(",")[0], CAL)


def test_build_market_from_csv(replay_dir):
    m = build_market(MarketConfig(source="csv", universe=["NVDA", "AAPL"], csv=CsvConfig(dir=str(replay_dir))))
    assert m.name == "csv" and m.tickers == ["NVDA"] and m.bayes_accuracy(5) is None
    assert m.prices.close_on("NVDA", date(2024, 7, 5)) > 0


@pytest.mark.parametrize("name,content,message", [
    # a spreadsheet's cp1252 export: é is 0xe9, which no UTF-8 sequence starts with
    ("news.csv", "published_at,ticker,title,snippet,url,source\n2024-06-03,A,ok,s,u,x\n2024-06-04,A,Soci\xe9t\xe9,s,u,x\n",
     r"news.csv:3: not UTF-8 \(byte 0xe9 at offset \d+\); save the file as UTF-8"),
    ("prices.csv", "date,ticker,open,high,low,close,adj_close,volume\n2024-06-03,\xff\xfe,1,1,1,1,1,1\n",
     r"prices.csv:2: not UTF-8 \(byte 0xff"),
    # a runaway quote swallows the rest of the file into one field past the csv module's size limit
    ("news.csv", "published_at,ticker,title,snippet,url,source\n2024-06-03,A,\"t" + "x" * 200_000 + "\n",
     r"news.csv:\d+: unreadable CSV \(field larger than field limit"),
])
def test_undecodable_or_unreadable_files_are_typed_errors(tmp_path, name, content, message):
    (tmp_path / "prices.csv").write_text("date,ticker,open,high,low,close,adj_close,volume\n")
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(CsvFormatError, match=message):
        CsvReplay(tmp_path, CAL)


def test_a_utf8_bom_is_not_part_of_the_header(replay_dir):
    (replay_dir / "prices.csv").write_bytes(b"\xef\xbb\xbf" + example_prices().encode())
    assert CsvReplay(replay_dir, CAL).tickers == {"NVDA", "OLD"}


def test_date_only_news_counts_as_published_at_that_days_close(replay_dir):
    """2024-06-07 (a Friday session) is visible from its close on, not from midnight: the 10:00 replay
    of that day must not see news that may have come out in the evening."""
    r = CsvReplay(replay_dir, CAL)
    close = CAL.close_of(date(2024, 6, 7))
    split = [n for n in r.search("split", CAL.replay_as_of(date(2024, 6, 7)), "NVDA").items]
    assert [n.published_at for n in split] == [close]
    assert r.search("split", close - timedelta(hours=6), "NVDA").items == []  # 10:00 New York that day
    assert r.search("split", close, "NVDA").items == []  # strictly before as_of
    from market.csv_replay import parse_published_at

    assert parse_published_at("2024-07-04", CAL) == datetime(2024, 7, 4, 23, 59, 59, 999999, tzinfo=UTC)  # holiday

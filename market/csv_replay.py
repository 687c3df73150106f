"""CSV replay: historical prices and news from two files, checked line by line on load.

prices.csv: date,ticker,open,high,low,close,adj_close,volume (one row per ticker and session; outcomes
use adj_close, so splits and dividends inside a window are already accounted for). A row with an
empty or NaN price is skipped and counted (`nan_rows`), as data exports often carry such gaps.
news.csv (optional): published_at,ticker,title,snippet,url,source; published_at is ISO 8601, a time
without offset is read as UTC; an empty ticker is market-wide. A date alone counts as published at
that day's close (exchange calendar; the end of the day, UTC, on a weekend or holiday): the item may
have come out any time that day, and midnight would show the evening's news to that day's 10:00.
Files must be UTF-8 (a BOM is fine); anything else is a CsvFormatError naming the line.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from market.calendar import TradingCalendar, require_utc
from market.guard import guard_bars
from market.keywords import keyword_search
from market.protocols import Bar, CsvFormatError, Fetched, NewsItem, NoDataError, UnknownTickerError

PRICE_COLUMNS = ["date", "ticker", "open", "high", "low", "close", "adj_close", "volume"]
NEWS_COLUMNS = ["published_at", "ticker", "title", "snippet", "url", "source"]


def parse_published_at(text: str, calendar: TradingCalendar | None = None) -> datetime:
    """ISO 8601 to aware UTC; a naive time is UTC; a bare date is that day's close (with a calendar;
    the end of the day, UTC, on a non-session day or without one)."""
    text = text.strip()
    if _is_iso_date(text):
        day = date.fromisoformat(text)
        if calendar is not None and calendar.is_session(day):
            return calendar.close_of(day)
        return datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC) - timedelta(microseconds=1)
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _read_text(path: Path) -> str:
    """The file as text; not UTF-8 is a typed error naming the line (spreadsheets export cp1252)."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CsvFormatError(f"{path}: cannot open ({err.strerror})") from None
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 BOM (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise CsvFormatError(f"{path}:{line}: not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                             "save the file as UTF-8") from None


def _rows(path: Path, columns: list[str]) -> list[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise CsvFormatError(f"{path}:1: missing columns {', '.join(missing)} (expected {','.join(columns)})")
        reader.fieldnames = header
        # Line numbers count the header as line 1; quoted newlines are not expected in these files.
        return [(i, {k: (v or "").strip() for k, v in row.items() if isinstance(k, str) and k})
                for i, row in enumerate(reader, start=2)]
    except csv.Error as err:  # a NUL byte, a field over the size limit
        raise CsvFormatError(f"{path}:{reader.line_num}: unreadable CSV ({err})") from None


def load_prices(path: Path, calendar: TradingCalendar) -> tuple[dict[str, list[Bar]], int]:
    """Bars per ticker sorted by date, plus how many rows had NaN/empty prices and were skipped."""
    bars: dict[str, list[Bar]] = defaultdict(list)
    seen: dict[tuple[str, date], int] = {}
    nan_rows = 0
    for line, row in _rows(path, PRICE_COLUMNS):
        where = f"{path}:{line}"
        try:
            day = date.fromisoformat(row["date"])
        except ValueError:
            raise CsvFormatError(f"{where}: unparsable date {row['date']!r} (expected YYYY-MM-DD)") from None
        ticker = row["ticker"].upper()
        if not ticker:
            raise CsvFormatError(f"{where}: empty ticker")
        raw = [row[c] for c in PRICE_COLUMNS[2:]]
        if any(v == "" or v.lower() == "nan" for v in raw[:5]):
            nan_rows += 1
            continue
        try:
            values = [float(v) if v else 0.0 for v in raw]
        except ValueError:
            raise CsvFormatError(f"{where}: a price or volume is not a number: {raw}") from None
        if any(not math.isfinite(v) or v <= 0 for v in values[:5]) or values[5] < 0:
            raise CsvFormatError(f"{where}: prices must be positive and volume non-negative: {raw}")
        if (ticker, day) in seen:
            raise CsvFormatError(f"{where}: duplicate row for {ticker} on {day} (first on line {seen[ticker, day]})")
        seen[ticker, day] = line
        if not calendar.is_session(day):
            raise CsvFormatError(f"{where}: {day} is not a {calendar.exchange} trading session")
        bars[ticker].append(Bar(ticker, day, *values))
    for series in bars.values():
        series.sort(key=lambda b: b.date)
    return dict(bars), nan_rows


def load_news(path: Path, calendar: TradingCalendar | None = None) -> list[NewsItem]:
    """News items sorted by published_at; missing columns, bad dates and duplicates are errors.
    `calendar` places date-only items at that day's close."""
    items: list[NewsItem] = []
    seen: dict[tuple[str, ...], int] = {}
    for line, row in _rows(path, NEWS_COLUMNS):
        where = f"{path}:{line}"
        try:
            published = parse_published_at(row["published_at"], calendar)
        except ValueError:
            raise CsvFormatError(f"{where}: unparsable published_at {row['published_at']!r} (ISO 8601)") from None
        if not row["title"]:
            raise CsvFormatError(f"{where}: empty title")
        key = (published.isoformat(), row["ticker"].upper(), row["title"], row["url"])
        if key in seen:
            raise CsvFormatError(f"{where}: duplicate news row (first on line {seen[key]})")
        seen[key] = line
        ticker = row["ticker"].upper()
        items.append(NewsItem(published, row["title"], row["snippet"], row["url"], row["source"] or "csv",
                              (ticker,) if ticker else ()))
    items.sort(key=lambda it: it.published_at)
    return items


class CsvReplay:
    """PriceSource and NewsSource over `prices.csv` and `news.csv` in one folder."""

    name = "csv"

    def __init__(self, folder: str | Path, calendar: TradingCalendar | None = None, exchange: str = "XNYS") -> None:
        self.folder = Path(folder)
        prices = self.folder / "prices.csv"
        if not prices.exists():
            raise CsvFormatError(f"{prices}: not found (CSV replay needs prices.csv; news.csv is optional)")
        if calendar is None:
            first = min((date.fromisoformat(r["date"]) for _, r in _rows(prices, PRICE_COLUMNS)
                         if _is_iso_date(r["date"])), default=None)
            calendar = TradingCalendar(exchange, start=first)
        self.calendar = calendar
        self._bars, self.nan_rows = load_prices(prices, calendar)
        self._dates = {t: [b.date for b in series] for t, series in self._bars.items()}
        news = self.folder / "news.csv"
        all_news = load_news(news, calendar) if news.exists() else []
        self._news: dict[str | None, list[NewsItem]] = defaultdict(list)
        self._news[None] = all_news
        for item in all_news:
            for t in item.tickers:
                self._news[t].append(item)
        self._times = {k: [it.published_at for it in v] for k, v in self._news.items()}

    @property
    def tickers(self) -> set[str]:
        return set(self._bars)

    @property
    def span(self) -> tuple[date, date] | None:
        days = [d for ds in self._dates.values() for d in (ds[0], ds[-1])]
        return (min(days), max(days)) if days else None

    def _series(self, ticker: str) -> list[Bar]:
        try:
            return self._bars[ticker.upper()]
        except KeyError:
            raise UnknownTickerError(f"unknown ticker {ticker!r}: not in {self.folder / 'prices.csv'}") from None

    def bars(self, ticker: str, as_of: datetime, lookback_days: int) -> Fetched[Bar]:
        series = self._series(ticker)
        as_of = require_utc(as_of)
        hi = bisect.bisect_right(self._dates[ticker.upper()], as_of.date())
        fetched = guard_bars(series[max(0, hi - lookback_days - 1): hi], as_of, self.calendar)
        fetched.items = fetched.items[-lookback_days:] if lookback_days > 0 else []
        if not fetched.items:
            raise NoDataError(f"no bars for {ticker} before {as_of.isoformat()} in {self.folder / 'prices.csv'}")
        return fetched

    def close_on(self, ticker: str, day: date) -> float:
        series = self._series(ticker)
        i = bisect.bisect_left(self._dates[ticker.upper()], day)
        if i == len(series) or series[i].date != day:
            raise NoDataError(f"no bar for {ticker} on {day} in {self.folder / 'prices.csv'} "
                              "(holiday, missing row, or delisted)")
        return series[i].adj_close

    def search(self, query: str, as_of: datetime, ticker: str | None = None, max_results: int = 8
               ) -> Fetched[NewsItem]:
        key = ticker.upper() if ticker else None
        return keyword_search(self._news.get(key, []), self._times.get(key, []), query, as_of, max_results)


def _is_iso_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True

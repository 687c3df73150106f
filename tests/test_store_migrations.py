import pytest
from sqlalchemy import inspect, text

from store.db import StoreError, current_revision, downgrade, head_revision, make_engine, open_store, upgrade
from store.views import VIEWS, views_at

TABLES = {
    "blocks", "episodes", "steps", "tool_calls", "snippets", "tool_call_snippets", "price_bars",
    "predictions", "outcomes", "rewards", "block_metrics", "training_runs", "adapters", "triggers",
    "daemon_lock", "eval_runs", "gate_decisions",
}


def test_upgrade_creates_tables_and_views(db_url):
    engine = open_store(db_url)
    insp = inspect(engine)
    assert TABLES <= set(insp.get_table_names())
    assert set(VIEWS) <= set(insp.get_view_names())
    with engine.connect() as conn:
        for view in VIEWS:
            assert conn.execute(text(f"SELECT * FROM {view}")).fetchall() == []
    assert current_revision(engine) == head_revision()


def test_init_is_idempotent(db_url):
    open_store(db_url).dispose()
    engine = open_store(db_url)
    assert current_revision(engine) == head_revision()


def test_downgrade_upgrade_round_trip(db_url):
    engine = open_store(db_url)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert "blocks" not in inspect(engine).get_table_names()
    assert upgrade(engine) == head_revision()
    assert TABLES <= set(inspect(engine).get_table_names())


def test_v_predictions_shows_stated_confidence_from_revision_0007(db_url):
    """A view change is its own revision: stepping back to 0006 restores the earlier view, which the
    fresh-database path (0001 builds views as of 0001) also relies on."""
    engine = open_store(db_url)

    def columns() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT * FROM v_predictions")).keys())

    assert "stated_confidence" in columns() and columns().index("stated_confidence") == columns().index("confidence") + 1
    downgrade(engine, "0006")
    assert "stated_confidence" not in columns() and "confidence" in columns()
    assert upgrade(engine) == head_revision() and "stated_confidence" in columns()
    assert "stated_confidence" not in views_at("0001")["v_predictions"]
    assert views_at("0008") == VIEWS


def test_v_predictions_marks_explored_predictions_from_revision_0008(db_url):
    engine = open_store(db_url)

    def columns() -> list[str]:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT * FROM v_predictions")).keys())

    assert {"explored_direction", "explored_tool"} <= set(columns())
    downgrade(engine, "0007")
    assert "explored_direction" not in columns() and "stated_confidence" in columns()
    assert upgrade(engine) == head_revision() and "explored_direction" in columns()


def test_newer_database_is_refused_and_untouched(db_url):
    engine = open_store(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(StoreError, match="9999_future.*upgrade scoreloop"):
        open_store(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "9999_future"


def test_bad_url_is_one_clear_error():
    with pytest.raises(StoreError, match="bad database URL"):
        make_engine("not a url")
    with pytest.raises(StoreError, match="unsupported database"):
        make_engine("mysql+nosuchdriver://x@y/z")


def test_unreachable_postgres_is_one_clear_error():
    with pytest.raises(StoreError, match="cannot reach database"):
        open_store("postgresql://nobody@127.0.0.1:1/nothing")


def test_sqlite_is_wal_with_foreign_keys(sqlite_db):
    with sqlite_db.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1

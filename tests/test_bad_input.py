"""Bad input at the CLI: a database URL never comes back with its password, and commands that only
read never create a database. Through the real CLI and real drivers (nothing listens on port 1)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from scheduler.cli import app
from store.db import mask_url

SECRET = "s3cret-pw"
BAD_URLS = [
    f"postgresql://bob:{SECRET}@127.0.0.1:notaport/db",  # make_url raises ValueError
    f"postgresql+nodriver://bob:{SECRET}@127.0.0.1/db",  # no such driver
    f"postgres ql://bob:{SECRET}@h/db",  # not a URL at all
    f"postgresql://bob:{SECRET}@127.0.0.1:1/db",  # nothing listens: the driver's own error
    f"postgresql://bob:{SECRET}@ex@mple@127.0.0.1:1/db",  # a raw @ inside the password
    f"mysql://bob:{SECRET}@h/db",
]


@pytest.mark.parametrize("url", BAD_URLS)
@pytest.mark.parametrize("command", [["status"], ["init"]])
def test_a_bad_database_url_is_one_line_without_its_password(url, command):
    res = CliRunner().invoke(app, ["--db", url, *command])
    assert res.exit_code == 1, res.output  # a typed error, not a traceback
    assert SECRET not in res.output and "ex@mple" not in res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1


def test_mask_url_hides_every_password_shape():
    assert mask_url("postgresql+psycopg://u:p@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert mask_url("see 'postgresql://u:p@ss@h/db' and sqlite:///x.db") == "see 'postgresql://u:***@h/db' and sqlite:///x.db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"  # nothing to hide


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["trace", "1"], ["report", "--out", "rep"],
                                     ["export", "--out", "x.jsonl"]])
def test_read_only_commands_never_create_a_database(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nested" / "none.db"
    res = CliRunner().invoke(app, ["--db", f"sqlite:///{missing}", *command])
    assert res.exit_code == 1, res.output
    assert "scoreloop init" in res.output
    assert not missing.exists() and not missing.parent.exists()

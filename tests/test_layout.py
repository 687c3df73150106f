"""The layering of DESIGN.md's layout table, read from the code: which package may import which.

Imports only flow down (scheduler -> agent / trainer / evaluation / scoring -> policy / market ->
store / rewards); a new arrow back up fails here with the file and line that drew it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("policy", "agent", "market", "rewards", "store", "trainer", "scoring", "evaluation", "scheduler")

# package -> the project packages it must never import (DESIGN.md, "must not" column).
FORBIDDEN = {
    "trainer": {"agent", "scheduler", "evaluation", "scoring"},
    "agent": {"trainer", "scheduler", "evaluation", "scoring"},
    "policy": {"agent", "trainer", "market", "rewards", "scheduler", "evaluation", "scoring"},
    "market": {"agent", "trainer", "policy", "rewards", "scheduler", "evaluation", "scoring"},
    "rewards": set(PACKAGES) - {"rewards"},
    "store": {"agent", "trainer", "policy", "market", "scheduler", "evaluation", "scoring"},
    "scoring": {"agent", "trainer", "policy", "scheduler", "evaluation"},
    "evaluation": {"trainer", "scheduler"},
}


def imports(package: str) -> list[tuple[str, int, str, list[str]]]:
    """(file, line, imported module, imported names) for every import of a project package in `package`."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules, names = [node.module], [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                modules, names = [a.name for a in node.names], []
            else:
                continue
            for mod in modules:
                if mod.split(".")[0] in PACKAGES:
                    found.append((str(path.relative_to(REPO)), node.lineno, mod, names))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_only_flow_down(package):
    bad = [f"{f}:{line} imports {mod}" for f, line, mod, _ in imports(package)
           if mod.split(".")[0] in FORBIDDEN[package]]
    assert bad == []


def test_policy_takes_only_the_error_base_from_store():
    """policy/ knows nothing of SQL: its one store import is the ScoreloopError base."""
    assert {mod for _, _, mod, _ in imports("policy") if mod.startswith("store")} <= {"store.errors"}


def test_agent_reads_no_trainer_table_directly():
    """agent/ reaches training_runs / adapters only through named store functions, never the models."""
    bad = [f"{f}:{line} imports {names}" for f, line, mod, names in imports("agent")
           if mod == "store.models" and {"TrainingRun", "Adapter"} & set(names)]
    assert bad == []

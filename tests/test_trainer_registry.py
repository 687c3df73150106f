"""Adapter registry on SQLite and PostgreSQL: atomic folders, one serving row, rejects never serve, gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from store.db import session_scope
from store.models import Adapter
from store.training import add_adapter
from trainer.config import TrainerConfig
from trainer.errors import TrainerError
from trainer.gate import apply_verdict, decide
from trainer.registry import check_adapter, publish, reject, save_adapter, serving_adapter


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from trainer.sft import load_trainable_model

    return load_trainable_model(tiny_model_dir, None, TrainerConfig(lora_r=2, lora_alpha=4), "cpu")


def candidate(engine, model, root: Path, version: int, parent: int | None = None) -> str:
    path = save_adapter(model, root / "adapters", version)
    with session_scope(engine) as s:
        add_adapter(s, version=version, parent_version=parent, path=str(path), base_model="tiny",
                    training_run_id=None)
    return str(path)


def statuses(engine) -> dict[int, str]:
    with session_scope(engine) as s:
        return {a.version: a.status for a in s.scalars(select(Adapter))}


def test_publish_flips_one_serving_row(fresh_db, peft_model, tmp_path):
    with session_scope(fresh_db) as s:
        assert serving_adapter(s) is None
    p1 = candidate(fresh_db, peft_model, tmp_path, 1)
    p2 = candidate(fresh_db, peft_model, tmp_path, 2, parent=1)
    publish(fresh_db, 1)
    assert statuses(fresh_db) == {1: "serving", 2: "candidate"}
    publish(fresh_db, 2)
    assert statuses(fresh_db) == {1: "retired", 2: "serving"}
    with session_scope(fresh_db) as s:
        assert serving_adapter(s) == (p2, 2)
    assert Path(p1).name == "v1" and sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["v1", "v2"]  # no temp dirs


def test_rejected_candidate_never_serves(fresh_db, peft_model, tmp_path):
    candidate(fresh_db, peft_model, tmp_path, 1)
    publish(fresh_db, 1)
    candidate(fresh_db, peft_model, tmp_path, 2, parent=1)
    reject(fresh_db, 2, {"mean_composite": 0.31})
    with pytest.raises(TrainerError, match="rejected"):
        publish(fresh_db, 2)
    assert statuses(fresh_db) == {1: "serving", 2: "rejected"}
    with session_scope(fresh_db) as s:
        assert serving_adapter(s)[1] == 1
        assert s.scalars(select(Adapter).where(Adapter.version == 2)).one().metrics["mean_composite"] == 0.31


def test_corrupted_candidate_is_refused_and_serving_stays(fresh_db, peft_model, tmp_path):
    candidate(fresh_db, peft_model, tmp_path, 1)
    publish(fresh_db, 1)
    p2 = Path(candidate(fresh_db, peft_model, tmp_path, 2, parent=1))
    weights = p2 / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated write
    with pytest.raises(TrainerError, match="corrupted"):
        publish(fresh_db, 2)
    assert statuses(fresh_db) == {1: "serving", 2: "candidate"}


@pytest.mark.parametrize("damage", ["missing_config", "garbled_config", "no_weights", "nan_weights"])
def test_check_adapter_names_the_damage(peft_model, tmp_path, damage):
    import torch
    from safetensors.torch import load_file, save_file

    path = save_adapter(peft_model, tmp_path, 1)
    check_adapter(path)
    if damage == "missing_config":
        (path / "adapter_config.json").unlink()
    elif damage == "garbled_config":
        (path / "adapter_config.json").write_text("{not json")
    elif damage == "no_weights":
        (path / "adapter_model.safetensors").unlink()
    else:
        tensors = load_file(path / "adapter_model.safetensors")
        key = next(iter(tensors))
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(TrainerError, match="corrupted"):
        check_adapter(path)


def test_save_adapter_replaces_a_stale_folder_without_rowless_leftovers(peft_model, tmp_path):
    stale = tmp_path / "v3"
    stale.mkdir()
    (stale / "junk").write_text("from a crashed round")
    path = save_adapter(peft_model, tmp_path, 3)
    assert sorted(p.name for p in path.iterdir()) == sorted(["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"])
    assert [p.name for p in tmp_path.iterdir()] == ["v3"]


def test_gate_verdicts_publish_or_reject_real_adapters(fresh_db, peft_model, tmp_path):
    """The decision rule itself is tested in test_gate.py; here its verdicts move real adapter folders."""
    serving = [0.2, 0.5, 0.8] * 10

    def gate(version, shift):
        v = decide(serving, [r + shift for r in serving])
        return apply_verdict(fresh_db, version, v, serving_version=None, serving_block_id=None,
                             candidate_block_id=None, items=[], region={})

    candidate(fresh_db, peft_model, tmp_path, 1)
    assert gate(1, 0.2)
    candidate(fresh_db, peft_model, tmp_path, 2, parent=1)
    assert not gate(2, -0.2)
    candidate(fresh_db, peft_model, tmp_path, 3, parent=1)
    assert not gate(3, 0.0)
    assert statuses(fresh_db) == {1: "serving", 2: "rejected", 3: "rejected"}
    with session_scope(fresh_db) as s:
        metrics = {a.version: a.metrics["gate"] for a in s.scalars(select(Adapter))}
    assert [metrics[v]["decision"] for v in (1, 2, 3)] == ["accept", "reject", "keep"]
    assert metrics[2]["mean_diff"] == pytest.approx(-0.2) and metrics[2]["ci_high"] < 0

"""Adapter registry: versions on disk under adapters_dir/v{version}, their rows in the store.

A candidate's folder is written atomically when its round ends (temp folder inside adapters_dir,
files fsynced, os.replace), so the gate can evaluate it; `publish` then checks the folder and
flips the serving row in one transaction. A reader therefore sees either the old serving
adapter or the new one, complete, never a half-written folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from store.db import session_scope
from store.training import adapter_row, flip_serving, merge_adapter_metrics, serving_adapter_row
from trainer.errors import TrainerError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def version_dir(adapters_dir: str | os.PathLike[str], version: int) -> Path:
    return Path(adapters_dir) / f"v{version}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(model: Any, adapters_dir: str | os.PathLike[str], version: int) -> Path:
    """Write a PEFT model's adapter to adapters_dir/v{version} atomically; returns the folder."""
    root = Path(adapters_dir)
    root.mkdir(parents=True, exist_ok=True)
    dest = version_dir(root, version)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=root))
    try:
        model.save_pretrained(tmp)
        _fsync_tree(tmp)
        if dest.exists():
            # A leftover from a round that crashed before its row was written: no row points at it.
            stale = Path(tempfile.mkdtemp(prefix=f".stale-v{version}-", dir=root))
            os.replace(dest, stale / dest.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, dest)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def check_adapter(path: str | os.PathLike[str]) -> None:
    """Raise TrainerError unless `path` holds a loadable LoRA adapter with finite weights."""
    folder = Path(path)
    config_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not folder.is_dir():
        raise TrainerError(f"adapter folder {folder} is missing")
    try:
        cfg = json.loads(config_file.read_text())
        if not isinstance(cfg, dict) or "peft_type" not in cfg:
            raise ValueError("not a PEFT adapter config")
    except (OSError, ValueError) as err:
        raise TrainerError(f"adapter {folder} is corrupted: {config_file.name}: {err}") from None
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            if not keys:
                raise ValueError("no tensors")
            for key in keys:
                t = f.get_tensor(key)
                if not bool(t.float().isfinite().all()):
                    raise ValueError(f"tensor {key} has NaN or inf values")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for garbled files
        raise TrainerError(f"adapter {folder} is corrupted: {weights.name}: {err}") from None


def serving_adapter(session: Session) -> tuple[str, int] | None:
    """(path, version) of the adapter that serves now; None = the base model serves."""
    row = serving_adapter_row(session)
    return None if row is None else (row.path, row.version)


def publish(engine: Engine, version: int) -> None:
    """Make `version` serve: its folder must load; the old serving row retires in the same transaction."""
    with session_scope(engine) as s:
        row = adapter_row(s, version)
        if row is None:
            raise TrainerError(f"adapter v{version} is not in the registry")
        if row.status == "rejected":
            raise TrainerError(f"adapter v{version} was rejected by the gate and never serves")
        if row.status == "serving":
            return
        check_adapter(row.path)
        flip_serving(s, version)


def reject(engine: Engine, version: int, metrics: dict[str, Any]) -> None:
    """Record a candidate as rejected with the metrics that sank it; it never serves."""
    with session_scope(engine) as s:
        row = adapter_row(s, version)
        if row is None:
            raise TrainerError(f"adapter v{version} is not in the registry")
        if row.status == "serving":
            raise TrainerError(f"adapter v{version} is serving; publish another version instead of rejecting it")
        merge_adapter_metrics(s, version, metrics)
        row.status = "rejected"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None all the way down: JSON columns on PostgreSQL refuse them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def record_gate_metrics(engine: Engine, version: int, metrics: dict[str, Any]) -> None:
    """Store the gate's evaluation (candidate and serving figures) on the candidate's row."""
    clean = _finite(json.loads(json.dumps(metrics, default=float)))
    with session_scope(engine) as s:
        if adapter_row(s, version) is None:
            raise TrainerError(f"adapter v{version} is not in the registry")
        merge_adapter_metrics(s, version, {"gate": clean})

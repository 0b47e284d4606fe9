"""The run directory: its layout and the atomic reads and writes of everything in it.

::

    RUN_DIR/config.yaml                      resolved config (seed included)
    RUN_DIR/manifest/<method>/step-NNN.json  one file per finished step (the manifest)
    RUN_DIR/versions/<method>/vK/            final weights (model.pt) + meta.json of version K
    RUN_DIR/epochs/<method>/step-NNN.pt      last finished epoch of an unfinished step (resume point)
    RUN_DIR/rows/<method>/row-NNN.json       row K of the compatibility matrices
    RUN_DIR/store/                           the embedding store
    RUN_DIR/ray/                             Ray Train run state (deterministic run names)
    RUN_DIR/progress/<method>.json           the running step's epoch and loss (for the progress display)
    RUN_DIR/replay/<method>/after-step-NNN.json  replay memory (training-split indices) after step N
    RUN_DIR/upstream/<digest>/               a run directory per upstream (replacement) model
    RUN_DIR/metrics.json, report.md, *.png, *.csv

Every file is written to a temporary name in the same directory and renamed into place, so a crash
never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from orchestrator.errors import RunError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path} is corrupt ({exc}); delete it and run again with --resume") from None


def atomic_torch_save(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- layout ------------------------------------------------------------------------------------
def store_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "store"


def versions_dir(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "versions" / method


def task_manifest_path(run_dir: Path, name: str) -> Path:
    """The manifest entry of a task of the run (``<method>/step-NNN``, ``encode-old``, ...)."""
    return Path(run_dir) / "manifest" / f"{name}.json"


def manifest_path(run_dir: Path, method: str, step: int) -> Path:
    return task_manifest_path(run_dir, f"{method}/step-{step:03d}")


def row_path(run_dir: Path, method: str, step: int) -> Path:
    return Path(run_dir) / "rows" / method / f"row-{step:03d}.json"


def epoch_state_path(run_dir: Path, method: str, step: int) -> Path:
    return Path(run_dir) / "epochs" / method / f"step-{step:03d}.pt"


def progress_path(run_dir: Path, method: str) -> Path:
    return Path(run_dir) / "progress" / f"{method.replace('/', '--')}.json"


def replay_path(run_dir: Path, method: str, step: int) -> Path:
    return Path(run_dir) / "replay" / method / f"after-step-{step:03d}.json"


def upstream_dir(run_dir: Path, digest: str) -> Path:
    return Path(run_dir) / "upstream" / digest


def relative_to_run(path: Optional[str], run_dir: Path) -> Optional[str]:
    """A path inside the run directory as relative to it (so a moved run directory stays valid)."""
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)


# -- cross-modal layout -------------------------------------------------------------------------
CROSSMODAL_VERSIONS = {"old": 0, "new": 1}  # store versions of the two CLIPs; projected queries are version 1 too


def seed_dir(run_dir: Path, seed: int) -> Path:
    """A cross-modal run's per-seed directory (its methods' stage states and projected queries)."""
    return Path(run_dir) / f"seed-{seed}"


def state_path(run_dir: Path, seed: int, method: str, stage: str) -> Path:
    return seed_dir(run_dir, seed) / "states" / method / f"{stage}.pt"


# -- manifest ----------------------------------------------------------------------------------
def task_done(run_dir: Path, name: str) -> bool:
    return task_manifest_path(run_dir, name).is_file()


def step_done(run_dir: Path, method: str, step: int) -> bool:
    return manifest_path(run_dir, method, step).is_file()


def mark_step_done(run_dir: Path, method: str, step: int, entry: dict) -> None:
    atomic_write_json(manifest_path(run_dir, method, step), entry)


def manifest_entry(run_dir: Path, method: str, step: int) -> Optional[dict]:
    path = manifest_path(run_dir, method, step)
    return read_json(path) if path.is_file() else None


# -- weights -----------------------------------------------------------------------------------
def save_version(run_dir: Path, method: str, version: int, state_dict: dict, meta: dict) -> Path:
    """Final weights of a version: tensors only, so ``torch.load(weights_only=True)`` reads them."""
    target = versions_dir(run_dir, method) / f"v{version}"
    atomic_torch_save(target / "model.pt", {k: v.detach().cpu() for k, v in state_dict.items()})
    atomic_write_json(target / "meta.json", meta)
    return target


def save_epoch_state(run_dir: Path, method: str, step: int, state: dict) -> None:
    atomic_torch_save(epoch_state_path(run_dir, method, step), state)


def load_epoch_state(run_dir: Path, method: str, step: int) -> Optional[dict]:
    path = epoch_state_path(run_dir, method, step)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunError(f"epoch checkpoint {path} is corrupt ({exc}); delete it to restart that step") from None


def clear_epoch_state(run_dir: Path, method: str, step: int) -> None:
    epoch_state_path(run_dir, method, step).unlink(missing_ok=True)


# -- progress ----------------------------------------------------------------------------------
def write_progress(run_dir: Path, method: str, progress: dict) -> None:
    """The running step's epoch and losses, one file per method (several chains train at once)."""
    atomic_write_json(progress_path(run_dir, method), progress)


def read_progress(run_dir: Path, method: str) -> Optional[dict]:
    try:
        return json.loads(progress_path(run_dir, method).read_text())
    except (OSError, json.JSONDecodeError):
        return None

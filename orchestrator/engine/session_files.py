"""FSCIL session index files in the common (TOPIC/CEC) format: which training images each session uses.

A directory holds ``session_1.txt`` (the base session) .. ``session_T.txt``, one line per training
image: either an integer index into the training split (CIFAR lists) or an image path whose last two
components are ``<class>/<file>`` (miniImageNet, CUB-200 lists; matched against an ``imagefolder``
training split). The files are authoritative: they fix the images of every step, and the order in
which they introduce classes is the class order (within a session, by dataset label).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.errors import ConfigError, DataError

if TYPE_CHECKING:
    from orchestrator.config import ExperimentConfig
    from orchestrator.engine.scenarios import Step


def session_file_paths(directory: str, num_steps: int, key: str = "scenario.session_files") -> list[Path]:
    """The files of steps 0..num_steps-1, checked to exist (a ConfigError naming ``key`` otherwise)."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise ConfigError(key, f"{root} is not a directory of session_1.txt .. session_{num_steps}.txt files")
    paths = [root / f"session_{t + 1}.txt" for t in range(num_steps)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(key, f"{root} lacks {', '.join(missing)} (the scenario has {num_steps} steps)")
    return paths


def read_session_file(path: Path) -> list[str]:
    """Non-empty lines, stripped; a file without any entry is an error."""
    entries = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not entries:
        raise DataError(f"session file {path} lists no image")
    return entries


def resolve_entries(entries: list[str], path: Path, num_images: int, image_paths: Optional[list[str]]) -> np.ndarray:
    """Training-split indices of ``entries`` (all integers, or all paths matched on ``<class>/<file>``)."""
    if all(e.isdigit() for e in entries):
        indices = np.array([int(e) for e in entries], dtype=np.int64)
        bad = indices[indices >= num_images]
        if bad.size:
            raise DataError(f"{path}: index {int(bad[0])} is out of range (the training split has {num_images} images)")
        return indices
    if image_paths is None:
        raise DataError(f"{path} names images by path, but this dataset has no image paths; list integer indices")
    lookup = {p: i for i, p in enumerate(image_paths)}
    indices = []
    for line, entry in enumerate(entries, 1):
        parts = entry.replace("\\", "/").split("/")
        index = lookup.get("/".join(parts[-2:]))
        if index is None:
            raise DataError(f"{path} line {line}: {entry!r} is not an image of the training split "
                            f"(matched as <class>/<file> = {'/'.join(parts[-2:])!r})")
        indices.append(index)
    return np.array(indices, dtype=np.int64)


@dataclass(frozen=True)
class SessionPlan:
    """What the files say: the class order and each step's training-image indices."""

    order: np.ndarray  # every dataset label, in the order the sessions introduce them
    indices: list[np.ndarray]  # per step: indices into the training split


def plan_from_files(paths: list[Path], labels: np.ndarray, num_classes: int, image_paths: Optional[list[str]],
                    new_per_step: list[int], shots: Optional[int]) -> SessionPlan:
    """Resolve every file and check it against the planned steps: step t must introduce exactly
    ``new_per_step[t]`` classes, and (with ``shots``) an incremental step exactly ``shots`` images each.
    Classes no file mentions follow, by label, at the end of the order."""
    order: list[int] = []
    per_step = []
    for t, path in enumerate(paths):
        indices = resolve_entries(read_session_file(path), path, len(labels), image_paths)
        new = sorted(set(labels[indices].tolist()) - set(order))
        if len(new) != new_per_step[t]:
            raise DataError(f"{path} introduces {len(new)} new classes; step {t} of the scenario expects {new_per_step[t]}")
        if t > 0 and shots is not None:
            counts = np.bincount(labels[indices], minlength=num_classes)[new]
            if (counts != shots).any():
                raise DataError(f"{path} lists {int(counts[counts != shots][0])} images of a new class; "
                                f"scenario.shots is {shots}")
        order.extend(new)
        per_step.append(np.sort(indices))
    rest = sorted(set(range(num_classes)) - set(order))
    return SessionPlan(np.array(order + rest, dtype=np.int64), per_step)


def image_paths_of(data: DataConfig) -> Optional[list[str]]:
    """``<class>/<file>`` of each training image when the dataset has files (imagefolder), else None."""
    if data.dataset != "imagefolder":
        return None
    from orchestrator.data.imagefolder import image_paths

    return image_paths(data, "train")


def session_plan(cfg: "ExperimentConfig", steps: list["Step"], train_labels: np.ndarray,
                 num_classes: int) -> Optional[SessionPlan]:
    """The plan of ``cfg.scenario.session_files`` for ``steps``, or None when the scenario samples shots."""
    if cfg.scenario.session_files is None:
        return None
    paths = session_file_paths(cfg.scenario.session_files, len(steps))
    return plan_from_files(paths, train_labels, num_classes, image_paths_of(cfg.data),
                           [s.num_seen - s.num_previous for s in steps], cfg.scenario.shots)

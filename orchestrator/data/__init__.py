"""Datasets: a registry of sources and one factory, :func:`load_split`.

Every source returns the same thing, :class:`LabeledImages` (uint8 images in memory plus labels and
normalisation stats), so the training loop and the evaluation never care where images came from.
Generated or decoded arrays are cached on disk once and only ``np.load``-ed afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.errors import DataError
from orchestrator.registry import Registry

Split = Literal["train", "test"]
PathLike = Union[str, Path]


@dataclass
class LabeledImages:
    """One split of a dataset. ``sample_ids`` are stable (the index in the split) and survive :meth:`subset`."""

    images: np.ndarray  # uint8 (N, H, W, 3), C-contiguous
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]
    sample_ids: np.ndarray  # int64 (N,)
    mean: tuple[float, float, float]  # per-channel, in [0, 1] units
    std: tuple[float, float, float]

    def __post_init__(self):
        self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        if self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"images must have shape (N, H, W, 3), got {self.images.shape}")
        if not len(self.images) == len(self.labels) == len(self.sample_ids):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels and {len(self.sample_ids)} ids")

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, order: np.ndarray, batch_size: int):
        """uint8 (B, H, W, 3) tensors of the samples ``order`` lists, ``batch_size`` at a time (the
        interface a streamed split shares, orchestrator/data/streaming.py)."""
        return array_batches(self.images, order, batch_size)

    def subset(self, indices: np.ndarray) -> "LabeledImages":
        """The samples at ``indices`` (ints or a boolean mask), keeping their original sample ids."""
        return LabeledImages(self.images[indices], self.labels[indices], self.class_names,
                             self.sample_ids[indices], self.mean, self.std)


class DatasetSource(ABC):
    """A dataset kind. ``class_names`` must be cheap (no image decoding): config validation calls it."""

    @abstractmethod
    def class_names(self, cfg: DataConfig) -> list[str]: ...

    @abstractmethod
    def load(self, cfg: DataConfig, split: Split, cache_dir: Path) -> LabeledImages: ...


DATASETS: Registry[DatasetSource] = Registry("dataset", "data.dataset")


def register_dataset(name: str) -> Callable[[type[DatasetSource]], type[DatasetSource]]:
    """Class decorator: make a :class:`DatasetSource` available as ``data.dataset: <name>``."""

    def decorate(cls: type[DatasetSource]) -> type[DatasetSource]:
        DATASETS.add(name, cls())
        return cls

    return decorate


def list_datasets() -> list[str]:
    return DATASETS.names()


def _source(cfg: DataConfig) -> DatasetSource:
    return DATASETS.get(cfg.dataset)


def class_names_of(cfg: DataConfig) -> list[str]:
    return _source(cfg).class_names(cfg)


def dataset_num_classes(cfg: DataConfig) -> int:
    """Number of classes, without loading any image."""
    return len(class_names_of(cfg))


def cache_root(cache_dir: Optional[PathLike] = None) -> Path:
    """Where decoded/generated arrays live: ``cache_dir``, else ``$COMPAT_CACHE_DIR``, else
    ``~/.cache/compat-orchestrator``."""
    root = cache_dir or os.environ.get("COMPAT_CACHE_DIR") or Path.home() / ".cache" / "compat-orchestrator"
    return Path(root).expanduser()


def load_split(cfg: DataConfig, split: Split, cache_dir: Optional[PathLike] = None) -> LabeledImages:
    """Load one split of ``cfg``'s dataset (arrays cached under :func:`cache_root`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _source(cfg).load(cfg, split, cache_root(cache_dir))


# ---- helpers shared by the sources -------------------------------------------------------------------

def cache_entry(cache_dir: Path, kind: str, key: dict, build: Callable[[], tuple[dict[str, np.ndarray], dict]]) -> Path:
    """Directory of the cache entry for ``key``, built once by ``build() -> (arrays, meta)``.

    The entry is written to a temporary directory and renamed into place, so concurrent workers never
    read a half-written entry; if two build it at once, the first rename wins.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    entry = cache_dir / f"{kind}-{digest}"
    if (entry / "meta.json").is_file():
        return entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays, meta = build()
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{entry.name}."))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.rename(tmp, entry)
    except OSError as exc:
        if not (entry / "meta.json").is_file():
            raise DataError(f"cannot write the dataset cache entry {entry}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def read_meta(entry: Path) -> dict:
    return json.loads((entry / "meta.json").read_text())


def read_array(entry: Path, name: str) -> np.ndarray:
    return np.load(entry / f"{name}.npy")


def array_batches(images: np.ndarray, order: np.ndarray, batch_size: int):
    """uint8 tensors of ``images[order]``, ``batch_size`` at a time."""
    import torch

    for start in range(0, len(order), batch_size):
        yield torch.from_numpy(images[order[start:start + batch_size]])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units, from 256-bin histograms (no float copy of the images)."""
    return histogram_stats(np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]))


def histogram_stats(counts: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of (3, 256) grey-level counts (sums of several batches'
    counts give the same numbers as the whole array's, so a streamed pass matches the in-memory one)."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for c in range(3):
        hist = counts[c].astype(np.float64)
        hist /= hist.sum()
        m = float(hist @ levels)
        mean.append(m)
        std.append(float(np.sqrt(max(hist @ (levels - m) ** 2, 1e-12))))
    return tuple(mean), tuple(std)


# Importing the built-in sources registers them.
from orchestrator.data import cifar, encoded, imagefolder, synthetic  # noqa: E402,F401

__all__ = [
    "DatasetSource",
    "LabeledImages",
    "cache_root",
    "class_names_of",
    "dataset_num_classes",
    "list_datasets",
    "load_split",
    "register_dataset",
]

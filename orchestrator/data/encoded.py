"""Split indexes of file-backed datasets (cached), and the ``parquet``, ``webdataset`` and ``huggingface``
dataset kinds (``imagefolder`` is orchestrator/data/imagefolder.py).

An index is built once per split from the files' listing (names, sizes, modification times: editing
the data invalidates it) and memory-mapped afterwards, so a worker of a million-image dataset holds
its labels and locators (a few bytes per image) but never the images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import (DatasetSource, LabeledImages, Split, cache_entry, cache_root, channel_stats,
                               read_array, read_meta, register_dataset)
from orchestrator.data.formats import (Source, SplitIndex, arrow_listing, classes_of, declared_classes, encode_labels,
                                       list_files, parquet_listing, read_all, split_root, webdataset_listing)
from orchestrator.errors import DataError

INDEX_VERSION = 1  # part of the index cache keys: bump whenever an index's layout changes
LISTINGS = {"parquet": (".parquet", parquet_listing), "webdataset": (".tar", webdataset_listing),
            "huggingface": (".arrow", arrow_listing)}


def _load_entry(entry: Path) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    meta = read_meta(entry)
    labels = np.load(entry / "labels.npy", mmap_mode="r")
    locators = {name: np.load(entry / f"loc_{name}.npy", mmap_mode="r") for name in meta["locators"]}
    return meta, labels, locators


def _cached_index(cfg: DataConfig, split: Split, kind: str, key: dict, build, cache_dir: Path) -> SplitIndex:
    """The index of ``split``, built by ``build() -> (labels, locators, files, class_names)`` once."""

    def arrays():
        labels, locators, files, names = build()
        out = {"labels": labels, **{f"loc_{name}": column for name, column in locators.items()}}
        return out, {"locators": list(locators), "files": files, "class_names": names}

    entry = cache_entry(cache_dir, f"index-{kind}", {"version": INDEX_VERSION, **key}, arrays)
    meta, labels, locators = _load_entry(entry)
    source = Source(kind, split_root(cfg, split), tuple(meta["files"]), cfg.image_size)
    return SplitIndex(source, labels, list(meta["class_names"]), locators, digest=entry.name)


def split_index(cfg: DataConfig, split: Split, cache_dir: Optional[Path] = None) -> SplitIndex:
    """Labels and locators of ``split`` of a file-backed dataset (imagefolder, parquet, webdataset, huggingface)."""
    cache_dir = cache_root(cache_dir)
    if cfg.dataset == "imagefolder":
        from orchestrator.data.imagefolder import class_directories, folder_listing

        root = split_root(cfg, split)
        classes = class_directories(split_root(cfg, "train"))
        files = folder_listing(root, classes)
        labels = np.array([label for label, *_ in files], dtype=np.int64)
        paths = np.array([rel.encode() for _, rel, _, _ in files], dtype=np.bytes_)
        key = {"root": root, "classes": classes, "files": files}
        return _cached_index(cfg, split, "imagefolder", key, lambda: (labels, {"path": paths}, [], classes), cache_dir)
    if cfg.dataset not in LISTINGS:
        raise DataError(f"dataset {cfg.dataset!r} is not read from files; only imagefolder, "
                        f"{', '.join(LISTINGS)} are")
    root = split_root(cfg, split)
    suffix, listing = LISTINGS[cfg.dataset]
    files = list_files(root, suffix)
    names = None if split == "train" else split_index(cfg, "train", cache_dir).class_names
    key = {"root": root, "files": [list(f) for f in files], "classes": names}

    def build():
        locators, values = listing(root, files)
        classes = names or classes_of(values, declared_classes(cfg.dataset, root, files))
        return encode_labels(values, classes, root), locators, [name for name, _, _ in files], classes

    return _cached_index(cfg, split, cfg.dataset, key, build, cache_dir)


def check_splits(cfg: DataConfig) -> None:
    """Both splits index cleanly and the test split's labels are all train classes (before any work)."""
    split_index(cfg, "train")
    split_index(cfg, "test")


def decoded_bytes(index: SplitIndex) -> int:
    """Memory the split takes decoded into one uint8 array."""
    return len(index) * index.source.image_size ** 2 * 3


class EncodedFiles(DatasetSource):
    """A dataset of encoded image files (an image folder, Parquet files, tar shards, Arrow files); decoded
    once into a cached array when it is loaded into memory (small data), or streamed by Ray Data (see
    orchestrator/data/streaming.py)."""

    def class_names(self, cfg: DataConfig) -> list[str]:
        return split_index(cfg, "train").class_names

    def load(self, cfg: DataConfig, split: Split, cache_dir: Path) -> LabeledImages:
        """Images of ``split``, normalisation stats of the train split (shared by both splits)."""
        entries = {s: self._entry(cfg, s, cache_dir) for s in dict.fromkeys(("train", split))}
        meta = read_meta(entries["train"])
        index = split_index(cfg, split, cache_dir)
        return LabeledImages(read_array(entries[split], "images"), np.asarray(index.labels), index.class_names,
                             np.arange(len(index), dtype=np.int64), tuple(meta["mean"]), tuple(meta["std"]))

    @staticmethod
    def _entry(cfg: DataConfig, split: Split, cache_dir: Path) -> Path:
        index = split_index(cfg, split, cache_dir)

        def decode():
            images = read_all(index)
            mean, std = channel_stats(images)
            return {"images": images}, {"mean": mean, "std": std}

        return cache_entry(cache_dir, f"decoded-{cfg.dataset}", {"index": index.digest, "image_size": cfg.image_size},
                           decode)


register_dataset("parquet")(type("Parquet", (EncodedFiles,), {}))
register_dataset("webdataset")(type("WebDataset", (EncodedFiles,), {}))
register_dataset("huggingface")(type("HuggingFace", (EncodedFiles,), {}))

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
                                       find_bad_samples, list_files, parquet_listing, read_all, split_root,
                                       webdataset_listing)
from orchestrator.errors import DataError

INDEX_VERSION = 1  # part of the index cache keys: bump whenever an index's layout changes
LISTINGS = {"parquet": (".parquet", parquet_listing), "webdataset": (".tar", webdataset_listing),
            "huggingface": (".arrow", arrow_listing)}


def _load_entry(entry: Path) -> tuple[dict, np.ndarray, dict[str, np.ndarray]]:
    meta = read_meta(entry)
    labels = np.load(entry / "labels.npy", mmap_mode="r")
    locators = {name: np.load(entry / f"loc_{name}.npy", mmap_mode="r") for name in meta["locators"]}
    return meta, labels, locators


def _cached_index(cfg: DataConfig, split: Split, kind: str, key: dict, build, cache_dir: Path,
                  damaged: Optional[list[str]] = None) -> SplitIndex:
    """The index of ``split``, built by ``build() -> (labels, locators, files, class_names)`` once. With
    ``data.bad_images: skip`` the build decodes every sample and leaves out the bad ones (``damaged``: the
    files ``build`` could not read whole); the index records them, and its cache key the mode (only when
    it is skip, so the indexes of ``error`` keep their keys)."""

    def arrays():
        labels, locators, files, names = build()
        meta = {"locators": list(locators), "files": files, "class_names": names}
        if cfg.bad_images == "skip":
            source = Source(kind, split_root(cfg, split), tuple(files), cfg.image_size)
            good, meta["skipped"] = find_bad_samples(source, locators)
            meta["damaged_files"] = list(damaged or [])
            _check_left(labels, good, names, split_root(cfg, split), meta)
            labels, locators = labels[good], {name: column[good] for name, column in locators.items()}
        return {"labels": labels, **{f"loc_{name}": column for name, column in locators.items()}}, meta

    if cfg.bad_images == "skip":
        key = {**key, "bad_images": "skip"}
    entry = cache_entry(cache_dir, f"index-{kind}", {"version": INDEX_VERSION, **key}, arrays)
    meta, labels, locators = _load_entry(entry)
    source = Source(kind, split_root(cfg, split), tuple(meta["files"]), cfg.image_size)
    return SplitIndex(source, labels, list(meta["class_names"]), locators, digest=entry.name,
                      skipped=meta.get("skipped", []), damaged_files=meta.get("damaged_files", []))


def _check_left(labels: np.ndarray, good: np.ndarray, class_names: list[str], root: str, meta: dict) -> None:
    """Skipping may not empty a class (nor the split): the class's images must be repaired or removed."""
    emptied = sorted(set(labels.tolist()) - set(labels[good].tolist()))
    if emptied or not good.any():
        what = f"class {class_names[emptied[0]]!r}" if emptied else "the split"
        first = next(iter(meta["skipped"] + meta["damaged_files"]), "no samples")
        raise DataError(f"{root}: every image of {what} is unreadable ({len(meta['skipped'])} skipped in all; "
                        f"first: {first}); repair or remove them")


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
    damaged = [] if cfg.bad_images == "skip" else None  # files that cannot be read whole: skipped, or an error

    def build():
        locators, values = listing(root, files, damaged)
        classes = names or classes_of(values, declared_classes(cfg.dataset, root, files))
        return encode_labels(values, classes, root), locators, [name for name, _, _ in files], classes

    return _cached_index(cfg, split, cfg.dataset, key, build, cache_dir, damaged)


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


def skipped_images(cfg: DataConfig, shown: int = 10) -> Optional[dict]:
    """What ``data.bad_images: skip`` left out, per split (metrics.json's ``skipped_images``): the count,
    the first ``shown`` errors (each naming its file) and the files that could not be read whole. None
    with ``bad_images: error``."""
    if cfg.bad_images != "skip":
        return None
    out = {}
    for split in ("train", "test"):
        index = split_index(cfg, split)
        out[split] = {"skipped": len(index.skipped), "first": index.skipped[:shown],
                      "damaged_files": index.damaged_files}
    return out

"""A directory of images, one sub-directory per class: ``root/{train,test}/<class>/<image>``.

Images are decoded and resized once with PIL and cached as arrays; the cache key covers every file's
path, modification time and size, so editing the folder invalidates it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import (DatasetSource, LabeledImages, Split, cache_entry, channel_stats, read_array, read_meta,
                               register_dataset)
from orchestrator.data.formats import IMAGE_EXTENSIONS as EXTENSIONS
from orchestrator.data.formats import decode_image
from orchestrator.errors import DataError


def _split_dir(cfg: DataConfig, split: Split) -> Path:
    if cfg.root is None:
        raise DataError("dataset 'imagefolder' needs data.root: a directory with train/<class>/ and test/<class>/")
    path = Path(cfg.root).expanduser() / split
    if not path.is_dir():
        raise DataError(f"imagefolder split directory {path} does not exist (expected {split}/<class>/<image> "
                        f"under data.root)")
    return path


def _class_dirs(split_dir: Path) -> list[Path]:
    """Sub-directories in name order; hidden ones (.ipynb_checkpoints, ...) are not classes."""
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _listing(split_dir: Path, classes: list[str]) -> list[tuple[int, str, int, int]]:
    """(label, path relative to split_dir, mtime_ns, size) of every image, in class then file-name order."""
    index = {name: i for i, name in enumerate(classes)}
    files = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise DataError(f"{class_dir} is not one of the training classes in {split_dir.parent / 'train'}")
        entries = sorted((e for e in os.scandir(class_dir) if e.is_file() and e.name.lower().endswith(EXTENSIONS)),
                         key=lambda e: e.name)
        if not entries:
            raise DataError(f"class directory {class_dir} holds no images ({', '.join(EXTENSIONS)})")
        for e in entries:
            st = e.stat()
            files.append((index[class_dir.name], f"{class_dir.name}/{e.name}", st.st_mtime_ns, st.st_size))
    return files


def _decode(split_dir: Path, files: list[tuple[int, str, int, int]], size: int) -> tuple[dict[str, np.ndarray], dict]:
    images = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, (_, rel, _, _) in enumerate(files):
        images[i] = decode_image(split_dir / rel, size, str(split_dir / rel))
    labels = np.array([label for label, *_ in files], dtype=np.int64)
    mean, std = channel_stats(images)
    return {"images": images, "labels": labels}, {"mean": mean, "std": std}


def folder_listing(cfg: DataConfig, split: Split) -> tuple[list[str], list[tuple[int, str, int, int]]]:
    """The classes and (label, ``<class>/<file>``, mtime_ns, size) of every image of ``split`` in
    sample-id order, without decoding anything."""
    classes = ImageFolder().class_names(cfg)
    return classes, _listing(_split_dir(cfg, split).resolve(), classes)


def image_paths(cfg: DataConfig, split: Split) -> list[str]:
    """``<class>/<file>`` of every image of ``split`` in sample-id order (FSCIL session index files name
    images by path): its index's, which leaves out the images ``data.bad_images: skip`` skipped."""
    from orchestrator.data.encoded import split_index

    return [rel.decode() for rel in split_index(cfg, split).locators["path"].tolist()]


@register_dataset("imagefolder")
class ImageFolder(DatasetSource):
    def class_names(self, cfg: DataConfig) -> list[str]:
        train_dir = _split_dir(cfg, "train")
        names = [p.name for p in _class_dirs(train_dir)]
        if not names:
            raise DataError(f"{train_dir} has no class directories")
        return names

    def load(self, cfg: DataConfig, split: Split, cache_dir: Path) -> LabeledImages:
        """Images of ``split``, normalisation stats of the train split (shared by both splits)."""
        if cfg.bad_images == "skip":  # the samples its index kept, decoded as the streamed path reads them
            from orchestrator.data.encoded import EncodedFiles

            return EncodedFiles().load(cfg, split, cache_dir)
        classes = self.class_names(cfg)
        entries = {s: self._entry(cfg, s, classes, cache_dir) for s in dict.fromkeys(("train", split))}
        meta = read_meta(entries["train"])
        labels = read_array(entries[split], "labels")
        return LabeledImages(read_array(entries[split], "images"), labels, classes,
                             np.arange(len(labels), dtype=np.int64), tuple(meta["mean"]), tuple(meta["std"]))

    @staticmethod
    def _entry(cfg: DataConfig, split: Split, classes: list[str], cache_dir: Path) -> Path:
        split_dir = _split_dir(cfg, split).resolve()
        files = _listing(split_dir, classes)
        key = {"root": str(split_dir), "image_size": cfg.image_size, "classes": classes, "files": files}
        return cache_entry(cache_dir, "imagefolder", key, lambda: _decode(split_dir, files, cfg.image_size))

"""Image-caption annotation files and text-only caption corpora, read into one shape.

Supported formats (several captions per image everywhere; paths are relative to ``image_root``, or to
the annotation file's directory when no root is given):

- Karpathy split JSON (Flickr30k, COCO): ``{"images": [{"filename", "filepath"?, "split",
  "sentences": [{"raw"} | {"tokens"}]}]}``; ``splits`` selects Karpathy splits (None = all of them);
- CSV with a header holding ``image`` and ``caption`` columns, one row per caption;
- JSONL, one object per line: ``{"image": ..., "caption": "..."}`` or ``{"image": ..., "captions": [...]}``;
- a text corpus: one caption per line (blank lines are skipped), no images.

Every malformed input raises :class:`DataError` naming the file and the line (or, for JSON whose syntax
is valid, the entry), before anything is written. Image files are checked to exist, not decoded:
:func:`load_images` decodes them (cached) when a run needs the pixels.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from orchestrator.errors import DataError

PathLike = Union[str, Path]


@dataclass(frozen=True)
class CaptionIndex:
    """Images by path and their captions: caption ``c`` describes image ``caption_of[c]``."""

    image_paths: list[Path]
    captions: list[str]
    caption_of: np.ndarray  # int64, one image index per caption

    def __len__(self) -> int:
        return len(self.image_paths)

    def subset(self, images: np.ndarray) -> "CaptionIndex":
        """The given images (in that order) with all their captions, re-indexed."""
        keep, caption_of = select_captions(self.caption_of, len(self.image_paths), images)
        return CaptionIndex([self.image_paths[i] for i in images], [self.captions[c] for c in keep], caption_of)


def select_captions(caption_of: np.ndarray, num_images: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For a selection of ``images`` (in that order): the indices of their captions, grouped by image in
    that order, and each kept caption's image position in the selection."""
    images = np.asarray(images, dtype=np.int64)
    position = np.full(num_images, -1, dtype=np.int64)
    position[images] = np.arange(len(images))
    keep = np.flatnonzero(position[caption_of] >= 0)
    keep = keep[np.argsort(position[caption_of[keep]], kind="stable")]
    return keep, position[caption_of[keep]]


class _Collector:
    """Groups (image, caption) records by image in order of first appearance and checks the files."""

    def __init__(self, source: Path, image_root: Optional[PathLike]):
        self.source = source
        self.root = Path(image_root).expanduser() if image_root else source.parent
        self.index: dict[str, int] = {}
        self.captions: list[str] = []
        self.caption_of: list[int] = []

    def add(self, image: object, captions: Sequence[object], where: str) -> None:
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{self.source}, {where}: the image path is missing or not a string")
        if not captions:
            raise DataError(f"{self.source}, {where}: image {image!r} has no caption")
        for caption in captions:
            if not isinstance(caption, str) or not caption.strip():
                raise DataError(f"{self.source}, {where}: a caption of {image!r} is empty or not a string")
        if image not in self.index:
            if not (self.root / image).is_file():
                raise DataError(f"{self.source}, {where}: image file {self.root / image} does not exist "
                                f"(paths are relative to {self.root})")
            self.index[image] = len(self.index)
        self.captions.extend(c.strip() for c in captions)
        self.caption_of.extend([self.index[image]] * len(captions))

    def finish(self) -> CaptionIndex:
        if not self.index:
            raise DataError(f"{self.source} lists no image-caption pair")
        order = np.argsort(self.caption_of, kind="stable")  # captions grouped by image
        return CaptionIndex([self.root / name for name in self.index], [self.captions[c] for c in order],
                            np.asarray(self.caption_of, dtype=np.int64)[order])


def read_caption_file(path: PathLike, image_root: Optional[PathLike] = None,
                      splits: Optional[Sequence[str]] = None) -> CaptionIndex:
    """Read an annotation file, choosing the format by suffix (.json, .csv, .jsonl)."""
    path = Path(path).expanduser()
    readers = {".json": lambda: read_karpathy_json(path, image_root, splits),
               ".csv": lambda: read_csv_pairs(path, image_root),
               ".jsonl": lambda: read_jsonl_pairs(path, image_root)}
    if path.suffix.lower() not in readers:
        raise DataError(f"{path}: unknown caption file format {path.suffix!r}; use .json (Karpathy), .csv or .jsonl")
    if splits is not None and path.suffix.lower() != ".json":
        raise DataError(f"{path}: splits select Karpathy JSON splits; a {path.suffix} file has none")
    return readers[path.suffix.lower()]()


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read caption file {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not valid UTF-8 text") from None


def read_karpathy_json(path: PathLike, image_root: Optional[PathLike] = None,
                       splits: Optional[Sequence[str]] = None) -> CaptionIndex:
    """Karpathy-format JSON; ``splits`` (e.g. ``["val", "restval"]``) keeps those splits only."""
    path = Path(path).expanduser()
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: a Karpathy caption file needs a top-level object with an 'images' list")
    collector = _Collector(path, image_root)
    found: set[str] = set()
    for i, entry in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sentences"), list):
            raise DataError(f"{path}, {where}: an image entry needs a 'sentences' list")
        split = entry.get("split")
        found.add(str(split))
        if splits is not None and split not in splits:
            continue
        filename = entry.get("filename")
        image = os.path.join(entry["filepath"], filename) if entry.get("filepath") and isinstance(filename, str) else filename
        collector.add(image, [_sentence(s, f"{path}, {where}") for s in entry["sentences"]], where)
    if splits is not None and not collector.index:
        raise DataError(f"{path}: no image in splits {list(splits)}; the file has splits {sorted(found)}")
    return collector.finish()


def _sentence(sentence: object, where: str) -> object:
    if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
        return sentence["raw"]
    if isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
        return " ".join(map(str, sentence["tokens"]))
    raise DataError(f"{where}: a sentence needs a 'raw' string or a 'tokens' list")


def read_csv_pairs(path: PathLike, image_root: Optional[PathLike] = None) -> CaptionIndex:
    """CSV with ``image`` and ``caption`` header columns; one row per caption."""
    path = Path(path).expanduser()
    reader = csv.DictReader(_read_text(path).splitlines())
    columns = reader.fieldnames or []
    if "image" not in columns or "caption" not in columns:
        raise DataError(f"{path}, line 1: the header must name the columns 'image' and 'caption', got {columns}")
    collector = _Collector(path, image_root)
    try:
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row or None in row.values():
                raise DataError(f"{path}, {where}: expected {len(columns)} fields as in the header")
            collector.add(row["image"], [row["caption"]], where)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None
    return collector.finish()


def read_jsonl_pairs(path: PathLike, image_root: Optional[PathLike] = None) -> CaptionIndex:
    """JSON Lines: ``{"image", "caption"}`` or ``{"image", "captions": [...]}`` per line."""
    path = Path(path).expanduser()
    collector = _Collector(path, image_root)
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, {where}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or ("caption" in record) == ("captions" in record):
            raise DataError(f"{path}, {where}: expected an object with 'image' and either 'caption' or 'captions'")
        captions = record.get("captions", [record.get("caption")])
        if not isinstance(captions, list):
            raise DataError(f"{path}, {where}: 'captions' must be a list of strings")
        collector.add(record.get("image"), captions, where)
    return collector.finish()


def read_text_corpus(path: PathLike) -> list[str]:
    """One caption per line; blank lines are skipped; at least one caption is required."""
    path = Path(path).expanduser()
    captions = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not captions:
        raise DataError(f"{path}: the text corpus holds no caption (one caption per line)")
    return captions


def load_images(paths: Sequence[Path], size: int, cache_dir: Optional[PathLike] = None) -> np.ndarray:
    """Decode images to uint8 (N, size, size, 3): resize the short side and centre-crop, as CLIP's
    preprocessing does. Cached by file path, size and modification time, so reruns skip decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from orchestrator.data import cache_entry, read_array

    stats = [(str(p), *_stat(p)) for p in paths]

    def decode() -> tuple[dict[str, np.ndarray], dict]:
        images = np.empty((len(paths), size, size, 3), dtype=np.uint8)
        for i, p in enumerate(paths):
            try:
                with Image.open(p) as img:
                    images[i] = np.asarray(ImageOps.fit(img.convert("RGB"), (size, size),
                                                        Image.Resampling.BICUBIC))
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot decode image {p}: {exc}") from None
        return {"images": images}, {"count": len(paths)}

    root = cache_dir or os.environ.get("COMPAT_CACHE_DIR") or Path.home() / ".cache" / "compat-orchestrator"
    entry = cache_entry(Path(root).expanduser(), "caption-images", {"files": stats, "size": size}, decode)
    return read_array(entry, "images")


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = Path(path).stat()
    except OSError as exc:
        raise DataError(f"image file {path} cannot be read: {exc.strerror or exc}") from None
    return st.st_mtime_ns, st.st_size

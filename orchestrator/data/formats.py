"""Encoded images on storage, read by sample index: image folders, Parquet files, WebDataset shards.

Each split has an *index*: every sample's label and a small locator (a relative path; a Parquet file,
row group and row; a tar shard, byte offset and size), in sample-id order, cached as ``.npy`` arrays
that workers memory-map. :func:`read_images` decodes any set of samples from their locators alone, so
the same function fills the in-memory array of a small dataset and the Ray Data tasks that stream a
large one (orchestrator/data/streaming.py): both paths see identical pixels.

Formats (``data.root`` holds ``train/`` and ``test/``, or the directories ``data.splits`` names; a local
path or any URI pyarrow.fs opens):

* ``imagefolder``: ``<split>/<class>/<image>`` (orchestrator/data/imagefolder.py lists them).
* ``parquet``: ``<split>/*.parquet`` with an ``image`` column (encoded bytes, or a struct with a
  ``bytes`` field as Hugging Face's ``Image`` feature writes) and a ``label`` column (an integer or a
  class name). Random access reads a whole row group: write files with small row groups (~1000 rows).
* ``webdataset``: ``<split>/*.tar``; a sample is the members sharing a key (``dir/name`` before the
  first dot): one image (``.png``, ``.jpg``, ...) and a ``.cls`` member holding the label as text.
* ``huggingface``: what ``datasets``' ``save_to_disk`` writes, ``<split>/data-*.arrow`` (Arrow IPC
  streams); read with pyarrow alone, one record batch per random access (see :func:`arrow_listing`).

Classes of ``parquet``, ``webdataset`` and ``huggingface`` are the distinct labels of the train split,
sorted (numbers numerically; a Hugging Face ``ClassLabel``'s names in its order); a test label outside
them is an error before any training.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from orchestrator.config import DataConfig
from orchestrator.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def decode_image(source, size: int, where: str) -> np.ndarray:
    """One image (a path, a file object or encoded bytes) as uint8 (size, size, 3): RGB, scaled so its
    shorter side fits and centre-cropped, bilinear. ``where`` names it in the error a bad image raises."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            return np.asarray(ImageOps.fit(img.convert("RGB"), (size, size), Image.Resampling.BILINEAR))
    except UnidentifiedImageError:  # PIL's own message names a BytesIO object, not the file
        raise DataError(f"cannot decode image {where}: not an image format PIL can read") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {where}: {exc}") from None


@dataclass(frozen=True)
class Source:
    """What a reader needs to open a split's samples: small and picklable (it travels to Ray Data tasks)."""

    kind: str  # imagefolder, parquet, webdataset or huggingface
    root: str  # the split's directory (path or URI)
    files: tuple[str, ...]  # parquet files / tar shards / arrow files, relative to root (empty for imagefolder)
    image_size: int


@dataclass
class SplitIndex:
    """Labels and locators of one split, in sample-id order (arrays may be memory-mapped)."""

    source: Source
    labels: np.ndarray  # int64 (N,), class indices into class_names
    class_names: list[str]
    locators: dict[str, np.ndarray]  # per-format columns, each (N,)
    digest: str  # names the index's cache entry (changes with the files), for caches derived from it
    # data.bad_images: skip only: the error of each sample left out (naming its file), in sample order, and of
    # each file that could not be read whole (its samples past the damage are not located, so not counted)
    skipped: list[str] = field(default_factory=list)
    damaged_files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The locator columns of ``indices``: all :func:`read_images` needs to decode them."""
        return {name: np.asarray(column[indices]) for name, column in self.locators.items()}


# ---- storage ---------------------------------------------------------------------------------------

def filesystem(uri: str):
    """(pyarrow filesystem, path) of a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs as pafs

    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot open {uri}: {exc}") from None


def split_root(cfg: DataConfig, split: str) -> str:
    """The directory (path or URI) of ``split``: ``data.root`` / ``data.splits[split]``."""
    if cfg.root is None:
        raise DataError(f"dataset {cfg.dataset!r} needs data.root: a directory (or URI) holding train/ and test/")
    directory = cfg.splits[split]
    return _join(cfg.root, directory) if "://" in cfg.root else str(Path(cfg.root).expanduser().resolve() / directory)


def list_entries(root: str, expected: str, recursive: bool = False) -> list:
    """(path relative to ``root``, pyarrow FileInfo) of every entry under the split directory ``root`` (a
    path or URI), from one listing; ``expected`` says what it should hold, for the error when it is missing."""
    import pyarrow.fs as pafs

    fs, path = filesystem(root)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise DataError(f"split directory {root} does not exist (expected {expected}; data.splits maps the "
                        f"splits to other directories)")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except OSError as exc:
        raise DataError(f"cannot list {root}: {exc}") from None
    prefix = path.rstrip("/") + "/"
    return [(info.path[len(prefix):], info) for info in infos if info.path.startswith(prefix)]


def list_files(root: str, suffix: str) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files ending in ``suffix`` directly under ``root``, in name order."""
    import pyarrow.fs as pafs

    found = sorted((name, info.size, info.mtime_ns or 0) for name, info in list_entries(root, f"{root}/*{suffix}")
                   if info.type == pafs.FileType.File and name.endswith(suffix) and not name.startswith("."))
    if not found:
        raise DataError(f"{root} holds no {suffix} files")
    return found


def _join(root: str, name: str) -> str:
    """``root/name``; a URI keeps its options (``s3://bucket/data?endpoint_override=...``) at the end."""
    path, mark, options = root.partition("?")
    return f"{path.rstrip('/')}/{name}{mark}{options}"


@lru_cache(maxsize=64)
def _open(path: str):
    """A random-access file, kept open per process (a Ray Data task reads many samples of one file)."""
    fs, p = filesystem(path)
    try:
        return fs.open_input_file(p)
    except OSError as exc:
        raise DataError(f"cannot open {path}: {exc}") from None


@lru_cache(maxsize=16)
def _parquet(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(_open(path))
    except (OSError, ValueError) as exc:  # a damaged file: ArrowInvalid (a ValueError) or OSError
        raise DataError(f"cannot read Parquet file {path}: {exc}") from None


# ---- labels -> classes -------------------------------------------------------------------------------

def classes_of(values: list, declared: Optional[list[str]] = None) -> list[str]:
    """Class names: the distinct label values, sorted (numbers numerically, names alphabetically), or
    in the order of ``declared`` names (a Hugging Face ClassLabel's) when the files declare one."""
    distinct = set(values)
    if declared is not None:
        return [name for name in declared if name in distinct]
    if all(isinstance(v, (int, np.integer)) for v in distinct):
        return [str(v) for v in sorted(int(v) for v in distinct)]
    return sorted(str(v) for v in distinct)


def encode_labels(values: list, class_names: list[str], where: str) -> np.ndarray:
    """Class indices of raw label values (compared as text: the label 3 is the class named "3")."""
    lookup = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        if str(v) not in lookup:
            raise DataError(f"{where}: label {v!r} is not one of the train split's {len(class_names)} classes; "
                            f"the splits must have the same classes")
        out[i] = lookup[str(v)]
    return out


# ---- Parquet ---------------------------------------------------------------------------------------

def _damaged(damaged: Optional[list[str]], error: DataError) -> None:
    """A file that cannot be read: recorded in ``damaged`` (data.bad_images: skip), else raised."""
    if damaged is None:
        raise error from None
    damaged.append(str(error))


def parquet_listing(root: str, files: list[tuple[str, int, int]],
                    damaged: Optional[list[str]] = None) -> tuple[dict[str, np.ndarray], list]:
    """Locator columns (file, row_group, row) and raw label values of a Parquet split's ``files``. With
    ``damaged``, a file whose metadata or labels cannot be read is recorded there and left out."""
    columns = {"file": [], "row_group": [], "row": []}
    values: list = []
    for f, (name, _, _) in enumerate(files):
        path = _join(root, name)
        try:
            pf = _parquet(path)
        except DataError as exc:
            _damaged(damaged, exc)
            continue
        names = pf.schema_arrow.names
        if "image" not in names or "label" not in names:
            raise DataError(f"Parquet file {path} needs columns 'image' and 'label', has {', '.join(names)}")
        try:
            file_values = pf.read(columns=["label"]).column("label").to_pylist()
        except (OSError, ValueError) as exc:
            _damaged(damaged, DataError(f"cannot read the labels of Parquet file {path}: {exc}"))
            continue
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            columns["file"].append(np.full(n, f, dtype=np.int32))
            columns["row_group"].append(np.full(n, g, dtype=np.int32))
            columns["row"].append(np.arange(n, dtype=np.int32))
        values.extend(file_values)
    if any(v is None for v in values):
        raise DataError(f"{root}: a Parquet row has no label")
    return {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in columns.items()}, values


def _read_parquet(source: Source, rows: dict[str, np.ndarray]) -> list[tuple[bytes, str]]:
    out: list = [None] * len(rows["file"])
    keys = rows["file"].astype(np.int64) << 32 | rows["row_group"].astype(np.int64)
    for key in np.unique(keys):
        at = np.flatnonzero(keys == key)
        f, g = int(key >> 32), int(key & 0xFFFFFFFF)
        path = _join(source.root, source.files[f])
        parquet = _parquet(path)
        try:
            column = parquet.read_row_group(g, columns=["image"]).column("image")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read row group {g} of Parquet file {path}: {exc}") from None
        taken = column.take(rows["row"][at]).to_pylist()
        for i, value in zip(at, taken):
            data = value.get("bytes") if isinstance(value, dict) else value
            out[i] = (data, f"{path} (row group {g}, row {int(rows['row'][i])})")
    return out


# ---- WebDataset ------------------------------------------------------------------------------------

def _split_key(member: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    directory, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (dot + ext).lower()


def webdataset_listing(root: str, shards: list[tuple[str, int, int]],
                       damaged: Optional[list[str]] = None) -> tuple[dict[str, np.ndarray], list]:
    """Locator columns (shard, offset, size) and raw label values of a WebDataset split's ``shards``:
    one sequential read of each shard's member headers (and labels). With ``damaged``, a shard that
    cannot be read to its end is recorded there; its complete samples before the damage are kept."""
    shard_col, offsets, sizes, values = [], [], [], []
    for s, (name, _, _) in enumerate(shards):
        path = _join(root, name)
        samples: dict[str, dict] = {}
        fs, p = filesystem(path)
        try:
            with fs.open_input_stream(p) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_key(member.name)
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_EXTENSIONS:
                        sample["image"] = (member.offset_data, member.size)
                    elif ext == ".cls":
                        sample["label"] = tar.extractfile(member).read().decode().strip()
        except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
            _damaged(damaged, DataError(f"cannot read WebDataset shard {path}: {exc}"))
            samples = {key: sample for key, sample in samples.items() if len(sample) == 2}
        for key, sample in samples.items():
            missing = [part for part in ("image", "label") if part not in sample]
            if missing:
                raise DataError(f"WebDataset shard {path}: sample {key!r} has no {' and no '.join(missing)} "
                                f"(expected {key}.png|.jpg|... and {key}.cls)")
            shard_col.append(s)
            offsets.append(sample["image"][0])
            sizes.append(sample["image"][1])
            label = sample["label"]
            values.append(int(label) if label.lstrip("-").isdigit() else label)
    columns = {"shard": np.array(shard_col, dtype=np.int32), "offset": np.array(offsets, dtype=np.int64),
               "size": np.array(sizes, dtype=np.int64)}
    return columns, values


def _read_webdataset(source: Source, rows: dict[str, np.ndarray]) -> list[tuple[bytes, str]]:
    out = []
    for s, offset, size in zip(rows["shard"].tolist(), rows["offset"].tolist(), rows["size"].tolist()):
        path = _join(source.root, source.files[s])
        try:
            data = _open(path).read_at(size, offset)
        except OSError as exc:
            raise DataError(f"cannot read WebDataset shard {path}: {exc}") from None
        if len(data) != size:
            raise DataError(f"WebDataset shard {path} is truncated (sample at byte {offset})")
        out.append((data, f"{path} (member at byte {offset})"))
    return out


# ---- image folders ---------------------------------------------------------------------------------

def _read_imagefolder(source: Source, rows: dict[str, np.ndarray]) -> list[tuple[bytes, str]]:
    fs, base = filesystem(source.root)
    out = []
    for rel in rows["path"].tolist():
        rel = rel.decode()
        try:
            with fs.open_input_file(_join(base, rel)) as f:
                out.append((f.read(), _join(source.root, rel)))
        except OSError as exc:
            raise DataError(f"cannot read image {_join(source.root, rel)}: {exc}") from None
    return out


# ---- Hugging Face save_to_disk ---------------------------------------------------------------------

IMAGE_COLUMNS = ("image", "img")  # the image column, unless a single Image feature is named otherwise
LABEL_COLUMNS = ("label", "labels", "fine_label")  # the label column, unless a single ClassLabel is named otherwise


def _pick_column(features: dict, defaults: tuple[str, ...], feature_type: str, path: str) -> str:
    for name in defaults:
        if name in features:
            return name
    typed = [name for name, f in features.items() if isinstance(f, dict) and f.get("_type") == feature_type]
    if len(typed) == 1:
        return typed[0]
    raise DataError(f"Arrow file {path} has no column {' or '.join(map(repr, defaults))} and not a single "
                    f"{feature_type} feature (its columns: {', '.join(features)}); rename the column with "
                    f"Dataset.rename_column before save_to_disk")


def arrow_columns(schema, path: str) -> tuple[str, str, Optional[list[str]]]:
    """(image column, label column, the label's ClassLabel names or None) of a save_to_disk file, from the
    ``datasets`` features its schema carries (the same as the split's dataset_info.json)."""
    metadata = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(metadata)["info"]["features"] if metadata else {name: {} for name in schema.names}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"Arrow file {path}: unreadable Hugging Face features in its schema: {exc}") from None
    image = _pick_column(features, IMAGE_COLUMNS, "Image", path)
    label = _pick_column(features, LABEL_COLUMNS, "ClassLabel", path)
    for column in (image, label):
        if column not in schema.names:
            raise DataError(f"Arrow file {path}: its features name column {column!r}, which it does not hold")
    names = features[label].get("names") if features[label].get("_type") == "ClassLabel" else None
    return image, label, names


@lru_cache(maxsize=64)
def _arrow_schema(path: str):
    """The schema of an Arrow IPC stream file: its first message."""
    import pyarrow as pa

    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as stream:
            return pa.ipc.open_stream(stream).schema
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read Arrow file {path}: {exc}") from None


def declared_classes(kind: str, root: str, files: list[tuple[str, int, int]]) -> Optional[list[str]]:
    """The class order a split's files declare (a Hugging Face ClassLabel's names), or None: sort the labels."""
    if kind != "huggingface":
        return None
    path = _join(root, files[0][0])
    return arrow_columns(_arrow_schema(path), path)[2]


def _message_size(message) -> int:
    """Bytes a message takes in an IPC stream: the continuation marker and length (8), its metadata
    (padded) and its body."""
    return 8 + message.metadata.size + (message.body.size if message.body is not None else 0)


def arrow_listing(root: str, files: list[tuple[str, int, int]],
                  damaged: Optional[list[str]] = None) -> tuple[dict[str, np.ndarray], list]:
    """Locator columns (file, offset, size, row) and label values of a save_to_disk split's ``files``:
    each record batch's byte range, found by one sequential read of each file. A ClassLabel's values
    are given as its names (so splits are matched by name). With ``damaged``, a file that cannot be read
    to its end is recorded there; its complete record batches before the damage are kept."""
    import pyarrow as pa

    columns = {"file": [], "offset": [], "size": [], "row": []}
    values: list = []
    for f, (name, file_size, _) in enumerate(files):
        path = _join(root, name)
        schema = _arrow_schema(path)
        _, label, names = arrow_columns(schema, path)
        fs, p, first = *filesystem(path), len(values)
        try:
            with fs.open_input_stream(p) as stream:
                messages = pa.ipc.MessageReader.open_stream(stream)
                end = _message_size(messages.read_next_message())  # the schema
                for message in messages:
                    if message.type != "record batch":
                        raise DataError(f"Arrow file {path} holds a {message.type} message at byte {end}; "
                                        f"only plain record batches are read")
                    batch = pa.ipc.read_record_batch(message, schema)
                    start, end = end, end + _message_size(message)
                    n = batch.num_rows
                    columns["file"].append(np.full(n, f, dtype=np.int32))
                    columns["offset"].append(np.full(n, start, dtype=np.int64))
                    columns["size"].append(np.full(n, end - start, dtype=np.int64))
                    columns["row"].append(np.arange(n, dtype=np.int32))
                    values.extend(batch.column(label).to_pylist())
        except (OSError, ValueError) as exc:  # a damaged stream: ArrowInvalid (a ValueError) or OSError
            _damaged(damaged, DataError(f"cannot read Arrow file {path}: {exc}"))
        else:
            if end + 8 != file_size:  # the 8-byte end-of-stream marker follows the last message: cut at a boundary?
                _damaged(damaged, DataError(
                    f"Arrow file {path} is truncated or damaged: its messages end at byte {end}, then "
                    f"{file_size - end} bytes where the 8-byte end-of-stream marker should be"))
        if names is not None:
            values[first:] = _class_label_names(values[first:], names, path)
    if not values:
        raise DataError(f"{root} holds no samples")
    return {k: np.concatenate(v) for k, v in columns.items()}, values


def _class_label_names(ids: list, names: list[str], path: str) -> list[str]:
    """A ClassLabel column's values as its names; -1 (an unlabelled sample) or another id is an error."""
    bad = [v for v in ids if not (isinstance(v, int) and 0 <= v < len(names))]
    if bad:
        raise DataError(f"Arrow file {path}: label {bad[0]!r} is not one of its ClassLabel's {len(names)} classes "
                        f"(-1 marks an unlabelled sample: train and test on labelled splits, see data.splits)")
    return [names[v] for v in ids]


def _read_arrow(source: Source, rows: dict[str, np.ndarray]) -> list[tuple[bytes, str]]:
    import pyarrow as pa

    out: list = [None] * len(rows["file"])
    batches, which = np.unique(np.stack([rows["file"].astype(np.int64), rows["offset"]], axis=1), axis=0,
                               return_inverse=True)
    which = which.reshape(-1)
    for b, (f, offset) in enumerate(batches.tolist()):
        at = np.flatnonzero(which == b)
        path = _join(source.root, source.files[f])
        size = int(rows["size"][at[0]])
        schema = _arrow_schema(path)
        image = arrow_columns(schema, path)[0]
        try:
            data = _open(path).read_at(size, offset)
            if len(data) != size:
                raise DataError(f"Arrow file {path} is truncated (record batch at byte {offset})")
            batch = pa.ipc.read_record_batch(pa.ipc.read_message(pa.py_buffer(data)), schema)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read the record batch at byte {offset} of Arrow file {path}: {exc}") from None
        taken = batch.column(image).take(pa.array(rows["row"][at])).to_pylist()
        for i, value in zip(at, taken):
            data = value.get("bytes") if isinstance(value, dict) else value
            where = f"{path} (record batch at byte {offset}, row {int(rows['row'][i])})"
            if data is None:  # an Image feature that only names a file elsewhere
                raise DataError(f"image {where} holds no encoded bytes (only a path: {value!r}); save the "
                                f"dataset with its images embedded")
            out[i] = (data, where)
    return out


_READERS = {"imagefolder": _read_imagefolder, "parquet": _read_parquet, "webdataset": _read_webdataset,
            "huggingface": _read_arrow}


def read_images(source: Source, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Decode the samples whose locator columns are ``rows`` (see :meth:`SplitIndex.rows`), in order:
    uint8 (n, size, size, 3). A file that cannot be read or decoded raises a DataError naming it."""
    encoded = _READERS[source.kind](source, rows)
    size = source.image_size
    images = np.empty((len(encoded), size, size, 3), dtype=np.uint8)
    for i, (data, where) in enumerate(encoded):
        images[i] = decode_image(data, size, where)
    return images


def read_all(index: SplitIndex, chunk: int = 1024) -> np.ndarray:
    """Every image of a split, decoded in sample-id order (the in-memory path of a small dataset)."""
    size = index.source.image_size
    images = np.empty((len(index), size, size, 3), dtype=np.uint8)
    for start in range(0, len(index), chunk):
        stop = min(start + chunk, len(index))
        images[start:stop] = read_images(index.source, index.rows(np.arange(start, stop)))
    return images


# ---- data.bad_images: skip -------------------------------------------------------------------------

def find_bad_samples(source: Source, locators: dict[str, np.ndarray], chunk: int = 256) -> tuple[np.ndarray, list[str]]:
    """Read and decode every sample once: a mask of the samples that decode, and for each one that does
    not, in sample order, the error ``data.bad_images: error`` would raise for it (naming its file).
    Files are read in order by this thread; a thread pool decodes (PIL releases the GIL meanwhile)."""
    count = len(next(iter(locators.values()), ()))
    good = np.ones(count, dtype=bool)
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, count, chunk):
            rows = {name: np.asarray(column[start:start + chunk]) for name, column in locators.items()}
            for i, error in enumerate(pool.map(partial(_decode_error, size=source.image_size),
                                               _read_each(source, rows))):
                if error is not None:
                    good[start + i] = False
                    errors.append(error)
    return good, errors


def _read_each(source: Source, rows: dict[str, np.ndarray]) -> list:
    """``(bytes, where)`` of each row, or the reader's error (a str) for each row that cannot be read."""
    read = _READERS[source.kind]
    try:
        return read(source, rows)
    except DataError:  # one file of the chunk failed: find which rows, one by one
        out = []
        for i in range(len(next(iter(rows.values())))):
            try:
                out.extend(read(source, {name: column[i:i + 1] for name, column in rows.items()}))
            except DataError as exc:
                out.append(str(exc))
        return out


def _decode_error(item, size: int) -> Optional[str]:
    if isinstance(item, str):
        return item
    try:
        decode_image(item[0], size, item[1])
    except DataError as exc:
        return str(exc)
    return None

"""The embedding store: one uncompressed Arrow IPC file per (method, version, eval set, shard).

Why Arrow IPC: an uncompressed IPC file memory-maps straight into a read-only float32 numpy view (no
decode, no copy), as fast as a raw ``.npy``; Parquet decodes far slower (docs/performance.md), so
it is only offered as an export for interchange (:meth:`EmbeddingStore.export_parquet`).

Layout, hive-style so plain ``pyarrow.dataset(root, format="arrow", partitioning="hive")``, pandas and
DuckDB read the tree::

    ROOT/method=<key>/version=<k>/eval_set=<name>/part-<shard>.arrow
                                                 /_COMPLETE.json

Path values are percent-encoded (hive partitioning decodes them), so any method label is safe. Names
starting with "." or "_" (temp files, the completion marker) are skipped by pyarrow's discovery. The
``version`` column is int32, not int16, because hive discovery infers int32 for ``version=<k>`` and
refuses to merge a same-named int16 column.

The store lives in a :class:`~orchestrator.storage.run_storage.RunStorage` (any ``pyarrow.fs``
filesystem); shards are memory-mapped only on the local backend, read through ranged reads elsewhere.

Completion protocol (no coordinator needed): every shard records ``shard``/``num_shards`` in its
schema metadata and is published whole (RunStorage's rule: temp file and rename locally, one PUT on
an object store). After publishing, the writer lists the partition; if every shard of that sharding
is there it writes ``_COMPLETE.json`` (listing each shard's byte size and SHA-256), the partition's
completion record. Whichever writer publishes last is bound to see all shards, so some writer always completes
the partition; two that see it at once write identical markers. A writer deletes the marker before
replacing its shard, so a marker never vouches for objects it has not seen. Readers trust only the
marker, so a partial partition is never returned. Reads check each shard's size against the marker;
:meth:`EmbeddingStore.artefacts` hands the marker's record to the task that commits the partition, so its
manifest entry vouches for every shard's bytes (verified by ``--resume`` and ``compat report``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple, Optional, Union
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from orchestrator.errors import StoreError
from orchestrator.storage.run_storage import Artefact, Location, RunStorage

ArrayLike = Any  # numpy arrays, lists, CPU torch tensors: anything np.asarray accepts
_META_KEY = b"compat"
_MARKER = "_COMPLETE.json"
_VECTOR_LEAF = "embedding.list.element"  # the Parquet leaf path of the fixed_size_list column
_NORM_TOLERANCE = 1e-2  # on squared norms: loose enough for vectors normalised in bf16/fp16


def _schema(dim: int, meta: Optional[dict] = None) -> pa.Schema:
    """The one schema every shard has; ``meta`` goes JSON-encoded under a single metadata key."""
    fields = [
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("label", pa.int32(), nullable=False),
        pa.field("session", pa.int16(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
        pa.field("modality", pa.dictionary(pa.int8(), pa.string()), nullable=False),
        pa.field("caption_of", pa.int64()),
    ]
    return pa.schema(fields, metadata=None if meta is None else {_META_KEY: json.dumps(meta, sort_keys=True)})


def _segment(value: str) -> str:
    """Percent-encode a hive path value; a leading '.' or '_' is encoded too, or discovery would skip it."""
    encoded = quote(value, safe="")
    return f"%{ord(encoded[0]):02X}{encoded[1:]}" if encoded[:1] in (".", "_") else encoded


class _Key(NamedTuple):
    method: str
    version: int
    eval_set: str

    def __str__(self) -> str:
        return f"method={self.method!r} version={self.version} eval_set={self.eval_set!r}"

    @property
    def directory(self) -> str:
        """The partition's key prefix inside the store."""
        return f"method={_segment(self.method)}/version={self.version}/eval_set={_segment(self.eval_set)}"

    @classmethod
    def checked(cls, method: str, version: int, eval_set: str) -> "_Key":
        if not (isinstance(method, str) and method and isinstance(eval_set, str) and eval_set):
            raise ValueError(f"method and eval_set must be non-empty strings, got {method!r}, {eval_set!r}")
        if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 0:
            raise ValueError(f"version must be a non-negative int, got {version!r}")
        return cls(method, int(version), eval_set)


def _part_name(shard: int) -> str:
    return f"part-{shard}.arrow"


@dataclass(frozen=True)
class EmbeddingTable:
    """One partition as numpy arrays. ``embeddings`` is a read-only memory-mapped view when the partition
    has a single shard; several shards are concatenated and sorted by ``sample_id``."""

    embeddings: np.ndarray  # float32 (N, d), C-contiguous
    labels: np.ndarray  # int64
    sample_ids: np.ndarray  # int64
    sessions: np.ndarray  # int16
    versions: np.ndarray  # int32: the version that embedded each row
    modality: np.ndarray  # str: "image" | "text"
    caption_of: np.ndarray  # int64: the captioned image's sample id, -1 where the row is not a caption
    metadata: dict[str, Any]  # method, version, eval_set, dim, normalized, config_digest, num_shards, extra


_COLUMNS = ("embedding", "label", "sample_id", "session", "version", "modality", "caption_of")  # EmbeddingTable order
_CONVERT: dict[str, Callable[[pa.Array], np.ndarray]] = {
    # flatten(), not .values, which ignores slice offsets
    "embedding": lambda a: a.flatten().to_numpy(zero_copy_only=True).reshape(-1, a.type.list_size),
    "label": lambda a: a.to_numpy().astype(np.int64),
    "modality": lambda a: np.asarray(a.dictionary.to_pylist(), dtype=str)[a.indices.to_numpy()],
    "caption_of": lambda a: pc.fill_null(a, -1).to_numpy(),
}


def _column(tables: list[pa.Table], name: str) -> np.ndarray:
    """One column across tables as numpy: zero-copy for a single chunk, one concatenate otherwise."""
    convert = _CONVERT.get(name, lambda a: a.to_numpy())
    arrays = [convert(chunk) for table in tables for chunk in table.column(name).chunks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _write_parquet(sink, table: pa.Table) -> None:
    """zstd plus byte-stream-split on the vectors (floats barely compress otherwise; no dictionary there).

    The ``version`` column is dropped: the path carries it, and ``pq.read_table``/pandas infer the hive
    key as a dictionary and refuse a file column of the same name.
    """
    table = table.drop_columns(["version"])
    pq.write_table(table, sink, compression="zstd", use_byte_stream_split=[_VECTOR_LEAF],
                   use_dictionary=[name for name in table.column_names if name != "embedding"])


class EmbeddingStore:
    """Embeddings of every (method, version, eval set) in ``root`` (a RunStorage or a location); see the
    module docstring."""

    def __init__(self, root: Union[RunStorage, Location]):
        self.storage = RunStorage.of(root)

    @property
    def root(self) -> str:
        return self.storage.location

    # -- writing -------------------------------------------------------------------------------
    def write(self, method: str, version: int, eval_set: str, embeddings: ArrayLike, labels: ArrayLike,
              sample_ids: ArrayLike, *, session: Union[int, ArrayLike] = 0,
              modality: Literal["image", "text"] = "image", caption_of: Optional[ArrayLike] = None,
              metadata: Optional[Mapping[str, Any]] = None, shard: int = 0, num_shards: int = 1) -> str:
        """Publish one shard atomically; the partition becomes readable once all ``num_shards`` exist.

        ``metadata`` may carry ``normalized`` (bool: rows are unit-norm, checked) and ``config_digest``;
        any other keys are kept under ``metadata["extra"]``. ``caption_of`` < 0 means "not a caption".
        Returns the shard's key inside the store.
        """
        key = _Key.checked(method, version, eval_set)
        batch = self._batch(key, embeddings, labels, sample_ids, session, modality, caption_of,
                            dict(metadata or {}), shard, num_shards)
        part = f"{key.directory}/{_part_name(shard)}"
        try:
            self.storage.delete(f"{key.directory}/{_MARKER}")
            output = self.storage.open_output(part)
            with output as sink, ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)  # one batch per file: one chunk, so reads are zero-copy
            self._complete_if_ready(key, num_shards, {_part_name(shard): output.artefact})
        except OSError as exc:
            raise StoreError(f"could not write {self.storage.location_of(part)}: {exc}; check free space and "
                             "permissions") from exc
        return part

    @staticmethod
    def _batch(key: _Key, embeddings: ArrayLike, labels: ArrayLike, sample_ids: ArrayLike,
               session: Union[int, ArrayLike], modality: str, caption_of: Optional[ArrayLike],
               extra: dict[str, Any], shard: int, num_shards: int) -> pa.RecordBatch:
        """Validate the caller's arrays (ValueError: a caller bug, not a store fault) and build the batch."""
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (N, d), got shape {vectors.shape}")
        n, dim = vectors.shape
        ids = np.asarray(sample_ids, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int32)
        captions = np.full(n, -1, np.int64) if caption_of is None else np.asarray(caption_of, dtype=np.int64)
        sessions = np.broadcast_to(np.asarray(session, dtype=np.int16), (n,))
        if not ids.shape == labels.shape == captions.shape == (n,):
            raise ValueError(f"{n} embeddings but sample_ids {ids.shape}, labels {labels.shape}, "
                             f"caption_of {captions.shape}")
        if n and ids.min() < 0:
            raise ValueError("sample_ids must be non-negative")
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} out of range for num_shards={num_shards}")
        normalized = bool(extra.pop("normalized", False))
        if normalized:  # an evaluator trusting a false claim would skip normalising: wrong cosines, silently
            squared = np.einsum("ij,ij->i", vectors, vectors)
            if np.any((np.abs(squared - 1) > _NORM_TOLERANCE) & (squared > 0)):  # zero rows: F.normalize of 0
                raise ValueError("metadata says normalized=True but some embeddings are not unit-norm")
        meta = {**key._asdict(), "dim": dim, "normalized": normalized,
                "config_digest": str(extra.pop("config_digest", "")), "shard": shard,
                "num_shards": num_shards, "extra": extra}
        arrays = [
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            pa.array(ids), pa.array(labels), pa.array(sessions),
            pa.array(np.full(n, key.version, np.int32)),
            pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8)), pa.array([modality])),
            pa.array(captions, mask=captions < 0),
        ]
        return pa.RecordBatch.from_arrays(arrays, schema=_schema(dim, meta))

    def _parts(self, key: _Key) -> list[str]:
        """The shard file names present in a partition."""
        return [name for name in self.storage.list(key.directory)
                if "/" not in name and name.startswith("part-") and name.endswith(".arrow")]

    def _complete_if_ready(self, key: _Key, num_shards: int, known: dict[str, Artefact]) -> None:
        """Write the marker when every shard of this sharding is present; drop shards of older shardings.
        ``known``: the shards this writer published itself (the others are read back to be hashed)."""
        expected = [_part_name(k) for k in range(num_shards)]
        present = self._parts(key)
        if not set(expected) <= set(present):
            return
        if any(self._open(key, name)[1]["num_shards"] != num_shards for name in expected):
            return  # some shard is left over from a run with another worker count; its rewrite completes it
        for stale in set(present) - set(expected):
            self.storage.delete(f"{key.directory}/{stale}")
        shards = {name: known.get(name) or self.storage.artefact(f"{key.directory}/{name}") for name in expected}
        marker = {"num_shards": num_shards, "bytes": {name: a.size for name, a in shards.items()},
                  "sha256": {name: a.sha256 for name, a in shards.items()}}
        self.storage.write_bytes(f"{key.directory}/{_MARKER}", json.dumps(marker, sort_keys=True).encode())

    # -- reading -------------------------------------------------------------------------------
    def read(self, method: str, version: int, eval_set: str) -> EmbeddingTable:
        """The complete partition as numpy arrays, without per-row Python (see :class:`EmbeddingTable`)."""
        key = _Key.checked(method, version, eval_set)
        tables, metas = map(list, zip(*self._load(key)))
        columns = {name: _column(tables, name) for name in _COLUMNS}
        if len(tables) > 1:
            order = np.argsort(columns["sample_id"], kind="stable")
            ids = columns["sample_id"][order]
            dup = ids[1:][ids[1:] == ids[:-1]]
            if dup.size:
                raise StoreError(f"partition {key} holds sample_id {dup[0]} in more than one shard (padded "
                                 f"shards?); delete {self.storage.location_of(key.directory)} and re-run with --resume")
            columns = {name: column[order] for name, column in columns.items()}
        metadata = {k: v for k, v in metas[0].items() if k != "shard"}
        metadata["normalized"] = all(m["normalized"] for m in metas)
        return EmbeddingTable(*columns.values(), metadata=metadata)

    def _load(self, key: _Key) -> Iterator[tuple[pa.Table, dict]]:
        """Each shard of a complete partition as (memory-mapped table, metadata), checked against the marker."""
        directory = self.storage.location_of(key.directory)

        def where(name: str) -> str:  # for messages
            return self.storage.location_of(f"{key.directory}/{name}")

        try:
            marker = json.loads(self.storage.read_bytes(f"{key.directory}/{_MARKER}"))
            sizes, num_shards = marker["bytes"], marker["num_shards"]
        except FileNotFoundError:
            parts = sorted(self._parts(key))
            if not parts:
                raise StoreError(f"no embeddings stored for {key} under {self.root}; run the step first") from None
            total = self._open(key, parts[0])[1]["num_shards"]
            raise StoreError(f"partition {key} is incomplete ({len(parts)} of {total} shards); "
                             "re-run the step") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store marker {where(_MARKER)} is corrupt ({exc}); delete {directory} and "
                             f"re-run with --resume") from exc
        for shard in range(num_shards):
            name = _part_name(shard)
            size = self.storage.size(f"{key.directory}/{name}")
            if size != sizes.get(name):
                raise StoreError(f"store file {where(name)} is missing or truncated ({size} bytes, expected "
                                 f"{sizes.get(name)}); delete {directory} and re-run with --resume")
            table, meta = self._open(key, name)
            if meta["num_shards"] != num_shards:
                raise StoreError(f"store file {where(name)} belongs to a {meta['num_shards']}-shard write but the partition "
                                 f"has {num_shards}; delete {directory} and re-run with --resume")
            yield table, meta

    def _open(self, key: _Key, name: str) -> tuple[pa.Table, dict]:
        """Open one shard (memory-mapped on the local backend) and check its schema and metadata against
        its partition and file name."""
        path = self.storage.location_of(f"{key.directory}/{name}")
        advice = f"delete {self.storage.location_of(key.directory)} and re-run with --resume"
        try:
            table = ipc.open_file(self.storage.open_input(f"{key.directory}/{name}")).read_all()
            meta = json.loads(table.schema.metadata[_META_KEY])
            expected_schema = _schema(meta["dim"])
        except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store file {path} is corrupt or unreadable ({exc}); {advice}") from exc
        if not table.schema.equals(expected_schema, check_metadata=False):
            raise StoreError(f"store file {path} has unexpected columns {table.schema.names}; {advice}")
        found = (meta.get("method"), meta.get("version"), meta.get("eval_set"), meta.get("shard"))
        if found != (*key, int(name.removesuffix(".arrow").split("-")[1])):
            raise StoreError(f"store file {path} holds method={found[0]!r} version={found[1]} eval_set={found[2]!r} "
                             f"shard={found[3]}, which disagrees with its location; {advice}")
        return table, meta

    def artefacts(self, method: str, version: int, eval_set: str) -> dict[str, Artefact]:
        """Every object of a complete partition (its shards and marker) by key inside the store, with the
        size and SHA-256 the marker records for each shard: what a task's manifest entry vouches for."""
        key = _Key.checked(method, version, eval_set)
        marker_key = f"{key.directory}/{_MARKER}"
        try:
            data = self.storage.read_bytes(marker_key)
            marker = json.loads(data)
            shards = {f"{key.directory}/{name}": Artefact(marker["bytes"][name], marker["sha256"][name])
                      for name in marker["bytes"]}
        except FileNotFoundError:
            raise StoreError(f"partition {key} is not complete under {self.root}; its step did not write "
                             "every shard") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"store marker {self.storage.path(marker_key)} is corrupt ({exc}); delete "
                             f"{self.storage.path(key.directory)} and re-run with --resume") from exc
        return {**shards, marker_key: Artefact.of_bytes(data)}

    # -- listing -------------------------------------------------------------------------------
    def has(self, method: str, version: int, eval_set: str) -> bool:
        """Whether the partition is complete (what :meth:`read` would return)."""
        return self.storage.exists(f"{_Key.checked(method, version, eval_set).directory}/{_MARKER}")

    def methods(self) -> list[str]:
        return sorted({key.method for key in self._complete()})

    def versions(self, method: str) -> list[int]:
        return sorted({key.version for key in self._complete() if key.method == method})

    def eval_sets(self, method: str, version: int) -> list[str]:
        return sorted({key.eval_set for key in self._complete() if key[:2] == (method, version)})

    def _complete(self) -> Iterator[_Key]:
        """Every complete partition; directories that are not the store's own are ignored."""
        for name in self.storage.list():
            parts = name.split("/")
            if len(parts) != 4 or parts[3] != _MARKER:
                continue
            (m, method), (v, version), (e, eval_set) = (part.partition("=")[::2] for part in parts[:3])
            if (m, v, e) == ("method", "version", "eval_set") and version.isdigit():
                yield _Key(unquote(method), int(version), unquote(eval_set))

    # -- interchange ---------------------------------------------------------------------------
    def export_parquet(self, dest_dir: Union[RunStorage, Location], method: Optional[str] = None) -> RunStorage:
        """Copy complete partitions (all, or one method's) to hive-partitioned Parquet under ``dest_dir``.

        One Parquet file per shard, schema metadata kept, ``version`` only in the path; readable by
        pyarrow, pandas, DuckDB and Polars. Existing files of the same partitions are replaced.
        """
        dest = RunStorage.of(dest_dir)
        for key in self._complete():
            if method is not None and key.method != method:
                continue
            for table, meta in self._load(key):
                with dest.open_output(f"{key.directory}/part-{meta['shard']}.parquet") as sink:
                    _write_parquet(sink, table)
        return dest

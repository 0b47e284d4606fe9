"""The one object through which run state is read and written, on any ``pyarrow.fs`` filesystem.

A run lives at a *location*: a local path (a shared mount for a multi-node run), a URI
(``s3://bucket/run``, ``gs://...``) that :meth:`pyarrow.fs.FileSystem.from_uri` understands, or any
``pyarrow.fs.FileSystem`` and a root in it. A storage opened from a URI keeps it, so the location it
prints (and its children's) can be passed back to ``compat run --resume`` or ``compat report``.
Every key below is a relative, ``/``-separated name inside the run (``manifest/bct/step-001.json``);
nothing here assumes a POSIX directory tree except :meth:`RunStorage.local_path`, which exists only for
libraries that insist on a real path and refuses on other filesystems, and :meth:`RunStorage.local_file`,
which hands such a library a cached local copy when the run is not local.

Atomicity, defined per operation in terms an object store keeps:

- **Whole objects.** :meth:`~RunStorage.write_bytes`, :meth:`~RunStorage.write_json`,
  :meth:`~RunStorage.save_torch` and :meth:`~RunStorage.open_output` publish an object whole or not at all:
  a reader sees the previous object (or none), never a prefix. On the local filesystem that is a temp file
  in the same directory, fsync, rename; elsewhere it is one PUT of the finished bytes (a write that fails
  midway PUTs nothing). There is no append and no rename across keys.
- **Write once per attempt.** An artefact is written once by the task that produces it; a retry of the task
  writes the same key again whole, which is safe because of the rule above.
- **The completion record is written last.** A task's artefacts (weights, store shards, rows) are only
  trusted once its completion record exists (a task's manifest entry; a store partition's
  ``_COMPLETE.json``), and that record is written after everything it vouches for. Readers decide
  "finished" from the record alone, so a crash between two writes leaves at most unreferenced objects.
- **Receipts.** Every write returns the :class:`Artefact` it published (byte size and SHA-256 of the
  object as stored), so a completion record can vouch for exact bytes; :meth:`RunStorage.artefact`
  measures a stored object the same way, for verification.
- **Deletes** are idempotent (a missing key is fine) and never needed for correctness, only for tidiness.
- **Fenced handles.** A driver's handle (and every handle derived from it: children, the ones its workers
  receive) carries the :class:`~orchestrator.storage.lease.Fence` of the run's lease: each write and
  delete first checks that the lease still names that driver, so a former holder writes nothing. A
  worker group's handle carries an :class:`~orchestrator.storage.attempts.AttemptFence` as well, which
  also checks that no newer start of the group exists, so a replaced group writes nothing either.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import pyarrow as pa
import pyarrow.fs as pafs

from orchestrator.errors import RunError

_TORN_READ_ATTEMPTS, _TORN_READ_PAUSE_S = 4, 0.2  # see RunStorage.read_json

Location = Union[str, os.PathLike]
OBJECT_STORES = ("s3", "gcs")  # pyarrow type names of filesystems without directories (no create_dir needed)
_BLOCK = 1 << 20  # bytes per read when hashing


@dataclass(frozen=True)
class Artefact:
    """What a completion record vouches for about one object: its byte size and the SHA-256 of its bytes."""

    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def of_bytes(cls, data: bytes) -> "Artefact":
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def of_stream(cls, stream: BinaryIO) -> "Artefact":
        digest, size = hashlib.sha256(), 0
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
            size += len(block)
        return cls(size, digest.hexdigest())


class Output:
    """:meth:`RunStorage.open_output`'s context manager: the block writes into the stream it yields; once
    the block ends without error the object is published and :attr:`artefact` describes it."""

    def __init__(self, storage: "RunStorage", key: str):
        self.artefact: Optional[Artefact] = None
        self._context = storage._publish(key, self)

    def __enter__(self) -> BinaryIO:
        return self._context.__enter__()

    def __exit__(self, *exc_info) -> Optional[bool]:
        return self._context.__exit__(*exc_info)


class RunStorage:
    """A run's state on one filesystem under one root; see the module docstring for the write rules."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, fence: Optional[Any] = None, uri: Optional[str] = None):
        self.filesystem = filesystem
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(filesystem, pafs.LocalFileSystem)
        self.fence = fence  # a lease's Fence, or an AttemptFence (orchestrator/storage/): checked before each write
        self.uri = None if self.is_local else uri  # the URI it was opened from (None: a path, or a filesystem given directly)

    @classmethod
    def at(cls, location: Location) -> "RunStorage":
        """The storage of a location: a local path, or a URI with a scheme pyarrow knows."""
        text = os.fspath(location)
        if not is_uri(text):
            return cls(pafs.LocalFileSystem(), str(Path(text).expanduser().absolute()))
        try:
            filesystem, root = pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, OSError) as exc:
            raise RunError(f"cannot open the run location {redacted(text)}: {str(exc).strip()}{uri_advice(text)}") from None
        return cls(filesystem, root, uri=text)

    @classmethod
    def of(cls, run: Union["RunStorage", Location]) -> "RunStorage":
        """``run`` itself when it is a RunStorage, else the storage at that location."""
        return run if isinstance(run, RunStorage) else cls.at(run)

    def __repr__(self) -> str:
        return f"RunStorage({self.location!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunStorage) and other.root == self.root and other.filesystem.equals(self.filesystem)

    def __hash__(self) -> int:
        return hash((self.root, self.filesystem.type_name))

    @property
    def location(self) -> str:
        """Where the run lives, as a user passes it back (``--resume``, ``compat report``): a path, the URI
        it was opened from (a password in it masked), or ``<filesystem type>:<root>``."""
        return self.location_of("")

    def location_of(self, key: str) -> str:
        """Where the object ``key`` lives, in the form of :attr:`location` (for messages)."""
        if self.is_local:
            return self.path(key)
        if self.uri is not None:
            self.path(key)  # the same check of the key
            return redacted(join_uri(self.uri, key))
        return f"{self.filesystem.type_name}:{self.path(key)}"

    # -- names ---------------------------------------------------------------------------------
    def path(self, key: str = "") -> str:
        """The filesystem path of ``key`` (for this filesystem's calls and for messages)."""
        key = key.strip("/")
        if not key:
            return self.root
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"run storage key {key!r} must be relative and normalised")
        return f"{self.root}/{key}" if self.root != "/" else f"/{key}"

    def child(self, sub: str) -> "RunStorage":
        """The storage rooted at ``sub`` inside this one (a nested run, the embedding store ...), under the same fence."""
        return RunStorage(self.filesystem, self.path(sub), self.fence, None if self.uri is None else join_uri(self.uri, sub))

    def fenced(self, fence: Any) -> "RunStorage":
        """This storage with every write and delete first checking ``fence`` (a lease's, see the module docstring)."""
        return RunStorage(self.filesystem, self.root, fence, self.uri)

    def _check_fence(self) -> None:
        if self.fence is not None:
            self.fence.check()

    def local_path(self, key: str = "") -> Path:
        """A real path, only for libraries that cannot take a stream (Ray Train's storage_path ...)."""
        if not self.is_local:
            raise RunError(f"{self.location} is not on a local filesystem; this operation needs a local run directory")
        return Path(self.path(key))

    def local_file(self, key: str, cache: Path) -> Path:
        """A real file with the object's bytes, for a library that reads only paths: the object itself on
        the local filesystem; elsewhere a copy under ``cache`` named by the SHA-256 of its bytes (and the
        key's suffix), written once and atomically. Naming by content, not by key, means runs sharing the
        cache never share a copy of other bytes."""
        if self.is_local:
            if not self.exists(key):
                raise FileNotFoundError(self.path(key))
            return Path(self.path(key))
        data = self.read_bytes(key)
        target = Path(cache) / f"{hashlib.sha256(data).hexdigest()}{Path(key).suffix}"
        if target.is_file() and target.stat().st_size == len(data):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    # -- queries -------------------------------------------------------------------------------
    def _info(self, key: str) -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path(key))

    def exists(self, key: str) -> bool:
        """Whether an object (a file, not a directory prefix) is stored at ``key``."""
        return self._info(key).type == pafs.FileType.File

    def size(self, key: str) -> Optional[int]:
        """The object's size in bytes, None when there is none."""
        info = self._info(key)
        return info.size if info.type == pafs.FileType.File else None

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Every object under ``prefix`` (only those right in it unless ``recursive``), as keys relative
        to ``prefix``, sorted. Hidden names (a leading ``.``: the local backend's temp files) are left out."""
        base = self.path(prefix)
        selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
        try:
            infos = self.filesystem.get_file_info(selector)
        except (FileNotFoundError, NotADirectoryError):
            return []
        start = len(base.strip("/")) + 1
        keys = [info.path.strip("/")[start:] for info in infos if info.type == pafs.FileType.File]
        return sorted(k for k in keys if not any(part.startswith(".") for part in k.split("/")))

    # -- bytes ---------------------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        if not self.exists(key):
            raise FileNotFoundError(self.path(key))
        with self.filesystem.open_input_stream(self.path(key)) as stream:
            return stream.read()

    def write_bytes(self, key: str, data: bytes) -> Artefact:
        """Publish ``data`` whole at ``key`` (see the module docstring)."""
        output = self.open_output(key)
        with output as out:
            out.write(data)
        return output.artefact

    def open_output(self, key: str) -> Output:
        """A writable binary stream (``with storage.open_output(key) as out``) whose bytes appear at ``key``
        whole when the block ends without error, and not at all otherwise; the returned object's
        ``artefact`` then holds their size and SHA-256."""
        return Output(self, key)

    @contextmanager
    def _publish(self, key: str, output: Output) -> Iterator[BinaryIO]:
        if self.is_local:
            target = Path(self.path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    yield handle
                    handle.flush()
                    os.fsync(handle.fileno())  # durable before it is published (and vouched for)
                with open(tmp, "rb") as written:  # the bytes as stored, read back from the page cache
                    output.artefact = Artefact.of_stream(written)
                self._check_fence()  # as late as possible: just before the object appears
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_directory(target.parent)
        else:
            buffer = io.BytesIO()
            yield buffer
            output.artefact = Artefact.of_bytes(buffer.getbuffer())
            self._check_fence()
            path = self.path(key)
            parent = path.rpartition("/")[0]
            if parent and self.filesystem.type_name not in OBJECT_STORES:  # an object store has no directories
                self.filesystem.create_dir(parent, recursive=True)
            with self.filesystem.open_output_stream(path) as stream:  # one PUT of the finished object
                stream.write(buffer.getbuffer())

    def open_input(self, key: str) -> pa.NativeFile:
        """A random-access reader of the object (Arrow IPC files): memory-mapped on the local backend, so
        Arrow reads are zero-copy; a ranged reader elsewhere."""
        if self.is_local:
            return pa.memory_map(self.path(key), "r")
        return self.filesystem.open_input_file(self.path(key))

    def artefact(self, key: str) -> Artefact:
        """Size and SHA-256 of the object stored at ``key`` (read in full); FileNotFoundError when there is none."""
        if not self.exists(key):
            raise FileNotFoundError(self.path(key))
        with self.filesystem.open_input_stream(self.path(key)) as stream:
            return Artefact.of_stream(stream)

    def delete(self, key: str) -> None:
        """Remove the object at ``key`` (nothing happens when there is none)."""
        self._check_fence()
        try:
            self.filesystem.delete_file(self.path(key))
        except FileNotFoundError:
            pass

    def delete_all(self, prefix: str) -> None:
        """Remove every object under ``prefix`` (nothing happens when there are none)."""
        for key in self.list(prefix):
            self.delete(f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key)

    # -- typed objects -------------------------------------------------------------------------
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def write_text(self, key: str, text: str) -> Artefact:
        return self.write_bytes(key, text.encode())

    def read_json(self, key: str) -> Any:
        """A JSON object; a corrupt one is a RunError that says what to delete.

        Away from the local backend a read that overlaps a rewrite of the same object (the lease's
        heartbeat) can come back torn: the reader takes the object's size from one request and its bytes
        from the next, which may already see the new object. Such a read is retried before the object is
        called corrupt; a torn read does not repeat, a corrupt object does."""
        attempts = 1 if self.is_local else _TORN_READ_ATTEMPTS
        for attempt in range(attempts):
            try:
                return json.loads(self.read_bytes(key))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                if attempt + 1 == attempts:
                    raise RunError(f"{self.location_of(key)} is corrupt ({exc}); delete it and run again with "
                                   "--resume") from None
                time.sleep(_TORN_READ_PAUSE_S)

    def read_json_or_none(self, key: str) -> Any:
        """A JSON object, or None when there is none."""
        return self.read_json(key) if self.exists(key) else None

    def write_json(self, key: str, obj: Any) -> Artefact:
        return self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def save_torch(self, key: str, obj: Any) -> Artefact:
        """``torch.save`` of tensors and plain containers, published whole (and, locally, fsynced first)."""
        import torch

        output = self.open_output(key)
        with output as out:
            torch.save(obj, out)
        return output.artefact

    def load_torch(self, key: str) -> Any:
        """``torch.load(weights_only=True)`` onto the CPU: tensors and plain containers only, never pickled code."""
        import torch

        return torch.load(io.BytesIO(self.read_bytes(key)), map_location="cpu", weights_only=True)


def is_uri(location: Location) -> bool:
    """Whether a location is a URI (``s3://...``, ``file:///...``) rather than a path."""
    return "://" in os.fspath(location)


def join_uri(uri: str, sub: str) -> str:
    """``sub`` (a relative key) inside the location ``uri``, its options (``?endpoint_override=...``) kept."""
    sub = sub.strip("/")
    if not sub:
        return uri
    parts = urllib.parse.urlsplit(uri)
    return parts._replace(path=f"{parts.path.rstrip('/')}/{sub}").geturl()


def redacted(uri: str) -> str:
    """A URI fit for messages and logs: a password in it (``s3://KEY:SECRET@bucket``) masked."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()


def uri_advice(uri: str) -> str:
    """What to set when a URI cannot be opened (docs/guide/storage.md has every setting)."""
    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme == "s3":
        return ("; for an S3-compatible server set AWS_ENDPOINT_URL=http://HOST:PORT (or add "
                "?endpoint_override=HOST:PORT&scheme=http to the URI), on AWS add ?region=REGION to skip the "
                "bucket's region lookup; credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if scheme in ("gs", "gcs"):
        return "; credentials come from GOOGLE_APPLICATION_CREDENTIALS (a service account key file)"
    return ""


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a crash after it cannot bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Embedding-store throughput against a raw ``.npy`` of the same bytes, measured in the same run.

    python bench/store.py [--n 1000000 --d 128]

A "read" ends with one touch of every memory page, so the lazily faulted memory map of the store is
not flattered against ``np.load``, which reads everything up front. The headline is the ratio
store-read-throughput / npy-read-throughput (target >= 0.5). Two-shard reads (concatenate and sort by
sample id) and the Parquet export are printed for information. Files go to a temp dir, removed after.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from orchestrator.storage.store import EmbeddingStore  # noqa: E402

_FLOATS_PER_PAGE = 1024  # 4 KiB pages of float32


def _touch(array: np.ndarray) -> float:
    """Read one float per page: faults in a memory map without timing arithmetic."""
    return float(array.reshape(-1)[::_FLOATS_PER_PAGE].sum())


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls (page cache warm: every file was just written)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _timed(fn: Callable[[], object]) -> float:
    return _best(fn, 1)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # fsync like the store does, so writes compare like for like
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, d, r = args.n, args.d, args.repeats
    vectors = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    labels, ids = np.zeros(n, np.int32), np.arange(n)
    megabytes = vectors.nbytes / 1e6
    with tempfile.TemporaryDirectory(prefix="compat-bench-store-") as tmp:
        root = Path(tmp)
        store = EmbeddingStore(root / "store")
        npy = root / "raw.npy"

        npy_write = _timed(lambda: _save_npy(npy, vectors))
        store_write = _timed(lambda: store.write("bench", 0, "test", vectors, labels, ids))
        npy_read = _best(lambda: _touch(np.load(npy)), r)
        store_open = _best(lambda: store.read("bench", 0, "test"), r)
        store_read = _best(lambda: _touch(store.read("bench", 0, "test").embeddings), r)
        allocated = pa.total_allocated_bytes()
        table = store.read("bench", 0, "test")
        assert np.array_equal(table.embeddings, vectors) and not table.embeddings.flags.writeable
        allocated = pa.total_allocated_bytes() - allocated
        del table

        for shard in (0, 1):  # interleaved ids, as Ray workers write them
            store.write("bench", 0, "sharded", vectors[shard::2], labels[shard::2], ids[shard::2],
                        shard=shard, num_shards=2)
        sharded_read = _best(lambda: _touch(store.read("bench", 0, "sharded").embeddings), r)

        export = _timed(lambda: store.export_parquet(root / "parquet", method="bench"))
        (part,) = (root / "parquet").rglob("eval_set=test/*.parquet")
        parquet_read = _best(lambda: _touch(pq.read_table(part, columns=["embedding"]).column("embedding")
                                            .combine_chunks().flatten().to_numpy().reshape(-1, d)), r)

    print(f"{n:,} x {d} float32 = {megabytes:.0f} MB, best of {r} reads, page cache warm")
    print(f"{'':32}{'seconds':>9}{'MB/s':>10}")
    rows = [("write  .npy (np.save + fsync)", npy_write), ("write  store (Arrow IPC + fsync)", store_write),
            ("read   .npy (np.load)", npy_read), ("read   store, open only (mmap)", store_open),
            ("read   store (mmap + touch)", store_read), ("read   store, 2 shards (+ sort)", sharded_read),
            ("export parquet (zstd, bss)", export), ("read   parquet (decode)", parquet_read)]
    for name, seconds in rows:
        print(f"{name:32}{seconds:9.3f}{megabytes / seconds:10.0f}")
    print(f"arrow heap allocated by a store read: {allocated / 1e6:.1f} MB (the small columns; the "
          f"{megabytes:.0f} MB of vectors are mapped, not copied)")
    print(f"ratio store-read / npy-read throughput: {npy_read / store_read:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()

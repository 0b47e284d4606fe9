import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from orchestrator.errors import StoreError
from orchestrator.storage.store import EmbeddingStore

METHOD = "bct a/b"  # a label that needs percent-encoding in the hive path


def unit_rows(n, d=8, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def partition_dir(root, version=0, eval_set="test"):
    (directory,) = root.glob(f"method=*/version={version}/eval_set={eval_set}")
    return directory


def test_round_trip_of_every_column_and_metadata(tmp_path):
    store = EmbeddingStore(tmp_path)
    emb, caps = unit_rows(6), np.array([-1, 3, 3, -1, 0, 1])
    store.write(METHOD, 2, "captions", emb, [5, 4, 3, 2, 1, 0], [10, 11, 12, 13, 14, 15], session=[0, 0, 1, 1, 2, 2],
                modality="text", caption_of=caps, metadata={"normalized": True, "config_digest": "abc", "method": "bct"})
    t = store.read(METHOD, 2, "captions")
    np.testing.assert_array_equal(t.embeddings, emb)
    assert t.labels.dtype == np.int64 and t.labels.tolist() == [5, 4, 3, 2, 1, 0]
    assert t.sample_ids.dtype == np.int64 and t.sample_ids.tolist() == [10, 11, 12, 13, 14, 15]
    assert t.sessions.tolist() == [0, 0, 1, 1, 2, 2] and t.versions.tolist() == [2] * 6
    assert t.modality.tolist() == ["text"] * 6 and t.caption_of.tolist() == caps.tolist()
    assert t.metadata == {"method": METHOD, "version": 2, "eval_set": "captions", "dim": 8, "normalized": True,
                          "config_digest": "abc", "num_shards": 1, "extra": {"method": "bct"}}
    assert store.has(METHOD, 2, "captions") and not store.has(METHOD, 1, "captions")
    assert store.methods() == [METHOD] and store.versions(METHOD) == [2] and store.eval_sets(METHOD, 2) == ["captions"]


def test_single_shard_read_is_a_zero_copy_read_only_view(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.write("m", 0, "test", unit_rows(5), np.zeros(5), np.arange(5))
    emb = store.read("m", 0, "test").embeddings
    assert emb.dtype == np.float32 and emb.flags.c_contiguous
    assert not emb.flags.writeable and not emb.flags.owndata


def test_sharded_partition_is_invisible_until_every_shard_exists_then_sorted(tmp_path):
    store = EmbeddingStore(tmp_path)
    emb = unit_rows(7)
    ids = np.arange(7)
    store.write("m", 0, "test", emb[1::2], ids[1::2], ids[1::2], shard=1, num_shards=2)
    assert not store.has("m", 0, "test") and store.methods() == []
    with pytest.raises(StoreError, match=r"incomplete \(1 of 2 shards\); re-run the step"):
        store.read("m", 0, "test")
    store.write("m", 0, "test", emb[0::2], ids[0::2], ids[0::2], shard=0, num_shards=2)
    t = store.read("m", 0, "test")
    assert t.sample_ids.tolist() == list(range(7)) and t.labels.tolist() == list(range(7))
    np.testing.assert_array_equal(t.embeddings, emb)
    assert t.embeddings.flags.c_contiguous and t.metadata["num_shards"] == 2


def test_shards_of_an_older_sharding_are_not_mixed_in(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.write("m", 0, "test", unit_rows(2), [0, 0], [8, 9], shard=2, num_shards=3)  # an interrupted 3-worker run
    store.write("m", 0, "test", unit_rows(4), np.zeros(4), np.arange(4), shard=0, num_shards=1)
    assert store.read("m", 0, "test").sample_ids.tolist() == [0, 1, 2, 3]
    assert [p.name for p in partition_dir(tmp_path).glob("part-*")] == ["part-0.arrow"]


def test_duplicate_sample_ids_across_shards_are_refused(tmp_path):
    store = EmbeddingStore(tmp_path)
    for shard in (0, 1):
        store.write("m", 0, "test", unit_rows(2), [0, 0], [0, 1], shard=shard, num_shards=2)
    with pytest.raises(StoreError, match="sample_id 0 in more than one shard"):
        store.read("m", 0, "test")


def test_crash_mid_write_leaves_no_readable_partial_partition(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path)

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="could not write"):
        store.write("m", 0, "test", unit_rows(3), np.zeros(3), np.arange(3))
    monkeypatch.undo()
    assert not store.has("m", 0, "test") and list(tmp_path.rglob("*.arrow")) == []
    assert list(tmp_path.rglob("*.tmp")) == []  # the failed writer removed its temp file
    with pytest.raises(StoreError, match="no embeddings stored"):
        store.read("m", 0, "test")


def test_leftover_temp_file_is_ignored_by_readers_and_listing(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.write("m", 0, "test", unit_rows(3), np.zeros(3), np.arange(3))
    leftover = partition_dir(tmp_path) / ".part-0.arrow.shard0.killed.tmp"  # what a killed writer leaves
    leftover.write_bytes(b"half a file")
    assert store.read("m", 0, "test").sample_ids.tolist() == [0, 1, 2]
    assert ds.dataset(tmp_path, format="arrow", partitioning="hive").count_rows() == 3
    store.write("m", 0, "test", unit_rows(3), np.zeros(3), np.arange(3))
    assert store.read("m", 0, "test").sample_ids.tolist() == [0, 1, 2] and store.versions("m") == [0]


def test_store_on_a_filesystem_without_rename_or_memory_maps():
    """The same store on an in-memory object-store-like filesystem: shards and marker are whole objects."""
    from tests.test_run_storage import memory_storage

    run = memory_storage()
    store = EmbeddingStore(run.child("store"))
    store.write("m/a", 1, "test", unit_rows(4), np.arange(4), np.arange(4), shard=1, num_shards=2)
    assert not store.has("m/a", 1, "test") and store.methods() == []
    with pytest.raises(StoreError, match="incomplete"):
        store.read("m/a", 1, "test")
    store.write("m/a", 1, "test", unit_rows(4), np.arange(4), np.arange(4, 8), shard=0, num_shards=2)
    table = store.read("m/a", 1, "test")
    assert table.sample_ids.tolist() == [0, 1, 2, 3, 4, 5, 6, 7] and table.embeddings.dtype == np.float32
    assert store.methods() == ["m/a"] and store.versions("m/a") == [1] and store.eval_sets("m/a", 1) == ["test"]
    exported = store.export_parquet(run.child("export"))
    assert sorted(exported.list()) == ["method=m%2Fa/version=1/eval_set=test/part-0.parquet",
                                       "method=m%2Fa/version=1/eval_set=test/part-1.parquet"]


def test_truncated_or_garbled_file_raises_store_error(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.write("m", 0, "test", unit_rows(50), np.zeros(50), np.arange(50))
    part = partition_dir(tmp_path) / "part-0.arrow"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"part-0\.arrow is missing or truncated.*re-run with --resume"):
        store.read("m", 0, "test")
    part.write_bytes(b"\x00" * len(data))  # same size: only the format check can catch it
    with pytest.raises(StoreError, match=r"part-0\.arrow is corrupt.*delete .* and re-run with --resume"):
        store.read("m", 0, "test")


def test_metadata_that_disagrees_with_its_directory_raises_store_error(tmp_path):
    store = EmbeddingStore(tmp_path)
    store.write("m", 0, "test", unit_rows(3), np.zeros(3), np.arange(3))
    source = partition_dir(tmp_path)
    shutil.copytree(source, source.parent.parent / "version=1" / source.name)
    with pytest.raises(StoreError, match="disagrees with its location"):
        store.read("m", 1, "test")


def test_normalized_claim_is_checked(tmp_path):
    store = EmbeddingStore(tmp_path)
    with pytest.raises(ValueError, match="not unit-norm"):
        store.write("m", 0, "test", np.ones((2, 3)), [0, 0], [0, 1], metadata={"normalized": True})
    zero_row = np.vstack([unit_rows(1, 3), np.zeros((1, 3))])  # what F.normalize makes of a dead feature
    store.write("m", 0, "test", zero_row, [0, 0], [0, 1], metadata={"normalized": True})
    assert store.read("m", 0, "test").metadata["normalized"]


def test_partitions_readable_by_plain_pyarrow_dataset(tmp_path):
    store = EmbeddingStore(tmp_path)
    for version in (0, 1):
        store.write(METHOD, version, "test", unit_rows(4), np.arange(4), np.arange(4))
    table = ds.dataset(tmp_path, format="arrow", partitioning="hive").to_table()
    assert table.num_rows == 8
    assert set(table.column("method").to_pylist()) == {METHOD}
    assert sorted(table.column("version").to_pylist()) == [0] * 4 + [1] * 4


def test_export_parquet_readable_by_pyarrow_and_pandas(tmp_path):
    store = EmbeddingStore(tmp_path / "store")
    emb = unit_rows(5)
    store.write(METHOD, 0, "test", emb, np.arange(5), np.arange(5), caption_of=[-1, 0, -1, 1, -1])
    store.write("other", 0, "test", unit_rows(2), [0, 0], [0, 1])
    dest = store.export_parquet(tmp_path / "export", method=METHOD).local_path()
    files = list(dest.rglob("*.parquet"))
    assert len(files) == 1
    assert "BYTE_STREAM_SPLIT" in pq.ParquetFile(files[0]).metadata.row_group(0).column(0).encodings
    table = pq.read_table(dest)
    assert table.num_rows == 5 and set(table.column("method").to_pylist()) == {METHOD}
    assert set(table.column("version").to_pylist()) == {0}  # from the path
    np.testing.assert_array_equal(np.stack(table.column("embedding").to_pylist()), emb)
    assert json.loads(pq.read_schema(files[0]).metadata[b"compat"])["method"] == METHOD
    frame = pd.read_parquet(dest)
    assert len(frame) == 5 and frame["caption_of"].isna().sum() == 3

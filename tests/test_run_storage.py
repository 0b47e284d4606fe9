"""RunStorage on the local filesystem and on a filesystem that is not a POSIX tree (fsspec's in-memory one)."""

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from orchestrator.errors import RunError
from orchestrator.storage.run_storage import RunStorage


def memory_storage() -> RunStorage:
    """A run on an in-memory filesystem: no rename, no directories, objects only (like an object store)."""
    return RunStorage(pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem())), f"/runs/{uuid.uuid4().hex}")


@pytest.fixture(params=["local", "memory"])
def run(request, tmp_path):
    return RunStorage.at(tmp_path / "run") if request.param == "local" else memory_storage()


def test_json_round_trip_and_listing(run):
    run.write_json("manifest/bct/step-000.json", {"version": 0, "loss": 0.5})
    run.write_json("manifest/bct/step-001.json", {"version": 1})
    run.write_json("rows/bct/row-000.json", [1, 2])
    assert run.read_json("manifest/bct/step-000.json") == {"version": 0, "loss": 0.5}
    assert run.list("manifest") == ["bct/step-000.json", "bct/step-001.json"]
    assert run.list() == ["manifest/bct/step-000.json", "manifest/bct/step-001.json", "rows/bct/row-000.json"]
    assert run.list("nothing/here") == []
    run.write_json("metrics.json", {})
    assert run.list(recursive=False) == ["metrics.json"] and run.list("manifest", recursive=False) == []
    assert run.exists("rows/bct/row-000.json") and not run.exists("rows/bct") and not run.exists("rows/x.json")
    assert run.read_json_or_none("rows/x.json") is None
    with pytest.raises(FileNotFoundError):
        run.read_bytes("rows/x.json")


def test_children_share_the_filesystem(run):
    sub = run.child("upstream/abc")
    sub.write_text("config.yaml", "seed: 1\n")
    assert run.read_text("upstream/abc/config.yaml") == "seed: 1\n"
    assert run.list("upstream") == ["abc/config.yaml"]
    assert sub == run.child("upstream").child("abc")


def test_torch_round_trip_refuses_pickled_code(run):
    state = {"w": torch.arange(6.0).reshape(2, 3), "epoch": 3}
    run.save_torch("versions/m/v0/model.pt", state)
    loaded = run.load_torch("versions/m/v0/model.pt")
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], state["w"])
    with run.open_output("evil.pt") as out:
        torch.save({"obj": uuid.UUID(int=1)}, out)  # an arbitrary class: weights_only must refuse it
    with pytest.raises(Exception):
        run.load_torch("evil.pt")


def test_a_failed_write_publishes_nothing_and_keeps_the_old_object(run):
    run.write_bytes("a/b.bin", b"old")
    with pytest.raises(RuntimeError):
        with run.open_output("a/b.bin") as out:
            out.write(b"half of the new")
            raise RuntimeError("crash midway")
    assert run.read_bytes("a/b.bin") == b"old"
    with pytest.raises(RuntimeError):
        with run.open_output("a/new.bin") as out:
            out.write(b"partial")
            raise RuntimeError("crash midway")
    assert not run.exists("a/new.bin") and run.list("a") == ["b.bin"]  # no temp file left visible either


def test_completion_record_decides_what_is_finished(run):
    """The rule every writer follows: artefacts first, the completion record last; readers look only at it."""
    run.save_torch("versions/m/v0/model.pt", {"w": torch.zeros(1)})
    assert not run.exists("manifest/m/step-000.json")  # weights alone do not make the step finished
    run.write_json("manifest/m/step-000.json", {"version": 0})
    assert run.exists("manifest/m/step-000.json") and run.size("versions/m/v0/model.pt") > 0


def test_arrow_files_through_streams(run):
    batch = pa.record_batch([pa.array(np.arange(5, dtype=np.float32))], names=["x"])
    with run.open_output("store/part-0.arrow") as out, ipc.new_file(out, batch.schema) as writer:
        writer.write_batch(batch)
    table = ipc.open_file(run.open_input("store/part-0.arrow")).read_all()
    assert table.column("x").to_pylist() == [0, 1, 2, 3, 4]


def test_delete_is_idempotent(run):
    run.write_bytes("x/1", b"1")
    run.write_bytes("x/2", b"2")
    run.delete("x/1")
    run.delete("x/1")
    assert run.list("x") == ["2"]
    run.delete_all("x")
    assert run.list("x") == []


def test_corrupt_json_names_the_file(run):
    run.write_bytes("metrics.json", b"{not json")
    with pytest.raises(RunError, match="metrics.json is corrupt"):
        run.read_json("metrics.json")


def test_locations(tmp_path):
    local = RunStorage.at(tmp_path / "r")
    assert local.is_local and local.local_path("a/b") == tmp_path / "r" / "a" / "b"
    assert RunStorage.at(f"file://{tmp_path}/r") == local
    assert RunStorage.of(local) is local
    with pytest.raises(RunError, match="not on a local filesystem"):
        memory_storage().local_path()
    with pytest.raises(ValueError):
        local.path("../escape")


def test_a_one_step_run_lives_entirely_on_a_non_local_filesystem():
    """Config, weights, store, manifest, rows, metrics and report all go through RunStorage: a run whose
    location is an in-memory filesystem finishes and leaves nothing on local disk. (Steps after the
    first still need a local run: methods read earlier versions' weights from a local path.)"""
    from helpers import config_under

    from orchestrator.engine.driver import run_experiment

    run = memory_storage()
    cfg = config_under("/nonexistent-output-dir", "data.num_classes=4", "data.train_per_class=8",
                       "data.test_per_class=4", "scenario.initial_classes=4", "scenario.num_steps=1",
                       "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.batch_size=16",
                       "resources.num_workers=0", "methods=[{name: independent}]")
    metrics = run_experiment(cfg, run, progress=False, echo=lambda line: None)
    assert list(metrics["methods"]) == ["independent"]
    stored = set(run.list())
    assert {"config.yaml", "run.json", "manifest/independent/step-000.json", "versions/independent/v0/model.pt",
            "store/method=independent/version=0/eval_set=test/_COMPLETE.json", "rows/independent/row-000.json",
            "metrics.json", "report.md", "heatmaps.png", "matrix_independent_cmc1.csv"} <= stored
    assert run.read_json("metrics.json")["methods"]["independent"]["matrices"]["cmc1"] == [[pytest.approx(metrics["methods"]["independent"]["matrices"]["cmc1"][0][0])]]
    assert not Path("/nonexistent-output-dir").exists()

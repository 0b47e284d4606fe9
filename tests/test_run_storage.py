"""RunStorage on the local filesystem and on a filesystem that is not a POSIX tree (fsspec's in-memory one),
and whole multi-step runs (replacements and an upstream CLIP included) living on the in-memory one."""

import os
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from orchestrator.errors import RunError
from orchestrator.storage.run_storage import RunStorage

from test_replacement import TINY as TINY_REPLACEMENT, UPSTREAM

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


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


QUICKSTART = ["data.num_classes=6", "data.train_per_class=12", "data.test_per_class=4", "scenario.initial_classes=2",
              "scenario.increment=2", "scenario.num_steps=3", "model.width=8", "model.embedding_dim=16",
              "training.epochs=1", "training.batch_size=16", "resources.num_workers=0",
              "methods=[{name: independent}, {name: bct}, {name: oca, params: {delta_dim: 4}}]"]
REPLACEMENT = [*TINY_REPLACEMENT, *UPSTREAM]
FSCIL = ["data.num_classes=6", "data.train_per_class=8", "data.test_per_class=4", "scenario.initial_classes=4",
         "scenario.increment=1", "scenario.shots=2", "scenario.num_steps=3",
         "upstream_clip={images_per_class: 4, epochs: 1, batch_size: 16}", "training.epochs=1",
         "training.batch_size=16", "training.incremental={batch_size: 2}", "resources.num_workers=0",
         "methods=[{name: zero_shot_clip}, {name: cpe_clip}]"]


def run_twice(config: Optional[str], overrides: list[str], tmp_path, monkeypatch) -> tuple[dict, dict, RunStorage]:
    """The same experiment in a local directory and on an in-memory filesystem (metrics of each, and the
    in-memory run), the second from an empty working directory whose output_dir does not exist."""
    from orchestrator import load_config
    from orchestrator.engine.driver import run_experiment

    local = run_experiment(load_config(config, [*overrides, f"output_dir={tmp_path / 'local'}"]),
                           progress=False, echo=lambda line: None)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = memory_storage()
    memory = run_experiment(load_config(config, [*overrides, "output_dir=/nonexistent-output-dir"]), run,
                            progress=False, echo=lambda line: None)
    assert not Path("/nonexistent-output-dir").exists() and not any(elsewhere.iterdir())
    return local, memory, run


def matrices(metrics: dict) -> dict:
    return {key: entry["matrices"] for key, entry in metrics["methods"].items()}


def test_a_multi_step_run_lives_entirely_on_a_non_local_filesystem(tmp_path, monkeypatch):
    """Every read and write of run state goes through RunStorage, earlier versions included (methods get
    them as StoredWeights): a fine-tuned three-step run of independent, bct (sharing independent's version
    0) and oca on an in-memory filesystem finishes, keeps everything there, writes nothing locally but the
    dataset cache, and gives bit-identical matrices to the same run in a local directory."""
    cache = Path(os.environ["COMPAT_CACHE_DIR"])
    before = set(cache.rglob("*")) if cache.exists() else set()
    local, memory, run = run_twice(None, QUICKSTART, tmp_path, monkeypatch)
    assert matrices(memory) == matrices(local) and list(memory["methods"]) == ["independent", "bct", "oca"]
    assert run.read_json("metrics.json")["methods"]["oca"]["matrices"] == memory["methods"]["oca"]["matrices"]
    stored = set(run.list())
    for method in ("independent", "bct", "oca"):
        for step in range(3):
            assert {f"manifest/{method}/step-{step:03d}.json", f"versions/{method}/v{step}/model.pt",
                    f"rows/{method}/row-{step:03d}.json",
                    f"store/method={method}/version={step}/eval_set=test/_COMPLETE.json"} <= stored
    assert run.read_json("manifest/bct/step-000.json")["copied_from"] == "independent"
    assert run.read_json("manifest/oca/step-002.json")["init_checkpoint"] == "versions/oca/v1/model.pt"
    assert {"config.yaml", "run.json", "metrics.json", "report.md", "heatmaps.png"} <= stored
    added = {p.relative_to(cache).parts[0] for p in set(cache.rglob("*")) - before}
    assert all(name.startswith("synthetic-") for name in added), added  # datasets only, no run state


def test_a_replacement_run_reaches_its_upstream_models_on_a_non_local_filesystem(tmp_path, monkeypatch):
    """Upstream models are nested runs inside the run; the replacing step loads one through the storage."""
    local, memory, run = run_twice(None, REPLACEMENT, tmp_path, monkeypatch)
    assert matrices(memory) == matrices(local)
    entry = run.read_json("manifest/er/step-002.json")
    assert entry["event"] == "replace" and entry["init_checkpoint"].startswith("upstream/")
    assert run.exists(entry["init_checkpoint"]) and entry["init_checkpoint"].endswith("/versions/er/v0/model.pt")


def test_an_upstream_clip_on_a_non_local_filesystem_reaches_open_clip_as_a_cached_local_copy(tmp_path, monkeypatch):
    """A CLIP's weights reach its method as a file name (model.pretrained): a run elsewhere hands over a
    local copy of the stored upstream CLIP, named by the SHA-256 of its bytes."""
    import hashlib

    local, memory, run = run_twice(str(CONFIGS / "fscil_synthetic.yaml"), FSCIL, tmp_path, monkeypatch)
    assert matrices(memory) == matrices(local)
    (weights,) = [key for key in run.list() if key.startswith("upstream-clip/") and key.endswith("/model.pt")]
    data = run.read_bytes(weights)
    copy = Path(os.environ["COMPAT_CACHE_DIR"]) / "stored-weights" / f"{hashlib.sha256(data).hexdigest()}.pt"
    assert copy.read_bytes() == data


def test_stored_weights_load_like_files_and_refuse_what_files_refuse(run, tmp_path):
    from methods.base import load_state_dict
    from orchestrator.errors import CheckpointError
    from orchestrator.storage import runfiles

    state = {"w": torch.arange(4.0)}
    runfiles.save_version(run, "m", 0, state, {"version": 0})
    weights = runfiles.version_checkpoint(run, "m", 0)
    assert str(weights) == run.path("versions/m/v0/model.pt") and torch.equal(load_state_dict(weights)["w"], state["w"])
    assert runfiles.relative_to_run(weights, run) == "versions/m/v0/model.pt"
    with run.open_output("versions/m/v1/model.pt") as out:
        torch.save({"obj": uuid.UUID(int=1)}, out)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_state_dict(runfiles.version_checkpoint(run, "m", 1))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(runfiles.version_checkpoint(run, "m", 2))
    from safetensors.torch import save

    run.write_bytes("w.safetensors", save(state))
    assert torch.equal(load_state_dict(runfiles.stored_weights(run, "w.safetensors"))["w"], state["w"])


def test_local_file_is_the_object_locally_and_a_content_named_copy_elsewhere(run, tmp_path):
    run.write_bytes("upstream-clip/abc/model.pt", b"weights")
    path = run.local_file("upstream-clip/abc/model.pt", tmp_path / "cache")
    assert path.read_bytes() == b"weights"
    if run.is_local:
        assert path == run.local_path("upstream-clip/abc/model.pt") and not (tmp_path / "cache").exists()
    else:
        assert path.parent == tmp_path / "cache" and path.name.endswith(".pt") and len(path.stem) == 64
        assert run.local_file("upstream-clip/abc/model.pt", tmp_path / "cache") == path


def test_ray_train_worker_groups_read_and_write_a_non_local_run(ray_cluster, tmp_path):
    """Worker groups in their own processes get the run's filesystem itself (Ray Train's
    storage_filesystem too), not a local path: a pyarrow filesystem that is no LocalFileSystem (a subtree
    of the local disk here, since an in-memory one would not be shared between processes)."""
    from orchestrator import load_config
    from orchestrator.engine.driver import run_experiment

    run = RunStorage(pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), "/run")
    assert not run.is_local
    overrides = [*QUICKSTART, "resources.num_workers=1", "resources.cpus_per_worker=1", "methods=[{name: bct}]",
                 "scenario.num_steps=2", "output_dir=/nonexistent-output-dir"]
    metrics = run_experiment(load_config(None, overrides), run, progress=False, echo=lambda line: None)
    assert len(metrics["methods"]["bct"]["matrices"]["cmc1"]) == 2
    assert run.exists("versions/bct/v1/model.pt") and run.read_json("manifest/bct/step-001.json")["event"] == "finetune"


def test_a_cross_modal_encoding_records_its_upstream_clip_as_a_key_in_the_run(tmp_path):
    """The encode manifest's ``weights``: the upstream CLIP's key inside the run (valid wherever the run
    lives), not the local copy a worker loaded; a spec that names a tag or a file keeps it."""
    from orchestrator.config.crossmodal import parse_crossmodal
    from orchestrator.engine.crossmodal import recorded_weights
    from orchestrator.engine.upstream_clip import upstream_entry

    from test_xbt import TINY as CROSSMODAL

    upstream = {"captions": "instance", "captions_per_image": 3, "images_per_class": 4, "epochs": 1}
    cfg = parse_crossmodal({**CROSSMODAL, "models": {"old": {"name": "tiny-vit-w32", "upstream": upstream},
                                                     "new": {"name": "tiny-vit-w64"}}})
    key = recorded_weights(cfg.models.old, cfg.data.synthetic)
    run = RunStorage.at(tmp_path / "run")
    assert key.startswith("upstream-clip/") and key.endswith("/model.pt")
    assert run.path(key) == upstream_entry(cfg.models.old.name, cfg.models.old.upstream, cfg.data.synthetic, run).path("model.pt")
    assert recorded_weights(cfg.models.new, cfg.data.synthetic) is None  # random weights: nothing to name


def test_a_torn_read_away_from_the_local_disk_is_read_again_before_it_is_called_corrupt(tmp_path):
    """On an object store a read overlapping a rewrite (the lease's heartbeat) can come back torn; the
    rewrite lands while the first reads fail, and the next read sees the whole object."""
    import threading

    run = memory_storage()
    run.write_bytes("lease.json", b'{"holder": "a"}\n{"tail": ')  # what a torn read returns
    rewrite = threading.Timer(0.1, lambda: run.write_json("lease.json", {"holder": "b"}))
    rewrite.start()
    try:
        assert run.read_json("lease.json") == {"holder": "b"}
    finally:
        rewrite.join()
    run.write_bytes("lease.json", b"{not json")  # corrupt for good: still an error naming the file
    with pytest.raises(RunError, match="lease.json is corrupt"):
        run.read_json("lease.json")

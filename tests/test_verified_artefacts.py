"""Verified artefacts: every manifest entry records the size and SHA-256 of what it vouches for; a resume
(sizes always, digests with --verify) and `compat report` find damage, and a resume recomputes exactly the
damaged tasks and what was derived from them (real files, real in-process runs)."""

import json
import re
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.engine import driver, executor
from orchestrator.engine.graph import RunPlan, Task, TaskGraph, step_name
from orchestrator.engine.repair import repair_run
from orchestrator.engine.scenarios import Resources
from orchestrator.errors import StoreError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import Artefact, RunStorage
from orchestrator.storage.store import EmbeddingStore
from orchestrator.storage.verify import check_artefacts, verify_run

from test_run_storage import memory_storage
from test_simulation import tiny

METHODS = ("independent", "bct")


def shard(method: str, version: int) -> str:
    return f"store/method={method}/version={version}/eval_set=test/part-0.arrow"


def weights(method: str, version: int) -> str:
    return f"versions/{method}/v{version}/model.pt"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path) -> None:
    """Change bytes in the middle of the file, keeping its size (only a digest can tell)."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 8):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def entries(run_dir: Path) -> dict[str, dict]:
    return {str(p.relative_to(run_dir / "manifest")): json.loads(p.read_text())
            for p in sorted((run_dir / "manifest").rglob("*.json"))}


def matrices(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {key: metrics["methods"][key]["matrices"] for key in METHODS}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (with a service simulation: its served-versions tables have records too);
    every test damages a copy of it."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = tiny(tmp, "service={budgets: [0, 100], policies: [random]}")
    driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    return tmp / cfg.name


@pytest.fixture
def copy(reference, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(reference, target)
    return target


def unchanged(reference: Path, run_dir: Path, except_tasks: set[str]) -> None:
    """Every manifest entry but ``except_tasks`` is byte-for-byte the reference's: nothing else was redone."""
    for name in entries(reference):
        if name not in except_tasks:
            assert (run_dir / "manifest" / name).read_bytes() == (reference / "manifest" / name).read_bytes(), name


# -- the records ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["local", "memory"])
def test_every_write_returns_the_size_and_sha256_of_the_stored_bytes(backend, tmp_path):
    import hashlib

    import torch

    run = RunStorage.at(tmp_path / "run") if backend == "local" else memory_storage()
    records = {"a.json": run.write_json("a.json", {"x": 1}), "b.bin": run.write_bytes("b.bin", b"\x00" * 3000),
               "c.pt": run.save_torch("c.pt", {"w": torch.ones(3)})}
    for key, record in records.items():
        data = run.read_bytes(key)
        assert record == Artefact(len(data), hashlib.sha256(data).hexdigest()) == run.artefact(key)
    store = EmbeddingStore(run.child("store"))
    for rank in (1, 0):  # the last writer hashes the other rank's shard by reading it back
        store.write("m", 0, "test", [[float(rank)] * 4], [0], [rank], shard=rank, num_shards=2)
    recorded = store.artefacts("m", 0, "test")
    assert len(recorded) == 3
    for key, record in recorded.items():
        assert run.child("store").artefact(key) == record


def test_torch_saves_are_fsynced_before_they_are_published(tmp_path, monkeypatch):
    import os

    import torch

    from orchestrator.storage import run_storage

    run = RunStorage.at(tmp_path / "run")
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        synced.append(("published", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(run_storage.os, "fsync", fsync)
    monkeypatch.setattr(run_storage.os, "replace", replace)
    run.save_torch("versions/m/v0/model.pt", {"w": torch.ones(2)})
    target = str(tmp_path / "run" / "versions" / "m" / "v0" / "model.pt")
    published = synced.index(("published", target))
    assert any(isinstance(p, str) and "/.model.pt." in p for p in synced[:published])  # the temp file, before
    assert synced[published + 1:] == [str(tmp_path / "run" / "versions" / "m" / "v0")]  # then the rename


def test_a_finished_run_vouches_for_every_artefact_it_keeps(reference):
    for name, entry in entries(reference).items():
        method, step = name.removesuffix(".json").split("/step-")
        version = int(step)
        recorded = set(entry["artefacts"])
        assert {weights(method, version), f"versions/{method}/v{version}/meta.json", shard(method, version),
                shard(method, version).replace("part-0.arrow", "_COMPLETE.json")} == recorded, name
    assert runfiles.service_methods(reference) == sorted(METHODS)
    for method in METHODS:  # derived at the end, in no task's entry: a record of its own
        record = json.loads((reference / runfiles.service_record_key(method)).read_text())["artefacts"]
        assert record == {runfiles.served_versions_key(method): Artefact.of_bytes(
            (reference / runfiles.served_versions_key(method)).read_bytes()).to_json()}
    assert verify_run(RunStorage.at(reference), digests=True).ok


def test_check_artefacts_tells_missing_truncated_and_changed_apart(tmp_path):
    run = RunStorage.at(tmp_path)
    records = {key: run.write_bytes(key, b"0123456789").to_json() for key in ("same", "short", "changed", "gone")}
    run.write_bytes("short", b"01234")
    run.write_bytes("changed", b"0123456780")
    run.delete("gone")
    found = {d.key: d for d in check_artefacts(run, records, digests=True)}
    assert set(found) == {"short", "changed", "gone"}
    assert found["changed"].by_digest and not found["short"].by_digest
    assert {d.key for d in check_artefacts(run, records, digests=False)} == {"short", "gone"}


# -- the repair rules, on a graph of hand-made tasks ----------------------------------------------------
class _Method:
    key = "m"


class _Config:
    methods = [_Method()]


def chain_graph() -> TaskGraph:
    """m step 0 -> step 1 -> step 2 of one method, and a task ``other`` that needs none of them."""
    res = Resources(num_workers=0, use_gpu=False, cpus_per_worker=1)
    graph = TaskGraph()
    graph.add_run(RunPlan("", _Config(), (None, None, None), "experiment"))
    for step in range(3):
        graph.add(Task(id=step_name("m", step), run="", name=step_name("m", step), action="train", resources=res,
                       method=0, step=step, deps=(step_name("m", step - 1),) if step else ()))
    graph.add(Task(id="other", run="", name="other", action="train", resources=res))
    return graph


def finish(run: RunStorage, name: str, files: dict[str, bytes]) -> None:
    records = {key: run.write_bytes(key, data) for key, data in files.items()}
    runfiles.mark_task_done(run, name, {"task": name, "artefacts": runfiles.artefact_records(records)})


@pytest.fixture
def chain(tmp_path):
    run = RunStorage.at(tmp_path / "run")
    for step in range(3):
        finish(run, f"m/step-{step:03d}", {weights("m", step): b"w" * 100, shard("m", step): b"e" * 100})
        runfiles.write_row(run, "m", step, {"cmc1": [0.5] * (step + 1)})
        run.write_bytes(runfiles.index_key("m", step, "test"), b"index")  # evaluation.search.index's artefact
    finish(run, "other", {"other.pt": b"o" * 10})
    run.write_json(runfiles.METRICS, {})
    return run


def test_damaged_weights_recompute_the_task_and_everything_trained_from_it(chain):
    chain.write_bytes(weights("m", 1), b"w" * 50)
    lines = []
    repair_run(chain_graph(), chain, digests=False, echo=lines.append)
    assert [runfiles.task_done(chain, f"m/step-{s:03d}") for s in range(3)] == [True, False, False]
    assert runfiles.task_done(chain, "other")
    assert not chain.exists(weights("m", 2)) and chain.exists(weights("m", 0))  # no longer vouched for: gone
    assert [runfiles.read_row(chain, "m", s) is not None for s in range(3)] == [True, False, False]
    assert [chain.exists(runfiles.index_key("m", s, "test")) for s in range(3)] == [True, False, False]
    assert not chain.exists(runfiles.METRICS)
    assert any("versions/m/v1/model.pt has 50 bytes, 100 recorded" in line for line in lines)
    assert any(line.startswith("Recomputing 2 finished task(s)") for line in lines)


def test_damaged_embeddings_alone_keep_the_weights_and_every_later_version(chain):
    entry = runfiles.manifest_entry(chain, "m", 1)
    chain.write_bytes(shard("m", 1), b"E" * 100)  # same size: only a digest sees it
    repair_run(chain_graph(), chain, digests=False, echo=lambda s: None)
    assert runfiles.task_done(chain, "m/step-001")
    repair_run(chain_graph(), chain, digests=True, echo=lambda s: None)
    assert [runfiles.task_done(chain, f"m/step-{s:03d}") for s in range(3)] == [True, False, True]
    assert runfiles.pending_reembed(chain, "m/step-001") == entry  # the worker embeds again from these weights
    assert chain.exists(weights("m", 1))
    assert [runfiles.read_row(chain, "m", s) is not None for s in range(3)] == [True, False, False]
    # version 1's gallery index goes with its vectors; version 2's gallery is intact, so its index stays
    assert [chain.exists(runfiles.index_key("m", s, "test")) for s in range(3)] == [True, False, True]
    repair_run(chain_graph(), chain, digests=True, echo=lambda s: None)  # an interrupted repair, resumed: the same
    assert runfiles.task_done(chain, "m/step-002") and runfiles.pending_reembed(chain, "m/step-001") == entry
    chain.write_bytes(weights("m", 1), b"w" * 99)  # and if the kept weights are damaged meanwhile: retrain
    repair_run(chain_graph(), chain, digests=False, echo=lambda s: None)
    assert not runfiles.task_done(chain, "m/step-002") and runfiles.pending_reembed(chain, "m/step-001") is None


def test_a_manifest_entry_deleted_by_hand_recomputes_that_task_and_what_depends_on_it(chain):
    chain.delete(runfiles.manifest_key("m", 0))
    repair_run(chain_graph(), chain, digests=False, echo=lambda s: None)
    assert not any(runfiles.task_done(chain, f"m/step-{s:03d}") for s in range(3))
    assert runfiles.task_done(chain, "other")


def test_an_unreadable_entry_or_row_is_damage_and_old_entries_are_trusted_with_a_warning(chain):
    chain.write_bytes(runfiles.manifest_key("m", 2), b'{"task": "m/st')
    chain.write_bytes(runfiles.row_key("m", 0), b"[0.5, ")
    chain.write_json(runfiles.task_manifest_key("other"), {"task": "other"})  # written before records existed
    lines = []
    repair_run(chain_graph(), chain, digests=True, echo=lines.append)
    assert [runfiles.task_done(chain, f"m/step-{s:03d}") for s in range(3)] == [True, True, False]
    assert runfiles.read_row(chain, "m", 0) is None and runfiles.read_row(chain, "m", 1) is not None
    assert runfiles.task_done(chain, "other")
    assert any(line.startswith("warning: 1 finished task(s)") and "delete its manifest entry" in line for line in lines)


# -- real runs --------------------------------------------------------------------------------------
def test_a_truncated_version_is_reported_and_resume_retrains_exactly_it_and_its_dependents(reference, copy, capsys):
    truncate(copy / weights("bct", 1))
    assert main(["report", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "versions/bct/v1/model.pt has" in err and "(task bct/step-001)" in err
    advice = re.search(r"Run `(compat run --resume [^`]+)`", err).group(1)
    assert advice == f"compat run --resume {copy}"  # a size check finds it: no --verify needed

    assert main(advice.split()[1:] + ["--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Recomputing 2 finished task(s) and what was derived from them: bct step 1, bct step 2" in out
    unchanged(reference, copy, except_tasks={"bct/step-001.json", "bct/step-002.json"})
    for step in (1, 2):
        assert entries(copy)[f"bct/step-00{step}.json"]["started_at"] > entries(reference)[f"bct/step-00{step}.json"]["finished_at"]
    assert matrices(copy) == matrices(reference)
    assert main(["report", "--verify", str(copy)]) == 0


def test_a_changed_shard_needs_verify_which_embeds_that_version_again(reference, copy, capsys, monkeypatch):
    flip(copy / shard("independent", 1))
    assert main(["report", str(copy)]) == 0  # sizes agree
    with monkeypatch.context() as patch:  # a plain resume checks sizes only: nothing to redo
        patch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
        assert main(["run", "--resume", str(copy), "--no-progress"]) == 0
    assert (copy / shard("independent", 1)).read_bytes() != (reference / shard("independent", 1)).read_bytes()
    capsys.readouterr()

    assert main(["report", "--verify", str(copy)]) == 2
    advice = re.search(r"Run `(compat run --resume [^`]+)`", capsys.readouterr().err).group(1)
    assert advice == f"compat run --resume {copy} --verify"
    assert main(advice.split()[1:] + ["--no-progress"]) == 0
    assert "Embedding again from verified weights: independent step 1" in capsys.readouterr().out
    assert (copy / shard("independent", 1)).read_bytes() == (reference / shard("independent", 1)).read_bytes()
    again, before = entries(copy)["independent/step-001.json"], entries(reference)["independent/step-001.json"]
    assert again.pop("embedded_again_at") > before["finished_at"]
    again.pop("embedded_again_by")
    assert again == before  # not retrained: same times, same weights, same (restored) shard records
    unchanged(reference, copy, except_tasks={"independent/step-001.json"})
    assert not (copy / "reembed").exists() or not any((copy / "reembed").rglob("*.json"))
    for step in range(3):
        assert runfiles.read_row(copy, "independent", step) == runfiles.read_row(reference, "independent", step)
    assert matrices(copy) == matrices(reference)


def test_a_changed_shard_and_changed_weights_then_resume_verify_equal_an_uninterrupted_run(reference, copy):
    flip(copy / shard("independent", 2))
    flip(copy / weights("bct", 1))
    driver.run_experiment(driver.load_run_config(copy), copy, progress=False, echo=lambda s: None, verify=True)
    assert matrices(copy) == matrices(reference)
    unchanged(reference, copy, except_tasks={"independent/step-002.json", "bct/step-001.json", "bct/step-002.json"})
    assert entries(copy)["independent/step-002.json"]["started_at"] == entries(reference)["independent/step-002.json"]["started_at"]
    assert "embedded_again_at" not in entries(copy)["bct/step-002.json"]
    assert verify_run(RunStorage.at(copy), digests=True).ok


def test_following_the_stores_own_advice_works(reference, copy, capsys):
    truncate(copy / shard("bct", 2))
    with pytest.raises(StoreError) as error:
        EmbeddingStore(copy / "store").read("bct", 2, "test")
    directory = re.search(r"; delete (\S+) and re-run with --resume", str(error.value)).group(1)
    shutil.rmtree(directory)
    assert main(["run", "--resume", str(copy), "--no-progress"]) == 0
    assert "Embedding again from verified weights: bct step 2" in capsys.readouterr().out
    assert matrices(copy) == matrices(reference)
    unchanged(reference, copy, except_tasks={"bct/step-002.json"})


def test_a_changed_served_versions_table_is_found_by_verify_and_written_again(reference, copy, capsys, monkeypatch):
    key = runfiles.served_versions_key("bct")
    flip(copy / key)
    assert verify_run(RunStorage.at(copy), digests=False).ok  # sizes agree
    assert main(["report", "--verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{key} has the recorded size but not the recorded SHA-256" in err
    assert f"Run `compat run --resume {copy} --verify`" in err
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    assert main(["run", "--resume", str(copy), "--verify", "--no-progress"]) == 0
    assert f"{key} has the recorded size" in capsys.readouterr().out
    assert (copy / key).read_bytes() == (reference / key).read_bytes()
    unchanged(reference, copy, except_tasks=set())
    assert verify_run(RunStorage.at(copy), digests=True).ok

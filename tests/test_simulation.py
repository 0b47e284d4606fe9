"""End-to-end driver behaviour in-process (num_workers: 0): outputs, resume, interruption, errors."""

import json
import shutil
import time

import numpy as np
import pytest
import torch

from methods.base import register
from methods.independent import Independent
from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator.engine import executor
from orchestrator.errors import CompatError
from orchestrator.cli import main
from orchestrator.engine.scenarios import class_order

from helpers import config_under

TINY = [
    "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
    "model.width=8", "model.embedding_dim=16", "training.epochs=2", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=0",
]


def tiny(tmp_path, *extra):
    return config_under(tmp_path, *TINY, *extra)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny(tmp)
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    return cfg, tmp / cfg.name, metrics


def test_run_directory_holds_every_output(finished_run):
    cfg, run_dir, metrics = finished_run
    for name in ["config.yaml", "run.json", "metrics.json", "report.md", "heatmaps.png"]:
        assert (run_dir / name).is_file(), name
    for key in ["independent", "bct"]:
        assert (run_dir / f"heatmap_{key}.png").is_file()
        assert (run_dir / f"matrix_{key}_cmc1.csv").is_file()
        for v in range(3):
            assert runfiles.step_done(run_dir, key, v)
            state = torch.load(run_dir / "versions" / key / f"v{v}" / "model.pt", weights_only=True)
            assert all(isinstance(t, torch.Tensor) for t in state.values())
    assert not list((run_dir / "epochs").rglob("*.pt"))  # resume points are cleared once a step is done


def test_metrics_json_schema(finished_run):
    _, run_dir, metrics = finished_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["schema_version"] == 1 and on_disk["protocol"] == "leave-one-out"
    entry = on_disk["methods"]["bct"]
    assert set(entry["matrices"]) == {"cmc1", "cmc5", "map"}
    m = entry["matrices"]["cmc1"]
    assert len(m) == 3 and m[0][1] is None and m[2][2] is not None and 0 <= m[2][0] <= 1
    assert set(entry["summary"]) == {"AC", "AM", "BC", "FC"}
    assert entry["ecc"]["cmc1"][1][0] in (True, False) and entry["ecc"]["cmc1"][0][0] is None
    assert len(entry["accuracy"]) == 3
    assert entry["params"]["variant"] == "paper" and entry["params"]["logit_scale"] == 1.0
    assert "update_gain" in entry


def test_rerun_with_the_same_config_redoes_nothing(finished_run, monkeypatch):
    cfg, run_dir, metrics = finished_run
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    again = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert again["methods"]["bct"]["matrices"] == metrics["methods"]["bct"]["matrices"]


def test_resume_flag_and_report_command(finished_run, monkeypatch, capsys):
    _, run_dir, _ = finished_run
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "bct" in capsys.readouterr().out
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").is_file()


def test_same_seed_gives_the_same_numbers(finished_run, tmp_path):
    cfg, _, metrics = finished_run
    again = driver.run_experiment(tiny(tmp_path), progress=False, echo=lambda s: None)
    assert again["methods"]["bct"]["matrices"] == metrics["methods"]["bct"]["matrices"]


def test_other_config_in_the_same_directory_is_refused(finished_run, tmp_path):
    from orchestrator.errors import RunError

    cfg, run_dir, _ = finished_run
    other = tiny(run_dir.parent, "training.lr=0.01")
    with pytest.raises(RunError, match="different config"):
        driver.run_experiment(other, progress=False, echo=lambda s: None)


@register
class Interrupted(Independent):
    """Raises once, in the second epoch of step 1 (6 batches per epoch there), as a killed driver would."""

    name = "test_interrupted"
    calls = 0

    def loss(self, outputs, images, labels, state, ctx):
        ce, parts = super().loss(outputs, images, labels, state, ctx)
        if ctx.index == 1 and Interrupted.calls == 0:  # step 1's first batch overflows fp16: a scaler backs off
            return ce * 1e6, parts
        return ce, parts

    def after_backward(self, model, state, ctx):
        if ctx.index == 1:
            Interrupted.calls += 1
            if Interrupted.calls == 8:
                raise KeyboardInterrupt


def test_interrupted_step_resumes_from_its_last_epoch(tmp_path, monkeypatch):
    """fp16 (its gradient scaler works on CPU): the resume point also carries the loss scale reached."""
    from orchestrator.engine.precision import Precision

    cfg = tiny(tmp_path, "methods=[{name: test_interrupted}]", "training.precision=fp16", "scenario.num_steps=2")
    run_dir = tmp_path / cfg.name
    seen_starts, saved_scales, resumed_scales = [], [], []
    original, original_load = runfiles.load_epoch_state, Precision.load_state_dict

    def spy(run, method, step):
        state = original(run, method, step)
        seen_starts.append((step, None if state is None else state["epoch"]))
        if state is not None:
            saved_scales.append(state["precision"]["scaler"]["scale"])
        return state

    def load_spy(self, state):
        original_load(self, state)
        resumed_scales.append(self.scaler.get_scale())

    monkeypatch.setattr("orchestrator.engine.worker.runfiles.load_epoch_state", spy)
    monkeypatch.setattr(Precision, "load_state_dict", load_spy)
    with pytest.raises(KeyboardInterrupt):
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert runfiles.step_done(run_dir, "test_interrupted", 0) and not runfiles.step_done(run_dir, "test_interrupted", 1)
    seen_starts.clear()
    driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert (1, 0) in seen_starts  # step 1 restarted after its finished epoch 0
    assert all(step != 0 for step, _ in seen_starts)  # step 0 was not redone
    assert resumed_scales == saved_scales and len(saved_scales) == 1  # the scaler continued, not from scratch
    assert saved_scales[0] == Precision("cpu", "fp16").scaler.get_scale() / 2  # it had backed off once


def test_invalid_config_writes_nothing(tmp_path, capsys):
    code = main(["run", "--output-dir", str(tmp_path), "--set", "training.epochs=0"])
    assert code == 2
    assert "training.epochs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


RECORD_KEYS = {"seconds", "train_seconds", "started_at", "finished_at", "group", "throughput"}  # when and where, not what


def without_store_records(entry: dict) -> dict:
    """A manifest entry without its store shards' records: shards carry the config's digest in their
    metadata, so two configs' shards differ in bytes even when every embedding is the same."""
    records = {k: r for k, r in entry.pop("artefacts").items() if not runfiles.is_store_key(k)}
    return {**entry, "artefacts": records}


def test_grouping_does_not_change_manifest_or_results(finished_run, tmp_path):
    _, run_dir, metrics = finished_run
    cfg = tiny(tmp_path, "resources.group_steps=false")
    ungrouped = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    groups = set()
    for key in ["independent", "bct"]:
        assert ungrouped["methods"][key]["matrices"] == metrics["methods"][key]["matrices"]
        for v in range(3):
            a = {k: x for k, x in without_store_records(runfiles.manifest_entry(run_dir, key, v)).items()
                 if k not in RECORD_KEYS}
            b = without_store_records(runfiles.manifest_entry(tmp_path / cfg.name, key, v))
            groups.add(b["group"])
            assert a == {k: x for k, x in b.items() if k not in RECORD_KEYS}  # the same weights
    assert len(groups) == 6  # one Train run per step and method


def test_every_trained_step_records_its_throughput(finished_run):
    """images/s of the timed batches, FLOPs counted on the first batch; on CPU no MFU, and why."""
    _, run_dir, _ = finished_run
    for v in range(3):
        record = runfiles.manifest_entry(run_dir, "independent", v)["throughput"]
        assert record["images_per_second"] > 0 and record["timed_images"] > 0 and record["train_flops_per_image"] > 0
        assert record["mfu"] is None and "cpu" in record["mfu_note"]
        assert (record["precision"], record["channels_last"], record["compile"]) == ("fp32", False, False)


def test_one_worker_group_trains_every_method_in_process(finished_run):
    """In-process, one group trains every task in turn (chain by chain): one start per experiment."""
    _, run_dir, _ = finished_run
    entries = [runfiles.manifest_entry(run_dir, key, v) for key in ["independent", "bct"] for v in range(3)]
    assert len({e["group"] for e in entries}) == 1
    order = sorted(entries, key=lambda e: e["started_at"])
    assert [(e["method"], e["version"]) for e in order] == [
        ("independent", 0), ("independent", 1), ("independent", 2), ("bct", 0), ("bct", 1), ("bct", 2)]


def test_rows_are_computed_while_later_steps_train(finished_run):
    """Each version's matrix row is computed as soon as it is committed, while the group trains on."""
    _, run_dir, _ = finished_run
    last = runfiles.manifest_entry(run_dir, "independent", 2)
    assert (run_dir / runfiles.row_key("independent", 0)).stat().st_mtime < last["finished_at"]


def test_cells_are_split_by_the_classes_each_version_added(finished_run):
    cfg, run_dir, metrics = finished_run
    names, block_of_label = driver.class_blocks(cfg, 6)
    assert names == ["v0", "v1", "v2"] and block_of_label.tolist() == [0, 0, 1, 1, 2, 2]
    blocks = metrics["methods"]["bct"]["cmc1_by_block"]
    assert blocks["blocks"] == names and blocks["cells"][0][1] is None and len(blocks["cells"][2][0]) == 3
    assert "## CMC top-1 by class block" in (run_dir / "report.md").read_text()
    names, _ = driver.class_blocks(tiny(run_dir, "scenario.num_steps=2"), 6)
    assert names == ["v0", "v1", "none"]  # classes 4-5 are in the test set, no version trained on them
    seeded = tiny(run_dir, "scenario.class_order=seeded")
    _, block_of_label = driver.class_blocks(seeded, 6)
    order = class_order(seeded, 6)
    assert block_of_label[order].tolist() == [0, 0, 1, 1, 2, 2]  # blocks follow the class order


def test_progress_line_shows_every_running_task(tmp_path):
    from orchestrator.engine.graph import plan

    graph = plan(tiny(tmp_path))
    display = driver.ProgressDisplay(tmp_path, graph, done=4, enabled=False, echo=lambda s: None)
    line = display.line([("bct/step-001", {"epoch": 1, "epochs": 2, "loss": 0.5}), ("independent/step-002", None)])
    assert line.startswith("  4/6 tasks done | bct step 1 epoch 1/2 loss 0.5000; independent step 2 starting |")


def test_an_identical_first_version_is_trained_once_and_copied(finished_run, tmp_path):
    """bct's version 0 is independent's model: copied, and the same results as training it again."""
    import numpy as np

    from orchestrator.storage.store import EmbeddingStore

    cfg, run_dir, metrics = finished_run
    entry = runfiles.manifest_entry(run_dir, "bct", 0)
    assert entry["copied_from"] == "independent" and entry["trained_images_per_worker"] == 0
    assert "copied_from" not in runfiles.manifest_entry(run_dir, "bct", 1)
    store = EmbeddingStore(run_dir / "store")
    assert np.array_equal(store.read("bct", 0, "test").embeddings, store.read("independent", 0, "test").embeddings)
    assert runfiles.version_meta(run_dir, "bct", 0)["method"] == "bct"

    retrained = driver.run_experiment(tiny(tmp_path, "resources.share_first_version=false"),
                                          progress=False, echo=lambda s: None)
    assert "copied_from" not in runfiles.manifest_entry(tmp_path / cfg.name, "bct", 0)
    for key in ["independent", "bct"]:
        assert retrained["methods"][key]["matrices"] == metrics["methods"][key]["matrices"]
    other_recipe = tiny(tmp_path / "other", "methods=[{name: independent}, {name: bct, training: {lr: 0.01}}]")
    driver.run_experiment(other_recipe, progress=False, echo=lambda s: None)
    assert "copied_from" not in runfiles.manifest_entry(tmp_path / "other" / cfg.name, "bct", 0)


@register
class Broken(Independent):
    """Fails in its step 1, every time."""

    name = "test_broken"

    def after_backward(self, model, state, ctx):
        if ctx.index == 1:
            raise RuntimeError("broken on purpose")


def test_a_failed_task_stops_its_chain_and_nothing_else(tmp_path):
    cfg = tiny(tmp_path, "methods=[{name: test_broken}, {name: independent}]")
    run_dir = tmp_path / cfg.name
    with pytest.raises(CompatError, match="test_broken step 1 failed.*broken on purpose"):
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    assert runfiles.step_done(run_dir, "test_broken", 0)
    assert not runfiles.step_done(run_dir, "test_broken", 1) and not runfiles.step_done(run_dir, "test_broken", 2)
    assert all(runfiles.step_done(run_dir, "independent", v) for v in range(3))  # the other chain finished


def test_negative_flip_rates_of_every_pair_match_the_reference_and_rows_hold_them(finished_run):
    """metrics.json's NFR cells against top-1 correctness from the independent float64 ranking of the
    stored embeddings; an old row without the recorded correctness is computed again to the same scores."""
    from orchestrator.storage.store import EmbeddingStore
    from ranking_reference import reference

    cfg, run_dir, metrics = finished_run
    store = EmbeddingStore(runfiles.store_dir(run_dir))
    tables = [store.read("bct", v, cfg.evaluation.query) for v in range(3)]
    labels = tables[0].labels

    right = {(i, j): reference(tables[i].embeddings, labels, tables[j].embeddings, labels, True)[0] == 1
             for i in range(3) for j in range(i + 1)}
    flips = metrics["methods"]["bct"]["negative_flip_rate"]
    for i, j in ((1, 0), (2, 0), (2, 1)):
        assert flips["new_old"][i][j] == pytest.approx(np.mean(right[j, j] & ~right[i, j]))
        assert flips["new_new"][i][j] == pytest.approx(np.mean(right[j, j] & ~right[i, i]))
    assert flips["new_old"][1][1] is None and flips["new_new"][0][1] is None
    assert "## Negative flips (%)" in (run_dir / "report.md").read_text()
    row = runfiles.read_row(run_dir, "bct", 1)
    runfiles.write_row(run_dir, "bct", 1, {k: v for k, v in row.items() if k != "top1_correct"})
    assert driver.ensure_row(cfg, run_dir, "bct", 1, 6) == row


def test_check_reads_two_versions_of_a_run_and_agrees_with_its_metrics(finished_run, capsys):
    """`compat check` on run-directory input: its cells and negative-flip rate are the run's own numbers."""
    _, run_dir, metrics = finished_run
    argv = ["check", "--old", str(run_dir), "--old-method", "bct", "--old-version", "0", "--new", str(run_dir),
            "--new-method", "bct", "--new-version", "2", "--json", "--resamples", "100"]
    code = main(argv)
    result = json.loads(capsys.readouterr().out)
    entry = metrics["methods"]["bct"]
    assert code == (0 if result["compatible"] else 1) and result["protocol"] == "leave-one-out"
    assert result["old_old"]["cmc1"] == pytest.approx(entry["matrices"]["cmc1"][0][0])
    assert result["new_old"]["map"] == pytest.approx(entry["matrices"]["map"][2][0])
    assert result["new_new"]["cmc5"] == pytest.approx(entry["matrices"]["cmc5"][2][2])
    assert result["negative_flip_rate"]["new_old"]["estimate"] == pytest.approx(entry["negative_flip_rate"]["new_old"][2][0])
    assert result["negative_flip_rate"]["new_new"]["estimate"] == pytest.approx(entry["negative_flip_rate"]["new_new"][2][0])
    assert main(argv[:7] + ["--new", str(run_dir), "--new-method", "nope", "--new-version", "2"]) == 2
    assert "--new-method 'nope' is not a method of that run: " in capsys.readouterr().err
    assert main(argv[:3] + ["--old-method", "bct", "--new", str(run_dir), "--new-method", "bct", "--new-version", "7"]) == 2
    err = capsys.readouterr().err
    assert "--old-version is needed" in err and "finished versions 0, 1, 2" in err


class NotATensor:
    """A pickled object a weights-only load must refuse."""


def test_check_on_checkpoints_equals_the_run_directory(finished_run, tmp_path, capsys):
    """`compat check` on v0's and v1's weights files, with the run directory or its config YAML as the config,
    embeds the evaluation sets on the CPU exactly as the run's store holds them: the same scores, intervals
    and verdict. Then the checkpoint errors, each naming the flag or the file."""
    _, run_dir, _ = finished_run
    weights = {v: run_dir / "versions" / "bct" / f"v{v}" / "model.pt" for v in range(3)}
    common = ["--json", "--resamples", "100"]

    def check(*argv):
        code = main(["check", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if out else None), err

    stored = check("--old", run_dir, "--old-method", "bct", "--old-version", 0,
                   "--new", run_dir, "--new-method", "bct", "--new-version", 1, *common)
    embedded = check("--old", weights[0], "--old-config", run_dir, "--old-method", "bct", "--old-version", 0,
                     "--new", weights[1], "--new-config", run_dir / "config.yaml", "--new-method", "bct",
                     "--new-version", 1, *common)
    assert embedded[0] == stored[0] in (0, 1)
    sources = ("old", "new")
    assert {k: v for k, v in embedded[1].items() if k not in sources} == {
        k: v for k, v in stored[1].items() if k not in sources}
    assert "model.pt (bct v1 of " in embedded[1]["new"]

    state = torch.load(weights[0], weights_only=True)
    first = next(iter(state))
    misfit = {**{k: v for k, v in state.items() if k != first}, "stray.weight": torch.zeros(1)}
    torch.save(misfit, tmp_path / "misfit.pt")
    torch.save({**state, "note": NotATensor()}, tmp_path / "unsafe.pt")
    old = ["--old", run_dir, "--old-method", "bct", "--old-version", 0]
    new = ["--new-config", run_dir, "--new-method", "bct"]
    cases = [
        (["--new", weights[1], "--new-method", "bct", "--new-version", 1], ["--new", "is a checkpoint", "--new-config"]),
        (["--new", weights[2], *new, "--new-version", 0], ["--new:", "v2/model.pt", "does not fit", "size mismatch"]),
        (["--new", tmp_path / "misfit.pt", *new, "--new-version", 0],
         ["--new:", "misfit.pt", f'Missing key(s) in state_dict: "{first}"', 'Unexpected key(s) in state_dict: "stray.weight"']),
        (["--new", tmp_path / "unsafe.pt", *new, "--new-version", 0],
         ["--new:", "unsafe.pt", "cannot be loaded safely", "NotATensor"]),
        (["--new", weights[1], *new], ["--new-version is needed", "0 to 2"]),
        (["--new", weights[1], "--new-config", tmp_path / "none.yaml", "--new-method", "bct"],
         ["--new-config", "none.yaml does not exist"]),
        (["--new", weights[1], "--new-config", run_dir, "--new-method", "oca", "--new-version", 1],
         ["--new-method 'oca'", "independent, bct"]),
        (["--new", run_dir, "--new-method", "bct", "--new-version", 1, "--set", "seed=3"], ["--set", "neither side"]),
    ]
    for argv, fragments in cases:
        code, out, err = check(*old, *argv)
        assert code == 2 and out is None, (argv, out)
        assert all(f in err for f in fragments), (argv, err)


def test_every_upgrade_carries_the_gate_that_compat_check_gives_on_the_run(finished_run, capsys):
    """metrics.json's ``gate`` of every upgrade is exactly what `compat check` prints for that pair of the
    run directory (same defaults, the run's ties), and report.md shows it."""
    cfg, run_dir, metrics = finished_run
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    for key in ("independent", "bct"):
        gates = on_disk["methods"][key]["gate"]
        assert [(g["new_version"], g["old_version"]) for g in gates] == [(1, 0), (2, 1), (2, 0)]
        for entry in gates:
            code = main(["check", "--old", str(run_dir), "--old-method", key, "--old-version", str(entry["old_version"]),
                         "--new", str(run_dir), "--new-method", key, "--new-version", str(entry["new_version"]),
                         "--ties", cfg.evaluation.ties, "--json"])
            result = json.loads(capsys.readouterr().out)
            assert code == (0 if entry["compatible"] else 1)
            assert {k: v for k, v in result.items() if k not in ("old", "new")} == {
                k: v for k, v in entry.items() if k not in ("new_version", "old_version")}
            assert entry["resamples"] == 1000 and entry["confidence"] == 0.95 and entry["seed"] == 0
    report = (run_dir / "report.md").read_text().split("## Release gate of every upgrade")[1].split("\n## ")[0]
    bct = on_disk["methods"]["bct"]["gate"][2]
    d = bct["difference"]["cmc1"]
    assert f"| bct | 2 vs 0 | {d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] |" in report

"""Experiment tracking with the real packages: a tiny in-process run logs to MLflow (a local file store,
read back with MlflowClient), W&B (offline; the run's transaction log read back record by record) and
TensorBoard (event files read back with TensorBoard's EventAccumulator); a resumed run's tracker run
is complete; seeds log per seed and the aggregate; a sweep logs each trial through Ray Tune's callbacks;
a tracker whose package is missing is a ConfigError before anything is written."""

from __future__ import annotations

import csv
import json
import struct
import sys

import pytest
import yaml

from helpers import config_under
from orchestrator.config import load_raw, parse_config
from orchestrator.engine.driver import run_experiment
from orchestrator.errors import ConfigError
from orchestrator.reporting.tracking import (FILES_FOLDER, INSTALL, matrix_tables, row_metrics, summary_metrics,
                                            throughput_metrics)

TINY = [
    "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=2", "training.incremental={epochs: 1}",
    "training.batch_size=16", "resources.num_workers=0", "methods=[{name: bct, params: {variant: paper}}]",
]
REPORT_FILES = {"report.md", "metrics.json", "config.yaml", "run.json", "matrix_bct_cmc1.csv", "matrix_bct_cmc5.csv",
                "matrix_bct_map.csv", "heatmaps.png", "heatmap_bct.png", "accuracy.png"}
quiet = dict(progress=False, echo=lambda line: None)


def parsed(tmp_path, *overrides: str):
    """The tiny experiment as typed sections, unchecked (the package check is the run's, see below)."""
    return parse_config(load_raw(None, [*TINY, f"output_dir={tmp_path}", *overrides]))


# -- config -------------------------------------------------------------------------------------------
def test_tracking_changes_no_digest(tmp_path):
    plain = parsed(tmp_path)
    tracked = parsed(tmp_path, "tracking={mlflow: {experiment: x}, wandb: {mode: offline}, tensorboard: {}}")
    assert tracked.tracking.enabled and not plain.tracking.enabled
    assert tracked.digest() == plain.digest()
    document = plain.to_dict()
    del document["tracking"]  # a run directory written before the section existed keeps its digest
    assert parse_config(document).digest() == plain.digest()


@pytest.mark.parametrize("override, key, message", [
    ("tracking.mlflow.uri=x", "tracking.mlflow.uri", "unknown key"),
    ("tracking.wandb.mode=cloud", "tracking.wandb.mode", "allowed values"),
    ("tracking.tensorboard=true", "tracking.tensorboard", "expected a mapping"),
    ("tracking.wandb.project=' '", "tracking.wandb.project", "must not be empty"),
])
def test_bad_tracking_sections_name_the_key(tmp_path, override, key, message):
    with pytest.raises(ConfigError) as err:
        parsed(tmp_path, override)
    assert err.value.key == key and message in str(err.value)


@pytest.mark.parametrize("backend, module", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboardX")])
def test_a_missing_package_fails_before_anything_is_written(tmp_path, monkeypatch, backend, module):
    cfg = parsed(tmp_path, f"tracking.{backend}={{}}")
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, **quiet)
    assert err.value.key == f"tracking.{backend}" and INSTALL in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_that_cannot_start_stops_the_run_before_any_step(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    if not hasattr(mlflow.environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow accepts directory stores")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    cfg = config_under(tmp_path, *TINY, f"tracking.mlflow={{tracking_uri: '{(tmp_path / 'mlruns').as_uri()}'}}")
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, **quiet)
    assert err.value.key == "tracking.mlflow.tracking_uri" and "MLFLOW_ALLOW_FILE_STORE" in str(err.value)
    assert not (tmp_path / cfg.name / "manifest").exists()


def test_wandb_online_without_an_api_key_is_a_config_error(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SETUP_API_KEY_HOOK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no `wandb login` credentials (~/.netrc) to find
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    cfg = config_under(tmp_path, *TINY, "tracking.wandb={mode: online}")
    with pytest.raises(ConfigError) as err:
        run_experiment(cfg, **quiet)
    assert err.value.key == "tracking.wandb.mode" and "mode: offline" in str(err.value)
    assert not (tmp_path / cfg.name / "manifest").exists()


# -- what is logged, on hand-made inputs ---------------------------------------------------------------
def test_row_metrics_name_each_gallery_version_and_skip_block_tables():
    row = {"cmc1": [0.5, 0.75], "map": [0.25, None], "cmc1_by_block": [[0.1, 0.2], [0.3, 0.4]]}
    assert row_metrics(row, "seed-1/bct") == {"seed-1/bct/cmc1/gallery_v0": 0.5, "seed-1/bct/cmc1/gallery_v1": 0.75,
                                              "seed-1/bct/map/gallery_v0": 0.25}


def test_throughput_metrics_name_each_number_of_the_entry_and_skip_the_rest():
    entry = {"throughput": {"images_per_second": 800.0, "images_per_second_per_device": 400.0, "timed_images": 512,
                            "train_flops_per_image": 2.5e9, "mfu": 0.0125, "mfu_note": "H100 SXM, bf16", "precision": "bf16"}}
    assert throughput_metrics(entry, "seed-1/bct") == {
        "seed-1/bct/throughput/images_per_second": 800.0, "seed-1/bct/throughput/images_per_second_per_device": 400.0,
        "seed-1/bct/throughput/train_flops_per_image": 2.5e9, "seed-1/bct/throughput/mfu": 0.0125}
    assert throughput_metrics({"throughput": {"images_per_second": None, "mfu": None}}, "bct") == {}
    assert throughput_metrics({}, "bct") == {}  # a copied version: no training, no throughput


def test_summary_metrics_of_a_run_an_aggregate_and_a_crossmodal_run():
    run = {"methods": {"bct": {"summary_by_metric": {"cmc1": {"AC": 0.5, "AM": 40.0, "ECC_every_pair": False}},
                               "accuracy_summary": {"avg": 0.6, "pd": 0.2, "base": [0.9]}, "update_gain": {"cmc1": 1.5}}}}
    assert summary_metrics(run, "") == {"bct/cmc1/AC": 0.5, "bct/cmc1/AM": 40.0, "bct/cmc1/ECC_every_pair": 0.0,
                                        "bct/accuracy_avg": 0.6, "bct/accuracy_pd": 0.2, "bct/cmc1/update_gain": 1.5}
    aggregate = {"methods": {"bct": {"summary_by_metric": {"map": {"AC": 0.75}}}},
                 "methods_std": {"bct": {"summary_by_metric": {"map": {"AC": 0.25}}}}}
    assert summary_metrics(aggregate, "") == {"bct/map/AC": 0.75, "bct/map/AC_std": 0.25}
    crossmodal = {"kind": "cross-modal", "old_old": {"i2t_r1": 0.3}, "new_new": {"i2t_r1": 0.5},
                  "methods": {"xbt": {"mean": {"i2t_r1": 0.4}, "std": {"i2t_r1": 0.01}, "compatible": {"i2t_r1": True}}}}
    assert summary_metrics(crossmodal, "") == {"old_old/i2t_r1": 0.3, "new_new/i2t_r1": 0.5, "xbt/i2t_r1": 0.4,
                                               "xbt/i2t_r1_std": 0.01, "xbt/i2t_r1_compatible": 1.0}


def test_matrix_tables_hold_the_lower_triangle_by_row():
    metrics = {"methods": {"bct": {"matrices": {"cmc1": [[0.5, None], [0.4, 0.6]]}}}}
    assert matrix_tables(metrics, "seed-0") == {
        "seed-0/bct/cmc1": (["query \\ gallery", "v0", "v1"], [["v0", 0.5, None], ["v1", 0.4, 0.6]])}


# -- a real run with every tracker ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    tmp = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow keeps directory stores behind this switch
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("WANDB_MODE", raising=False)
        uri = (tmp / "mlruns").as_uri()
        cfg = config_under(tmp, *TINY, f"tracking={{mlflow: {{tracking_uri: '{uri}'}}, wandb: {{mode: offline}}, tensorboard: {{}}}}")
        metrics = run_experiment(cfg, **quiet)
        yield cfg, tmp / cfg.name, metrics, uri


@pytest.fixture(autouse=True, scope="module")
def _end_wandb_service():
    """W&B's runs in this process share a service process; end it with the module."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def manifest(run_dir, step: int) -> dict:
    return json.loads((run_dir / "manifest" / "bct" / f"step-{step:03d}.json").read_text())


def test_mlflow_holds_config_steps_summary_and_report(tracked_run, tmp_path):
    cfg, run_dir, metrics, uri = tracked_run
    client, runs = mlflow_runs(uri, cfg.name)
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["compat.run_dir"] == str(run_dir)
    assert run.data.params["training/epochs"] == "2" and run.data.params["name"] == cfg.name
    losses = [point["loss"] for step in (0, 1) for point in manifest(run_dir, step)["losses"]]
    assert [s for s, _ in history(client, run.info.run_id, "bct/train/loss")] == [1, 2, 3]  # 2 epochs, then 1
    assert [v for _, v in history(client, run.info.run_id, "bct/train/loss")] == pytest.approx(losses)
    matrix = metrics["methods"]["bct"]["matrices"]["cmc1"]
    assert history(client, run.info.run_id, "bct/cmc1/gallery_v0") == [(0, pytest.approx(matrix[0][0])),
                                                                         (1, pytest.approx(matrix[1][0]))]
    assert history(client, run.info.run_id, "bct/cmc1/gallery_v1") == [(1, pytest.approx(matrix[1][1]))]
    assert history(client, run.info.run_id, "bct/accuracy") == [(v, pytest.approx(manifest(run_dir, v)["accuracy"]))
                                                                 for v in (0, 1)]
    for name in ("images_per_second", "images_per_second_per_device", "train_flops_per_image"):
        assert history(client, run.info.run_id, f"bct/throughput/{name}") == [
            (v, pytest.approx(manifest(run_dir, v)["throughput"][name])) for v in (0, 1)]
    assert manifest(run_dir, 1)["throughput"]["mfu"] is None and "bct/throughput/mfu" not in run.data.metrics  # a CPU
    assert run.data.metrics["bct/map/AC"] == pytest.approx(metrics["methods"]["bct"]["summary_by_metric"]["map"]["AC"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == REPORT_FILES
    downloaded = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(open(downloaded).read()) == metrics
    with open(client.download_artifacts(run.info.run_id, "matrix_bct_cmc1.csv", str(tmp_path))) as handle:
        rows = list(csv.reader(handle))
    assert float(rows[2][1]) == pytest.approx(matrix[1][0])


def test_tensorboard_events_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, run_dir, metrics, _ = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    losses = [point["loss"] for step in (0, 1) for point in manifest(run_dir, step)["losses"]]
    assert [(e.step, e.value) for e in events.Scalars("bct/train/loss")] == [
        (i + 1, pytest.approx(v)) for i, v in enumerate(losses)]
    matrix = metrics["methods"]["bct"]["matrices"]["map"]
    assert [(e.step, e.value) for e in events.Scalars("bct/map/gallery_v0")] == [
        (0, pytest.approx(matrix[0][0])), (1, pytest.approx(matrix[1][0]))]
    assert events.Scalars("summary/bct/cmc1/AM")[0].value == pytest.approx(
        metrics["methods"]["bct"]["summary_by_metric"]["cmc1"]["AM"])
    assert set(events.Tags()["images"]) == {"plots/heatmaps", "plots/heatmap_bct", "plots/accuracy"}
    text = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert yaml.safe_load(text["config/text_summary"].replace("\n    ", "\n").strip()) == cfg.to_dict()
    assert "| v1 |" in text["matrices/bct/cmc1/text_summary"]
    assert text["report/text_summary"] == (run_dir / "report.md").read_text()


def test_wandb_offline_run_holds_config_history_summary_and_files(tracked_run):
    cfg, run_dir, metrics, _ = tracked_run
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(next(offline.glob("*.wandb")))
    (run,) = records["run"]
    config = {key_of(item): json.loads(item.value_json) for item in run.config.update}
    assert run.project == cfg.name and run.display_name == cfg.name
    assert config["training"]["epochs"] == 2 and config["name"] == cfg.name
    rows = [{key_of(item): json.loads(item.value_json) for item in record.item} for record in records["history"]]
    assert [(r["epoch"], r["bct/train/loss"]) for r in rows if "bct/train/loss" in r] == [
        (i + 1, pytest.approx(v)) for i, v in enumerate(
            point["loss"] for step in (0, 1) for point in manifest(run_dir, step)["losses"])]
    matrix = metrics["methods"]["bct"]["matrices"]["cmc1"]
    assert [(r["version"], r["bct/cmc1/gallery_v0"]) for r in rows if "bct/cmc1/gallery_v0" in r] == [
        (0, pytest.approx(matrix[0][0])), (1, pytest.approx(matrix[1][0]))]
    summary = {key_of(item): json.loads(item.value_json) for record in records["summary"] for item in record.update}
    assert summary["bct/cmc1/AC"] == metrics["methods"]["bct"]["summary_by_metric"]["cmc1"]["AC"]
    tables = [r for r in rows if "matrices/bct/cmc1" in r or any(k.startswith("matrices/bct/cmc1/") for k in r)]
    assert tables  # the matrix as a W&B table
    assert {p.name for p in (offline / "files" / FILES_FOLDER).iterdir()} == REPORT_FILES
    assert records["exit"][0].exit_code == 0


def key_of(item) -> str:
    """A W&B record item's key (``nested_key`` holds the parts of some keys with '/')."""
    return item.key or "/".join(item.nested_key)


def wandb_records(path) -> dict[str, list]:
    """The records of a W&B run's transaction log (``run-<id>.wandb``), by kind. The file is a 7-byte
    header (":W&B", magic, version) then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte
    header (CRC-32C, length, type: 1 full, 2 first, 3 middle, 4 last) and data; every record is one
    serialised ``wandb.proto.wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending, records = 7, b"", {}
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a chunk header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding to the end of the block
            position += room
            continue
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.setdefault(record.WhichOneof("record_type"), []).append(getattr(record, record.WhichOneof("record_type")))
    return records


def test_a_resumed_run_logs_every_step_again(tracked_run):
    cfg, run_dir, metrics, uri = tracked_run
    tracked = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    only_mlflow = parse_config({**tracked.to_dict(), "tracking": {"mlflow": {"tracking_uri": uri}}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert run_experiment(only_mlflow, run_dir, **quiet) == metrics  # every task was done: only replayed
    client, runs = mlflow_runs(uri, cfg.name)
    first, second = runs
    for key in ("bct/train/loss", "bct/cmc1/gallery_v0", "bct/accuracy"):
        assert history(client, second.info.run_id, key) == history(client, first.info.run_id, key)
    assert {a.path for a in client.list_artifacts(second.info.run_id)} == REPORT_FILES


# -- seeds and sweeps ----------------------------------------------------------------------------------
def test_seeds_log_each_seed_and_the_aggregate(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_under(tmp_path, *TINY, "training.epochs=1", "training.incremental={}", "seeds=[0, 1]",
                       "tracking.tensorboard={}")
    metrics = run_experiment(cfg, **quiet)
    events = EventAccumulator(str(tmp_path / cfg.name / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for seed in (0, 1):
        per_seed = json.loads((tmp_path / cfg.name / f"seed-{seed}" / "metrics.json").read_text())
        assert [e.value for e in events.Scalars(f"seed-{seed}/bct/cmc1/gallery_v0")] == pytest.approx(
            [row[0] for row in per_seed["methods"]["bct"]["matrices"]["cmc1"]])
        assert f"seed-{seed}/bct/train/loss" in scalars and f"summary/seed-{seed}/bct/cmc1/AC" in scalars
    assert events.Scalars("summary/bct/cmc1/AC")[0].value == pytest.approx(
        metrics["methods"]["bct"]["summary_by_metric"]["cmc1"]["AC"])
    assert events.Scalars("summary/bct/cmc1/AC_std")[0].value == pytest.approx(
        metrics["methods_std"]["bct"]["summary_by_metric"]["cmc1"]["AC"])
    assert {"report/text_summary", "seed-0/report/text_summary", "seed-1/report/text_summary"} <= set(events.Tags()["tensors"])


@pytest.mark.integration
def test_a_sweep_logs_every_trial_through_tune_callbacks(ray_cluster, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from orchestrator.tuning.sweep import parse_sweep, run_sweep

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    document = load_raw(None, [
        *TINY, "training.epochs=1", "training.incremental={}", f"output_dir={tmp_path}",
        "sweep={space: {training.lr: {grid: [0.001, 0.01]}}, search: grid, objective: {metric: AM}, max_concurrent: 1}",
        f"tracking={{mlflow: {{tracking_uri: '{uri}'}}, wandb: {{mode: offline, dir: '{tmp_path}'}}, tensorboard: {{}}}}"])
    sweep = parse_sweep(document)
    results = run_sweep(sweep, progress=False, echo=lambda line: None)
    trial_ids = {t.trial_id for t in results.trials}
    client, runs = mlflow_runs(uri, sweep.directory.name)
    trial_runs = [r for r in runs if "trial_name" in r.data.tags]
    assert {r.data.tags["trial_name"] for r in trial_runs} == trial_ids  # one MLflow run per trial, no other
    for run in trial_runs:
        assert run.data.params["training.lr"] in ("0.001", "0.01")
        assert [s for s, _ in history(client, run.info.run_id, "objective")] == [1, 2]  # one result per step
    (summary,) = [r for r in runs if "trial_name" not in r.data.tags]
    artefacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.csv", "results.md", "best_config.yaml", "objective_vs_params.png", "trials"} <= artefacts
    assert "tuner.pkl" not in artefacts and not any(a.endswith(".json") for a in artefacts)  # not Tune's state
    for trial_id in trial_ids:
        assert "report.md" in {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(summary.info.run_id, f"trials/{trial_id}")}
        assert not (sweep.directory / "runs" / trial_id / "tensorboard").exists()  # trials are not tracked twice
        assert list((sweep.directory / trial_id).glob("events.out.tfevents.*"))  # Tune's TensorBoard files
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == len(trial_ids) + 1  # the trials, the summary
    assert "tracking" in yaml.safe_load((sweep.directory / "best_config.yaml").read_text())


def test_a_crossmodal_run_logs_its_recall_cells_and_report(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from orchestrator.config.crossmodal import parse_crossmodal

    cfg = parse_crossmodal({
        "kind": "cross-modal", "name": "cm", "seeds": [0], "output_dir": str(tmp_path),
        "models": {"old": {"name": "tiny-vit-w32"}, "new": {"name": "tiny-vit-w64"}},
        "data": {"synthetic": {"num_classes": 4, "train_per_class": 8, "test_per_class": 4},
                 "captions_per_image": 3, "pair_count": 16},
        "resources": {"num_workers": 0}, "methods": [{"name": "procrustes"}], "tracking": {"tensorboard": {}}})
    metrics = run_experiment(cfg, **quiet)
    events = EventAccumulator(str(tmp_path / "cm" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert events.Scalars("summary/old_old/i2t_r1")[0].value == pytest.approx(metrics["old_old"]["i2t_r1"])
    assert events.Scalars("summary/procrustes/t2i_r1")[0].value == pytest.approx(
        metrics["methods"]["procrustes"]["mean"]["t2i_r1"])
    text = events.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == (tmp_path / "cm" / "report.md").read_text()

"""Runs on object storage: a real S3-compatible server (moto in server mode) on loopback, reached by
pyarrow's own S3 client with the endpoint and credentials from the environment; the CLI end to end
(--output-dir, --resume, report), seeds and a Ray Train worker group on it, a sweep on it, and the
check that stops a worker which cannot see the run's location before it trains."""

import logging
import os
import socket
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest

from orchestrator import load_config
from orchestrator.cli import main
from orchestrator.engine import executor
from orchestrator.engine.driver import default_run_dir, run_experiment
from orchestrator.errors import ConfigError, RunError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

from test_run_storage import matrices, memory_storage

BUCKET = "compat-runs"
TINY = ["data.num_classes=4", "data.train_per_class=8", "data.test_per_class=4", "scenario.initial_classes=2",
        "scenario.increment=2", "scenario.num_steps=2", "model.width=8", "model.embedding_dim=16",
        "training.epochs=1", "training.batch_size=16", "resources.num_workers=0",
        "methods=[{name: independent}, {name: bct, params: {variant: paper}}]"]
ONE_TRAIN_WORKER = [*TINY, "resources.num_workers=1", "resources.cpus_per_worker=1",
                    "methods=[{name: bct, params: {variant: paper}}]"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, one empty bucket, and the environment a user sets for an
    S3-compatible endpoint (AWS_ENDPOINT_URL and the credentials; instance metadata off, so nothing is
    asked of any other address). Yields the bucket's admin filesystem to inspect objects with."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test-key",
           "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        admin = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="test-key",
                                  secret_key="test-secret", allow_bucket_creation=True)
        admin.create_dir(BUCKET)
        yield SimpleNamespace(fs=admin, port=port)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def ray_on_s3(s3):
    """A local Ray cluster started after the S3 environment is set, so its workers inherit it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster found running
    yield
    ray.shutdown()


def objects(s3, prefix: str) -> set[str]:
    """The keys under ``prefix`` in the bucket, as S3 itself lists them."""
    infos = s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {info.path[len(f"{BUCKET}/{prefix}/"):] for info in infos if info.type == pafs.FileType.File}


def test_uri_locations_keep_their_options_and_mask_passwords():
    """A URI's options stay at its end through children, so every location printed can be reopened."""
    uri = "s3://bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    run = RunStorage.at(uri).child("exp")
    assert run.location == "s3://bkt/runs/exp?endpoint_override=127.0.0.1:9000&scheme=http"
    assert run.location_of("manifest/bct/step-000.json") == \
        "s3://bkt/runs/exp/manifest/bct/step-000.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert RunStorage.at(run.location) == run and run.root == "bkt/runs/exp" and not run.is_local
    assert RunStorage.at(run.location).child("seed-0") == run.child("seed-0")
    assert default_run_dir(load_config(None, ["name=exp", f"output_dir={uri}"])) == run
    secret = RunStorage.at("s3://KEY:SECRET@bkt/runs?endpoint_override=127.0.0.1:9000&scheme=http")
    assert "SECRET" not in secret.location and secret.location.startswith("s3://KEY:***@bkt/runs?")
    with pytest.raises(RunError, match="cannot open the run location s3://bkt/x.*AWS_ENDPOINT_URL"):
        RunStorage.at("s3://bkt/x?no_such_option=1")
    with pytest.raises(ConfigError, match="output_dir.*holds a password"):  # it would be stored in config.yaml
        default_run_dir(load_config(None, ["output_dir=s3://KEY:SECRET@bkt/runs"]))


def test_a_cli_run_on_s3_equals_a_local_run_resumes_and_re_renders(s3, tmp_path, monkeypatch, capsys):
    """`compat run --output-dir s3://...` stores the whole run in the bucket (nothing on local disk but
    the dataset cache), gives the local run's matrices, `--resume` finds every step done, and `compat
    report` re-renders from the URI."""
    local = run_experiment(load_config(None, [*TINY, f"output_dir={tmp_path / 'local'}"]), progress=False,
                           echo=lambda line: None)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    sets = [arg for item in TINY for arg in ("--set", item)]
    assert main(["run", *sets, "--output-dir", f"s3://{BUCKET}/cli", "--no-progress"]) == 0
    assert "Running 'quickstart' in s3://compat-runs/cli/quickstart:" in capsys.readouterr().out
    stored = objects(s3, "cli/quickstart")
    for method in ("independent", "bct"):
        for step in (0, 1):
            assert {f"manifest/{method}/step-{step:03d}.json", f"versions/{method}/v{step}/model.pt",
                    f"rows/{method}/row-{step:03d}.json",
                    f"store/method={method}/version={step}/eval_set=test/_COMPLETE.json"} <= stored
    assert {"config.yaml", "run.json", "lease.json", "metrics.json", "report.md", "heatmaps.png"} <= stored
    assert not any(key.startswith("epochs/") for key in stored)  # resume points are removed once a step is done
    run = RunStorage.at(f"s3://{BUCKET}/cli/quickstart")
    assert matrices(run.read_json("metrics.json")) == matrices(local)
    assert run.read_json("manifest/bct/step-001.json")["init_checkpoint"] == "versions/bct/v0/model.pt"
    assert not any(workdir.iterdir())

    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    assert main(["run", "--resume", f"s3://{BUCKET}/cli/quickstart", "--no-progress"]) == 0
    assert "4/4 already done" in capsys.readouterr().out
    s3.fs.delete_file(f"{BUCKET}/cli/quickstart/report.md")
    assert main(["report", f"s3://{BUCKET}/cli/quickstart"]) == 0
    assert "Report written to s3://compat-runs/cli/quickstart/report.md" in capsys.readouterr().out
    assert "report.md" in objects(s3, "cli/quickstart")


def test_a_missing_bucket_fails_before_anything_runs(s3, capsys):
    assert main(["run", *[a for item in TINY for a in ("--set", item)], "--output-dir", "s3://no-such-bucket/runs",
                 "--no-progress"]) == 2
    assert "cannot write the run at s3://no-such-bucket/runs/quickstart" in capsys.readouterr().err


@pytest.mark.integration
def test_seeds_in_train_worker_groups_on_s3(s3, ray_on_s3):
    """Two seeds, each a chain of steps in a Ray Train worker group of its own process, on the bucket:
    the workers reach it with the filesystem the driver opened (endpoint included) and the credentials
    of their own environment, and Ray Train keeps its own run state on the same store."""
    cfg = load_config(None, [*ONE_TRAIN_WORKER, "seeds=[0, 1]", f"output_dir=s3://{BUCKET}/seeds"])
    metrics = run_experiment(cfg, progress=False, echo=lambda line: None)
    assert metrics["seeds"]["values"] == [0, 1] and len(metrics["methods"]["bct"]["matrices"]["cmc1"]) == 2
    stored = objects(s3, "seeds/quickstart")
    for seed in (0, 1):
        assert {f"seed-{seed}/manifest/bct/step-001.json", f"seed-{seed}/versions/bct/v1/model.pt",
                f"seed-{seed}/metrics.json", f"seed-{seed}/report.md"} <= stored
        entry = RunStorage.at(f"s3://{BUCKET}/seeds/quickstart/seed-{seed}").read_json("manifest/bct/step-001.json")
        assert entry["world_size"] == 1 and entry["event"] == "finetune"
    assert {"metrics.json", "report.md", "lease.json"} <= stored
    assert any(key.startswith("ray/") for key in stored)  # Ray Train's storage_path, on the same bucket


@pytest.mark.integration
def test_a_sweep_on_s3_keeps_tune_state_trials_and_outputs_in_the_bucket(s3, ray_on_s3, capsys):
    """`compat sweep --output-dir s3://...`: Ray Tune's experiment state, every trial's run and the
    outputs are objects in the bucket; `--resume` on the URI re-runs no finished trial."""
    sweep = ("sweep={space: {training.lr: {grid: [0.1, 0.05]}}, search: grid, objective: {metric: AM}, "
             "max_concurrent: 1}")
    sets = [a for item in [*TINY, "methods=[{name: bct, params: {variant: paper}}]", sweep] for a in ("--set", item)]
    assert main(["sweep", "quickstart", *sets, "--output-dir", f"s3://{BUCKET}/sweeps", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Best config: s3://compat-runs/sweeps/quickstart-sweep/best_config.yaml  (copy it to a local file" in out
    stored = objects(s3, "sweeps/quickstart-sweep")
    assert {"sweep.yaml", "results.csv", "results.md", "best_config.yaml", "objective_vs_params.png"} <= stored
    assert any(key.startswith("experiment_state") for key in stored)  # Tune's own state, in the bucket
    trial_metrics = {key for key in stored if key.startswith("runs/") and key.count("/") == 2 and key.endswith("/metrics.json")}
    assert len(trial_metrics) == 2
    stamps = {i.path: i.mtime for i in s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/quickstart-sweep/runs",
                                                                                   recursive=True))}
    assert main(["sweep", "--resume", f"s3://{BUCKET}/sweeps/quickstart-sweep", "--no-progress"]) == 0
    after = {i.path: i.mtime for i in s3.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/quickstart-sweep/runs",
                                                                                  recursive=True))}
    assert after == stamps  # no trial's run was touched


@pytest.mark.integration
def test_a_worker_that_cannot_see_a_local_run_fails_at_its_first_step(ray_on_s3, tmp_path, monkeypatch):
    """A multi-node run in a local directory: the driver's lease lands on the driver's disk, which the
    worker's node does not share. Simulated on one machine by having the driver take its lease (and fence
    its writes) on a directory of its own: the worker, a real Ray Train process, finds no lease at the
    run's path and stops before it trains, with what to set."""
    from orchestrator.storage.lease import RunLease

    run_dir = tmp_path / "runs" / "quickstart"
    take = RunLease.take.__func__
    monkeypatch.setattr(RunLease, "take", classmethod(
        lambda cls, run, **kw: take(cls, RunStorage.at(tmp_path / "driver-disk"), **kw)))
    cfg = load_config(None, [*ONE_TRAIN_WORKER, f"output_dir={tmp_path / 'runs'}"])
    with pytest.raises(RunError, match=r"does not see the run .* at .*/runs/quickstart \(nothing of it is there\); "
                                       r"a multi-node run needs output_dir .* or on object storage \(s3://"):
        run_experiment(cfg, progress=False, echo=lambda line: None)
    assert (run_dir / "config.yaml").exists()  # the driver wrote, fenced by its own lease
    assert not (run_dir / "versions").exists() and not (run_dir / "manifest").exists()


def test_the_worker_check_names_what_a_worker_found():
    """What check_driver says for each view a worker may have of the top of the run."""
    from orchestrator.storage.lease import LEASE, RunLease

    run = memory_storage()
    with RunLease.take(run) as lease:
        fenced = lease.guard(run)
        runfiles.check_driver(fenced)  # the driver's own run: nothing to say
        elsewhere = memory_storage().fenced(lease.fence)  # the same path on a disk the driver never wrote
        with pytest.raises(RunError, match=r"does not see the run .* \(nothing of it is there\)"):
            runfiles.check_driver(elsewhere)
        elsewhere.fenced(None).write_json(LEASE, {**lease.record, "holder": "old", "generation": 0, "host": "node-b"})
        with pytest.raises(RunError, match=r"only an earlier run's lease, from host node-b\); a multi-node run"):
            runfiles.check_driver(elsewhere)
        run.write_json(LEASE, {**lease.record, "holder": "new", "generation": lease.fence.generation + 1})
        with pytest.raises(RunError, match="no longer holds the lease"):  # taken over: the fence's own error
            runfiles.check_driver(fenced)


def test_file_datasets_read_from_the_bucket(s3, ray_on_s3, tmp_path):
    """Every file-backed dataset kind straight from object storage (listing, index, random access by
    path, byte range, row group or record batch, decoding) equals its local copy, URI options included;
    an image folder in memory and streamed by Ray Data tasks, and re-indexed when an object changes."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from orchestrator.config import DataConfig
    from orchestrator.data import load_split
    from orchestrator.data.encoded import split_index
    from orchestrator.data.export import WRITERS
    from orchestrator.data.formats import read_images
    from orchestrator.data.streaming import StreamedImages, open_split

    from test_streaming import save_to_disk

    images = np.random.default_rng(0).integers(0, 256, (6, 9, 9, 3), dtype=np.uint8)
    labels = np.array([0, 0, 0, 1, 1, 1])
    options = {"imagefolder": {}, "parquet": {"row_group_size": 2}, "webdataset": {"samples_per_shard": 4}}
    for kind in ("imagefolder", "parquet", "webdataset", "huggingface"):
        if kind == "huggingface":
            save_to_disk(tmp_path / kind, {"train": (images, labels), "test": (images, labels)}, ["ant", "bee"],
                         num_shards={"train": 2, "test": 1})
        else:
            for split in ("train", "test"):
                WRITERS[kind](tmp_path / kind, split, images, labels, ["ant", "bee"], **options[kind])
        pafs.copy_files(str(tmp_path / kind), f"{BUCKET}/data/{kind}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3.fs)
        local = load_split(DataConfig(dataset=kind, root=str(tmp_path / kind), image_size=8), "train")
        uri = f"s3://{BUCKET}/data/{kind}?endpoint_override=127.0.0.1:{s3.port}&scheme=http"
        remote = split_index(DataConfig(dataset=kind, root=uri, image_size=8), "train")
        assert remote.class_names == ["ant", "bee"] and remote.labels.tolist() == local.labels.tolist(), kind
        picked = np.array([4, 1, 5])
        np.testing.assert_array_equal(read_images(remote.source, remote.rows(picked)), local.images[picked])

    folder = DataConfig(dataset="imagefolder", root=f"s3://{BUCKET}/data/imagefolder", image_size=8)  # env's endpoint
    local = load_split(DataConfig(dataset="imagefolder", root=str(tmp_path / "imagefolder"), image_size=8), "test")
    in_memory = load_split(folder, "test")
    assert in_memory.labels.tolist() == local.labels.tolist()
    np.testing.assert_array_equal(in_memory.images, local.images)
    streamed = open_split(dataclasses.replace(folder, loading="stream"), "test")
    assert isinstance(streamed, StreamedImages)
    order = np.array([5, 0, 3, 2, 4, 1])
    np.testing.assert_array_equal(np.concatenate([b.numpy() for b in streamed.batches(order, 4)]), local.images[order])
    replaced = Image.new("RGB", (8, 8), (0, 255, 0))
    with s3.fs.open_output_stream(f"{BUCKET}/data/imagefolder/test/bee/5.png") as out:
        replaced.save(out, format="PNG")
    assert tuple(load_split(folder, "test").images[5, 0, 0]) == (0, 255, 0)  # a changed object is re-read
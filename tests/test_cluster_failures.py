"""Real failures on a real multi-node Ray cluster, each compared with an uninterrupted run of the same seed.

One ``ray.cluster_utils.Cluster`` serves every test: a head node that hosts the drivers (the pytest
process, a ``compat run`` subprocess), their task queues and Ray Train controllers but has no CPU for
training, and two one-CPU worker nodes for the one-worker Train groups. Every run is the same tiny
2-step, 3-epoch experiment. The reference is one uninterrupted run of it; every interrupted run must end
with exactly its matrices and weights, without redoing its finished step 0 (its manifest entry and
weights stay as they were before the failure), and its step 1 resumed from the epoch checkpoint.

To fail *mid-step* deterministically, a test-only method waits in step 1 at its first batch after an
epoch checkpoint exists, while a hold file exists, and records its process and node; the test then
kills for real (SIGKILL of the Train worker or of the driver, ``Cluster.remove_node`` of the worker's
node) and removes the hold. The workers import this module through ``COMPAT_EXTRA_METHOD_MODULES``,
which the nodes inherit when the cluster starts. What each failure shows: docs/guide/operations.md.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from methods.base import EXTRA_METHOD_MODULES_ENV, register
from methods.independent import Independent
from orchestrator import load_config
from orchestrator.cli import main
from orchestrator.engine import driver
from orchestrator.engine.executor import DRIVER_RESOURCE
from orchestrator.errors import RunError
from orchestrator.storage import attempts, runfiles
from orchestrator.storage.lease import EXPIRY_ENV, Fence, read_lease
from orchestrator.storage.run_storage import RunStorage

from test_object_storage import BUCKET, s3  # noqa: F401  (the moto S3 server fixture)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:--set methods=")]

ROOT = Path(__file__).resolve().parents[1]
METHOD = "test_killable"
EPOCHS = 3
RUN = ["data.num_classes=4", "data.train_per_class=16", "data.test_per_class=4",
       "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
       "model.width=8", "model.embedding_dim=16", f"training.epochs={EPOCHS}", "training.incremental={}",
       "training.batch_size=8", "resources.num_workers=1", "resources.cpus_per_worker=1"]


@dataclass
class KillableParams:
    hold: str = ""  # while this file exists, step 1 waits at its first batch after an epoch checkpoint
    run: str = ""  # the run's location, where that epoch checkpoint appears


@register
class KillableIndependent(Independent):
    """``independent`` that can be held mid-step: it records its pid and node next to the hold file
    (``<hold>.<pid>.json``) and waits until the hold file is gone, or its process is killed."""

    name = METHOD
    Params = KillableParams

    def loss(self, outputs, images, labels, state, ctx):
        hold = Path(self.params.hold) if self.params.hold else None
        if (hold is not None and ctx.index == 1 and hold.exists()
                and runfiles.storage(self.params.run).exists(runfiles.epoch_state_key(METHOD, ctx.index))):
            import ray

            record, partial = (hold.with_name(f"{hold.name}.{os.getpid()}.{ext}") for ext in ("json", "partial"))
            partial.write_text(json.dumps({"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}))
            partial.replace(record)  # whole, so the test never reads half of it
            deadline = time.time() + 300  # never hang a broken test forever
            while hold.exists() and time.time() < deadline:
                time.sleep(0.05)
        return super().loss(outputs, images, labels, state, ctx)


# -- the cluster and the reference -------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(s3):  # noqa: F811
    """Head (drivers, queues, Train controllers; 0 CPUs) + two 1-CPU worker nodes. Every node inherits
    this environment: the S3 endpoint and credentials, and this module as an extra method module."""
    import ray
    from ray.cluster_utils import Cluster

    python_path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, EXTRA_METHOD_MODULES_ENV: __name__, "OMP_NUM_THREADS": "1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "resources": {DRIVER_RESOURCE: 1}, "include_dashboard": False,
        # a removed node is declared dead in about a second, not the default 15 s
        "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 5}})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def overrides(output_dir, hold: Path | None = None, max_failures: int = 0) -> tuple[list[str], RunStorage]:
    """The `--set` overrides of the experiment every test runs, and its run; ``hold`` makes step 1 wait
    while that file exists."""
    run = RunStorage.at(str(output_dir)).child("quickstart")
    params = f"{{hold: '{hold}', run: '{run.location}'}}" if hold else "{}"
    return [*RUN, f"resources.max_failures={max_failures}", f"output_dir={output_dir}",
            f"methods=[{{name: {METHOD}, params: {params}}}]"], run


def config(output_dir, hold: Path | None = None, max_failures: int = 0):
    items, run = overrides(output_dir, hold, max_failures)
    return load_config(None, items), run


def outcome(run: RunStorage) -> dict:
    """What must not depend on failures: every matrix, and every version's weights."""
    metrics = run.read_json(runfiles.METRICS)
    return {"matrices": metrics["methods"][METHOD]["matrices"],
            "weights": {v: {k: t.tolist() for k, t in runfiles.version_weights(run, METHOD, v).items()}
                        for v in range(2)}}


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted run, trained in this process (``resources.num_workers: 0``): the same seed gives
    the same numbers wherever a step trains, and this costs no worker group."""
    items, run = overrides(tmp_path_factory.mktemp("reference"))
    driver.run_experiment(load_config(None, [*items, "resources.num_workers=0"]), progress=False,
                          echo=lambda line: None)
    return outcome(run)


# -- helpers -----------------------------------------------------------------------------------------
def wait_for(condition, what: str, timeout: float = 180.0):
    deadline = time.time() + timeout
    while not (found := condition()):
        if time.time() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)
    return found


def held(hold: Path, seen: set[int], ended=lambda: None) -> dict:
    """The record of the next worker process held at ``hold`` (one not in ``seen``); ``ended`` says why
    the run ended instead (None while it runs)."""
    def fresh():
        why = ended()
        if why is not None:
            pytest.fail(f"the run ended before its worker reached the hold: {why}")
        for path in hold.parent.glob(f"{hold.name}.*.json"):
            record = json.loads(path.read_text())
            if record["pid"] not in seen:
                return record
        return None

    record = wait_for(fresh, "a worker held mid-step")
    seen.add(record["pid"])
    return record


def gone(pid: int) -> bool:
    """The process has ended (a zombie that its parent has not reaped yet counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def kill(pid: int) -> None:
    """SIGKILL a process of this machine and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), f"pid {pid} to end", timeout=30)


def finished_step_0(run: RunStorage) -> dict:
    """Step 0 as committed: its manifest entry's bytes and its weights' modification time."""
    info = run.filesystem.get_file_info(run.path(f"{runfiles.version_key(METHOD, 0)}/model.pt"))
    return {"entry": run.read_bytes(runfiles.manifest_key(METHOD, 0)), "weights_mtime": info.mtime_ns}


def in_thread(target, *args, **kwargs):
    """Run ``target`` in a thread; returns the thread and a dict that receives its result or error."""
    out: dict = {"ended": lambda: None if thread.is_alive() else repr(out.get("error", "no error"))}

    def body():
        try:
            out["result"] = target(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def assert_resumed_like_reference(run: RunStorage, reference: dict, step_0: dict) -> dict:
    """The run equals the reference, step 0 was not redone and step 1 resumed after its first epoch."""
    assert outcome(run) == reference
    assert finished_step_0(run) == step_0
    entry = runfiles.manifest_entry(run, METHOD, 1)
    assert entry["trained_images_per_worker"] == (EPOCHS - 1) * entry["train_samples"]  # epochs 1 and 2 only
    assert [point["epoch"] for point in entry["losses"]] == list(range(EPOCHS))
    assert not run.exists(runfiles.epoch_state_key(METHOD, 1))
    return entry


def assert_replaced_group_is_fenced(run: RunStorage, first: dict, second: dict) -> None:
    """Each start of the group recorded its attempt (rank 0's pid), and the storage a worker of the
    first one held (the lease's fence and attempt 1's), had it been cut off rather than killed, writes
    nothing more: its epoch checkpoint and its commit are refused, naming the worker that replaced it."""
    keys = run.list(attempts.ATTEMPTS)
    assert [key.split("/", 1)[1] for key in keys] == ["group-0/attempt-0001.json", "group-0/attempt-0002.json"]
    assert [run.read_json(f"{attempts.ATTEMPTS}/{key}")["pid"] for key in keys] == [first["pid"], second["pid"]]
    lease = read_lease(run)
    root = run.fenced(Fence(run, lease["holder"], lease["generation"]))
    stale = root.fenced(attempts.fence_of(root, f"{attempts.ATTEMPTS}/{keys[0].split('/')[0]}", "group-0", 1))
    checkpoint = run.read_bytes(runfiles.epoch_state_key(METHOD, 1))
    for write in (lambda: runfiles.save_epoch_state(stale, METHOD, 1, {"epoch": 1}),
                  lambda: runfiles.mark_step_done(stale, METHOD, 1, {"version": 1})):
        with pytest.raises(RunError, match=rf"attempt 2 \(pid {second['pid']} on host .+\) replaced attempt 1"):
            write()
    assert run.read_bytes(runfiles.epoch_state_key(METHOD, 1)) == checkpoint and not runfiles.step_done(run, METHOD, 1)


# -- the failures ------------------------------------------------------------------------------------
def test_killed_train_workers_restart_until_retries_run_out_then_resume_finishes(reference, tmp_path):
    """max_failures: 1. A SIGKILLed Train worker is replaced by a new group, which skips step 0 and is
    again past step 1's first epoch; SIGKILLing that one too exhausts the retries, the run fails saying
    how to continue, and `compat run --resume` finishes it from the epoch checkpoint, equal to the
    reference."""
    hold = tmp_path / "hold"
    hold.touch()
    cfg, run = config(tmp_path / "runs", hold, max_failures=1)
    thread, out = in_thread(driver.run_experiment, cfg, progress=False, echo=lambda line: None)
    seen: set[int] = set()
    first = held(hold, seen, out["ended"])
    step_0 = finished_step_0(run)
    kill(first["pid"])
    second = held(hold, seen, out["ended"])  # the restarted group, a new process
    assert finished_step_0(run) == step_0  # the restart skipped the finished step
    assert_replaced_group_is_fenced(run, first, second)
    kill(second["pid"])
    thread.join(timeout=180)
    assert isinstance(out.get("error"), RunError), out
    assert "--resume continues" in str(out["error"])
    assert not runfiles.step_done(run, METHOD, 1) and run.exists(runfiles.epoch_state_key(METHOD, 1))

    hold.unlink()
    assert main(["run", "--resume", run.location, "--no-progress"]) == 0
    entry = assert_resumed_like_reference(run, reference, step_0)
    assert entry["placement"]["pid"] not in seen


def test_a_killed_driver_is_resumed_by_another_one(reference, cluster, tmp_path):
    """`compat run` in a process of its own, SIGKILLed while its Train worker is mid-step: Ray ends the
    dead driver's worker, and once its lease has expired `compat run --resume` takes the run over and
    finishes step 1 from its epoch checkpoint, equal to the reference."""
    hold = tmp_path / "hold"
    hold.touch()
    items, run = overrides(tmp_path / "runs", hold)
    log = tmp_path / "driver.log"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, EXPIRY_ENV: "3"}
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "--no-progress",
                                    *[a for item in items for a in ("--set", item)]],
                                   cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        worker = held(hold, set(), lambda: None if process.poll() is None else log.read_text())
        step_0 = finished_step_0(run)
        assert read_lease(run)["pid"] == process.pid
        kill(process.pid)
        wait_for(lambda: gone(worker["pid"]), "Ray to end the dead driver's Train worker", timeout=120)
    finally:
        process.kill()
        process.wait()
    hold.unlink()
    lease = read_lease(run)
    assert lease["released_at"] is None  # killed: it could not let go
    time.sleep(max(0.0, lease["heartbeat_at"] + lease["expiry_s"] - time.time()) + 0.1)
    assert main(["run", "--resume", run.location, "--no-progress"]) == 0
    assert_resumed_like_reference(run, reference, step_0)
    assert read_lease(run)["generation"] == 2


def test_a_node_dies_mid_step_of_a_run_on_object_storage_then_damage_is_repaired(reference, cluster, s3, tmp_path,  # noqa: F811
                                                                                 capsys):
    """A run on S3 (moto on loopback), max_failures: 1. The node running step 1 is removed from the
    cluster mid-step; Ray Train restarts the group on the other worker node, which resumes from the
    epoch checkpoint in the bucket. Then a changed store shard of version 0 and changed weights of
    version 1 (same sizes: only digests see them) are found by `--resume --verify`, which embeds version
    0 again from its verified weights and retrains version 1: the reference again.
    Runs last: the cluster keeps one worker node."""
    hold = tmp_path / "hold"
    hold.touch()
    cfg, run = config(f"s3://{BUCKET}/node-loss", hold, max_failures=1)
    thread, out = in_thread(driver.run_experiment, cfg, progress=False, echo=lambda line: None)
    first = held(hold, set(), out["ended"])
    step_0 = finished_step_0(run)
    node = next(n for n in cluster.worker_nodes if n.node_id == first["node"])
    cluster.remove_node(node, allow_graceful=False)  # its raylet, object store and agents, at once
    if not gone(first["pid"]):  # a dead machine takes its worker processes along; on one machine, kill it
        kill(first["pid"])
    hold.unlink()
    thread.join(timeout=180)
    assert "error" not in out, out
    entry = assert_resumed_like_reference(run, reference, step_0)
    assert entry["placement"]["node"] not in (None, first["node"])

    shard = f"store/method={METHOD}/version=0/eval_set=test/part-0.arrow"
    weights = f"{runfiles.version_key(METHOD, 1)}/model.pt"
    for key in (shard, weights):
        data = bytearray(run.read_bytes(key))
        data[len(data) // 2] ^= 0xFF
        run.write_bytes(key, bytes(data))
    capsys.readouterr()
    assert main(["run", "--resume", run.location, "--verify", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"Embedding again from verified weights: {METHOD} step 0" in printed
    assert f"Recomputing 1 finished task(s) and what was derived from them: {METHOD} step 1" in printed
    assert outcome(run) == reference
    again = json.loads(run.read_bytes(runfiles.manifest_key(METHOD, 0)))
    assert {k: v for k, v in again.items() if not k.startswith("embedded_again_")} == json.loads(step_0["entry"])
    assert finished_step_0(run)["weights_mtime"] == step_0["weights_mtime"]  # embedded again, not retrained
    assert runfiles.manifest_entry(run, METHOD, 1)["started_at"] > entry["finished_at"]

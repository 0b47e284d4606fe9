"""A replaced worker group of the same driver writes nothing (orchestrator/storage/attempts.py).

When Ray Train restarts a worker group, a worker of the replaced group that is cut off rather than dead
still holds the driver's lease-fenced storage. These tests start a group's attempt 1, then attempt 2 of
the same group (as its restart does, numbered by the real task queue), and show that attempt 1's epoch
checkpoint, store shard, weights and commit are refused with an error naming attempt 2, while attempt 2
works on; on a local disk, an in-memory object store and S3 (moto). Then a real in-process run whose
group is replaced mid-step: its next epoch checkpoint is refused, the run fails saying so, and
``--resume`` ends with exactly the matrices and weights of an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from methods.base import register
from methods.independent import Independent
from orchestrator import load_config
from orchestrator.cli import main
from orchestrator.engine import driver
from orchestrator.engine.queue import TaskQueue
from orchestrator.errors import RunError
from orchestrator.storage import attempts, runfiles
from orchestrator.storage.lease import RunLease
from orchestrator.storage.run_storage import RunStorage
from orchestrator.storage.store import EmbeddingStore

from test_object_storage import BUCKET, s3  # noqa: F401  (the moto S3 server fixture)
from test_run_storage import memory_storage

pytestmark = pytest.mark.filterwarnings("ignore:--set methods=")

REPLACED = r"worker group group-0 was started again: attempt 2 \(pid \d+ on host .+\) replaced attempt 1"


@pytest.fixture(params=["local", "memory", "s3"])
def run(request, tmp_path):
    if request.param == "local":
        return RunStorage.at(tmp_path / "run")
    if request.param == "memory":
        return memory_storage()
    request.getfixturevalue("s3")
    return RunStorage.at(f"s3://{BUCKET}/attempts-{tmp_path.name}")


def test_a_replaced_attempt_writes_nothing_once_its_group_started_again(run):
    with RunLease.take(run, expiry_s=30) as lease:
        root = lease.guard(run)
        queue = TaskQueue([], set())
        group = queue.open_group((1, False, 1.0))
        prefix = attempts.new_execution()
        first = attempts.start(root, prefix, group, queue.start_attempt(group))  # rank 0 of attempt 1
        first_rank_1 = attempts.joined(root, prefix, group, 1)
        runfiles.mark_step_done(first, "bct", 0, {"version": 0})
        runfiles.save_epoch_state(first, "bct", 1, {"epoch": 0})
        runfiles.save_epoch_state(first_rank_1.child("seed-0"), "bct", 1, {"epoch": 0})  # a nested run

        second = attempts.start(root, prefix, group, queue.start_attempt(group))  # the restarted group
        for write in (lambda: runfiles.save_epoch_state(first, "bct", 1, {"epoch": 1}),
                      lambda: EmbeddingStore(runfiles.store_dir(first_rank_1)).write(
                          "bct", 1, "test", np.zeros((2, 4), np.float32), np.zeros(2, np.int32), np.arange(2),
                          session=1, shard=1, num_shards=2),
                      lambda: runfiles.save_version(first, "bct", 1, {}, {"version": 1}),
                      lambda: runfiles.mark_step_done(first, "bct", 1, {"version": 1}),
                      lambda: runfiles.clear_epoch_state(first_rank_1.child("seed-0"), "bct", 1),
                      lambda: attempts.joined(root, prefix, group, 1),  # a late rank of attempt 1 joining
                      lambda: attempts.start(root, prefix, group, 1)):  # its rank 0 writing its record late
            with pytest.raises(RunError, match=f"{REPLACED}.*; this worker .* writes nothing more"):
                write()
        assert not runfiles.step_done(run, "bct", 1) and not run.list("store") and not run.list("versions")
        assert runfiles.load_epoch_state(run, "bct", 1) == {"epoch": 0}
        assert runfiles.load_epoch_state(run.child("seed-0"), "bct", 1) == {"epoch": 0}

        # attempt 2 resumes from attempt 1's last checkpoint and commits; step 0 stays as attempt 1 committed it
        assert runfiles.load_epoch_state(second, "bct", 1) == {"epoch": 0}
        runfiles.save_epoch_state(second, "bct", 1, {"epoch": 1})
        runfiles.mark_step_done(second, "bct", 1, {"version": 1, "by": "attempt 2"})
        runfiles.clear_epoch_state(second, "bct", 1)
        assert runfiles.manifest_entry(run, "bct", 1) == {"version": 1, "by": "attempt 2"}
        assert runfiles.manifest_entry(run, "bct", 0) == {"version": 0}

        # the execution ends: its records go, and a worker still holding attempt 2 is refused as well
        attempts.end(root, prefix)
        assert not run.list(prefix)
        with pytest.raises(RunError, match="the record of attempt 2 of worker group group-0 is gone"):
            runfiles.write_progress(second, "bct", {"epoch": 2})
    # the lease is checked first: once its driver let go, an attempt is told so
    with pytest.raises(RunError, match="no longer holds the lease"):
        runfiles.write_progress(second, "bct", {"epoch": 2})


# -- a real in-process run whose worker group is replaced mid-step -----------------------------------
METHOD = "test_replaced"
RUN = ["data.num_classes=4", "data.train_per_class=8", "data.test_per_class=4", "scenario.initial_classes=2",
       "scenario.increment=2", "scenario.num_steps=2", "model.width=8", "model.embedding_dim=16",
       "training.epochs=3", "training.incremental={}", "training.batch_size=8", "resources.num_workers=0"]


@dataclass
class ReplacedParams:
    trigger: str = ""  # while this file exists, step 1's first batch after an epoch checkpoint starts attempt 2
    run: str = ""  # the run's location


@register
class ReplacedIndependent(Independent):
    """``independent`` whose worker group is started again under it: in step 1, once an epoch checkpoint
    exists, it writes attempt 2 of its own group, as the group's restart would (the trigger file is then
    removed, so a resume trains normally)."""

    name = METHOD
    Params = ReplacedParams

    def loss(self, outputs, images, labels, state, ctx):
        trigger = Path(self.params.trigger) if self.params.trigger else None
        run = runfiles.storage(self.params.run) if self.params.run else None
        if (trigger is not None and trigger.exists() and ctx.index == 1
                and run.exists(runfiles.epoch_state_key(METHOD, ctx.index))):
            (record,) = run.list(attempts.ATTEMPTS)  # <execution>/<group>/attempt-0001.json
            execution, group, _ = record.split("/")
            attempts.start(run, f"{attempts.ATTEMPTS}/{execution}", group, 2)
            trigger.unlink()
        return super().loss(outputs, images, labels, state, ctx)


def outcome(run: RunStorage) -> dict:
    metrics = run.read_json(runfiles.METRICS)
    return {"matrices": metrics["methods"][METHOD]["matrices"],
            "weights": {v: {k: t.tolist() for k, t in runfiles.version_weights(run, METHOD, v).items()}
                        for v in range(2)}}


def test_a_run_whose_group_is_replaced_mid_step_refuses_the_old_group_and_resumes_like_an_uninterrupted_run(
        tmp_path):
    reference = tmp_path / "reference"
    driver.run_experiment(load_config(None, [*RUN, f"output_dir={reference}", f"methods=[{{name: {METHOD}}}]"]),
                          progress=False, echo=lambda line: None)
    expected = outcome(RunStorage.at(reference / "quickstart"))

    trigger = tmp_path / "trigger"
    trigger.touch()
    run = RunStorage.at(tmp_path / "runs").child("quickstart")
    cfg = load_config(None, [*RUN, f"output_dir={tmp_path / 'runs'}",
                             f"methods=[{{name: {METHOD}, params: {{trigger: '{trigger}', run: '{run.location}'}}}}]"])
    with pytest.raises(RunError, match=REPLACED):
        driver.run_experiment(cfg, progress=False, echo=lambda line: None)
    assert not trigger.exists()
    assert runfiles.step_done(run, METHOD, 0) and not runfiles.step_done(run, METHOD, 1)
    assert runfiles.load_epoch_state(run, METHOD, 1)["epoch"] == 0  # its epoch-1 checkpoint was refused
    assert not (tmp_path / "runs" / "quickstart" / attempts.ATTEMPTS).exists()  # the execution's records are gone

    assert main(["run", "--resume", run.location, "--no-progress"]) == 0
    assert outcome(run) == expected
    assert not (tmp_path / "runs" / "quickstart" / attempts.ATTEMPTS).exists()
    entry = runfiles.manifest_entry(run, METHOD, 1)
    assert [point["epoch"] for point in entry["losses"]] == [0, 1, 2]
    assert entry["trained_images_per_worker"] == 2 * entry["train_samples"]  # epochs 1 and 2, after the refusal

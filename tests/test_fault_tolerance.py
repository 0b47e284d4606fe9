"""Fault tolerance and multi-node placement on a real two-node Ray cluster (``ray.cluster_utils.Cluster``).

A 2-step simulation runs its two DDP workers on two logical nodes; a test-only method raises once, on
rank 1 in the middle of step 1's second epoch. Ray Train restarts the worker group (max_failures: 1);
the restarted workers must skip step 0 (its manifest entry exists) and resume step 1 from its epoch
checkpoint. The method reaches the Ray workers through the generic COMPAT_EXTRA_METHOD_MODULES hook.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from methods import base
from methods.base import EXTRA_METHOD_MODULES_ENV, list_methods, register
from methods.independent import Independent
from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator import load_config
from orchestrator.errors import ConfigError

# Step 1 trains on 4 classes x 16 images = 64 images: 32 per rank, 4 batches of 8 per epoch.
IMAGES_PER_RANK_EPOCH_STEP1 = 32
BATCHES_PER_EPOCH_STEP1 = 4
EPOCHS = 3
METHOD = "flaky_independent"


@dataclass
class FlakyParams:
    log_dir: str = ""  # where each (step, rank, attempt) records its node, and the failure marker lives
    fail_step: int = 1
    fail_rank: int = 1
    fail_at_batch: int = BATCHES_PER_EPOCH_STEP1 + 2  # counted from the attempt's first batch of the step


@register
class FlakyIndependent(Independent):
    """``independent`` that records where each step runs and raises once, on the first attempt only."""

    name = METHOD
    Params = FlakyParams

    def _marker(self) -> Path:
        """Left by the failing rank before it raises: its presence means this is the second attempt."""
        return Path(self.params.log_dir) / "failed-once"

    def _attempt(self) -> int:
        return 2 if self._marker().exists() else 1

    def prepare(self, ctx, model, previous, loader):
        import ray

        record = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        log = Path(self.params.log_dir) / f"prepare-step{ctx.index}-rank{ctx.rank}-attempt{self._attempt()}.json"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps(record))
        return {"batches": 0}

    def loss(self, outputs, images, labels, state, ctx):
        state["batches"] += 1
        if (ctx.index, ctx.rank, state["batches"]) == (self.params.fail_step, self.params.fail_rank,
                                                       self.params.fail_at_batch) and self._attempt() == 1:
            self._marker().touch()
            raise RuntimeError("injected worker failure")
        return super().loss(outputs, images, labels, state, ctx)


@pytest.fixture(scope="module")
def two_node_cluster():
    """Head + one extra node, 2 CPUs each; the driver's job runtime_env makes this module importable in
    every Ray worker and names it in COMPAT_EXTRA_METHOD_MODULES, so the workers register the method."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        python_path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": python_path, EXTRA_METHOD_MODULES_ENV: __name__}})
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.integration
def test_worker_failure_restarts_the_group_which_skips_finished_steps_and_resumes_the_epoch(two_node_cluster, tmp_path):
    import ray

    log_dir = tmp_path / "log"
    cfg = load_config(None, [
        "data.num_classes=4", "data.train_per_class=16", "data.test_per_class=4",
        "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
        "model.width=8", "model.embedding_dim=16", f"training.epochs={EPOCHS}", "training.incremental={}",
        "training.batch_size=8",
        "resources.num_workers=2", "resources.cpus_per_worker=2", "resources.max_failures=1",
        f"methods=[{{name: {METHOD}, params: {{log_dir: '{log_dir}'}}}}]",
    ])
    cfg.output_dir = str(tmp_path / "runs")
    run_dir = Path(cfg.output_dir) / cfg.name
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)

    marker = log_dir / "failed-once"
    assert marker.is_file(), "the injected failure never fired"
    records = {p.stem: json.loads(p.read_text()) for p in log_dir.glob("prepare-*.json")}
    # step 0 ran once per rank and was not re-trained after the restart; step 1 ran on both attempts
    assert sorted(records) == sorted(
        [f"prepare-step0-rank{r}-attempt1" for r in (0, 1)]
        + [f"prepare-step1-rank{r}-attempt{a}" for r in (0, 1) for a in (1, 2)])
    assert records["prepare-step1-rank1-attempt1"]["pid"] != records["prepare-step1-rank1-attempt2"]["pid"]
    for artefact in [run_dir / runfiles.manifest_key(METHOD, 0),
                     run_dir / runfiles.version_key(METHOD, 0) / "model.pt"]:
        assert artefact.stat().st_mtime_ns < marker.stat().st_mtime_ns, f"{artefact} was rewritten after the failure"

    # multi-node: on both attempts the two ranks ran on the two logical nodes of the cluster
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2
    for step, attempt in [(0, 1), (1, 1), (1, 2)]:
        nodes = {records[f"prepare-step{step}-rank{r}-attempt{attempt}"]["node"] for r in (0, 1)}
        assert nodes == alive, f"step {step} attempt {attempt} did not span both nodes"
    for step in (0, 1):
        assert runfiles.manifest_entry(run_dir, METHOD, step)["world_size"] == 2

    # step 1 resumed after its first epoch's checkpoint: the second attempt trained epochs 1 and 2 only
    step1 = runfiles.manifest_entry(run_dir, METHOD, 1)
    assert step1["trained_images_per_worker"] == (EPOCHS - 1) * IMAGES_PER_RANK_EPOCH_STEP1
    assert [point["epoch"] for point in step1["losses"]] == list(range(EPOCHS))  # the first attempt's epoch kept
    assert not runfiles.storage(run_dir).exists(runfiles.epoch_state_key(METHOD, 1))  # cleared once the step is done
    group = step1["group"]  # one worker group (one Train run) for both steps, restarted in place
    assert runfiles.manifest_entry(run_dir, METHOD, 0)["group"] == group
    assert [p.name for p in (run_dir / "ray").iterdir() if p.is_dir()] == [f"{cfg.name}-{group}"]

    # the metrics are complete
    entry = metrics["methods"][METHOD]
    assert entry["num_versions"] == 2 and len(entry["accuracy"]) == 2
    for matrix in entry["matrices"].values():
        assert all(matrix[i][j] is not None for i in range(2) for j in range(i + 1))
    assert json.loads((run_dir / "metrics.json").read_text())["methods"].keys() == {METHOD}


def test_extra_method_modules_hook_registers_methods_and_names_a_missing_module(tmp_path, monkeypatch):
    (tmp_path / "compat_plugin_example.py").write_text(
        "from methods.base import register\n"
        "from methods.independent import Independent\n\n\n"
        "@register\n"
        "class PluginExample(Independent):\n"
        "    name = 'plugin_example'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base.METHODS, "_entries", dict(base.METHODS._entries))  # the plugin stays out of other tests
    monkeypatch.setenv(EXTRA_METHOD_MODULES_ENV, " compat_plugin_example , ")
    try:
        assert "plugin_example" in list_methods()
    finally:
        sys.modules.pop("compat_plugin_example", None)

    monkeypatch.setenv(EXTRA_METHOD_MODULES_ENV, "compat_no_such_module")
    with pytest.raises(ConfigError, match="COMPAT_EXTRA_METHOD_MODULES.*compat_no_such_module"):
        list_methods()

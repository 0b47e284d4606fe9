"""Independent chains train at the same time, each in a worker group of its own, on a multi-node cluster."""

import pytest

from orchestrator.storage import runfiles
from orchestrator.engine import driver
from orchestrator import load_config

pytestmark = pytest.mark.integration

# each chain trains for several seconds, longer than the jitter of two worker groups' start-up
TWO_CHAINS = [
    "data.num_classes=6", "data.train_per_class=48", "data.test_per_class=8",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=15", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=1", "resources.cpus_per_worker=1", "resources.share_first_version=false",
    "methods=[{name: independent, label: chain-a}, {name: independent, label: chain-b}]",
]


@pytest.fixture
def two_node_cluster():
    """A head without CPUs (the driver, the queue and Train's controllers need none) and two 1-CPU nodes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_independent_chains_overlap_in_time(two_node_cluster, tmp_path):
    cfg = load_config(None, TWO_CHAINS)
    cfg.output_dir = str(tmp_path)
    run_dir = tmp_path / cfg.name
    metrics = driver.run_experiment(cfg, progress=False, echo=lambda s: None)
    spans = {}
    for key in ["chain-a", "chain-b"]:
        entries = [runfiles.manifest_entry(run_dir, key, v) for v in range(2)]
        assert len({e["group"] for e in entries}) == 1  # a chain keeps its worker group
        spans[key] = (min(e["started_at"] for e in entries), max(e["finished_at"] for e in entries))
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert max(a_start, b_start) < min(a_end, b_end), f"the chains ran one after another: {spans}"
    groups = {runfiles.manifest_entry(run_dir, key, 0)["group"] for key in spans}
    assert len(groups) == 2
    # the same numbers as one chain after the other in one group
    serial = load_config(None, TWO_CHAINS)
    serial.output_dir = str(tmp_path / "serial")
    one_group = driver.run_experiment(serial, progress=False, echo=lambda s: None, max_groups=1)
    for key in spans:
        assert one_group["methods"][key]["matrices"] == metrics["methods"][key]["matrices"]
    entries = [runfiles.manifest_entry(tmp_path / "serial" / cfg.name, k, v) for k in spans for v in range(2)]
    assert len({e["group"] for e in entries}) == 1

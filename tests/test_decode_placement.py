"""Where streamed images are decoded (``data.decode_on``): the choice of nodes as a function of the node
list, and on a real two-node cluster (a "GPU" head, logical GPU only, and a CPU-only worker) the real
decoding tasks of a stream read from the GPU node, located through Ray's state API."""

from __future__ import annotations

import time

import numpy as np
import pytest

from orchestrator import load_config, run_experiment
from orchestrator.config import DataConfig
from orchestrator.data import load_split
from orchestrator.data.export import write_parquet
from orchestrator.data.streaming import HEAD_NODE_RESOURCE, NODE_ID_LABEL, block_rows, decode_nodes, open_split
from orchestrator.errors import ConfigError

from helpers import free_port

CLASSES = ["ant", "bee", "cat", "dog"]
DECODE_TASK = "MapBatches(_decode_block)"  # Ray Data's name for the tasks of map_batches(_decode_block)


def _node(node_id: str, gpus: float = 0, head: bool = False, alive: bool = True) -> dict:
    """One entry of ``ray.nodes()``, with the fields the choice reads."""
    resources = {"CPU": 8.0, "memory": 1e9, f"node:10.0.0.{len(node_id)}": 1.0}
    if gpus:
        resources["GPU"] = float(gpus)
    if head:
        resources[HEAD_NODE_RESOURCE] = 1.0
    return {"NodeID": node_id, "Alive": alive, "Resources": resources, "Labels": {NODE_ID_LABEL: node_id}}


# ---- the choice, on hand-made node lists ---------------------------------------------------------

def test_auto_decodes_on_cpu_only_workers_only_next_to_gpu_nodes():
    head, gpu1, gpu2 = _node("h", head=True), _node("g1", gpus=1), _node("g2", gpus=4)
    cpu_b, cpu_a = _node("cb"), _node("ca")
    assert decode_nodes([head, gpu1, cpu_b, gpu2, cpu_a], "auto") == ["ca", "cb"]
    assert decode_nodes([_node("g0", gpus=1, head=True), cpu_a], "auto") == ["ca"]  # a GPU head counts as a GPU node
    # one kind of node: unchanged (any node)
    assert decode_nodes([head, gpu1, gpu2], "auto") is None  # cluster.yaml: a CPU head that hosts the drivers
    assert decode_nodes([head, cpu_a, cpu_b], "auto") is None  # all CPU
    assert decode_nodes([_node("g0", gpus=1, head=True), gpu1], "auto") is None  # all GPU
    assert decode_nodes([head], "auto") is None  # a local machine
    # dead nodes count for nothing
    assert decode_nodes([head, gpu1, _node("cx", alive=False)], "auto") is None
    assert decode_nodes([head, _node("gx", gpus=1, alive=False), cpu_a], "auto") is None
    assert decode_nodes([head, gpu1, cpu_a, _node("cx", alive=False)], "auto") == ["ca"]


def test_cpu_nodes_requires_them_and_anywhere_never_restricts():
    head, gpu, cpu = _node("h", head=True), _node("g", gpus=1), _node("c")
    assert decode_nodes([head, gpu, cpu], "cpu_nodes") == ["c"]
    assert decode_nodes([head, cpu], "cpu_nodes") == ["c"]  # asked for: kept off the head even without GPUs
    for nodes in ([head, gpu], [head], [head, gpu, _node("cx", alive=False)]):
        with pytest.raises(ConfigError, match=r"config key 'data.decode_on': cpu_nodes .* has none"):
            decode_nodes(nodes, "cpu_nodes")
    with pytest.raises(ConfigError,
                       match=r"'evaluation.sets.x.data.decode_on'.*h \(head, CPU only\), g \(worker, 1 GPU\)"):
        decode_nodes([head, gpu], "cpu_nodes", "evaluation.sets.x.data.decode_on")
    for nodes in ([head, gpu, cpu], [head, gpu], [head]):
        assert decode_nodes(nodes, "anywhere") is None


def test_decode_on_config_errors():
    with pytest.raises(ConfigError, match="data.decode_on.*allowed values"):
        load_config(None, ["data.decode_on=gpu_nodes"])
    with pytest.raises(ConfigError, match="data.decode_on.*'synthetic'.*decoded in memory; remove it"):
        load_config(None, ["data.decode_on=cpu_nodes"])
    with pytest.raises(ConfigError, match="'decode_on'.*loading 'memory'"):
        DataConfig(dataset="parquet", root="x", loading="memory", decode_on="anywhere")
    assert DataConfig(dataset="parquet", root="x", decode_on="cpu_nodes").decode_on == "cpu_nodes"  # auto may stream


# ---- a real cluster: a GPU head and a CPU-only worker ---------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """A head with a logical GPU (nothing touches CUDA) and 2 CPUs, and one 2-CPU worker node; the
    dashboard serves the state API. A removed node is declared dead in about a second."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "include_dashboard": True, "dashboard_port": free_port(),
        "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 5}})
    try:
        cpu_node = cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        state_api = "http://" + ray.init(address=cluster.address, log_to_driver=False).dashboard_url
        yield cluster, cpu_node, state_api
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def parquet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("test", 2)):
        labels = np.repeat(np.arange(len(CLASSES)), per_class)
        write_parquet(root, split, rng.integers(0, 256, (len(labels), 12, 10, 3), dtype=np.uint8), labels, CLASSES)
    return str(root)


def _stream_on_the_gpu_node(cfg: DataConfig, order: np.ndarray, batch_size: int) -> np.ndarray:
    """The batches a Train worker holding the GPU would receive, streamed the way it streams them, from
    a task on the GPU node (which holds the input blocks and has a free CPU of its own)."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=1)
    def read():
        return np.concatenate([b.numpy() for b in open_split(cfg, "train").batches(order, batch_size)])

    return ray.get(read.remote())


def _decode_tasks(state_api: str, seen: set, expected: int) -> list:
    """The decoding tasks finished since ``seen`` (their ids are added to it): waits for the state API,
    which receives task events in batches, to show ``expected`` of them."""
    from ray.util.state import list_tasks

    deadline = time.time() + 30
    while True:
        tasks = [t for t in list_tasks(address=state_api, filters=[("name", "=", DECODE_TASK)], detail=True,
                                       limit=1000, raise_on_missing_output=False)
                 if t.task_id not in seen and t.state == "FINISHED"]
        if len(tasks) >= expected or time.time() > deadline:
            seen.update(t.task_id for t in tasks)
            return tasks
        time.sleep(0.5)


@pytest.mark.integration
def test_decoding_runs_on_the_cpu_only_node(cluster, parquet_root, tmp_path):
    import ray

    from orchestrator.config import load_raw
    from orchestrator.tuning.sweep import parse_sweep, run_sweep

    ray_cluster, cpu_node, state_api = cluster
    gpu_node = ray_cluster.head_node.node_id
    memory = load_split(DataConfig(dataset="parquet", root=parquet_root, image_size=8), "train")
    order = np.tile(np.random.default_rng(1).permutation(len(memory)), 24)  # 768 samples
    blocks = len(block_rows(len(order), 16, 3 * 8 * 8))  # 16, 32, ..., 256, then what is left: 6 decoding tasks
    seen: set = set()
    for decode_on in ("auto", "anywhere"):
        cfg = DataConfig(dataset="parquet", root=parquet_root, image_size=8, loading="stream", decode_on=decode_on)
        np.testing.assert_array_equal(_stream_on_the_gpu_node(cfg, order, 16), memory.images[order])
        tasks = _decode_tasks(state_api, seen, expected=blocks)
        assert len(tasks) == blocks, [(t.name, t.state) for t in tasks]
        if decode_on == "auto":  # CPU-only node next to a GPU node: only there
            assert {t.node_id for t in tasks} == {cpu_node.node_id} != {gpu_node}
            assert all(cpu_node.node_id in t.label_selector[NODE_ID_LABEL] for t in tasks), tasks[0].label_selector
        else:  # no restriction: Ray places them as it would without the key
            assert all(not t.label_selector for t in tasks), tasks[0].label_selector

    # without the CPU-only node, cpu_nodes stops the run before anything is written; auto decodes anywhere
    ray_cluster.remove_node(cpu_node)
    deadline = time.time() + 30
    while any(n["NodeID"] == cpu_node.node_id and n["Alive"] for n in ray.nodes()) and time.time() < deadline:
        time.sleep(0.2)
    assert decode_nodes(ray.nodes(), "auto") is None
    run = ["data.dataset=parquet", f"data.root={parquet_root}", "data.image_size=8", "data.loading=stream",
           "data.decode_on=cpu_nodes", "scenario.initial_classes=2", "scenario.increment=1", f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"'data.decode_on': cpu_nodes .* has none"):
        run_experiment(load_config(None, run), progress=False, echo=lambda *_: None)
    sweep = ["sweep={space: {training.lr: {grid: [0.001]}}, objective: {method: independent}}"]
    with pytest.raises(ConfigError, match=r"'data.decode_on': cpu_nodes .* has none"):  # a sweep: once, not per trial
        run_sweep(parse_sweep(load_raw(None, [*run, *sweep])), progress=False, echo=lambda *_: None)
    assert not any(tmp_path.iterdir())

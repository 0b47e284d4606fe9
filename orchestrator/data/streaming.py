"""Splits in memory or streamed through Ray Data, behind one interface: ``batches(order, batch_size)``.

The training loop decides *which* samples a batch holds (a seeded permutation of the step's indices,
sharded by rank, or the replay sampler's balanced batches: orchestrator/engine/worker.py); the data
only delivers their pixels. In memory that is a gather from one uint8 array. Streamed, the rank's
order for the epoch becomes a Ray Dataset of locator rows (a path; a Parquet row; a tar offset) whose
``map_batches`` tasks read and decode the images, running ahead of training, on the cluster's CPU-only
worker nodes when it has them next to GPU nodes (``data.decode_on``: :func:`decode_nodes`), so that a
GPU node's CPUs stay with its Train worker; ``preserve_order`` keeps their output in the order asked
for. So a step's selection of classes, shots and replay memory is a set of indices, never a copy, each
worker reads only its own shard, and the same seed gives the same batches in both modes, pixel for
pixel. Augmentation (random crop and flip) and normalisation stay the batch transform's, on the
worker's device, for the same reason: the seeded generator of a step draws them in one sequence.
"""

from __future__ import annotations

from functools import cached_property
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.config.experiment import STREAMABLE_DATASETS
from orchestrator.data import LabeledImages, Split, cache_entry, cache_root, histogram_stats, load_split, read_meta
from orchestrator.data.encoded import decoded_bytes, split_index
from orchestrator.data.formats import Source, SplitIndex, read_images
from orchestrator.errors import ConfigError, DataError

# decoded bytes a decoding task aims at: its fixed cost (scheduling, the object store, the consumer's
# unpacking) spread over many images, while a few blocks in flight stay small beside a worker's memory.
# bench/data.py on 32 px images: 256 images a block streamed at 0.81x the in-memory speed, 4096 at 0.92x.
BLOCK_BYTES = 16 * 2 ** 20
STATS_BATCH = 256  # images per batch of the statistics pass
PREFETCH_BATCHES = 4  # batches the iterator keeps decoded ahead of training
DECODE_CPUS = 1.0  # logical CPUs each decoding task asks Ray for
HEAD_NODE_RESOURCE = "node:__internal_head__"  # the resource by which Ray marks its head node
NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node: its ID


def streams(cfg: DataConfig) -> bool:
    """Whether ``cfg``'s splits stream: ``loading: stream``, or ``auto`` and the train split decoded
    would exceed ``memory_limit_gb``."""
    if cfg.loading == "memory" or cfg.dataset not in STREAMABLE_DATASETS:
        return False
    return cfg.loading == "stream" or decoded_bytes(split_index(cfg, "train")) > cfg.memory_limit_gb * 2 ** 30


def streamed_sections(cfg) -> list[tuple[str, DataConfig]]:
    """The data sections of an experiment (``orchestrator.config.ExperimentConfig``) that stream, each with
    its key path: ``data`` and ``evaluation.sets.NAME.data``."""
    sections = [("data", cfg.data), *((f"evaluation.sets.{name}.data", eval_set.data)
                                      for name, eval_set in cfg.evaluation.sets.items())]
    return [(key, data) for key, data in sections if data is not None and streams(data)]


def open_split(cfg: DataConfig, split: Split) -> Union[LabeledImages, "StreamedImages"]:
    """One split, decoded in memory or streamed, per ``cfg.loading`` (see :func:`streams`)."""
    if streams(cfg):
        return StreamedImages(split_index(cfg, split), split_index(cfg, "train"), cfg.decode_on)
    return load_split(cfg, split)


class StreamedImages:
    """A split read on demand: labels and locators in memory (memory-mapped), images decoded by Ray
    Data tasks batch by batch. Quacks like :class:`LabeledImages` except for ``images``."""

    def __init__(self, index: SplitIndex, train_index: SplitIndex, decode_on: str = "auto"):
        self.index, self.train_index, self.decode_on = index, train_index, decode_on
        self.labels = np.asarray(index.labels, dtype=np.int64)
        self.class_names = index.class_names
        self.sample_ids = np.arange(len(index), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def mean(self) -> tuple[float, float, float]:
        return self._stats[0]

    @property
    def std(self) -> tuple[float, float, float]:
        return self._stats[1]

    @cached_property
    def _stats(self):
        """The train split's exact channel stats (as the in-memory path computes them), from one streamed
        pass the first time any worker needs them, then cached. Fixed normalisations never ask."""
        def build():
            hist = np.zeros((3, 256), dtype=np.int64)
            for images in stream_images(self.train_index, np.arange(len(self.train_index)), STATS_BATCH,
                                        self.decode_on):
                for c in range(3):
                    hist[c] += np.bincount(images[..., c].ravel(), minlength=256)
            mean, std = histogram_stats(hist)
            return {}, {"mean": mean, "std": std}

        entry = cache_entry(cache_root(), "stats", {"index": self.train_index.digest,
                                                    "image_size": self.train_index.source.image_size}, build)
        meta = read_meta(entry)
        return tuple(meta["mean"]), tuple(meta["std"])

    def batches(self, order: np.ndarray, batch_size: int) -> Iterator["torch.Tensor"]:  # noqa: F821
        """uint8 (B, H, W, 3) tensors of the samples ``order`` lists, ``batch_size`` at a time."""
        import torch

        for images in stream_images(self.index, np.asarray(order, dtype=np.int64), batch_size, self.decode_on):
            yield torch.from_numpy(images if images.flags.writeable else images.copy())  # Ray hands out read-only views


def decode_nodes(nodes: Sequence[Mapping], decode_on: str, key: str = "data.decode_on") -> Optional[list[str]]:
    """The IDs of the nodes that may decode streamed images (sorted), or None for any node.

    ``nodes`` is ``ray.nodes()``. The candidates are the alive CPU-only worker nodes: no GPU, and not
    the head, whose CPUs serve the drivers (the deployment files' head is CPU-only and hosts every
    driver and sweep trial). ``cpu_nodes`` keeps decoding on them and is a ConfigError at ``key`` when
    there are none; ``auto`` does so only when the cluster also has GPU nodes, so a cluster of one
    kind (all CPU, or GPU workers beside a CPU head) decodes anywhere, as Ray places it by default."""
    if decode_on == "anywhere":
        return None
    alive = [node for node in nodes if node["Alive"]]
    cpu_workers = sorted(node["NodeID"] for node in alive
                         if not node["Resources"].get("GPU") and HEAD_NODE_RESOURCE not in node["Resources"])
    if decode_on == "cpu_nodes" and not cpu_workers:
        kinds = ", ".join(f"{node['NodeID'][:8]} ({_node_kind(node)})" for node in alive)
        raise ConfigError(key, f"cpu_nodes decodes on CPU-only worker nodes, but the cluster has none (nodes: "
                               f"{kinds}); add one (docs/guide/data.md), or set auto or anywhere")
    if decode_on == "cpu_nodes" or any(node["Resources"].get("GPU") for node in alive):
        return cpu_workers or None
    return None


def _node_kind(node: Mapping) -> str:
    gpus = node["Resources"].get("GPU", 0)
    role = "head" if HEAD_NODE_RESOURCE in node["Resources"] else "worker"
    return f"{role}, {gpus:g} GPU" if gpus else f"{role}, CPU only"


def stream_images(index: SplitIndex, order: np.ndarray, batch_size: int,
                  decode_on: str = "auto") -> Iterator[np.ndarray]:
    """Decoded uint8 batches of ``order``'s samples, in that order, through a Ray Data pipeline whose
    decoding tasks run on the nodes :func:`decode_nodes` picks for ``decode_on``."""
    import pyarrow as pa
    import ray
    import ray.data

    if len(order) == 0:
        return
    bounds = np.cumsum([0, *block_rows(len(order), batch_size, 3 * index.source.image_size ** 2)])
    tables = [pa.table(index.rows(order[start:stop])) for start, stop in zip(bounds[:-1], bounds[1:])]
    ds = ray.data.from_arrow(tables)  # starts a local Ray when none is running, so ray.nodes() answers
    nodes = decode_nodes(ray.nodes(), decode_on)
    # Ray's default node-ID label, so no node has to declare anything; no space after the commas
    # (Ray 2.60's lease policy reads the IDs verbatim and aborts the process on " <id>").
    selector = None if nodes is None else {NODE_ID_LABEL: f"in({','.join(nodes)})"}
    ds = ds.map_batches(_decode_block, fn_kwargs={"source": index.source}, batch_size=None, batch_format="numpy",
                        num_cpus=DECODE_CPUS, label_selector=selector)
    ds.context.execution_options.preserve_order = True  # this dataset's own context: others keep theirs
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES):
        failed = batch["error"][batch["error"] != ""]
        if len(failed):
            raise DataError(str(failed[0]))
        yield batch["image"]


def block_rows(count: int, batch_size: int, image_bytes: int) -> list[int]:
    """Images per decoding task for a stream of ``count`` images: whole batches, one batch first (the
    first batch of an epoch waits for its block only), each block twice the last, up to about
    :data:`BLOCK_BYTES` decoded."""
    largest = batch_size * max(1, BLOCK_BYTES // (image_bytes * batch_size))
    sizes, size, left = [], batch_size, count
    while left > 0:
        sizes.append(min(size, left))
        left -= sizes[-1]
        size = min(2 * size, largest)
    return sizes


def _decode_block(rows: dict[str, np.ndarray], source: Source) -> dict[str, np.ndarray]:
    """Decode one block. A bad file's DataError travels back as data (Ray would wrap a raised one in
    exceptions that lose it), so the worker raises the reader's own sentence, naming the file."""
    try:
        images, error = read_images(source, rows), ""
    except DataError as exc:
        size = source.image_size
        images, error = np.zeros((len(next(iter(rows.values()))), size, size, 3), dtype=np.uint8), str(exc)
    return {"image": images, "error": np.full(len(images), error, dtype=object)}


__all__ = ["StreamedImages", "decode_nodes", "open_split", "stream_images", "streams"]

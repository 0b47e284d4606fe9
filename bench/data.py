"""Streaming training input: peak memory of one Train worker as the dataset grows, and throughput against
the in-memory path on the same data and model, measured in the same run.

An image folder of N small PNG files (synthetic images, ``--size`` px) and one ten times larger are
written once (the larger repeats each encoded image ten times under other names: the same decoding
work per image, a tenth of the encoding time). A Ray Train worker opens the train split
(``data.loading: stream`` or ``memory``), draws seeded permutations of *all* its samples, as training
epochs do, and trains the quickstart's network on batches of them (uint8 batch -> augmentation and
normalisation -> forward, backward, Adam step).

- Memory: one fresh worker per (data size, mode); its peak resident memory (ru_maxrss: the whole
  process, Python, torch and Ray included). Target: streamed, 10x the data within 1.5x the peak at 1x.
- Throughput: one worker trains both modes on the 1x data, alternating, a round of each at a time after
  a warm-up round, so both see the same machine load. Target: streamed >= 0.8x in memory. Each round is
  one epoch (a new streamed pipeline), so the time until its first batch arrives is printed apart: it is
  paid once per epoch and weighs little in an epoch of hundreds of batches.

    python bench/data.py [--images 20000] [--factor 10] [--batches 200] [--rounds 3] [--no-memory-large]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator.config import DataConfig, ModelConfig  # noqa: E402


def write_folders(base: Path, images: int, factor: int, size: int) -> tuple[Path, Path]:
    """``base/small`` with ``images`` PNGs and ``base/large`` with ``factor`` times as many."""
    from orchestrator.data import load_split
    from orchestrator.data.export import png_bytes
    from orchestrator.data.synthetic import word_names

    classes = 100
    data = load_split(DataConfig(num_classes=classes, train_per_class=-(-images // classes), test_per_class=1,
                                 image_size=size), "train")
    names = word_names(classes)
    encoded = [png_bytes(image) for image in data.images[:images]]
    labels = data.labels[:images]
    for name, copies in (("small", 1), ("large", factor)):
        for c in names:
            (base / name / "train" / c).mkdir(parents=True, exist_ok=True)
            (base / name / "test" / c).mkdir(parents=True, exist_ok=True)
        for i, (blob, label) in enumerate(zip(encoded, labels)):
            for k in range(copies):
                (base / name / "train" / names[label] / f"{i:06d}-{k:02d}.png").write_bytes(blob)
        for c, label in zip(names, range(classes)):  # one test image per class: the layout needs both splits
            (base / name / "test" / c / "0.png").write_bytes(encoded[int(np.flatnonzero(labels == label)[0])])
    return base / "small", base / "large"


def _train(data, order: np.ndarray, batch_size: int, model, optimizer, transform, generator
           ) -> tuple[int, float, float]:
    """Train on ``order``'s batches read through ``data.batches``; returns (images, seconds, seconds until
    the first batch arrived)."""
    import torch
    import torch.nn.functional as F

    labels = torch.from_numpy(data.labels)
    started, done, first = time.perf_counter(), 0, None
    for start, images in zip(range(0, len(order), batch_size), data.batches(order, batch_size)):
        first = first if first is not None else time.perf_counter() - started
        x = transform(images, generator=generator)
        loss = F.cross_entropy(model(x)["logits"], labels[order[start:start + len(images)]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(images)
    return done, time.perf_counter() - started, first


def train_worker(config: dict) -> None:
    """One Train worker. For each loading mode in ``config["modes"]`` it opens the train split; then, for
    ``rounds`` rounds, each mode in turn trains ``batches`` batches of a fresh seeded permutation of all
    samples (a streamed round starts a new pipeline, as an epoch does), so the modes share the machine's
    load alike. Writes images/s per mode and the process's peak resident memory."""
    import torch

    from methods.nets.heads import ClassifierNet
    from orchestrator.data.streaming import open_split
    from orchestrator.data.transforms import BatchTransform

    torch.set_num_threads(1)
    splits, open_seconds = {}, {}
    for mode in config["modes"]:
        opened = time.perf_counter()
        splits[mode] = open_split(DataConfig(dataset="imagefolder", root=config["root"], image_size=config["size"],
                                             loading=mode), "train")
        open_seconds[mode] = time.perf_counter() - opened
    num_classes = len(next(iter(splits.values())).class_names)
    model = ClassifierNet(ModelConfig(), num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    transform = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True)
    generator = torch.Generator().manual_seed(0)
    totals = {mode: [0, 0.0, 0.0] for mode in splits}  # images, seconds, seconds waiting for first batches
    bs = config["batch_size"]
    for round_ in range(config["rounds"] + 1):  # round 0 warms up (decoding processes start, caches fill)
        for mode, data in splits.items():
            order = np.random.default_rng(round_).permutation(len(data.labels))[: config["batches"] * bs]
            images, seconds, first = _train(data, order, bs, model, optimizer, transform, generator)
            if round_:
                for i, value in enumerate((images, seconds, first)):
                    totals[mode][i] += value
    Path(config["out"]).write_text(json.dumps({
        "images": len(next(iter(splits.values())).labels),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "images_per_s": {mode: n / seconds for mode, (n, seconds, _) in totals.items()},
        "steady_images_per_s": {mode: n / (seconds - first) for mode, (n, seconds, first) in totals.items()},
        "first_batch_s": {mode: first / config["rounds"] for mode, (_, _, first) in totals.items()},
        "open_seconds": open_seconds}))


def measure(root: Path, modes: list[str], rounds: int, args, tmp: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"{root.name}-{'-'.join(modes)}"
    out = tmp / f"{name}.json"
    config = {"root": str(root), "modes": modes, "size": args.size, "batches": args.batches, "rounds": rounds,
              "batch_size": args.batch_size, "out": str(out)}
    TorchTrainer(train_worker, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bench-data-{name}", storage_path=str(tmp / "ray"))).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="train images of the 1x dataset")
    parser.add_argument("--factor", type=int, default=10, help="the larger dataset holds this many times more")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (files and training)")
    parser.add_argument("--batches", type=int, default=200, help="batches per mode and round (an epoch's length)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of the throughput comparison")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--no-memory-large", action="store_true", help="skip the in-memory path on the large data")
    args = parser.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        os.environ["COMPAT_CACHE_DIR"] = str(tmp / "cache")  # decoded arrays and indexes of this run only
        t0 = time.time()
        small, large = write_folders(tmp / "data", args.images, args.factor, args.size)
        print(f"wrote {args.images} + {args.images * args.factor} PNG files ({args.size} px) in {time.time() - t0:.0f} s")
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"COMPAT_CACHE_DIR": os.environ["COMPAT_CACHE_DIR"]}})
        try:
            speed = measure(small, ["memory", "stream"], args.rounds, args, tmp)
            peaks = {(name, mode): measure(root, [mode], 1, args, tmp)
                     for name, root in (("1x", small), (f"{args.factor}x", large)) for mode in ("stream", "memory")
                     if not (args.no_memory_large and name != "1x" and mode == "memory")}
        finally:
            ray.shutdown()
    print(f"\npeak resident memory of one Train worker (opens the split, trains {2 * args.batches} batches):")
    print(f"{'data':>5} {'loading':>7} {'images':>8} {'peak MB':>8} {'open s':>7}")
    for (name, mode), r in peaks.items():
        print(f"{name:>5} {mode:>7} {r['images']:>8} {r['peak_mb']:>8.0f} {r['open_seconds'][mode]:>7.1f}")
    large_name = f"{args.factor}x"
    for mode in ("stream", "memory"):
        if (large_name, mode) in peaks:
            growth = peaks[(large_name, mode)]["peak_mb"] / peaks[("1x", mode)]["peak_mb"]
            target = "  (target <= 1.5)" if mode == "stream" else ""
            print(f"{mode:>6}: peak at {args.factor}x the data / at 1x: {growth:.2f}{target}")
    rates = speed["images_per_s"]
    print(f"\nthroughput on the 1x data, same worker, modes alternating over {args.rounds} rounds of "
          f"{args.batches} batches: in memory {rates['memory']:.0f} images/s, streamed {rates['stream']:.0f} images/s")
    print(f"streaming / in-memory throughput: {rates['stream'] / rates['memory']:.2f}  (target >= 0.8)")
    first, steady = speed["first_batch_s"], speed["steady_images_per_s"]
    print(f"an epoch's first batch arrives after {first['stream']:.2f} s streamed ({first['memory']:.3f} s in memory); "
          f"after it, streamed / in memory: {steady['stream'] / steady['memory']:.2f}")


if __name__ == "__main__":
    main()

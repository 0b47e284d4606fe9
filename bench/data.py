"""Streaming training input: peak memory of one Train worker as the dataset grows, and throughput against
the in-memory path on the same data and model, measured in the same run.

An image folder of N small PNG files (synthetic images, ``--size`` px) and one ten times larger are
written once (the larger repeats each encoded image ten times under other names: the same decoding
work per image, a tenth of the encoding time). Each measurement is a fresh Ray Train worker that opens
the train split (``data.loading: stream`` or ``memory``), draws a seeded permutation of *all* its
samples, as a training epoch does, and trains the quickstart's network on ``--batches`` batches of it
(uint8 batch -> the step's augmentation and normalisation -> forward, backward, Adam step). Reported:
the worker's peak resident memory (ru_maxrss, the whole process: Python, torch and Ray included) and
its training images/s after ``--warmup`` batches. Targets: streaming peak memory at 10x the data within
1.5x of the peak at 1x; streaming throughput >= 0.8x the in-memory path on the 1x data.

    python bench/data.py [--images 20000] [--factor 10] [--batches 200] [--no-memory-large]
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


def train_worker(config: dict) -> None:
    """One Train worker: open the split, train ``batches`` batches of a seeded permutation of all of it."""
    import torch
    import torch.nn.functional as F

    from methods.nets.heads import ClassifierNet
    from orchestrator.data.streaming import open_split
    from orchestrator.data.transforms import BatchTransform

    torch.set_num_threads(1)
    opened = time.time()
    data = open_split(DataConfig(dataset="imagefolder", root=config["root"], image_size=config["size"],
                                 loading=config["loading"]), "train")
    open_seconds = time.time() - opened
    model = ClassifierNet(ModelConfig(), len(data.class_names))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    transform = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True)
    generator = torch.Generator().manual_seed(0)
    order = np.random.default_rng(0).permutation(len(data.labels))[: config["batches"] * config["batch_size"]]
    labels = torch.from_numpy(data.labels)
    done, started = 0, None
    for i, (start, images) in enumerate(zip(range(0, len(order), config["batch_size"]),
                                            data.batches(order, config["batch_size"]))):
        if i == config["warmup"]:
            started, done = time.time(), 0
        x = transform(images, generator=generator)
        loss = F.cross_entropy(model(x)["logits"], labels[order[start:start + len(images)]])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += len(images)
    rate = done / (time.time() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(config["out"]).write_text(json.dumps({"images_per_s": rate, "peak_mb": peak_mb, "images": len(data.labels),
                                               "open_seconds": open_seconds}))


def measure(root: Path, loading: str, args, tmp: Path) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp / f"{root.name}-{loading}.json"
    config = {"root": str(root), "loading": loading, "size": args.size, "batches": args.batches,
              "batch_size": args.batch_size, "warmup": args.warmup, "out": str(out)}
    TorchTrainer(train_worker, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bench-data-{root.name}-{loading}", storage_path=str(tmp / "ray"))).fit()
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000, help="train images of the 1x dataset")
    parser.add_argument("--factor", type=int, default=10, help="the larger dataset holds this many times more")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (files and training)")
    parser.add_argument("--batches", type=int, default=200, help="batches trained per measurement")
    parser.add_argument("--warmup", type=int, default=20, help="batches before the clock starts")
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
            runs = {("small", "memory"): measure(small, "memory", args, tmp),
                    ("small", "stream"): measure(small, "stream", args, tmp),
                    ("large", "stream"): measure(large, "stream", args, tmp)}
            if not args.no_memory_large:
                runs[("large", "memory")] = measure(large, "memory", args, tmp)
        finally:
            ray.shutdown()
    print(f"\n{'dataset':>8} {'loading':>7} {'images':>8} {'peak MB':>8} {'images/s':>9} {'open s':>7}")
    for (name, loading), r in runs.items():
        print(f"{name:>8} {loading:>7} {r['images']:>8} {r['peak_mb']:>8.0f} {r['images_per_s']:>9.0f} "
              f"{r['open_seconds']:>7.1f}")
    growth = runs[("large", "stream")]["peak_mb"] / runs[("small", "stream")]["peak_mb"]
    ratio = runs[("small", "stream")]["images_per_s"] / runs[("small", "memory")]["images_per_s"]
    print(f"\nstreaming peak memory, {args.factor}x the data / 1x: {growth:.2f}  (target <= 1.5)")
    if ("large", "memory") in runs:
        print(f"in-memory peak memory, {args.factor}x the data / 1x: "
              f"{runs[('large', 'memory')]['peak_mb'] / runs[('small', 'memory')]['peak_mb']:.2f}")
    print(f"streaming / in-memory throughput on the 1x data: {ratio:.2f}  (target >= 0.8)")


if __name__ == "__main__":
    main()

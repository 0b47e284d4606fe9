"""Training throughput of the one training loop under each GPU-path option, as ratios against fp32 in one run.

Runs ``orchestrator.engine.loop.train_epochs`` standalone — no Ray, no run storage, no scenario — on the
project's classifier network with the worker's input path (uint8 images gathered on the host, pinned and
copied without blocking on a GPU, augmented and normalised on the device, one batch prefetched ahead),
each option from the same initial weights on the same batches. Prints images/s, the training FLOPs
per image counted by torch, an MFU estimate (GPUs in the peak table only) and the ratio against fp32.

    python bench/gpu_step.py                                   # GPU when there is one, else CPU
    python bench/gpu_step.py --backbone resnet50 --image-size 224 --batch-size 128 --batches 40
    python bench/gpu_step.py --options fp32,bf16,channels_last

Needs torch, torchvision, numpy and PyYAML (the project's network and config types), not Ray.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from methods.nets.heads import ClassifierNet  # noqa: E402
from orchestrator.config import ModelConfig  # noqa: E402
from orchestrator.data.transforms import IMAGENET_STATS, BatchTransform  # noqa: E402
from orchestrator.engine.loop import train_epochs  # noqa: E402
from orchestrator.engine.precision import Precision  # noqa: E402
from orchestrator.engine.throughput import Throughput  # noqa: E402

OPTIONS = {  # name -> the training section's options it sets (Precision's arguments)
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "compile": {"compile": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}
DEFAULTS = {  # per device kind: an ImageNet-like step on a GPU, a CIFAR-like one on a CPU
    "cuda": {"backbone": "resnet50", "stem": "imagenet", "image_size": 224, "batch_size": 128, "batches": 30, "warmup": 5},
    "cpu": {"backbone": "small_cnn", "stem": "cifar", "image_size": 32, "batch_size": 64, "batches": 20, "warmup": 2},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, from: {', '.join(OPTIONS)}")
    parser.add_argument("--backbone", default=None, help="small_cnn, resnet18 or resnet50")
    parser.add_argument("--stem", default=None, choices=["cifar", "imagenet"])
    parser.add_argument("--width", type=int, default=32, help="small_cnn only")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None, help="timed batches per option (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (one more with compile)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="CPU only: torch threads")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for key, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.options = [name.strip() for name in args.options.split(",") if name.strip()]
    unknown = [name for name in args.options if name not in OPTIONS]
    if unknown or not args.options:
        parser.error(f"unknown option(s) {unknown}; choose from {', '.join(OPTIONS)}")
    if "fp32" not in args.options:
        args.options.insert(0, "fp32")  # the baseline of every ratio
    return args


def measure(option: str, args, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """One option: a fresh copy of ``model``, Adam, warm-up + timed batches of the same seeded stream."""
    device = args.device
    model = copy.deepcopy(model).to(device)
    precision = Precision(device, **OPTIONS[option])
    run = precision.prepare(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = args.warmup + (1 if precision.compile else 0)  # the counted batch, then the compiling one
    throughput = Throughput(device, precision.precision, warmup_batches=max(warmup, 1), count=lambda b: len(b[1]))
    transform = BatchTransform(*IMAGENET_STATS, augment=True)
    pin = device.type == "cuda"

    def batches(epoch):
        gen = torch.Generator().manual_seed(epoch)
        for _ in range(throughput.warmup_batches + args.batches):
            idx = torch.randint(len(images), (args.batch_size,), generator=gen)
            x, y = images[idx], labels[idx]
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield (transform(x.to(device, non_blocking=True), generator=gen), y.to(device, non_blocking=True))

    def loss(batch, epoch):
        return F.cross_entropy(run(batch[0])["logits"], batch[1]), {}

    means = train_epochs(run, optimizer, 1, lr=None, batches=batches, loss=loss, hooks=[throughput], precision=precision)
    return {**throughput.record(), "loss": means["loss"]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {args.backbone} ({args.stem} stem) at {args.image_size} px, "
          f"batch {args.batch_size}, {args.warmup} warm-up + {args.batches} timed batches per option")
    torch.manual_seed(0)
    model = ClassifierNet(ModelConfig(backbone=args.backbone, stem=args.stem, width=args.width, embedding_dim=128),
                          args.classes)
    pool = max(4 * args.batch_size, 256)  # uint8 host images (B, H, W, 3), as a worker's dataset holds them
    images = torch.randint(0, 256, (pool, args.image_size, args.image_size, 3), dtype=torch.uint8)
    labels = torch.randint(0, args.classes, (pool,))
    results = {option: measure(option, args, model, images, labels) for option in args.options}
    base = results["fp32"]["images_per_second"]
    print(f"{'option':28s} {'images/s':>10s} {'vs fp32':>8s} {'GFLOP/img':>10s} {'MFU':>7s}  mean loss")
    for option, r in results.items():
        ratio = r["images_per_second"] / base if r["images_per_second"] and base else float("nan")
        gflops = (r["train_flops_per_image"] or 0) / 1e9
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{option:28s} {r['images_per_second'] or 0:10.1f} {ratio:8.2f} {gflops:10.3f} {mfu:>7s}  {r['loss']:.4f}")
    print(f"MFU: {results['fp32']['mfu_note']} (bf16/fp16 rows use their own peak)")


if __name__ == "__main__":
    main()

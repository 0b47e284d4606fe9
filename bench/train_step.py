"""Training throughput of one step inside the orchestrator against a bare loop (same model, data, batch).

The orchestrated figure is the step's training phase as recorded in its manifest entry (epochs,
per-epoch checkpoints and progress reports included). Target: ratio >= 0.9.

    python bench/train_step.py [--epochs 3] [--workers 1]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from common import bare_loop

from orchestrator.storage import runfiles
from orchestrator import load_config
from orchestrator.engine.driver import run_experiment
from orchestrator.engine.executor import ensure_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=int, default=1,
                        help="CPUs (threads) of each Train worker; the bare loop gets the same number of threads")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus_per_worker)  # like for like: the bare loop and in-process runs too
    overrides = [f"training.epochs={args.epochs}", "scenario.num_steps=1", "scenario.initial_classes=20",
                 "methods=[{name: independent}]", f"resources.num_workers={args.workers}",
                 f"resources.cpus_per_worker={args.cpus_per_worker}"]
    cfg = load_config(None, overrides)
    bare = bare_loop(cfg, embed_test=False)
    bare_rate = bare["trained_images"] / bare["train_seconds"]
    if args.workers:
        ensure_ray()
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        run_experiment(cfg, progress=False, echo=lambda s: None)
        entry = runfiles.manifest_entry(f"{tmp}/{cfg.name}", "independent", 0)
    ours = entry["trained_images_per_worker"] * entry["world_size"] / entry["train_seconds"]
    print(f"bare loop:    {bare_rate:8.0f} images/s")
    print(f"orchestrator: {ours:8.0f} images/s ({args.workers or 'in-process'} worker(s))")
    print(f"ratio orchestrator / bare: {ours / bare_rate:.2f}  (target >= 0.9)")


if __name__ == "__main__":
    main()

"""Session overhead: the quickstart scenario with 8 small steps, three ways in one run.

1. a bare PyTorch loop doing the same training in one process (the baseline);
2. the orchestrator with a fresh Ray Train worker group per step (``resources.group_steps: false``);
3. the orchestrator with consecutive steps grouped into one worker group (the default);
plus, for information, the orchestrator in-process (``resources.num_workers: 0``).
Then the quickstart itself (two methods, three steps each (24, 8, 8 epochs), one worker group for all six)
against the bare loop run once per method.

Prints the overhead per step, (orchestrated - bare) / steps, and its share of the orchestrated time.
Targets with grouping on 2 CPU cores: <= 2 s per step and <= 10 % of the total quickstart time.
The local Ray cluster is started before the clock runs (a cluster is up already in real use).

    python bench/overhead.py [--epochs 2] [--skip-quickstart]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import bare_loop

from orchestrator import load_config
from orchestrator.engine.driver import run_experiment
from orchestrator.engine.executor import ensure_ray

SCENARIO = ["scenario.initial_classes=6", "scenario.increment=2", "scenario.num_steps=8", "methods=[{name: independent}]"]


def orchestrated(overrides: list[str]) -> float:
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        started = time.time()
        run_experiment(cfg, progress=False, echo=lambda s: None)
        return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--skip-quickstart", action="store_true", help="only the 8-step comparison")
    parser.add_argument("--cpus-per-worker", type=int, default=1,
                        help="CPUs (threads) of the Train worker; the bare loop gets the same number of threads")
    args = parser.parse_args()
    torch.set_num_threads(args.cpus_per_worker)  # like for like: the bare loop and in-process runs too
    common = [f"training.epochs={args.epochs}", "training.incremental={}", f"resources.cpus_per_worker={args.cpus_per_worker}"]
    ensure_ray()  # a cluster is already up in real use; its start-up is not per-step overhead
    bare = bare_loop(load_config(None, SCENARIO + common))["seconds"]
    rows = [
        ("grouped worker group (default)", orchestrated(SCENARIO + common + ["resources.num_workers=1", "resources.group_steps=true"])),
        ("fresh worker group per step", orchestrated(SCENARIO + common + ["resources.num_workers=1", "resources.group_steps=false"])),
        ("in-process (num_workers: 0)", orchestrated(SCENARIO + common + ["resources.num_workers=0"])),
    ]
    steps = 8
    print(f"bare PyTorch loop: {bare:.1f} s for {steps} steps")
    print(f"{'orchestrator':34s} {'total s':>8s} {'overhead s/step':>16s} {'overhead share':>15s}")
    for name, seconds in rows:
        print_row(name, seconds, bare, steps)
    print(f"grouping speed-up over a fresh group per step: {rows[1][1] / rows[0][1]:.2f}x")
    if not args.skip_quickstart:
        # like for like: the bare loop trains every version of both methods, so the orchestrator does too
        same_work = [f"resources.cpus_per_worker={args.cpus_per_worker}", "resources.share_first_version=false"]
        quickstart = load_config(None, same_work)
        bare = len(quickstart.methods) * bare_loop(quickstart)["seconds"]
        seconds = orchestrated(same_work)
        steps = len(quickstart.methods) * quickstart.scenario.num_steps
        print(f"\nquickstart ({steps} steps): bare PyTorch loop {bare:.1f} s (once per method)")
        print_row("quickstart, one worker group", seconds, bare, steps)


def print_row(name: str, seconds: float, bare: float, steps: int) -> None:
    over = (seconds - bare) / steps
    print(f"{name:34s} {seconds:8.1f} {over:16.2f} {100 * (seconds - bare) / seconds:14.1f}%")


if __name__ == "__main__":
    main()

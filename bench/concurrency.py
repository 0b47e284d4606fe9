"""Independent chains at once: the same experiments with their worker groups concurrent and one after another.

1. Two independent chains (``independent`` twice, version 0 not shared), one 1-CPU Train worker each,
   every step trained as long as the quickstart trains it (24 epochs): wall time with the executor's
   default (as many worker groups as the cluster holds) against ``max_groups=1`` (one group trains
   every task in turn, as the engine did before task graphs). Ideal ratio 0.5 on a 2-core machine;
   target <= 0.65. Shorter steps (``--epochs 6``) leave the fixed costs (each concurrent group's
   start-up, ~10-15 s here) a larger share.
2. The quickstart (``independent`` and ``bct``, version 0 shared) both ways: concurrent must not be
   slower than one group for everything.

The local Ray cluster is started before the clock runs (a cluster is up already in real use).

    python bench/concurrency.py [--epochs 24] [--skip-quickstart]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator import load_config  # noqa: E402
from orchestrator.engine.driver import run_experiment  # noqa: E402
from orchestrator.engine.executor import ensure_ray  # noqa: E402

TWO_CHAINS = ["methods=[{name: independent, label: chain-a}, {name: independent, label: chain-b}]",
              "resources.share_first_version=false", "resources.num_workers=1", "resources.cpus_per_worker=1"]


def timed(overrides: list[str], max_groups) -> float:
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        started = time.time()
        run_experiment(cfg, progress=False, echo=lambda s: None, max_groups=max_groups)
        return time.time() - started


def compare(name: str, overrides: list[str]) -> float:
    serial = timed(overrides, max_groups=1)
    concurrent = timed(overrides, max_groups=None)
    ratio = concurrent / serial
    print(f"{name:40s} one after another {serial:7.1f} s   concurrent {concurrent:7.1f} s   ratio {ratio:.2f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24,
                        help="epochs of every step of the two-chain experiment (the quickstart's: 24)")
    parser.add_argument("--skip-quickstart", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_ray()
    import ray

    print(f"cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    ratio = compare("2 independent chains, 1 CPU each", [*TWO_CHAINS, f"training.epochs={args.epochs}",
                                                         "training.incremental={}"])
    print(f"  target <= 0.65 (ideal 0.5): {'met' if ratio <= 0.65 else 'NOT met'}")
    if not args.skip_quickstart:
        ratio = compare("quickstart (version 0 shared)", [])
        print(f"  concurrent not slower than one group for all: {'met' if ratio <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()

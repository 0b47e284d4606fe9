"""Benchmark: a whole backfill curve against one full evaluation of the same gallery.

    python bench/backfill.py [--n 100000 --queries 1000 --d 64 --classes 1000 --repeat 1]

One upgrade of a service whose gallery holds N items embedded by version 0 (synthetic clustered vectors;
version 1 moves every class centre part of the way to a new one). The curve: 11 budgets (0, 10, ...,
100 % of the gallery) for 4 policies (random, oldest, uncertainty, class-balanced), with both references
and the negative-flip rate, as `service:` computes it (orchestrator/evaluation/mixed_gallery.py: the
step before the upgrade ranked too). One full evaluation: version 1's queries ranked against the whole
gallery once, by the exact per_query_scores. Both in this run, so the ratio is what to read; CPU seconds
(all threads) are printed next to wall seconds because a shared machine inflates wall time unevenly.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator.config import ServiceConfig  # noqa: E402
from orchestrator.evaluation import per_query_scores  # noqa: E402
from orchestrator.evaluation.mixed_gallery import StoredVersions, service_results  # noqa: E402


def two_versions(n: int, queries: int, d: int, classes: int, seed: int = 0) -> StoredVersions:
    """Query-gallery data embedded by two versions; version 1's class centres are 60 % new."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    moved = 0.8 * centres + 0.6 * rng.standard_normal((classes, d)).astype(np.float32)
    gallery_labels, query_labels = rng.integers(0, classes, n), rng.integers(0, classes, queries)

    def embed(labels: np.ndarray, centre: np.ndarray) -> np.ndarray:
        return centre[labels] + 0.8 * rng.standard_normal((len(labels), d)).astype(np.float32)

    return StoredVersions([embed(query_labels, centres), embed(query_labels, moved)],
                          [embed(gallery_labels, centres), embed(gallery_labels, moved)],
                          query_labels, gallery_labels, leave_one_out=False)


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=1, help="best of this many runs of each side")
    args = parser.parse_args()
    versions = two_versions(args.n, args.queries, args.d, args.classes)
    service = ServiceConfig(budgets=[float(b) for b in range(0, 101, 10)],
                            policies=["random", "oldest", "uncertainty", "class-balanced"])
    first_step = np.zeros(args.n, dtype=np.int64)  # the whole gallery is there before the upgrade

    def one_evaluation():
        return per_query_scores(versions.queries[1], versions.query_labels, versions.gallery[0],
                                versions.gallery_labels, leave_one_out=False)

    def curve():
        return service_results(versions, first_step, 2, service, seed=0)

    single = min((timed(one_evaluation) for _ in range(args.repeat)), key=lambda t: t[0][0])
    whole = min((timed(curve) for _ in range(args.repeat)), key=lambda t: t[0][0])
    (single_wall, single_cpu), scores = single
    (curve_wall, curve_cpu), out = whole
    points = sum(len(c["points"]) for c in out["policies"].values())
    print(f"gallery {args.n} items, {args.queries} queries, d={args.d}, {args.classes} classes")
    print(f"one full evaluation (per_query_scores, mAP {np.nanmean(scores['ap']):.3f}): "
          f"{single_wall:.2f} s wall, {single_cpu:.2f} s CPU")
    print(f"backfill curve: {len(out['policies'])} policies x {points // len(out['policies'])} budgets + 2 references "
          f"({out['rankings']} galleries ranked over both steps): {curve_wall:.2f} s wall, {curve_cpu:.2f} s CPU")
    print(f"ratio curve / one evaluation: {curve_wall / single_wall:.2f}x wall, {curve_cpu / single_cpu:.2f}x CPU")
    for policy, entry in out["policies"].items():
        print(f"  {policy:15s} mAP by budget: " + " ".join(f"{p['mean']['map']:.3f}" for p in entry["points"])
              + f"   area {entry['area']['map']:.3f}")


if __name__ == "__main__":
    main()

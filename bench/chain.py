"""A long chain: what one more version costs the evaluation when T grows.

Synthetic stored vectors (no training): ``--versions`` versions, each with a query set and a gallery
set in the embedding store, as a run's workers leave them. Every row is computed in order with the
function a row task runs (orchestrator/engine/driver.py ``ensure_row`` -> ``compatibility_row``): row t
reads the store, ranks its t + 1 cells and takes its negative flips from the earlier rows' stored
top-1 correctness; no earlier row is recomputed. Prints the seconds of the rows asked for (``--rows``),
per row and per cell: row t has t + 1 cells, so the row's cost grows with t by construction; what stays
flat is the cost per cell (and the query-side work, done once per row).

    python bench/chain.py [--versions 50] [--gallery 100000] [--queries 200] [--dim 64] [--rows 10,25,50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator.config import EvaluationConfig  # noqa: E402
from orchestrator.config.experiment import EvalSetConfig, SearchConfig  # noqa: E402
from orchestrator.evaluation import compatibility_row  # noqa: E402
from orchestrator.evaluation.flips import TOP1_CORRECT, unpack_correct  # noqa: E402
from orchestrator.storage.store import EmbeddingStore  # noqa: E402


def write_chain(store: EmbeddingStore, versions: int, gallery: int, queries: int, dim: int, classes: int) -> None:
    """Each version's vectors: shared class centres plus noise of its own (the versions drift apart)."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    sides = {"gallery": rng.integers(0, classes, gallery), "query": rng.integers(0, classes, queries)}
    for version in range(versions):
        noise = np.random.default_rng(version + 1)
        for eval_set, labels in sides.items():
            vectors = centres[labels] + 0.8 * noise.standard_normal((len(labels), dim), dtype=np.float32)
            store.write("chain", version, eval_set, vectors, labels, np.arange(len(labels)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=50)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rows", default="10,25,50", help="1-based rows to report (row 50 = version 49)")
    parser.add_argument("--engine", choices=("auto", "exact", "faiss"), default="auto",
                        help="evaluation.search.engine (auto: faiss above 50k gallery items)")
    args = parser.parse_args()
    report = sorted({int(r) for r in args.rows.split(",")})
    if report[0] < 1 or report[-1] > args.versions:
        parser.error(f"--rows must lie in 1..{args.versions}")
    eval_cfg = EvaluationConfig(protocol="query-gallery", sets={"query": EvalSetConfig(), "gallery": EvalSetConfig()},
                                query="query", gallery="gallery", search=SearchConfig(engine=args.engine))
    print(f"{args.versions} versions, gallery {args.gallery} x {args.dim}, {args.queries} queries, "
          f"{args.classes} classes, engine {args.engine}")
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(tmp)
        started = time.perf_counter()
        write_chain(store, args.versions, args.gallery, args.queries, args.dim, args.classes)
        print(f"store written in {time.perf_counter() - started:.1f} s")
        top1, seconds, cpu = [], [], []
        for version in range(args.versions):
            started, cpu_started = time.perf_counter(), time.process_time()
            row = compatibility_row(store, "chain", version, eval_cfg, earlier_top1=top1)
            seconds.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)  # every thread's: what load does not inflate
            top1.append(unpack_correct(row[TOP1_CORRECT]))
    print(f"{'row':>4} {'cells':>5} {'wall s/row':>10} {'wall ms/cell':>12} {'CPU s/row':>10} {'CPU ms/cell':>12}")
    for r in report:
        print(f"{r:>4} {r:>5} {seconds[r - 1]:>10.2f} {1000 * seconds[r - 1] / r:>12.1f} "
              f"{cpu[r - 1]:>10.2f} {1000 * cpu[r - 1] / r:>12.1f}")
    first, last = report[0], report[-1]
    print(f"per-cell cost, row {last} / row {first}: wall {seconds[last - 1] / last / (seconds[first - 1] / first):.2f}x, "
          f"CPU {cpu[last - 1] / last / (cpu[first - 1] / first):.2f}x; whole chain {sum(seconds):.1f} s wall, "
          f"{sum(cpu):.1f} s CPU for {args.versions * (args.versions + 1) // 2} cells")


if __name__ == "__main__":
    main()

"""Benchmark top-k retrieval on a large gallery: exact faiss search vs the numpy engine, and approximate indexes.

    python bench/search.py [--n 1000000 --queries 10000 --d 128 --classes 20000 --k 100
                            --numpy-queries 200 --hnsw-n 100000]

On the same clustered data (class centres plus noise; queries drawn from the same classes):

1. **faiss exact** — the project's top-k engine (orchestrator/evaluation/search.py): faiss flat
   inner-product search, every candidate re-scored exactly, lists certified (or ranked in numpy), then
   CMC top-1/5/k, mAP@k and MAP@R. All queries.
2. **numpy engine** — the project's full-ranking engine (``per_query_scores``, as ``engine: exact`` runs it
   for a cell: every relevant item's rank, hence CMC and AP) on ``--numpy-queries`` queries and on half of
   them; the difference gives its cost per query, the rest its fixed cost (the gallery's exact copy), and
   both are extrapolated to all queries. The numpy top-k lists
   (``exact_topk``) of the same queries are compared with faiss's: they must be identical (ties go to the
   lower gallery index on both sides), and so must the first relevant ranks within the depth.
3. **approximate indexes** at the shipped default parameters (nprobe / efSearch tuned at build time for
   recall@k 0.9 on the gallery's own vectors; build time includes the tuning): build time, search time
   and recall@k of each query's list against the exact list (|ANN top-k ∩ exact top-k| / k), plus their
   CMC top-1.
   HNSW's build is single-threaded (reproducible) and slow on two cores, so it runs on the first
   ``--hnsw-n`` gallery items (printed as such).

CPU seconds (all threads) are printed beside wall seconds: on a machine shared with other jobs they show
the work done, which contention does not inflate. Peak memory of each stage is the process's peak resident set above what it held when the stage began
(Linux's VmHWM, reset per stage), printed beside the size of a query x gallery float64 matrix, which no
stage may come near.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from orchestrator.config import SearchIndexConfig  # noqa: E402
from orchestrator.evaluation import metrics, per_query_scores, search  # noqa: E402
from orchestrator.evaluation.retrieval import truncate_and_normalize  # noqa: E402

GB = 1024 ** 3


def clustered(n: int, queries: int, d: int, classes: int, noise: float, seed: int = 0):
    """Gallery and queries around shared class centres, generated in chunks (float32 throughout)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    labels = rng.permutation(np.arange(n) % classes)
    gallery = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 1 << 16):
        stop = min(start + (1 << 16), n)
        gallery[start:stop] = centres[labels[start:stop]] + noise * rng.standard_normal((stop - start, d), dtype=np.float32)
    query_labels = rng.integers(0, classes, queries)
    query = centres[query_labels] + noise * rng.standard_normal((queries, d), dtype=np.float32)
    return gallery, labels.astype(np.int64), query, query_labels.astype(np.int64)


class Stage:
    """Wall seconds and peak resident memory above the stage's start (VmHWM, reset at the start)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.base = _status("VmRSS")
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self.cpu = time.process_time() - self.cpu_started
        self.peak = max(0, _status("VmHWM") - self.base)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def recall_against(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approximate top-k ∩ exact top-k| / k."""
    hits = [np.intersect1d(a[:k][a[:k] >= 0], e[:k]).size for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / k


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery items")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--classes", type=int, default=20_000, help="gallery items per class: n / classes")
    parser.add_argument("--noise", type=float, default=2.0, help="within-class noise (higher = harder)")
    parser.add_argument("--k", type=int, default=100, help="list depth (mAP@k, recall@k)")
    parser.add_argument("--numpy-queries", type=int, default=200, help="queries the numpy engine runs on")
    parser.add_argument("--hnsw-n", type=int, default=100_000, help="gallery items HNSW is built on")
    args = parser.parse_args()
    gallery, labels, query, query_labels = clustered(args.n, args.queries, args.d, args.classes, args.noise)
    qxn = args.queries * args.n * 8 / GB
    print(f"gallery {args.n:,} x {args.d}, {args.queries:,} queries, {args.classes:,} classes, top-{args.k}; "
          f"a query x gallery float64 matrix would take {qxn:.1f} GiB")

    with Stage() as faiss_stage:  # what a matrix cell does: normalise, search, certify, score
        unit_q, unit_g = truncate_and_normalize(query, gallery)
        relevant = search.relevant_counts(query_labels, labels, leave_one_out=False)
        depth = search.search_depth(relevant, args.k)
        ranked, fallback = search.faiss_topk(unit_q, unit_g, depth)
        scores = search.list_scores(ranked, query_labels, labels, relevant, args.k)
    summary = search.summarize(scores, args.k)
    print(f"faiss exact  {faiss_stage.seconds:8.1f} s wall {faiss_stage.cpu:8.1f} s CPU   peak +{faiss_stage.peak / GB:.2f} GiB   "
          f"(all {args.queries:,} queries, depth {depth}, {fallback} ranked by numpy after an uncertain list end)")
    print("             " + ", ".join(f"{name} {value:.4f}" for name, value in summary.items()))

    subset = np.random.default_rng(1).choice(args.queries, size=min(args.numpy_queries, args.queries), replace=False)
    half = subset[:len(subset) // 2]
    with Stage() as numpy_half:
        per_query_scores(query[half], query_labels[half], gallery, labels, leave_one_out=False)
    with Stage() as numpy_stage:
        full = per_query_scores(query[subset], query_labels[subset], gallery, labels, leave_one_out=False)
    extra = len(subset) - len(half)

    def extrapolated(whole: float, part: float) -> tuple[float, float, float]:
        per_query = max(whole - part, 0.0) / extra
        fixed = max(whole - per_query * len(subset), 0.0)
        return fixed + per_query * args.queries, fixed, per_query

    numpy_total, fixed, per_query = extrapolated(numpy_stage.seconds, numpy_half.seconds)
    numpy_cpu = extrapolated(numpy_stage.cpu, numpy_half.cpu)[0]
    print(f"numpy engine {numpy_total:8.1f} s wall {numpy_cpu:8.1f} s CPU   peak +{numpy_stage.peak / GB:.2f} GiB   "
          f"(full ranking with every relevant rank: measured on {len(half)} and {len(subset)} queries "
          f"({numpy_half.seconds:.1f} s, {numpy_stage.seconds:.1f} s), extrapolated to {args.queries:,}: "
          f"{fixed:.1f} s once + {per_query * 1e3:.1f} ms per query)")
    print(f"ratio        numpy / faiss = {numpy_total / faiss_stage.seconds:.1f}x wall, "
          f"{numpy_cpu / faiss_stage.cpu:.1f}x CPU (same run, same data)")

    with Stage() as topk_stage:
        numpy_lists = search.exact_topk(unit_q[subset], unit_g, depth)
    same_lists = np.array_equal(numpy_lists, ranked[subset])
    within = full["first_rank"] <= depth
    same_ranks = np.array_equal(full["first_rank"][within], scores["first_rank"][subset][within])
    beyond_ok = bool(np.isinf(scores["first_rank"][subset][~within & ~np.isnan(full["first_rank"])]).all())
    agree = same_lists and same_ranks and beyond_ok
    print(f"agreement    top-{depth} lists identical to numpy's exact_topk on {len(subset)} queries: {same_lists}; "
          f"first relevant ranks identical: {same_ranks and beyond_ok} -> {'OK' if agree else 'MISMATCH'} "
          f"(numpy top-k: {topk_stage.seconds:.1f} s, peak +{topk_stage.peak / GB:.2f} GiB)")

    exact_k = ranked[:, :args.k]
    for kind in ("ivf-flat", "ivf-pq", "hnsw"):
        cfg = SearchIndexConfig(type=kind)
        size = min(args.n, args.hnsw_n) if kind == "hnsw" else args.n
        if size == args.n:
            truth, part_labels, part = exact_k, labels, unit_g
        else:
            part, part_labels = unit_g[:size], labels[:size]
            truth = search.faiss_topk(unit_q, part, args.k)[0]
        with Stage() as build:
            index = search.build_index(part, cfg, depth=args.k)  # tunes nprobe / efSearch for target_recall
        with Stage() as probe:
            lists = search.index_topk(index, unit_q, args.k, cfg)
        found = search.list_scores(lists, query_labels, part_labels,
                                   search.relevant_counts(query_labels, part_labels, leave_one_out=False), args.k)
        tuned = index.hnsw.efSearch if kind == "hnsw" else faiss.extract_index_ivf(index).nprobe
        params = {"ivf-flat": f"nlist √N, nprobe {tuned}", "ivf-pq": f"nlist √N, nprobe {tuned}, "
                  f"PQ {cfg.pq_m}x{cfg.pq_bits}", "hnsw": f"M {cfg.hnsw_m}, efC {cfg.ef_construction}, efS {tuned}"}
        print(f"{kind:9}    recall@{args.k} {recall_against(lists, truth, args.k):.4f}   CMC top-1 "
              f"{metrics.recall_at_k(found['first_rank'], 1):.4f}   build {build.seconds:.1f} s, search "
              f"{probe.seconds:.1f} s, peak +{max(build.peak, probe.peak) / GB:.2f} GiB   ({params[kind]}"
              f"{'' if size == args.n else f'; on the first {size:,} gallery items'})")
        del index
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())

"""Top-k retrieval through faiss: exact search for large galleries, approximate indexes built once.

**Exact top-k.** faiss's flat inner-product search (float32 BLAS; on a GPU when the process has one)
proposes each query's candidates, a few more than the depth asked for. Every candidate is then scored
exactly as the full-ranking engine scores it (the unit vectors rounded to the 2^-26 grid of
:func:`~orchestrator.evaluation.retrieval.ranking_vectors`, an exact float64 inner product) and the list
is ordered by that score, ties to the lower gallery index. A float32 inner product of two unit vectors is
within :func:`float32_error_bound` of the exact one, so a query's list is certain when its last exact
score beats the last proposed float32 score by more than that bound: no item faiss did not propose can
reach the list. A query without that margin (a tie or near-tie at the list's end) is ranked exactly in
numpy instead (:func:`exact_topk`). The lists therefore equal the full ranking's first k items, and
CMC@k and mAP@k computed from them equal the full-ranking engine's.

**Approximate indexes** (IVF-Flat, IVF-PQ, HNSW; ``evaluation.search.index``): built once from a gallery
version's vectors, stored in the run (:class:`GalleryIndexes`) and never rebuilt; every later version's
queries search it, as a retrieval service that does not backfill does. Its lists are the index's own
(ties in its scores to the lower gallery index), so its metrics show what the index loses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from orchestrator.config import SearchConfig, SearchIndexConfig
from orchestrator.errors import ConfigError, DataError
from orchestrator.evaluation import metrics
from orchestrator.evaluation.retrieval import _BLOCK_ELEMENTS, _GRID_BITS, _normalized, _on_grid, truncate_and_normalize

if TYPE_CHECKING:
    from orchestrator.storage.run_storage import RunStorage
    from orchestrator.storage.store import EmbeddingTable

INDEX_KEY = "evaluation.search.index"
# k-means of the IVF cells samples at most this many gallery items per cell (faiss's default, 256, makes
# training a 1M gallery's 1,000 cells take minutes on two cores; faiss warns below 39)
_TRAIN_PER_CELL = 64
INDEX_PREFIX = "index_"  # row metrics through the approximate index: index_cmc1, index_map100, ...


def _faiss():
    import faiss  # imported where used: only large galleries and indexes need it

    return faiss


def engine_for(search: SearchConfig, gallery_size: int) -> str:
    """``exact`` (full ranking) or ``faiss`` (top-k) for a gallery of ``gallery_size`` items."""
    if search.engine == "auto":
        return "faiss" if gallery_size > search.exact_max_gallery else "exact"
    return search.engine


def metric_names(k: int) -> tuple[str, ...]:
    """The row metrics of a top-k search of depth ``k``: CMC top-1, top-5 and top-k (= Recall@K), mAP@k, MAP@R."""
    return ("cmc1", "cmc5", f"cmc{k}", f"map{k}", "mapR")


def float32_error_bound(dim: int) -> float:
    """A bound on |float32 inner product of two float32 unit vectors - the exact inner product of their grid
    roundings|, with a factor 2 to spare: the float32 sum of d products errs by at most d·2^-24 (times the
    product of the norms, ~1), and rounding each coordinate to the 2^-26 grid moves the product by at most
    2·√d·2^-27."""
    return 2.0 * ((dim + 2) * 2.0 ** -24 + math.sqrt(dim) * 2.0 ** -_GRID_BITS)


def _margin(depth: int) -> int:
    """Extra candidates asked of faiss, so that a list's end rarely lies within the float32 error."""
    return 16 + depth // 8


def exact_topk(query: np.ndarray, gallery: np.ndarray, depth: int, *, own: Optional[np.ndarray] = None,
               gallery_grid: Optional[np.ndarray] = None) -> np.ndarray:
    """The numpy engine's top ``depth`` gallery indices per query, best first: exact grid scores (as the
    full ranking's), ties to the lower gallery index; -1 past the last rankable item.

    ``query``/``gallery`` are float32 unit vectors of one width (:func:`truncate_and_normalize`'s); ``own[q]``
    is an item left out of query q's list (leave-one-out). Rows are blocked so a block of exact scores
    stays ~32 MiB whatever the gallery size; ``gallery_grid`` (the gallery on the grid) is computed here
    when not given.
    """
    n = len(gallery)
    grid = _on_grid(gallery) if gallery_grid is None else gallery_grid
    keep = min(depth, n - (own is not None))
    out = np.full((len(query), depth), -1, dtype=np.int64)
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, len(query), rows):
        stop = min(start + rows, len(query))
        sims = _on_grid(query[start:stop]) @ grid.T  # exact: see ranking_vectors
        if own is not None:
            sims[np.arange(stop - start), own[start:stop]] = -np.inf
        threshold = np.partition(sims, n - keep, axis=1)[:, n - keep]  # each row's keep-th best score
        row, col = np.nonzero(sims >= threshold[:, None])
        order = np.lexsort((col, -sims[row, col], row))
        row, col = row[order], col[order]
        position = np.arange(len(row)) - np.searchsorted(row, row)
        first = position < keep
        out[start + row[first], position[first]] = col[first]
    return out


def faiss_topk(query: np.ndarray, gallery: np.ndarray, depth: int, *, own: Optional[np.ndarray] = None
               ) -> tuple[np.ndarray, int]:
    """:func:`exact_topk`'s lists, found with faiss's flat search and certified (see the module docstring);
    also the number of queries that had to be ranked by :func:`exact_topk` instead.

    Memory: the index's float32 copy of the gallery and blocks of candidates, never a query x gallery matrix.
    """
    faiss = _faiss()
    n, dim = gallery.shape
    excluded = 0 if own is None else 1
    keep = min(depth, n - excluded)
    want = min(n, keep + excluded + _margin(keep))
    index = faiss.IndexFlatIP(dim)
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    index = _on_gpu(index)
    bound = float32_error_bound(dim)
    out = np.full((len(query), depth), -1, dtype=np.int64)
    uncertain: list[np.ndarray] = []
    chunk = max(1, (1 << 24) // want)  # queries per faiss call: bounds the (chunk, want) result arrays
    for start in range(0, len(query), chunk):
        stop = min(start + chunk, len(query))
        proposed, candidates = index.search(np.ascontiguousarray(query[start:stop]), want)
        step = max(1, _BLOCK_ELEMENTS // (want * dim))  # re-scored candidates per block: (step, want, dim) float64
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            cand = candidates[lo - start:hi - start]
            exact = np.einsum("qd,qkd->qk", _on_grid(query[lo:hi]), _on_grid(gallery[np.maximum(cand, 0)]))
            exact[cand < 0] = -np.inf
            if own is not None:
                exact[cand == own[lo:hi, None]] = -np.inf
            order = np.lexsort((cand, -exact))  # per row: exact score descending, then gallery index
            ranked = np.take_along_axis(cand, order, axis=1)[:, :keep]
            last = np.take_along_axis(exact, order, axis=1)[:, keep - 1]
            certain = np.full(hi - lo, want == n) | (last > proposed[lo - start:hi - start, -1].astype(np.float64) + bound)
            out[lo:hi, :keep] = ranked
            uncertain.append(lo + np.flatnonzero(~certain))
    redo = np.concatenate(uncertain) if uncertain else np.zeros(0, dtype=np.int64)
    if redo.size:
        out[redo] = exact_topk(query[redo], gallery, depth, own=None if own is None else own[redo])
    return out, int(redo.size)


def _on_gpu(index):
    """``index`` on every GPU this process sees (a faiss build with GPU support), else itself. faiss's GPU
    flat index computes in float32 as on the CPU, so the certificate's bound holds there too."""
    faiss = _faiss()
    if hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray, *, leave_one_out: bool) -> np.ndarray:
    """R per query: the gallery items of its label (its own item excluded with leave-one-out)."""
    classes, counts = np.unique(gallery_labels, return_counts=True)
    position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
    found = np.where(classes[position] == query_labels, counts[position], 0)
    return found - (1 if leave_one_out else 0)


def list_scores(ranked: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray, num_relevant: np.ndarray,
                k: int) -> dict[str, np.ndarray]:
    """Per query, from its ranked list (gallery indices, best first, -1 for none): ``first_rank`` (inf when
    no relevant item is listed, NaN when the query has none), ``ap_k`` (AP truncated at k) and ``ap_r``
    (AP truncated at R, i.e. MAP@R's term). The list must be at least max(k, R) deep for ``ap_r``."""
    relevant = (ranked >= 0) & (gallery_labels[np.maximum(ranked, 0)] == query_labels[:, None])
    rows, positions = np.nonzero(relevant)
    listed = np.bincount(rows, minlength=len(ranked))
    ranks = positions + 1.0
    first_rank = np.full(len(ranked), np.inf)
    found = listed > 0
    first_rank[found] = ranks[(np.cumsum(listed) - listed)[found]]
    first_rank[num_relevant <= 0] = np.nan
    return {"first_rank": first_rank,
            "ap_k": metrics.truncated_average_precision(ranks, listed, num_relevant, k),
            "ap_r": metrics.truncated_average_precision(ranks, listed, num_relevant, num_relevant)}


def summarize(scores: dict[str, np.ndarray], k: int, prefix: str = "") -> dict[str, float]:
    """Row metrics (see :func:`metric_names`) averaged over the queries that have a relevant item."""
    first_rank = scores["first_rank"]
    if np.isnan(first_rank).all():
        raise DataError("no query has a relevant gallery item (queries and gallery share no label)")
    cmc1, cmc5, cmck, map_k, map_r = (prefix + name for name in metric_names(k))
    return {cmc1: metrics.recall_at_k(first_rank, 1), cmc5: metrics.recall_at_k(first_rank, 5),
            cmck: metrics.recall_at_k(first_rank, k), map_k: float(np.nanmean(scores["ap_k"])),
            map_r: float(np.nanmean(scores["ap_r"]))}


def search_depth(num_relevant: np.ndarray, k: int) -> int:
    """How deep each list goes: k, or the largest R where it is deeper (MAP@R reads the top R)."""
    return max(k, int(num_relevant.max(initial=0)))


def search_scores(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray,
                  *, leave_one_out: bool, k: int) -> dict[str, np.ndarray]:
    """:func:`list_scores` of exact faiss top-k lists (``fallback``: queries ranked by numpy instead)."""
    query_labels, gallery_labels = _labels(query, query_labels, gallery, gallery_labels, leave_one_out)
    query, gallery = truncate_and_normalize(query, gallery)
    num_relevant = relevant_counts(query_labels, gallery_labels, leave_one_out=leave_one_out)
    own = np.arange(len(query)) if leave_one_out else None
    ranked, fallback = faiss_topk(query, gallery, search_depth(num_relevant, k), own=own)
    scores = list_scores(ranked, query_labels, gallery_labels, num_relevant, k)
    scores["fallback"] = np.array(fallback)
    return scores


def _labels(query, query_labels, gallery, gallery_labels, leave_one_out) -> tuple[np.ndarray, np.ndarray]:
    from orchestrator.evaluation.retrieval import _check_sides

    query_labels = np.asarray(query_labels, dtype=np.int64)
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    _check_sides(query, query_labels, gallery, gallery_labels)
    if leave_one_out and not np.array_equal(query_labels, gallery_labels):
        raise DataError("leave-one-out needs the same samples, in the same order, as queries and gallery")
    return query_labels, gallery_labels


# -- approximate indexes ------------------------------------------------------------------------------

def build_index(gallery: np.ndarray, cfg: SearchIndexConfig, key: str = INDEX_KEY, depth: int = 100):
    """An approximate inner-product index of ``gallery`` (float32 unit vectors), trained on them and holding
    them, its search parameter (nprobe, efSearch) set, or tuned for lists of ``depth`` when the config
    leaves it None (:func:`tune_search`). A gallery the index cannot hold is a ConfigError naming the
    key. HNSW is built on one thread: a multi-threaded build inserts in a racy order, and the same run
    must give the same index."""
    index = _trained_index(gallery, cfg, key)
    if _search_parameter(cfg) is None:
        tune_search(index, gallery, cfg, depth)
    else:
        _set_search_parameter(index, cfg.type, _search_parameter(cfg))
    return index


def _search_parameter(cfg: SearchIndexConfig) -> Optional[int]:
    return cfg.ef_search if cfg.type == "hnsw" else cfg.nprobe


def _set_search_parameter(index, kind: str, value: int) -> None:
    """nprobe (IVF) or efSearch (HNSW): stored with the index when it is serialised."""
    if kind == "hnsw":
        index.hnsw.efSearch = value
    else:
        ivf = _faiss().extract_index_ivf(index)
        ivf.nprobe = min(value, ivf.nlist)


def search_candidates(index, kind: str, depth: int) -> list[int]:
    """The values :func:`tune_search` tries, cheapest first: nprobe 1, 2, 4, ... up to every cell; efSearch
    depth, 2·depth, ... up to the gallery size."""
    if kind == "hnsw":
        top = max(depth, index.ntotal)
        values = [depth]
    else:
        top = _faiss().extract_index_ivf(index).nlist
        values = [1]
    while values[-1] < top:
        values.append(min(2 * values[-1], top))
    return values


def list_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / |exact|: the share of each exact list an index's list holds
    (-1 entries, past a short list, never match)."""
    found, exact = np.asarray(found), np.asarray(exact)
    chunk = max(1, (1 << 24) // max(1, found.shape[1] * exact.shape[1]))  # a block of pairwise comparisons
    held = np.concatenate([
        ((f[:, :, None] == e[:, None, :]) & (e[:, None, :] >= 0)).any(axis=2).sum(axis=1)  # a list has no repeats
        for f, e in ((found[i:i + chunk], exact[i:i + chunk]) for i in range(0, len(found), chunk))])
    return float(np.mean(held / np.maximum(1, (exact >= 0).sum(axis=1))))


TUNING_QUERIES = 1000  # gallery vectors, seeded, that search parameters are tuned on
TUNING_PLATEAU = 0.005  # a doubling that raises recall by less ends the tuning (PQ codes bound the recall)


def tune_search(index, gallery: np.ndarray, cfg: SearchIndexConfig, depth: int) -> tuple[int, float]:
    """Set the index's search parameter to the cheapest of :func:`search_candidates` whose top-``depth``
    lists reach ``cfg.target_recall`` (:func:`list_recall` against faiss's exact lists) for a seeded
    sample of the gallery's own vectors as queries; if none does, the value after which doubling raises
    the recall by less than :data:`TUNING_PLATEAU` (or the last: every cell, or a list as long as the
    gallery). Returns the value and its recall. Tuning on the gallery is the usual
    stand-in for the queries to come, which later versions embed."""
    faiss = _faiss()
    n = index.ntotal
    want = min(depth, n)
    sample = gallery[np.sort(np.random.default_rng(0).choice(n, min(TUNING_QUERIES, n), replace=False))]
    _, exact = faiss.knn(sample, gallery, want, metric=faiss.METRIC_INNER_PRODUCT)
    best = None
    for value in search_candidates(index, cfg.type, want):
        _set_search_parameter(index, cfg.type, value)
        recall = list_recall(index.search(sample, want)[1], exact)
        if best is not None and recall - best[1] < TUNING_PLATEAU:  # doubling bought nothing: keep the cheaper
            break
        best = value, recall
        if recall >= cfg.target_recall:
            break
    _set_search_parameter(index, cfg.type, best[0])
    return best


def _trained_index(gallery: np.ndarray, cfg: SearchIndexConfig, key: str):
    faiss = _faiss()
    n, dim = gallery.shape
    cfg.check_dimension(dim, key)
    if cfg.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            index.add(gallery)
        finally:
            faiss.omp_set_num_threads(threads)
        return index
    nlist = cfg.nlist or max(1, round(math.sqrt(n)))
    if nlist > n:
        raise ConfigError(f"{key}.nlist", f"{nlist} cells cannot be trained on a gallery of {n} items; use at most {n}")
    if cfg.type == "ivf-pq" and n < 2 ** cfg.pq_bits:
        raise ConfigError(f"{key}.pq_bits", f"{2 ** cfg.pq_bits} codes per sub-quantizer cannot be trained on a "
                                            f"gallery of {n} items; use at most {int(math.log2(n))} bits")
    codes = "Flat" if cfg.type == "ivf-flat" else f"PQ{cfg.pq_m}x{cfg.pq_bits}"
    index = faiss.index_factory(dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.max_points_per_centroid = _TRAIN_PER_CELL
    index.train(gallery)
    index.add(gallery)
    return index


def index_topk(index, query: np.ndarray, depth: int, cfg: SearchIndexConfig, *,
               own: Optional[np.ndarray] = None) -> np.ndarray:
    """The index's top ``depth`` gallery indices per query (-1 where it finds fewer), ordered by its own
    scores, ties to the lower gallery index; ``own[q]`` left out of query q's list."""
    want = min(index.ntotal, depth + (own is not None))
    if _search_parameter(cfg) is not None:  # else the value the index was tuned to when built
        _set_search_parameter(index, cfg.type, _search_parameter(cfg))
    if cfg.type == "hnsw":
        index.hnsw.efSearch = max(index.hnsw.efSearch, want)
    out = np.full((len(query), depth), -1, dtype=np.int64)
    chunk = max(1, (1 << 24) // want)
    for start in range(0, len(query), chunk):
        stop = min(start + chunk, len(query))
        scores, cand = index.search(np.ascontiguousarray(query[start:stop], dtype=np.float32), want)
        scores = scores.astype(np.float64)
        scores[cand < 0] = -np.inf
        if own is not None:
            scores[cand == own[start:stop, None]] = -np.inf
        order = np.lexsort((cand, -scores))
        ranked = np.take_along_axis(cand, order, axis=1)
        ranked[np.take_along_axis(scores, order, axis=1) == -np.inf] = -1
        width = min(depth, want)
        out[start:stop, :width] = ranked[:, :width]
    return out


def index_scores(index, cfg: SearchIndexConfig, query: np.ndarray, query_labels: np.ndarray,
                 gallery_labels: np.ndarray, *, leave_one_out: bool, k: int) -> dict[str, np.ndarray]:
    """:func:`list_scores` of the index's lists for ``query`` (cut to the index's width and normalised)."""
    if query.shape[1] < index.d:
        raise DataError(f"queries of {query.shape[1]} coordinates cannot search an index of {index.d}-dimensional "
                        "gallery vectors (a newer version must embed at least as wide as the gallery's)")
    query_labels = np.asarray(query_labels, dtype=np.int64)
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    num_relevant = relevant_counts(query_labels, gallery_labels, leave_one_out=leave_one_out)
    own = np.arange(len(query)) if leave_one_out else None
    ranked = index_topk(index, _normalized(query[:, :index.d]), search_depth(num_relevant, k), cfg, own=own)
    return list_scores(ranked, query_labels, gallery_labels, num_relevant, k)


class GalleryIndexes:
    """The approximate index of each gallery version, one artefact in the run each
    (``indexes/<method>/v<version>/<eval set>.faiss``): built and written at first use, read ever after."""

    def __init__(self, run: "RunStorage", cfg: SearchIndexConfig, depth: int):
        self.run, self.cfg, self.depth = run, cfg, depth  # depth: the lists' length a tuned index aims at

    @staticmethod
    def key(method: str, version: int, eval_set: str) -> str:
        from orchestrator.storage.runfiles import index_key

        return index_key(method, version, eval_set)

    def get(self, method: str, version: int, eval_set: str, gallery: "EmbeddingTable"):
        """The index of ``gallery`` (version ``version``'s vectors of ``eval_set``): read, or built once."""
        faiss = _faiss()
        key = self.key(method, version, eval_set)
        if self.run.exists(key):
            try:
                index = faiss.deserialize_index(np.frombuffer(self.run.read_bytes(key), dtype=np.uint8))
            except RuntimeError as exc:
                raise DataError(f"{self.run.location_of(key)} is not a readable faiss index ({str(exc).strip()}); "
                                "delete it and run again with --resume") from None
            if index.ntotal != len(gallery.labels):
                raise DataError(f"{self.run.location_of(key)} indexes {index.ntotal} items but the gallery holds "
                                f"{len(gallery.labels)}; delete it and run again with --resume")
            return index
        index = build_index(_normalized(gallery.embeddings), self.cfg, depth=self.depth)
        self.run.write_bytes(key, faiss.serialize_index(index).tobytes())
        return index

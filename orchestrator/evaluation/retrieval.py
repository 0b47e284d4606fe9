"""Evaluation protocols over embedding arrays and over the embedding store.

Every protocol reduces to one question per query: at which 1-based ranks do its relevant gallery items
appear when the gallery is sorted by cosine similarity (descending, ties broken by the lower gallery
index)? The ranks come from one vectorised, row-blocked engine; the formulas that turn ranks into
scores live in :mod:`orchestrator.evaluation.metrics`.

Similarities are exact (see :func:`ranking_vectors`), so "tie" means equal similarity, not "within
rounding noise": identical gallery vectors always tie, and no result depends on how queries are
blocked or on the BLAS. mAP can instead count tied scores at one shared threshold (``map_ties="shared"``,
as scikit-learn's ``average_precision_score`` does).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal, Optional, Sequence

import numpy as np

from orchestrator.evaluation import metrics
from orchestrator.evaluation.flips import row_flips
from orchestrator.config import EvaluationConfig
from orchestrator.errors import DataError, StoreError

if TYPE_CHECKING:
    from orchestrator.storage.store import EmbeddingStore, EmbeddingTable

# Elements of one similarity block (rows x gallery size). The exact float64 block with its float32 copy
# and that copy sorted takes ~16 bytes per element, so ~64 MiB per worker whatever the gallery size.
_BLOCK_ELEMENTS = 1 << 22
# Below every cosine (which lies in [-1, 1] up to rounding): marks the left-out item in a query's row.
_LEFT_OUT = -2.0
# Unit-vector coordinates are rounded to multiples of 2**-_GRID_BITS before ranking (ranking_vectors).
_GRID_BITS = 26
MapTies = Literal["lower-index", "shared"]
# upgrade(j, i, vectors): version j's stored gallery vectors as version i's queries search them
# (orchestrator/engine/gallery_upgrade.py provides it for methods that upgrade stored vectors)
Upgrade = Callable[[int, int, np.ndarray], np.ndarray]
MAP_TIES = ("lower-index", "shared")


def truncate_and_normalize(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut both sides to the first min(d_a, d_b) coordinates and L2-normalise them (as the leave-one-out protocol does).

    Truncation commutes with scaling, so normalise-truncate-renormalise equals truncate-normalise.
    Returns new float32 arrays: the inputs may be read-only memory maps and are never modified. A zero
    vector stays zero (it matches nothing); NaN or inf is an error because it would scramble the ranking.
    """
    dim = min(a.shape[1], b.shape[1])
    if dim == 0:
        raise DataError("embeddings have no coordinates")
    return _normalized(a[:, :dim]), _normalized(b[:, :dim])


def ranking_vectors(query: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float64 vectors whose inner products rank the gallery: :func:`truncate_and_normalize`, then
    every coordinate rounded to a multiple of 2^-26.

    Why: on that grid a product of two coordinates is a multiple of 2^-52, and every partial sum of one
    query-item pair's products stays below 2 in magnitude (Cauchy-Schwarz on unit vectors), so float64
    holds each of them exactly. A similarity is then the exact inner product, whatever order the BLAS
    adds in and however queries are blocked; bit-identical items get equal similarities, and the tie
    rule (lower gallery index first) is what decides between them. The rounding moves a similarity by
    at most 2·√d·2^-27 (3e-7 at d = 512, typically ~1e-8): the scale of float32's own rounding.
    """
    return tuple(_on_grid(x) for x in truncate_and_normalize(query, gallery))


def _on_grid(x: np.ndarray) -> np.ndarray:
    scale = float(2 ** _GRID_BITS)  # a power of two: the scaling is exact, only np.rint rounds
    return np.rint(x.astype(np.float64) * scale) / scale


def _normalized(x: np.ndarray) -> np.ndarray:
    out = np.array(x, dtype=np.float32, copy=True, order="C")
    if not np.isfinite(out).all():
        raise DataError("embeddings contain NaN or inf; the model that produced them diverged")
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
    return out


def per_query_scores(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray, *, leave_one_out: bool, with_ap: bool = True,
                     map_ties: MapTies = "lower-index") -> dict[str, np.ndarray]:
    """Per-query ``first_rank`` (rank of the best-ranked relevant item) and, with ``with_ap``, ``ap``.

    Relevant = same label. With ``leave_one_out`` query n and gallery item n are the same sample (also
    when two models encoded them), so item n is removed from query n's ranking. Queries without any
    relevant item get NaN in both arrays. Per-query values serve paired comparisons between models and
    checks against a reference; :func:`retrieval_scores` averages them.

    ``map_ties`` only changes AP: ``"lower-index"`` ranks tied items by gallery index, as the CMC ranks
    always are; ``"shared"`` gives every item of a tie the precision after the whole tie (one threshold
    per distinct score, scikit-learn's ``average_precision_score``).
    """
    if map_ties not in MAP_TIES:
        raise ValueError(f"map_ties must be one of {', '.join(MAP_TIES)}, got {map_ties!r}")
    query_labels = np.asarray(query_labels, dtype=np.int64)
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    _check_sides(query, query_labels, gallery, gallery_labels)
    if leave_one_out and not np.array_equal(query_labels, gallery_labels):
        raise DataError("leave-one-out needs the same samples, in the same order, as queries and gallery")
    query, gallery = ranking_vectors(query, gallery)
    relevant = _RelevantItems(query_labels, gallery_labels)
    rows = max(1, _BLOCK_ELEMENTS // len(gallery))
    starts = range(0, len(query), rows)

    def block(start: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        stop = min(start + rows, len(query))
        return _score_block(query[start:stop], gallery, relevant, start, stop,
                            leave_one_out=leave_one_out, with_ap=with_ap, shared_ties=map_ties == "shared")

    # numpy releases the GIL in matmul, sort and searchsorted, so threads use every core.
    with ThreadPoolExecutor(max_workers=_worker_count()) as pool:
        results = list(pool.map(block, starts))
    scores = {"first_rank": np.concatenate([first for first, _ in results])}
    if with_ap:
        scores["ap"] = np.concatenate([ap for _, ap in results])
    return scores


def retrieval_scores(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                     gallery_labels: np.ndarray, *, leave_one_out: bool, topk: Sequence[int] = (1, 5),
                     with_map: bool = True, map_ties: MapTies = "lower-index") -> dict[str, float]:
    """CMC top-k (``cmc1``, ``cmc5``, ...) and mAP over the entire ranking (``map``), as fractions.

    The leave-one-out protocol with ``leave_one_out=True``; the all-vectors query-gallery protocol with
    ``False``. Queries whose class has no gallery item cannot be answered and are left out of every
    average (an error if that leaves none). ``map_ties``: see :func:`per_query_scores`.
    """
    scores = per_query_scores(query, query_labels, gallery, gallery_labels,
                              leave_one_out=leave_one_out, with_ap=with_map, map_ties=map_ties)
    return _summarize(scores, topk, with_map)


def _summarize(scores: dict[str, np.ndarray], topk: Sequence[int], with_map: bool) -> dict[str, float]:
    first_rank = _answerable(scores["first_rank"])
    out = {f"cmc{k}": metrics.recall_at_k(first_rank, k) for k in topk}
    if with_map:
        out["map"] = float(np.nanmean(scores["ap"]))
    return out


def template_top1(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                  gallery_labels: np.ndarray) -> dict[str, float]:
    """The query-gallery protocol with templates: top-1 accuracy of queries against L2-normalised class
    means of the gallery.

    The class means are taken over the normalised gallery features and re-normalised, so this is
    nearest-class-mean classification with the gallery model's class means (exact inner product).
    """
    first_rank = _template_first_rank(query, query_labels, gallery, gallery_labels)
    return {"cmc1": metrics.recall_at_k(_answerable(first_rank), 1)}


def _template_first_rank(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                         gallery_labels: np.ndarray) -> np.ndarray:
    """Per query: the rank of its class's template among the class templates (see :func:`template_top1`)."""
    query, gallery = truncate_and_normalize(query, gallery)
    classes, inverse = np.unique(np.asarray(gallery_labels, dtype=np.int64), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse))[:-1]])
    sums = np.add.reduceat(gallery[order].astype(np.float64), bounds, axis=0)
    templates = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    return per_query_scores(query, query_labels, templates, classes, leave_one_out=False, with_ap=False)["first_rank"]


def cross_modal_recall(image_q: np.ndarray, text_gallery: np.ndarray, caption_of: np.ndarray,
                       text_q: np.ndarray, image_gallery: np.ndarray,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The cross-modal protocol: image-to-text and text-to-image Recall@K as fractions (``i2t_r1``, ``t2i_r5``, ...).

    ``caption_of[c]`` is the image index of caption c; captions are in the same order in ``text_gallery``
    and ``text_q``, images in ``image_q`` and ``image_gallery``. An image query hits at K when any of its
    captions is in the top K; a caption query hits when its image is. Both reduce to the rank of the
    best-ranked relevant item, with the image index as the shared label.
    """
    caption_of = np.asarray(caption_of, dtype=np.int64)
    num_images = len(image_q)
    if len(image_gallery) != num_images or not len(text_q) == len(text_gallery) == len(caption_of):
        raise DataError("cross-modal recall needs the same images on both image sides and the same captions "
                        "on both text sides, with one caption_of entry per caption")
    if caption_of.size and (caption_of.min() < 0 or caption_of.max() >= num_images):
        raise DataError(f"caption_of must hold image indices in [0, {num_images})")
    image_ids = np.arange(num_images)
    i2t = per_query_scores(image_q, image_ids, text_gallery, caption_of, leave_one_out=False, with_ap=False)
    t2i = per_query_scores(text_q, caption_of, image_gallery, image_ids, leave_one_out=False, with_ap=False)
    i2t_first, t2i_first = _answerable(i2t["first_rank"]), _answerable(t2i["first_rank"])
    out = {f"i2t_r{k}": metrics.recall_at_k(i2t_first, k) for k in ks}
    out.update({f"t2i_r{k}": metrics.recall_at_k(t2i_first, k) for k in ks})
    return out


def _answerable(first_rank: np.ndarray) -> np.ndarray:
    """``first_rank`` unchanged, after checking that at least one query has a relevant gallery item."""
    if np.isnan(first_rank).all():
        raise DataError("no query has a relevant gallery item (queries and gallery share no label)")
    return first_rank


def _check_sides(query: np.ndarray, query_labels: np.ndarray, gallery: np.ndarray,
                 gallery_labels: np.ndarray) -> None:
    for name, x, labels in (("query", query, query_labels), ("gallery", gallery, gallery_labels)):
        if x.ndim != 2 or len(x) == 0:
            raise DataError(f"{name} embeddings must be a non-empty (N, d) array, got shape {x.shape}")
        if labels.shape != (len(x),):
            raise DataError(f"{name} has {len(x)} embeddings but {labels.size} labels")


def _worker_count() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


class _RelevantItems:
    """For each query, the gallery items of its class, in ascending gallery index.

    Built from the gallery grouped by class, so a block's relevant pairs cost O(#pairs), not O(rows x N).
    """

    def __init__(self, query_labels: np.ndarray, gallery_labels: np.ndarray):
        classes, inverse, counts = np.unique(gallery_labels, return_inverse=True, return_counts=True)
        self.order = np.argsort(inverse, kind="stable")
        self.class_start = np.cumsum(counts) - counts
        position = np.clip(np.searchsorted(classes, query_labels), 0, len(classes) - 1)
        known = classes[position] == query_labels
        self.query_class = np.where(known, position, 0)
        self.query_count = np.where(known, counts[position], 0)

    def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(row in block, gallery index) of every relevant pair of queries start..stop-1, row-major."""
        count = self.query_count[start:stop]
        rows = np.repeat(np.arange(stop - start), count)
        first = self.class_start[self.query_class[start:stop]] - (np.cumsum(count) - count)
        return rows, self.order[np.repeat(first, count) + np.arange(int(count.sum()))]


def _score_block(query: np.ndarray, gallery: np.ndarray, relevant: _RelevantItems, start: int, stop: int,
                 *, leave_one_out: bool, with_ap: bool, shared_ties: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """First relevant rank (and AP) of queries start..stop-1 from one similarity block."""
    sims = query @ gallery.T  # exact: see ranking_vectors
    rows, cols = relevant_pairs(sims, relevant, start, stop, leave_one_out=leave_one_out)
    return scores_from_similarities(sims, rows, cols, with_ap=with_ap, shared_ties=shared_ties)


def relevant_pairs(sims: np.ndarray, relevant: "_RelevantItems", start: int, stop: int,
                   *, leave_one_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row in block, gallery index) of the relevant items of queries start..stop-1; with
    ``leave_one_out`` each query's own item is dropped from them and marked below every cosine in ``sims``."""
    rows, cols = relevant.pairs(start, stop)
    if leave_one_out:
        own = np.arange(stop - start)
        sims[own, start + own] = _LEFT_OUT
        keep = cols != start + rows
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def scores_from_similarities(sims: np.ndarray, rows: np.ndarray, cols: np.ndarray, *, with_ap: bool,
                             shared_ties: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """First relevant rank (and AP) of every row of an exact similarity block, its relevant items at
    (``rows``, ``cols``) in row-major order."""
    num_rows = len(sims)
    count = np.bincount(rows, minlength=num_rows)
    values = sims[rows, cols]
    group_start = np.cumsum(count) - count
    answerable = count > 0
    first_rank = np.full(num_rows, np.nan)
    if not answerable.any():
        return first_rank, (np.full(num_rows, np.nan) if with_ap else None)
    if not with_ap:
        # Only the best relevant item matters: its rank is a count, no sort needed.
        best = np.maximum.reduceat(values, group_start[answerable])
        is_best = values == np.repeat(best, count[answerable])
        best_col = np.minimum.reduceat(np.where(is_best, cols, sims.shape[1]), group_start[answerable])
        first_rank[answerable] = _counted_ranks(sims, np.flatnonzero(answerable), best, best_col)[0]
        return first_rank, None
    ranks, tie_ends = _relevant_ranks(sims, rows, cols, values, tie_ends=shared_ties)
    ranks = _ascending_per_row(ranks, rows, sims.shape[1])
    first_rank[answerable] = ranks[group_start[answerable]]
    ap_ranks = ranks if tie_ends is None else _ascending_per_row(tie_ends, rows, sims.shape[1])
    return first_rank, metrics.average_precision_from_ranks(ap_ranks, count)


def _ascending_per_row(ranks: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """``ranks`` (grouped by ``rows``, row-major) sorted ascending within each row, in one sort."""
    offset = rows * (width + 1)
    return np.sort(offset + ranks) - offset


def _relevant_ranks(sims: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray,
                    *, tie_ends: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """For each (row, col) pair: its 1-based rank in the row sorted by descending similarity, ties to the
    lower gallery index, and with ``tie_ends`` where its tie ends (the number of items at least as similar).

    Each row is sorted once (the unavoidable cost), as a float32 copy (cheaper than float64): rounding
    never swaps two similarities, it can only merge close ones into one float32 value. The row's relevant
    values are looked up in it (``rows`` is row-major): a value alone in its float32 bucket has exactly
    the items above it that the sorted copy shows and ends its own tie; where the bucket holds other
    items too (a tie, or values closer than float32 resolves) both are counted in the exact row.
    """
    width = sims.shape[1]
    ordered = np.sort(sims.astype(np.float32), axis=1)
    keys = values.astype(np.float32)
    bounds = np.searchsorted(rows, np.arange(len(sims) + 1))
    end = np.empty(len(values), dtype=np.int64)  # one past the key's last equal in its sorted row
    for row in np.flatnonzero(bounds[1:] > bounds[:-1]):
        lo, hi = bounds[row], bounds[row + 1]
        end[lo:hi] = np.searchsorted(ordered[row], keys[lo:hi], side="right")
    ranks = width - end + 1
    ends = ranks.copy() if tie_ends else None
    crowded = np.flatnonzero((end >= 2) & (ordered[rows, np.maximum(end - 2, 0)] == keys))
    if crowded.size:
        ranks[crowded], counted_ends = _counted_ranks(sims, rows[crowded], values[crowded], cols[crowded],
                                                      tie_ends=tie_ends)
        if tie_ends:
            ends[crowded] = counted_ends
    return ranks, ends


def _counted_ranks(sims: np.ndarray, rows: np.ndarray, values: np.ndarray, cols: np.ndarray,
                   *, tie_ends: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rank of the item at (row, col) with similarity ``value`` (1 + #higher + #equal at a lower index),
    counted in the exact row; with ``tie_ends`` also where its tie ends (#higher + #equal, itself included)."""
    width = sims.shape[1]
    index = np.arange(width)
    ranks = np.empty(len(rows), dtype=np.int64)
    ends = np.empty(len(rows), dtype=np.int64) if tie_ends else None
    step = max(1, _BLOCK_ELEMENTS // width)
    for lo in range(0, len(rows), step):  # chunks of pairs, to bound memory
        part = slice(lo, lo + step)
        row_sims = sims[rows[part]]
        value = values[part, None]
        higher = np.count_nonzero(row_sims > value, axis=1)
        equal = row_sims == value
        ranks[part] = higher + np.count_nonzero(equal & (index < cols[part, None]), axis=1) + 1
        if tie_ends:
            ends[part] = higher + np.count_nonzero(equal, axis=1)
    return ranks, ends


class CompatibilityMatrix:
    """T x T scores, row = query version, column = gallery version (<= row).

    Missing cells are NaN *and* False in ``mask``: a computed score of exactly 0 is never mistaken for a
    missing one. CSV form: header ``query\\gallery,0,1,...``, one row per query version, empty cells missing.
    """

    CORNER = "query\\gallery"

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a compatibility matrix needs size >= 1, got {size}")
        self.values = np.full((size, size), np.nan)
        self.mask = np.zeros((size, size), dtype=bool)

    @property
    def size(self) -> int:
        return len(self.values)

    @property
    def complete(self) -> bool:
        """Whether every cell on and below the diagonal has been computed."""
        return bool(self.mask[metrics.lower_triangle_mask(self.size)].all())

    def set(self, i: int, j: int, value: float) -> None:
        if not 0 <= j <= i < self.size:
            raise ValueError(f"cell ({i}, {j}) is outside the lower triangle of a {self.size}x{self.size} matrix")
        if not math.isfinite(value):
            raise ValueError(f"cell ({i}, {j}) must be finite, got {value}")
        self.values[i, j] = value
        self.mask[i, j] = True

    def to_list(self) -> list[list[Optional[float]]]:
        """Rows as lists, ``None`` for missing cells (JSON-friendly)."""
        return [[float(v) if m else None for v, m in zip(row, row_mask)]
                for row, row_mask in zip(self.values, self.mask)]

    @classmethod
    def from_list(cls, rows: Sequence[Sequence[Optional[float]]]) -> "CompatibilityMatrix":
        """Inverse of :meth:`to_list`. ``None`` or NaN is missing; anything above the diagonal is ignored."""
        matrix = cls(len(rows))
        for i, row in enumerate(rows):
            if len(row) != len(rows):
                raise ValueError(f"row {i} has {len(row)} cells; a {len(rows)}x{len(rows)} matrix needs {len(rows)}")
            for j, value in enumerate(row[: i + 1]):
                if value is not None and not math.isnan(value):
                    matrix.set(i, j, float(value))
        return matrix

    def to_csv(self, path: str | os.PathLike) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([self.CORNER, *range(self.size)])
            for i, row in enumerate(self.to_list()):
                writer.writerow([i, *("" if v is None else repr(v) for v in row)])

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "CompatibilityMatrix":
        """Read a square matrix CSV with or without a header row and an index column.

        The first row is a header when it holds text after its first cell, when its first cell is empty
        (cell (0, 0) is always computed) or text above a numeric index, or when the rows outnumber the
        columns by one; the first column is then an index when it holds text or the columns outnumber the
        rows by one. Short rows (a bare lower triangle) are padded. Values above the diagonal are
        ignored, so full matrices with 0 there (iamcl2r) are accepted.
        """
        path = Path(path)
        try:
            with open(path, newline="") as handle:
                grid = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read matrix file {path} ({exc}); pass a CSV file of scores") from None
        if not grid:
            raise DataError(f"matrix file {path} is empty; it needs one row of scores per query version")
        width = max(len(row) for row in grid)
        grid = [[cell.strip() for cell in row] + [""] * (width - len(row)) for row in grid]
        corner, top, side = grid[0][0], grid[0][1:], [row[0] for row in grid[1:]]
        if (not all(map(_is_number, top)) or corner == ""
                or (not _is_number(corner) and all(map(_is_number, side))) or len(grid) == width + 1):
            grid = grid[1:]
        if grid and (not all(_is_number(row[0]) for row in grid) or width == len(grid) + 1):
            grid = [row[1:] for row in grid]
        if not grid or len(grid) != len(grid[0]):
            raise DataError(f"matrix file {path} does not hold a square matrix "
                            f"({len(grid)} rows x {len(grid[0]) if grid else 0} columns of scores)")
        try:
            return cls.from_list([[float(cell) if cell else None for cell in row] for row in grid])
        except ValueError as exc:
            raise DataError(f"matrix file {path} has an invalid cell ({exc}); cells must be numbers or empty") from None


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == ""
    return True


BY_BLOCK = "cmc1_by_block"  # row entry: CMC top-1 of each class block (see class_block_top1)


def _pair_scores(query_table: "EmbeddingTable", gallery_table: "EmbeddingTable",
                 eval_cfg: EvaluationConfig, block_of_label: Optional[np.ndarray] = None,
                 index=None) -> tuple[dict, np.ndarray]:
    """One matrix cell, every metric of the configured protocol, and its per-query first relevant ranks
    (for the negative flips); with ``block_of_label`` (and without templates) also CMC top-1 per class
    block, from the same ranking. The ranking is the full one or exact faiss top-k (``evaluation.search``,
    orchestrator/evaluation/search.py: its first ranks are inf past the list's depth); with ``index`` (the
    gallery's approximate index) the cell also holds the metrics of searching it, prefixed ``index_``."""
    from orchestrator.evaluation import search

    if eval_cfg.protocol == "leave-one-out":
        if not np.array_equal(query_table.sample_ids, gallery_table.sample_ids):
            raise StoreError("the stored embeddings of the two versions list different samples or a different "
                             "order; re-encode the evaluation set for both versions")
    elif eval_cfg.templates:
        first_rank = _template_first_rank(query_table.embeddings, query_table.labels, gallery_table.embeddings,
                                          gallery_table.labels)
        return {"cmc1": metrics.recall_at_k(_answerable(first_rank), 1)}, first_rank
    leave_one_out, k = eval_cfg.protocol == "leave-one-out", eval_cfg.search.k
    sides = (query_table.embeddings, query_table.labels, gallery_table.embeddings, gallery_table.labels)
    if search.engine_for(eval_cfg.search, len(gallery_table.labels)) == "faiss":
        scores = search.search_scores(*sides, leave_one_out=leave_one_out, k=k)
        out: dict = search.summarize(scores, k)
    else:
        scores = per_query_scores(*sides, leave_one_out=leave_one_out, map_ties=eval_cfg.map_ties)
        out = _summarize(scores, (1, 5), with_map=True)
    if index is not None:
        out.update(search.summarize(search.index_scores(index, eval_cfg.search.index, query_table.embeddings,
                                                        query_table.labels, gallery_table.labels,
                                                        leave_one_out=leave_one_out, k=k), k, search.INDEX_PREFIX))
    if block_of_label is not None:
        out[BY_BLOCK] = class_block_top1(scores["first_rank"], block_of_label[query_table.labels],
                                         int(block_of_label.max()) + 1)
    return out, scores["first_rank"]


def class_block_top1(first_rank: np.ndarray, query_blocks: np.ndarray, num_blocks: int) -> list[Optional[float]]:
    """CMC top-1 of the queries of each class block (e.g. the classes each step added): where a
    cross-model test gains or loses against the old self-test. ``None`` for a block without queries."""
    out: list[Optional[float]] = []
    for block in range(num_blocks):
        ranks = first_rank[query_blocks == block]
        ranks = ranks[~np.isnan(ranks)]
        out.append(metrics.recall_at_k(ranks, 1) if ranks.size else None)
    return out


def _gallery_set(eval_cfg: EvaluationConfig) -> str:
    return eval_cfg.query if eval_cfg.protocol == "leave-one-out" else eval_cfg.gallery


def evaluate_pair(store: "EmbeddingStore", method_key: str, query_version: int, gallery_version: int,
                  eval_cfg: EvaluationConfig) -> dict[str, float]:
    """Cell (query_version, gallery_version): scores of the new queries against the stored old gallery."""
    query_table = store.read(method_key, query_version, eval_cfg.query)
    gallery_table = store.read(method_key, gallery_version, _gallery_set(eval_cfg))
    return _pair_scores(query_table, gallery_table, eval_cfg)[0]


def compatibility_row(store: "EmbeddingStore", method_key: str, version: int, eval_cfg: EvaluationConfig,
                      block_of_label: Optional[np.ndarray] = None, *, earlier_top1: Sequence[np.ndarray],
                      indexes=None,
                      upgrade: Optional[Upgrade] = None) -> dict[str, list]:
    """Row ``version`` of the matrix: cells (version, j) for j = 0..version, one list per metric (and
    per-block top-1 lists under ``BY_BLOCK`` when ``block_of_label`` maps each label to its block), and
    its negative flips against each older version's own pair (``earlier_top1``: see flips.row_flips).
    ``indexes`` (a :class:`~orchestrator.evaluation.search.GalleryIndexes`) adds the metrics of searching
    each gallery version's approximate index, built at its first use and reused by every later row.
    ``upgrade(j, version, vectors)``, when given, is what the stored gallery of version j becomes before
    version ``version``'s queries search it (vectors upgraded in place instead of re-embedded); an index
    holds stored vectors, so the two do not combine (refused when the config is validated).

    The query embeddings are read once; each gallery once.
    """
    query_table = store.read(method_key, version, eval_cfg.query)
    row: dict[str, list] = {}
    first_ranks = []
    for gallery_version in range(version + 1):
        gallery_table = store.read(method_key, gallery_version, _gallery_set(eval_cfg))
        upgraded = upgrade is not None and gallery_version < version
        if upgraded and indexes is not None:
            raise ValueError("an approximate index holds stored vectors; it cannot serve an upgraded gallery")
        if upgraded:
            gallery_table = dataclasses.replace(
                gallery_table, embeddings=upgrade(gallery_version, version, gallery_table.embeddings))
        index = None if indexes is None else indexes.get(method_key, gallery_version, _gallery_set(eval_cfg),
                                                         gallery_table)
        scores, first_rank = _pair_scores(query_table, gallery_table, eval_cfg, block_of_label, index)
        for name, value in scores.items():
            row.setdefault(name, []).append(value)
        first_ranks.append(first_rank)
    row.update(row_flips(first_ranks, earlier_top1))
    return row

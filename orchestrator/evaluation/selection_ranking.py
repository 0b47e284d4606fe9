"""Many mixed galleries ranked at once: each a per-item selection among a few versions' vectors.

A backfill curve asks for dozens of galleries that differ only in which version serves each item.
Ranking each from scratch repeats the expensive part (a similarity product and a sort per query) for
every one of them. Here, per query, the product is taken once per version and every gallery value is
bucketed once among the query's *thresholds* (the similarities of its relevant items under every
version); a selection's ranks then come from a histogram of bucket indices, built from a reference
version's or an earlier selection's histogram plus the few items the selection serves differently. The cost of one more
selection is a gather and a count over the items it changes, not a sort.

The results are exactly :func:`orchestrator.evaluation.retrieval.per_query_scores` on the assembled
gallery (the same exact similarities, the same tie rule): a query where two different items reach the
same similarity as one of its thresholds is ranked by that exact path instead (ties are rare outside
duplicated items).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from orchestrator.evaluation import metrics
from orchestrator.evaluation.retrieval import (_BLOCK_ELEMENTS, MAP_TIES, MapTies, _check_sides, _RelevantItems,
                                               _worker_count, ranking_vectors, relevant_pairs,
                                               scores_from_similarities)


@dataclass(frozen=True)
class _Selection:
    """One gallery and how its histogram is derived: from a reference (an earlier selection, or one
    version serving every item; whichever differs from it in the fewest items) plus the items served
    otherwise, as flat indices into a (versions x items) array of one query's bucket indices."""

    versions: np.ndarray  # int (n,)
    reference: int  # an earlier selection's index, or -1 - v for "version v serves every item"
    reference_flat: np.ndarray  # (reference's version of k) * n + k for the items served otherwise
    served_flat: np.ndarray  # versions[k] * n + k for the same items


def _plans(selections: np.ndarray, num_versions: int) -> list[_Selection]:
    """Each selection's cheapest reference: consecutive budgets of one policy differ in a few items."""
    n = selections.shape[1]
    plans: list[_Selection] = []
    for p, versions in enumerate(selections):
        whole = [np.count_nonzero(versions != v) for v in range(num_versions)]
        earlier = np.count_nonzero(selections[:p] != versions, axis=1) if p else np.array([], dtype=np.int64)
        if earlier.size and earlier.min() < min(whole):
            reference = int(np.argmin(earlier))
            reference_versions = selections[reference]
        else:
            reference = -1 - int(np.argmin(whole))
            reference_versions = np.full(n, -1 - reference)
        changed = np.flatnonzero(versions != reference_versions)
        plans.append(_Selection(versions, reference, reference_versions[changed] * n + changed,
                                versions[changed] * n + changed))
    return plans


def rank_selections(queries: np.ndarray, query_labels: np.ndarray, galleries: Sequence[np.ndarray],
                    gallery_labels: np.ndarray, selections: np.ndarray, *, leave_one_out: bool,
                    map_ties: MapTies = "lower-index") -> list[dict[str, np.ndarray]]:
    """Per selection, ``first_rank`` and ``ap`` per query, as :func:`per_query_scores` gives them for the
    gallery whose item k is ``galleries[selections[p, k]][k]``.

    ``galleries``: the same items (same order, ``gallery_labels``) embedded by each version;
    ``selections``: int (P, n), a version index per item for each gallery."""
    if map_ties not in MAP_TIES:
        raise ValueError(f"map_ties must be one of {', '.join(MAP_TIES)}, got {map_ties!r}")
    query_labels = np.asarray(query_labels, dtype=np.int64)
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    for gallery in galleries:
        _check_sides(queries, query_labels, gallery, gallery_labels)
    selections = np.atleast_2d(np.asarray(selections, dtype=np.int64))
    n, num_versions = len(gallery_labels), len(galleries)
    if selections.shape[1] != n or selections.min(initial=0) < 0 or selections.max(initial=0) >= num_versions:
        raise ValueError(f"selections must be ({len(selections)}, {n}) version indices in [0, {num_versions})")
    if leave_one_out and not np.array_equal(query_labels, gallery_labels):
        raise ValueError("leave-one-out needs the same samples, in the same order, as queries and gallery")
    grid = [ranking_vectors(queries, gallery) for gallery in galleries]
    query, vectors = grid[0][0], [g for _, g in grid]
    plans = _plans(selections, num_versions)
    relevant = _RelevantItems(query_labels, gallery_labels)
    step = max(1, _BLOCK_ELEMENTS // (n * num_versions))

    def block(start: int) -> tuple[np.ndarray, np.ndarray]:
        stop = min(start + step, len(query))
        return _rank_block(query[start:stop], vectors, relevant, plans, start, stop, leave_one_out=leave_one_out,
                           shared_ties=map_ties == "shared")

    with ThreadPoolExecutor(max_workers=_worker_count()) as pool:
        results = list(pool.map(block, range(0, len(query), step)))
    first = np.concatenate([f for f, _ in results], axis=1)
    ap = np.concatenate([a for _, a in results], axis=1)
    return [{"first_rank": first[p], "ap": ap[p]} for p in range(len(plans))]


def _rank_block(query: np.ndarray, vectors: list[np.ndarray], relevant: _RelevantItems, plans: list[_Selection],
                start: int, stop: int, *, leave_one_out: bool, shared_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """(first_rank, ap), each (selections, rows), of queries start..stop-1."""
    sims = np.empty((len(vectors), len(query), len(vectors[0])))  # (versions, rows, n)
    for version, gallery in enumerate(vectors):  # (rows, cols): the same relevant pairs for every version
        np.matmul(query, gallery.T, out=sims[version])  # exact: see ranking_vectors
        rows, cols = relevant_pairs(sims[version], relevant, start, stop, leave_one_out=leave_one_out)
    num_rows = stop - start
    count = np.bincount(rows, minlength=num_rows)
    bounds = np.concatenate([[0], np.cumsum(count)])
    sorted_ranks = np.zeros((len(plans), len(rows)))
    exact: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, first_rank per selection, ap per selection)
    for row in np.flatnonzero(count):
        items = cols[bounds[row]:bounds[row + 1]]
        row_sims = sims[:, row, :]
        thresholds = np.unique(row_sims[:, items])
        buckets, near = _buckets(thresholds, row_sims)
        if _has_ties(buckets, row_sims, thresholds, near):
            exact.append((row, *_exact_row(row_sims, items, plans, shared_ties)))
            sorted_ranks[:, bounds[row]:bounds[row + 1]] = np.arange(1, len(items) + 1)  # placeholder, replaced
            continue
        size = len(thresholds) + 2  # buckets 0..m, and an empty one past the top
        flat = buckets.ravel()
        base = [np.bincount(b, minlength=size) for b in buckets]
        histograms = []
        for p, plan in enumerate(plans):
            histogram = (base[-1 - plan.reference] if plan.reference < 0 else histograms[plan.reference]).copy()
            if plan.served_flat.size:
                histogram -= np.bincount(flat[plan.reference_flat], minlength=size)
                histogram += np.bincount(flat[plan.served_flat], minlength=size)
            histograms.append(histogram)
            above = np.cumsum(histogram[::-1])[::-1]  # above[j]: values in buckets >= j
            # a relevant value is threshold j (bucket j); those above it are in buckets >= j + 1
            ranks = 1 + above[buckets[plan.versions[items], items] + 1]
            sorted_ranks[p, bounds[row]:bounds[row + 1]] = np.sort(ranks)
    answerable = count > 0
    first = np.full((len(plans), num_rows), np.nan)
    first[:, answerable] = sorted_ranks[:, bounds[:-1][answerable]]
    ap = np.stack([metrics.average_precision_from_ranks(r, count) for r in sorted_ranks])
    for row, row_first, row_ap in exact:
        first[:, row], ap[:, row] = row_first, row_ap
    return first, ap


_CELLS_PER_THRESHOLD = 16


def _buckets(thresholds: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.searchsorted(thresholds, values)`` (how many thresholds lie strictly below each value, int32),
    and the flat indices of the values that share a grid cell with a threshold (only they can equal one).

    A binary search per value is the bulk of the work, so values go first to a uniform grid of cells
    over the thresholds' range. The cell of x is a monotone function of x (subtracting, scaling and
    flooring are monotone in IEEE arithmetic), so every threshold in a lower cell is below x and every
    one in a higher cell above it: a table per cell gives the count, and only values in a cell that
    holds a threshold are searched exactly."""
    low, high = thresholds[0], thresholds[-1]
    if high == low:
        return np.searchsorted(thresholds, values).astype(np.int32), np.flatnonzero(values.ravel() == low)
    cells = _CELLS_PER_THRESHOLD * len(thresholds)
    scale = cells / (high - low)
    # the thresholds fill cells 1 .. cells + 1 (half a cell of margin against rounding at both ends);
    # cell 0 holds the values below them all, cell cells + 2 those above
    offset = low * scale - 1.5

    def cell_of(x: np.ndarray) -> np.ndarray:  # any monotone map works; this one spreads the range evenly
        t = np.multiply(x, scale)
        t -= offset
        np.floor(t, out=t)
        return np.clip(t, 0, cells + 2, out=t).astype(np.int32)

    threshold_cells = cell_of(thresholds)
    below = np.searchsorted(threshold_cells, np.arange(cells + 3)).astype(np.int32)  # thresholds in lower cells
    occupied = np.zeros(cells + 3, dtype=bool)
    occupied[threshold_cells] = True
    value_cells = cell_of(values)
    buckets = below[value_cells]
    near = np.flatnonzero(occupied[value_cells].ravel())
    flat = buckets.reshape(-1)
    flat[near] = np.searchsorted(thresholds, values.reshape(-1)[near])
    return buckets, near


def _has_ties(buckets: np.ndarray, row_sims: np.ndarray, thresholds: np.ndarray, near: np.ndarray) -> bool:
    """Whether two different items reach the value of one threshold (under any versions): their order
    then follows the tie rule, which the histogram cannot see. Only the values ``near`` (sharing a cell
    with a threshold) can equal one."""
    near_buckets = buckets.reshape(-1)[near]
    hits = near[thresholds[np.minimum(near_buckets, len(thresholds) - 1)] == row_sims.reshape(-1)[near]]
    n = row_sims.shape[1]
    pairs = np.unique(buckets.reshape(-1)[hits].astype(np.int64) * n + hits % n)  # distinct (threshold, item)
    return len(np.unique(pairs // n)) < len(pairs)


def _exact_row(row_sims: np.ndarray, items: np.ndarray, plans: list[_Selection],
               shared_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """One query's first rank and AP in every selection, by the exact ranking of its assembled row."""
    columns = np.arange(row_sims.shape[1])
    mixed = np.stack([row_sims[plan.versions, columns] for plan in plans])
    rows = np.repeat(np.arange(len(plans)), len(items))
    first, ap = scores_from_similarities(mixed, rows, np.tile(items, len(plans)), with_ap=True, shared_ties=shared_ties)
    return first, ap

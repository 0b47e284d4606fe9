"""Negative flips of a compatibility-matrix row, from per-query top-1 correctness.

Row ``i`` holds two negative-flip rates (:func:`orchestrator.evaluation.metrics.negative_flip_rate`) per
older version ``j < i``, both against version j's own pair j/j (its queries, its gallery):

- ``nfr_new_old``: right under j/j, wrong under i/j (version i's queries against the old gallery: the
  upgrade without backfilling);
- ``nfr_new_new``: right under j/j, wrong under i/i (the upgrade with the gallery re-embedded).

The diagonal cell has no older pair (None). Each row also records its own diagonal's per-query
correctness (``top1_correct``, packed bits), so a later row compares against j/j without ranking it
again and ``compat report`` re-renders from the row files alone.
"""

from __future__ import annotations

import base64
from typing import Optional, Sequence

import numpy as np

from orchestrator.errors import StoreError
from orchestrator.evaluation import metrics

NFR_NEW_OLD = "nfr_new_old"
NFR_NEW_NEW = "nfr_new_new"
TOP1_CORRECT = "top1_correct"
FLIP_KEYS = (NFR_NEW_OLD, NFR_NEW_NEW, TOP1_CORRECT)  # row entries that are not score matrices


def top1_correct(first_rank: np.ndarray) -> np.ndarray:
    """Per query: its best-ranked relevant item is at rank 1 (False for a query without one, NaN)."""
    return np.asarray(first_rank, dtype=np.float64) == 1


def pack_correct(correct: np.ndarray) -> str:
    """``<count>:<base64 of the packed bits>``: one bit per query, JSON-friendly (1.4 characters per 8 queries)."""
    correct = np.asarray(correct, dtype=bool)
    return f"{correct.size}:{base64.b64encode(np.packbits(correct)).decode('ascii')}"


def unpack_correct(text: str) -> np.ndarray:
    """Inverse of :func:`pack_correct`."""
    count, _, bits = text.partition(":")
    return np.unpackbits(np.frombuffer(base64.b64decode(bits), dtype=np.uint8), count=int(count)).astype(bool)


def row_flips(first_ranks: Sequence[np.ndarray], earlier_top1: Sequence[np.ndarray]) -> dict:
    """The flip entries of row ``i = len(first_ranks) - 1``.

    ``first_ranks[j]`` is cell (i, j)'s per-query rank of the best relevant item (NaN: none);
    ``earlier_top1[j]`` is the top-1 correctness of cell (j, j) for every j < i, as row j recorded it.
    Rates are over the queries that have a relevant item, as CMC is: the cells of one row rank galleries
    of the same evaluation set, so that set of queries is the same in every cell.
    """
    version = len(first_ranks) - 1
    if len(earlier_top1) != version:
        raise ValueError(f"row {version} needs the top-1 correctness of {version} older diagonal cell(s), "
                         f"got {len(earlier_top1)}")
    new_new = top1_correct(first_ranks[-1])
    new_old_rates: list[Optional[float]] = []
    new_new_rates: list[Optional[float]] = []
    for j, old in enumerate(earlier_top1):
        if old.shape != new_new.shape:
            raise StoreError(f"version {j} recorded {old.size} queries, version {version} has {new_new.size}; "
                             "both versions must embed the same evaluation set (resume the run to recompute it)")
        answerable = ~np.isnan(first_ranks[j])
        new_old_rates.append(metrics.negative_flip_rate(old[answerable], top1_correct(first_ranks[j])[answerable]))
        new_new_rates.append(metrics.negative_flip_rate(old[answerable], new_new[answerable]))
    return {NFR_NEW_OLD: new_old_rates + [None], NFR_NEW_NEW: new_new_rates + [None],
            TOP1_CORRECT: pack_correct(new_new)}


def flip_matrices(rows: Sequence[dict]) -> Optional[dict[str, list[list[Optional[float]]]]]:
    """metrics.json's ``negative_flip_rate``: ``new_old`` and ``new_new`` as T x T matrices (cells j < i;
    None elsewhere) from the rows; None when a row was written before rows held flips."""
    if not all(NFR_NEW_OLD in row and NFR_NEW_NEW in row for row in rows):
        return None
    size = len(rows)
    return {name: [[row[key][j] if j < i else None for j in range(size)] for i, row in enumerate(rows)]
            for name, key in (("new_old", NFR_NEW_OLD), ("new_new", NFR_NEW_NEW))}

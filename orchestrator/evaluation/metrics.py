"""Compatibility and retrieval metrics: pure numpy, one place per formula.

Matrices follow the compatibility-matrix convention: ``M[i][j]`` is the score of query model ``i``
against gallery model ``j <= i``; only cells on and below the diagonal are read, so whatever is stored
above it (NaN here, 0 in the iamcl2r notebooks) is ignored. Scores are fractions unless a docstring
says otherwise.
"""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np

Ties = Literal["fail", "pass"]
TIES = ("fail", "pass")
ECC_COMPARISON = {"fail": ">", "pass": "≥"}  # how each ties rule compares new/old with old/old, for messages


def lower_triangle_mask(size: int) -> np.ndarray:
    """Cells a compatibility matrix computes: on and below the diagonal (query version >= gallery version)."""
    return np.tri(size, dtype=bool)


def _checked(M: np.ndarray) -> np.ndarray:
    """``M`` as a float array after checking it is square with every lower-triangle cell present.

    A missing cell would silently shift every average, so it is an error rather than skipped.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"a compatibility matrix must be square and non-empty, got shape {M.shape}")
    missing = lower_triangle_mask(len(M)) & ~np.isfinite(M)
    if missing.any():
        i, j = np.argwhere(missing)[0]
        raise ValueError(f"compatibility matrix cell ({i}, {j}) is missing; every cell with j <= i is needed")
    return M


def ecc_holds(new_old, old_old, ties: Ties = "fail"):
    """The empirical compatibility criterion for one pair (or elementwise for arrays): the new model's
    queries against the old gallery score above the old model's self-test, ``new_old > old_old``.

    The one place that decides "version i is compatible with version j": every verdict (AC, the ECC
    flags, reports, ``compat compare``) goes through it. ``ties="pass"`` lets ``new_old == old_old``
    pass (CL2R counts a violation only for strict ``<``); the default follows the strict inequality of
    the criterion (iamcl2r, which produced the published AC values).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be 'fail' or 'pass', got {ties!r}")
    return np.greater(new_old, old_old) if ties == "fail" else np.greater_equal(new_old, old_old)


def ecc_matrix(M: np.ndarray, ties: Ties = "fail") -> np.ndarray:
    """:func:`ecc_holds` per cell: ``M[i][j]`` against the gallery version's self-test ``M[j][j]``, j < i.

    The diagonal and the upper triangle are False: a model is not "compatible with itself" and
    new-gallery/old-query is never measured.
    """
    M = _checked(M)
    holds = ecc_holds(M, np.diag(M)[None, :], ties)
    return holds & np.tri(len(M), k=-1, dtype=bool)


def ecc_every_pair(M: np.ndarray, ties: Ties = "fail") -> Optional[bool]:
    """Whether ECC holds on every pair j < i (AC = 1); None for a single version, which has no pair."""
    holds = ecc_matrix(M, ties)
    if len(holds) == 1:
        return None
    return bool(holds[np.tri(len(holds), k=-1, dtype=bool)].all())


def average_compatibility(M: np.ndarray, ties: Ties = "fail") -> float:
    """AC: the fraction of the T(T-1)/2 cross-tests that satisfy the ECC.

    Only signs matter, so pass scores at full precision, never rounded percentages. T = 1 has no
    cross-test; the reference code clamps the denominator, giving 1.0, and so does this.
    """
    holds = ecc_matrix(M, ties)
    size = len(holds)
    if size == 1:
        return 1.0
    return float(holds.sum() / (size * (size - 1) / 2))


def ac_curve(M: np.ndarray, ties: Ties = "fail") -> list[float]:
    """AC_tau over the top-left tau x tau block for tau = 2..T (empty for T = 1): AC as the sequence grows."""
    M = _checked(M)
    return [average_compatibility(M[:tau, :tau], ties) for tau in range(2, len(M) + 1)]


def average_multimodel_accuracy(M: np.ndarray) -> float:
    """AM, in percent: 100 x the mean of every cell on and below the diagonal.

    The cells are selected by the lower-triangle mask, not by "non-zero" as in the reference code, so a
    genuine score of 0 counts. Values are taken as given: pass fractions to get a percentage.
    """
    M = _checked(M)
    return float(100.0 * M[lower_triangle_mask(len(M))].mean())


def am_curve(M: np.ndarray) -> list[float]:
    """AM_tau over the top-left tau x tau block for tau = 1..T; the last value is AM."""
    M = _checked(M)
    return [average_multimodel_accuracy(M[:tau, :tau]) for tau in range(1, len(M) + 1)]


def backward_compatibility(M: np.ndarray) -> float:
    """BC: mean over old galleries j < T of (final model's query vs gallery j) - (self-test of j).

    Positive means the final model improves on old galleries without re-indexing. T = 1 has no old
    gallery, so BC is NaN (undefined) rather than a neutral-looking 0.
    """
    M = _checked(M)
    if len(M) == 1:
        return float("nan")
    return float(np.mean(M[-1, :-1] - np.diag(M)[:-1]))


def forward_compatibility(M: np.ndarray) -> float:
    """FC: mean over i >= 2 of M[i][i-1] - M[i][i], what one update loses by not re-indexing.

    T = 1 has no update, so FC is NaN, as for :func:`backward_compatibility`.
    """
    M = _checked(M)
    if len(M) == 1:
        return float("nan")
    return float(np.mean(np.diag(M, k=-1) - np.diag(M)[1:]))


def update_gain(new_old: float, old_old: float, newstar_newstar: float) -> float:
    """BCT update gain: the share of the full-backfill improvement obtained without backfilling.

    ``(new_old - old_old) / (newstar_newstar - old_old)`` with new* an independently trained new model;
    all three in the same metric. NaN when new* does not differ from the old model (no improvement to share).
    """
    denominator = newstar_newstar - old_old
    if denominator == 0:
        return float("nan")
    return float((new_old - old_old) / denominator)


def average_precision_from_ranks(ranks: np.ndarray, num_relevant: np.ndarray) -> np.ndarray:
    """Non-interpolated AP per query over the entire ranking: AP = (1/R) sum_r Precision@rank_r.

    ``ranks`` concatenates, query after query, the 1-based ranks of each query's R relevant items in
    ascending order (``num_relevant[q]`` of them for query q). Precision@n = (relevant items ranked
    <= n) / n, so with distinct ranks the k-th relevant item adds k / rank_k. Equal ranks stand for tied
    scores counted at one threshold: give each item of a tie the last rank of the tie (the number of
    items scored at least as high) and each gets the precision after the whole tie, which is scikit-learn's
    ``average_precision_score``. Queries with R = 0 get NaN: AP is undefined without a relevant item.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if ranks.shape != (int(num_relevant.sum()),):
        raise ValueError(f"{ranks.size} ranks given for {int(num_relevant.sum())} relevant items")
    query = np.repeat(np.arange(len(num_relevant)), num_relevant)
    starts = np.cumsum(num_relevant) - num_relevant
    same_query = query[1:] == query[:-1]
    if (ranks[1:][same_query] < ranks[:-1][same_query]).any():
        raise ValueError("each query's ranks must be in ascending order")
    # The relevant items ranked <= rank_r: up to the last item of r's query with the same rank.
    last = np.flatnonzero(np.append(~same_query | (ranks[1:] != ranks[:-1]), True))
    position = last[np.searchsorted(last, np.arange(len(ranks)))] - starts[query] + 1
    total = np.bincount(query, weights=position / ranks, minlength=len(num_relevant))
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / num_relevant


def truncated_average_precision(ranks: np.ndarray, num_listed: np.ndarray, num_relevant: np.ndarray,
                                cutoff) -> np.ndarray:
    """AP truncated at rank ``cutoff``, per query: (1 / min(R, cutoff)) Σ_{relevant r, rank_r <= cutoff} Precision@rank_r.

    ``ranks`` concatenates, query after query, the distinct 1-based ranks of relevant items in ascending
    order, ``num_listed[q]`` of them for query q; it must list every relevant item ranked <= the query's
    cutoff (a top-k result list does, for cutoffs <= k) and may list more. ``num_relevant`` is R, every
    relevant item of the query in the gallery. ``cutoff`` is one number for all queries (mAP@k, divided by
    min(R, k) so that a perfect list scores 1) or one per query: ``cutoff = R`` gives R-precision's
    average, MAP@R (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020). With distinct ranks the
    i-th listed relevant item has precision i / rank_i. Queries with R = 0 get NaN.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    num_listed = np.asarray(num_listed, dtype=np.int64)
    num_relevant = np.asarray(num_relevant, dtype=np.int64)
    if ranks.shape != (int(num_listed.sum()),) or num_relevant.shape != num_listed.shape:
        raise ValueError(f"{ranks.size} ranks given for {int(num_listed.sum())} listed items "
                         f"({num_relevant.size} R values for {num_listed.size} queries)")
    if (num_listed > num_relevant).any():
        raise ValueError("a query lists more relevant items than it has")
    cutoff = np.broadcast_to(np.asarray(cutoff, dtype=np.float64), num_listed.shape)
    query = np.repeat(np.arange(len(num_listed)), num_listed)
    same_query = query[1:] == query[:-1]
    if (ranks[1:][same_query] <= ranks[:-1][same_query]).any():
        raise ValueError("each query's ranks must be distinct and ascending")
    position = np.arange(len(ranks)) - np.repeat(np.cumsum(num_listed) - num_listed, num_listed) + 1
    counted = ranks <= cutoff[query]
    total = np.bincount(query[counted], weights=position[counted] / ranks[counted], minlength=len(num_listed))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(num_relevant > 0, total / np.minimum(num_relevant, cutoff), np.nan)


def recall_at_k(first_ranks: np.ndarray, k: int) -> float:
    """Fraction of queries whose best-ranked relevant item has rank <= k (1-based).

    CMC top-k (first-match break) and cross-modal Recall@K ("any ground-truth item in the top K") are
    this same number. NaN ranks mark queries without any relevant item; they are left out.
    """
    first_ranks = np.asarray(first_ranks, dtype=np.float64)
    answerable = first_ranks[~np.isnan(first_ranks)]
    if answerable.size == 0:
        raise ValueError("no query has a relevant item, so recall is undefined")
    return float(np.mean(answerable <= k))


def negative_flips(old_correct: np.ndarray, new_correct: np.ndarray) -> np.ndarray:
    """Per query: correct under the old model's pair (old queries, old gallery) and wrong under the new one.

    A negative flip is the regression a user notices: an item the old system found and the upgraded one
    misses (Yan et al., CVPR 2021; RACT, ICLR 2022). ``old_correct``/``new_correct`` are per-query booleans
    (e.g. top-1 correct) for the same queries in the same order.
    """
    old_correct = np.asarray(old_correct, dtype=bool)
    new_correct = np.asarray(new_correct, dtype=bool)
    if old_correct.shape != new_correct.shape or old_correct.ndim != 1:
        raise ValueError(f"negative flips need two per-query vectors of one length, got {old_correct.shape} "
                         f"and {new_correct.shape}")
    return old_correct & ~new_correct


def negative_flip_rate(old_correct: np.ndarray, new_correct: np.ndarray) -> float:
    """NFR: the fraction of all queries that are :func:`negative_flips` (0 = no regression)."""
    flips = negative_flips(old_correct, new_correct)
    if flips.size == 0:
        raise ValueError("the negative-flip rate needs at least one query")
    return float(flips.mean())


# Elements of one block of resampled per-query values: bounds the bootstrap's memory (~32 MiB of float64).
_BOOTSTRAP_BLOCK = 1 << 22


def upgrade_pairs(num_versions: int) -> list[tuple[int, int]]:
    """(new, old) version pairs a report judges: each consecutive upgrade, plus the newest against
    version 0 when that is not already one of them."""
    pairs = [(i, i - 1) for i in range(1, num_versions)]
    return pairs + [(num_versions - 1, 0)] if num_versions > 2 else pairs


def paired_bootstrap(per_query: np.ndarray, *, resamples: int, confidence: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means of ``k`` per-query statistics with percentile-bootstrap confidence intervals over queries.

    ``per_query`` is (k, n): k statistics of the same n queries (e.g. per query new/old top-1 minus
    old/old top-1, the AP difference, a negative flip). Each of ``resamples`` resamples draws n queries
    with replacement and applies that one draw to every row: the resampling is paired, so a query's old
    and new outcomes stay together and the k intervals come from the same resamples. Returns
    (mean, low, high), each of shape (k,): the sample means and the (1 - confidence)/2 and
    (1 + confidence)/2 quantiles of the resampled means. The same ``seed`` gives the same intervals.
    """
    values = np.asarray(per_query, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"the bootstrap needs a (statistics, queries) array with at least one query, got {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError("per-query values must be finite (leave out queries without a relevant item)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if resamples < 1:
        raise ValueError(f"the bootstrap needs at least one resample, got {resamples}")
    k, n = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty((k, resamples))
    step = max(1, _BOOTSTRAP_BLOCK // (k * n))
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        drawn = rng.integers(0, n, size=(stop - start, n))
        means[:, start:stop] = values[:, drawn].mean(axis=2)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=1)
    return values.mean(axis=1), low, high


def session_average(accs: list[float] | np.ndarray) -> float:
    """FSCIL "Avg": the mean accuracy over all sessions, base session included."""
    accs = np.asarray(accs, dtype=np.float64)
    if accs.size == 0:
        raise ValueError("session_average needs at least one session")
    return float(accs.mean())


def performance_drop(accs: list[float] | np.ndarray) -> float:
    """FSCIL "PD": first-session minus last-session accuracy (how much was forgotten overall)."""
    accs = np.asarray(accs, dtype=np.float64)
    if accs.size == 0:
        raise ValueError("performance_drop needs at least one session")
    return float(accs[0] - accs[-1])


def new_classes_undertrained(accuracy_new: Optional[float], accuracy_previous: Optional[float],
                             min_ratio: float) -> Optional[bool]:
    """Whether a version learned the classes its own step added far worse than the ones it already knew:
    accuracy_new < min_ratio × accuracy_previous. None when either accuracy is unknown (version 0 knows no
    earlier classes; a step may add none) or the check is off (``min_ratio`` 0)."""
    if accuracy_new is None or accuracy_previous is None or min_ratio <= 0:
        return None
    return bool(accuracy_new < min_ratio * accuracy_previous)

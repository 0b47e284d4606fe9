"""An independent float64 implementation of the retrieval protocols, for tests of the code that ranks.

It shares nothing with ``orchestrator.evaluation`` but the definitions: scores summed with ``math.fsum``,
a stable sort per query, AP as the mean precision at each relevant item, and scikit-learn's AP for the
shared-threshold variant.
"""

import math

import numpy as np
from sklearn.metrics import average_precision_score


def reference_scores(query, gallery):
    """Cosine similarities computed independently of the code under test, in float64: truncate both
    sides, normalise, and add each pair's products with math.fsum (correctly rounded, so a score depends
    on the two vectors only, never on the position of a row or on a BLAS: identical rows tie exactly)."""
    dim = min(query.shape[1], gallery.shape[1])
    q, g = (np.asarray(x, dtype=np.float64)[:, :dim] for x in (query, gallery))
    q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    return np.array([[math.fsum(a * b) for b in g] for a in q])


def reference(query, query_labels, gallery, gallery_labels, leave_one_out):
    """Per-query evaluation on :func:`reference_scores`: stable argsort of each row (lower index first on
    ties), AP as the mean of precision at each relevant item's rank."""
    scores = reference_scores(query, gallery)
    first, ap = [], []
    for n in range(len(query)):
        candidates = np.arange(len(gallery))
        if leave_one_out:
            candidates = np.delete(candidates, n)
        ranked = candidates[np.argsort(-scores[n, candidates], kind="stable")]
        hits = np.flatnonzero(gallery_labels[ranked] == query_labels[n]) + 1
        first.append(hits[0] if hits.size else np.nan)
        ap.append(np.mean(np.arange(1, hits.size + 1) / hits) if hits.size else np.nan)
    return np.array(first, dtype=float), np.array(ap)


def sklearn_ap(query, query_labels, gallery, gallery_labels, leave_one_out):
    """Per-query AP by scikit-learn on :func:`reference_scores` (tied scores share one threshold)."""
    scores = reference_scores(query, gallery)
    out = []
    for n in range(len(query)):
        keep = np.arange(len(gallery)) != n if leave_one_out else np.ones(len(gallery), dtype=bool)
        relevant = gallery_labels[keep] == query_labels[n]
        out.append(average_precision_score(relevant, scores[n, keep]) if relevant.any() else np.nan)
    return np.array(out)


def reference_summary(query, query_labels, gallery, gallery_labels, leave_one_out):
    """CMC top-1, top-5 and mAP of :func:`reference`, averaged over the queries that have a relevant item."""
    first, ap = reference(query, query_labels, gallery, gallery_labels, leave_one_out)
    answerable = ~np.isnan(first)
    return {"cmc1": float(np.mean(first[answerable] <= 1)), "cmc5": float(np.mean(first[answerable] <= 5)),
            "map": float(np.mean(ap[answerable]))}

"""Many mixed galleries ranked at once equal the exact ranking of each assembled gallery."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.evaluation import per_query_scores
from orchestrator.evaluation import selection_ranking
from orchestrator.evaluation.selection_ranking import rank_selections


@pytest.mark.parametrize("leave_one_out", [True, False])
@pytest.mark.parametrize("map_ties", ["lower-index", "shared"])
def test_every_selection_equals_the_exact_ranking_of_its_gallery(leave_one_out, map_ties, monkeypatch):
    rng = np.random.default_rng(0)
    n, d, versions = 120, 8, 3
    labels = rng.integers(0, 7, n)
    galleries = [(rng.normal(size=(7, d))[labels] + rng.normal(size=(n, d))).astype(np.float32) for _ in range(versions)]
    zeros = np.flatnonzero(labels == 0)  # class 0 holds duplicated items: ties within a version and across versions
    galleries[1][zeros[:3]] = galleries[1][zeros[3:6]]
    galleries[2][zeros[6:8]] = galleries[0][zeros[8:10]]
    galleries[1][30:35] = galleries[0][30:35]  # the same item equal under two versions: no tie
    queries = galleries[2] if leave_one_out else rng.normal(size=(40, d)).astype(np.float32)
    query_labels = labels if leave_one_out else rng.integers(0, 8, 40)  # class 7: no relevant item
    selections = np.stack([np.zeros(n, int), np.full(n, 2), rng.integers(0, 3, n), rng.integers(0, 2, n),
                           (np.arange(n) % 3 == 0).astype(int)])
    exact_rows = []
    original = selection_ranking._exact_row
    monkeypatch.setattr(selection_ranking, "_exact_row", lambda *a: exact_rows.append(1) or original(*a))
    got = rank_selections(queries, query_labels, galleries, labels, selections, leave_one_out=leave_one_out,
                          map_ties=map_ties)
    # the queries of class 0 (and only they) meet ties and take the exact path
    assert len(exact_rows) == np.count_nonzero(query_labels == 0)
    for selection, scores in zip(selections, got):
        gallery = np.stack([galleries[v][k] for k, v in enumerate(selection)])
        want = per_query_scores(queries, query_labels, gallery, labels, leave_one_out=leave_one_out, map_ties=map_ties)
        np.testing.assert_array_equal(scores["first_rank"], want["first_rank"])
        np.testing.assert_allclose(scores["ap"], want["ap"], rtol=1e-12)


def test_grid_buckets_equal_a_binary_search():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.uniform(-1, 1, 5000), np.linspace(-1, 1, 41), [0.9, 2.0, -3.0]]).reshape(2, -1)
    for thresholds in (np.unique(rng.uniform(-0.5, 0.9, 37)), np.linspace(-1, 1, 41), np.array([0.3])):
        buckets, near = selection_ranking._buckets(thresholds, values)
        np.testing.assert_array_equal(buckets, np.searchsorted(thresholds, values))
        equal = np.flatnonzero(np.isin(values.ravel(), thresholds))
        assert set(equal) <= set(near)  # every value equal to a threshold is searched exactly


def test_values_off_the_thresholds_range_are_counted_without_a_search():
    thresholds = np.array([0.1, 0.2, 0.7])
    values = np.array([[-2.0, -0.5, 0.05, 0.75, 0.99]])
    buckets, near = selection_ranking._buckets(thresholds, values)
    assert buckets.tolist() == [[0, 0, 0, 3, 3]] and near.size == 0

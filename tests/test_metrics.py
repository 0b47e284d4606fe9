"""Every formula of orchestrator.evaluation.metrics against hand-computed values and the published iamcl2r matrices."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator.evaluation import metrics

NAN = float("nan")
FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "iamcl2r_matrices.json").read_text())

# Rows = query model, columns = gallery model.
#   cross-tests: (1,0) 0.60 > 0.50 holds; (2,0) 0.50 vs 0.50 is a tie; (2,1) 0.65 < 0.70 fails.
M3 = np.array([
    [0.50, NAN, NAN],
    [0.60, 0.70, NAN],
    [0.50, 0.65, 0.80],
])


def test_ecc_matrix_marks_only_cross_tests_that_beat_the_gallery_self_test():
    expected = np.zeros((3, 3), dtype=bool)
    expected[1, 0] = True
    np.testing.assert_array_equal(metrics.ecc_matrix(M3), expected)
    expected[2, 0] = True  # the tie passes under the CL2R convention
    np.testing.assert_array_equal(metrics.ecc_matrix(M3, ties="pass"), expected)


def test_ecc_holds_is_the_pair_rule_for_scalars_and_arrays():
    assert metrics.ecc_holds(0.6, 0.5) and not metrics.ecc_holds(0.5, 0.5) and not metrics.ecc_holds(0.4, 0.5)
    assert metrics.ecc_holds(0.5, 0.5, ties="pass") and not metrics.ecc_holds(0.4, 0.5, ties="pass")
    np.testing.assert_array_equal(metrics.ecc_holds(np.array([0.4, 0.5, 0.6]), 0.5), [False, False, True])
    with pytest.raises(ValueError, match="ties"):
        metrics.ecc_holds(0.6, 0.5, ties="strict")


def test_ecc_every_pair():
    assert metrics.ecc_every_pair(M3) is False and metrics.ecc_every_pair(M3, ties="pass") is False  # (2,1)
    tied = np.array([[0.5, NAN], [0.5, 0.9]])
    assert metrics.ecc_every_pair(tied) is False and metrics.ecc_every_pair(tied, ties="pass") is True
    assert metrics.ecc_every_pair(np.array([[0.7]])) is None  # no pair to judge


def test_average_compatibility_counts_ties_as_violations_by_default():
    assert metrics.average_compatibility(M3) == pytest.approx(1 / 3)  # only (1,0) of 3 cross-tests
    assert metrics.average_compatibility(M3, ties="pass") == pytest.approx(2 / 3)  # (1,0) and the tie (2,0)
    with pytest.raises(ValueError):
        metrics.average_compatibility(M3, ties="maybe")


def test_ac_curve_is_ac_of_each_top_left_block():
    # tau=2: [[0.5], [0.6, 0.7]] -> the single cross-test holds -> 1.0; tau=3: AC of M3.
    assert metrics.ac_curve(M3) == pytest.approx([1.0, 1 / 3])
    assert metrics.ac_curve(M3, ties="pass") == pytest.approx([1.0, 2 / 3])


def test_average_multimodel_accuracy_and_curve():
    # 100 * (0.5 + 0.6 + 0.7 + 0.5 + 0.65 + 0.8) / 6 = 100 * 3.75 / 6 = 62.5
    assert metrics.average_multimodel_accuracy(M3) == pytest.approx(62.5)
    # tau=1: 50; tau=2: 100 * (0.5 + 0.6 + 0.7) / 3 = 60; tau=3: 62.5
    assert metrics.am_curve(M3) == pytest.approx([50.0, 60.0, 62.5])


def test_average_multimodel_accuracy_keeps_a_genuine_zero():
    M = np.array([[0.0, NAN], [0.4, 0.8]])
    # 100 * (0 + 0.4 + 0.8) / 3 = 40; dropping the 0 as "missing" would give 60.
    assert metrics.average_multimodel_accuracy(M) == pytest.approx(40.0)
    assert metrics.average_compatibility(M) == 1.0  # 0.4 > 0.0


def test_backward_and_forward_compatibility():
    # BC = mean(M[2][0] - M[0][0], M[2][1] - M[1][1]) = mean(0.0, -0.05) = -0.025
    assert metrics.backward_compatibility(M3) == pytest.approx(-0.025)
    # FC = mean(M[1][0] - M[1][1], M[2][1] - M[2][2]) = mean(-0.10, -0.15) = -0.125
    assert metrics.forward_compatibility(M3) == pytest.approx(-0.125)


def test_single_model_conventions():
    M = np.array([[0.7]])
    assert metrics.average_compatibility(M) == 1.0  # reference code clamps the denominator
    assert metrics.ac_curve(M) == []
    assert metrics.average_multimodel_accuracy(M) == pytest.approx(70.0)
    assert metrics.am_curve(M) == pytest.approx([70.0])
    assert math.isnan(metrics.backward_compatibility(M))
    assert math.isnan(metrics.forward_compatibility(M))


def test_upper_triangle_is_ignored_and_missing_lower_cells_are_errors():
    zeros_above = np.nan_to_num(M3)  # iamcl2r stores 0 above the diagonal
    assert metrics.average_multimodel_accuracy(zeros_above) == pytest.approx(62.5)
    assert metrics.average_compatibility(zeros_above) == pytest.approx(1 / 3)
    holey = M3.copy()
    holey[2, 1] = NAN
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        metrics.average_multimodel_accuracy(holey)
    with pytest.raises(ValueError, match="square"):
        metrics.average_compatibility(np.zeros((2, 3)))


def test_lower_triangle_mask():
    np.testing.assert_array_equal(metrics.lower_triangle_mask(2), [[True, False], [True, True]])


def test_update_gain_bt2_worked_example():
    # BT-2 README, ImageNet top-1: BCT (44.3 - 40.9) / (67.9 - 40.9) = 3.4 / 27 = 0.126
    assert metrics.update_gain(44.3, 40.9, 67.9) == pytest.approx(0.126, abs=5e-4)
    assert metrics.update_gain(44.4, 40.9, 67.9) == pytest.approx(0.130, abs=5e-4)  # BT^2
    assert metrics.update_gain(0.30, 0.40, 0.60) == pytest.approx(-0.5)  # ECC fails -> negative gain
    assert math.isnan(metrics.update_gain(0.5, 0.4, 0.4))


def test_average_precision_from_ranks_by_hand():
    # query 0: relevant at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6
    # query 1: no relevant item -> NaN;  query 2: relevant at rank 2 -> (1/2) / 1 = 1/2
    ap = metrics.average_precision_from_ranks(np.array([1, 3, 2]), np.array([2, 0, 1]))
    np.testing.assert_allclose(ap, [5 / 6, NAN, 0.5])
    with pytest.raises(ValueError):
        metrics.average_precision_from_ranks(np.array([1, 2]), np.array([1]))
    with pytest.raises(ValueError, match="ascending"):
        metrics.average_precision_from_ranks(np.array([3, 1]), np.array([2]))


def test_average_precision_with_shared_ranks_by_hand():
    # A tie that ends at rank 4 holds 2 relevant items (each ranked 4), one more relevant item at rank 6:
    # precision after the tie 2/4 for both, then 3/6 -> (2/4 + 2/4 + 3/6) / 3 = 1/2.
    # Second query: a tie of 3 relevant items at the top (ranked 3) -> precision 3/3 each -> 1.
    ap = metrics.average_precision_from_ranks(np.array([4, 4, 6, 3, 3, 3]), np.array([3, 3]))
    np.testing.assert_allclose(ap, [0.5, 1.0])


def test_average_precision_with_shared_ranks_matches_scikit_learn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, 30).astype(float)  # coarse scores: many ties
        relevant = rng.random(30) < 0.3
        relevant[0] = True
        tie_ends = np.array([(scores >= s).sum() for s in scores[relevant]])  # items scored at least as high
        ap = metrics.average_precision_from_ranks(np.sort(tie_ends), np.array([relevant.sum()]))
        assert ap[0] == pytest.approx(average_precision_score(relevant, scores), abs=1e-12)


def test_recall_at_k_skips_unanswerable_queries():
    first = np.array([1, 3, NAN, 6])
    assert metrics.recall_at_k(first, 1) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(first, 5) == pytest.approx(2 / 3)
    assert metrics.recall_at_k(first, 10) == 1.0
    with pytest.raises(ValueError):
        metrics.recall_at_k(np.array([NAN]), 1)


def test_fscil_session_average_and_performance_drop():
    # CPE-CLIP CIFAR-100 per-session accuracies as quoted in Lark's Table 2: Avg 83.42, PD 7.31.
    sessions = [87.83, 85.86, 84.93, 82.85, 82.64, 82.42, 82.27, 81.44, 80.52]
    assert metrics.session_average(sessions) == pytest.approx(83.42, abs=5e-3)
    assert metrics.performance_drop(sessions) == pytest.approx(7.31)


def test_published_hoc_7_tasks():
    M = np.array(FIXTURES["hoc_7tasks"]["matrix"])
    # exactly one violation: M[4][3] = 0.72114 <= M[3][3] = 0.72374 (0-indexed)
    assert metrics.average_compatibility(M) == pytest.approx(20 / 21, abs=1e-12)
    assert not metrics.ecc_matrix(M)[4, 3] and metrics.ecc_matrix(M).sum() == 20
    assert metrics.average_compatibility(M) == pytest.approx(FIXTURES["hoc_7tasks"]["AC"], abs=5e-3)
    assert metrics.average_multimodel_accuracy(M) == pytest.approx(68.899, abs=5e-4)
    assert metrics.am_curve(M)[-1] == pytest.approx(metrics.average_multimodel_accuracy(M))


@pytest.mark.parametrize("key, am", [("er_7tasks", 35.179), ("er_31tasks", 30.326)])
def test_published_er(key, am):
    M = np.array(FIXTURES[key]["matrix"])
    assert metrics.average_compatibility(M) == 0.0
    assert metrics.average_compatibility(M, ties="pass") == 0.0
    assert metrics.average_multimodel_accuracy(M) == pytest.approx(am, abs=5e-4)
    assert FIXTURES[key]["AM"] == pytest.approx(am)


def test_negative_flips_count_only_queries_the_old_pair_got_right_and_the_new_pair_gets_wrong():
    # queries:      0      1      2      3      4
    old = np.array([True, True, False, False, True])
    new = np.array([True, False, True, False, False])
    np.testing.assert_array_equal(metrics.negative_flips(old, new), [False, True, False, False, True])
    assert metrics.negative_flip_rate(old, new) == pytest.approx(2 / 5)
    assert metrics.negative_flip_rate(old, old) == 0.0
    with pytest.raises(ValueError, match="one length"):
        metrics.negative_flip_rate(old, new[:3])
    with pytest.raises(ValueError, match="at least one query"):
        metrics.negative_flip_rate(np.zeros(0, bool), np.zeros(0, bool))

"""Protocols of orchestrator.evaluation against hand-computed cases, an independent float64 reference
and scikit-learn's average precision."""

from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.config import EvalSetConfig, EvaluationConfig
from orchestrator.errors import DataError, StoreError
from orchestrator.evaluation.flips import FLIP_KEYS, TOP1_CORRECT, pack_correct, row_flips, unpack_correct
from ranking_reference import reference, reference_scores, sklearn_ap
from orchestrator.evaluation import (BY_BLOCK, CompatibilityMatrix, class_block_top1, compatibility_row, cross_modal_recall, evaluate_pair,
                                     per_query_scores, retrieval_scores, template_top1, truncate_and_normalize)


def well_separated(query, gallery, gap=1e-6):
    """Whether two scores of a row are either equal or more than ``gap`` apart: the code and the reference
    round differently (by less than 1e-7), so only a closer pair could rank differently on the two sides."""
    rows = [np.unique(row) for row in reference_scores(query, gallery)]
    return all(row.size < 2 or np.diff(row).min() > gap for row in rows)


def with_duplicates(rng, n, classes, dims=(16, 24), share=0.4):
    """Labels and one float32 embedding set per dimension in ``dims`` (one per model), where ``share`` of
    the samples repeat an earlier sample exactly (same label, same vector in every model), as duplicated
    images in a real test set do: bit-identical gallery vectors, whose ties the rule must break."""
    labels = rng.integers(0, classes, n)
    models = [(rng.standard_normal((n, d)) + labels[:, None] % 3).astype(np.float32) for d in dims]
    copies = rng.choice(np.arange(1, n), size=int(share * n), replace=False)
    originals = [rng.integers(0, c) for c in copies]  # an earlier sample, perhaps itself a copy
    for c, o in sorted(zip(copies, originals)):  # in index order: an original holds its final value
        labels[c] = labels[o]
        for x in models:
            x[c] = x[o]
    return labels, models


def unit(*degrees):
    return np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in degrees], dtype=np.float32)


# ---- truncation and normalisation ---------------------------------------------------------------------------

def test_truncate_and_normalize_cuts_to_the_smaller_dimension_on_copies(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.f32"
    rng.standard_normal((5, 6)).astype(np.float32).tofile(path)
    a = np.memmap(path, dtype=np.float32, mode="r", shape=(5, 6))  # read-only, as the store serves it
    b = rng.standard_normal((3, 4)) * 10
    a_out, b_out = truncate_and_normalize(a, b)
    assert a_out.shape == (5, 4) and b_out.shape == (3, 4)
    assert a_out.dtype == np.float32 and b_out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a_out, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(a_out, a[:, :4] / np.linalg.norm(a[:, :4], axis=1, keepdims=True), rtol=1e-6)
    assert np.linalg.norm(b, axis=1)[0] > 2  # the input was not touched


def test_zero_vectors_stay_zero_and_non_finite_values_are_errors():
    out, _ = truncate_and_normalize(np.array([[0.0, 0.0], [3.0, 4.0]]), np.ones((1, 2)))
    np.testing.assert_allclose(out, [[0, 0], [0.6, 0.8]])
    with pytest.raises(DataError, match="NaN"):
        truncate_and_normalize(np.array([[np.nan, 1.0]]), np.ones((1, 2)))


# ---- ranking: hand-computed cases ---------------------------------------------------------------------------

def test_leave_one_out_by_hand():
    # Four unit vectors at 0, 30, 50, 90 degrees with labels 0, 1, 0, 1 (the norms must not matter).
    x = unit(0, 30, 50, 90) * np.array([[1], [2], [0.5], [3]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    # query 0 (0 deg):  others by cosine 30 (.87), 50 (.64), 90 (0)   -> its class mate (50) at rank 2: AP 1/2
    # query 1 (30 deg): 50 (.94), 0 (.87), 90 (.5)                     -> class mate (90) at rank 3: AP 1/3
    # query 2 (50 deg): 30 (.94), 90 (.77), 0 (.64)                    -> class mate (0) at rank 3:  AP 1/3
    # query 3 (90 deg): 50 (.77), 30 (.5), 0 (0)                       -> class mate (30) at rank 2: AP 1/2
    scores = per_query_scores(x, labels, x, labels, leave_one_out=True)
    np.testing.assert_array_equal(scores["first_rank"], [2, 3, 3, 2])
    np.testing.assert_allclose(scores["ap"], [1 / 2, 1 / 3, 1 / 3, 1 / 2])
    result = retrieval_scores(x, labels, x, labels, leave_one_out=True, topk=(1, 2, 5))
    assert result == pytest.approx({"cmc1": 0.0, "cmc2": 0.5, "cmc5": 1.0, "map": 5 / 12})


def test_query_gallery_map_by_hand():
    query = np.array([[1.0, 0.0]])
    gallery = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    # similarities 1, .8, .6, 0 -> ranks 1..4; relevant (label 0) at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    result = retrieval_scores(query, np.array([0]), gallery, np.array([1, 0, 1, 0]), leave_one_out=False)
    assert result == pytest.approx({"cmc1": 0.0, "cmc5": 1.0, "map": 0.5})


@pytest.mark.parametrize("gallery_labels, rank", [([0, 1, 1], 2), ([1, 0, 1], 3)])
def test_ties_go_to_the_lower_gallery_index(gallery_labels, rank):
    # items 0 and 1 are the same vector (similarity 0 to the query); item 2 is the query itself (similarity 1)
    gallery = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    args = (np.array([[1.0, 0.0]]), np.array([0]), gallery, np.array(gallery_labels))
    sorted_path = per_query_scores(*args, leave_one_out=False)
    counted_path = per_query_scores(*args, leave_one_out=False, with_ap=False)
    assert sorted_path["first_rank"][0] == counted_path["first_rank"][0] == rank
    assert sorted_path["ap"][0] == pytest.approx(1 / rank)
    # shared: the tie (ranks 2-3) is one threshold, so the relevant item gets precision 1/3 either way
    shared = per_query_scores(*args, leave_one_out=False, map_ties="shared")
    assert shared["first_rank"][0] == rank and shared["ap"][0] == pytest.approx(1 / 3)


def test_shared_ties_map_by_hand():
    # Similarities to the query (1, 0): items 0-2 are (.6, .8) (0.6, tied), item 3 is (1, 0) (1.0),
    # item 4 is (0, 1) (0.0). Relevant (label 0): items 0, 1 and 4.
    gallery = np.array([[0.6, 0.8], [0.6, 0.8], [0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    args = (np.array([[1.0, 0.0]]), np.array([0]), gallery, np.array([0, 0, 1, 1, 0]))
    # lower-index: ranking 3, 0, 1, 2, 4 -> relevant at ranks 2, 3, 5: AP = (1/2 + 2/3 + 3/5) / 3
    assert retrieval_scores(*args, leave_one_out=False)["map"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    # shared: the tie {0, 1, 2} ends at rank 4 holding 2 relevant -> 2/4 each; item 4 at rank 5 -> 3/5
    shared = retrieval_scores(*args, leave_one_out=False, map_ties="shared")
    assert shared == pytest.approx({"cmc1": 0.0, "cmc5": 1.0, "map": (2 / 4 + 2 / 4 + 3 / 5) / 3})
    with pytest.raises(ValueError, match="map_ties"):
        retrieval_scores(*args, leave_one_out=False, map_ties="average")


def test_queries_without_relevant_items_are_left_out():
    rng = np.random.default_rng(3)
    query, gallery = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    scores = per_query_scores(query, np.array([0, 7, 1, 7]), gallery, np.array([0, 0, 1, 1, 2]), leave_one_out=False)
    assert np.isnan(scores["first_rank"][[1, 3]]).all() and np.isnan(scores["ap"][[1, 3]]).all()
    result = retrieval_scores(query, np.array([0, 7, 1, 7]), gallery, np.array([0, 0, 1, 1, 2]), leave_one_out=False)
    assert result["map"] == pytest.approx(np.nanmean(scores["ap"]))
    with pytest.raises(DataError, match="no query"):
        retrieval_scores(query, np.full(4, 9), gallery, np.zeros(5), leave_one_out=False)


# ---- ranking: against the independent float64 reference and scikit-learn ----------------------------------

def reference_cases(seed):
    """(query, query labels, gallery, gallery labels, leave_one_out) on data with many exact duplicates:
    self-test, cross-model test (another dimension, so truncation), and query-gallery with labels on
    either side that the other lacks."""
    rng = np.random.default_rng(seed)
    for _ in range(20):  # a draw with two distinct scores closer than the rounding could tell apart is redrawn
        n, classes = int(rng.integers(40, 120)), int(rng.integers(2, 8))
        labels, (old, new) = with_duplicates(rng, n, classes)
        if well_separated(old, old) and well_separated(new, old):
            break
    else:
        pytest.fail("no well-separated draw in 20 tries")
    gallery_labels = rng.integers(0, classes + 2, n)
    return [(old, labels, old, labels, True), (new, labels, old, labels, True),
            (new[: n // 2], labels[: n // 2], old, gallery_labels, False)]


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_float64_reference_on_data_with_duplicates(seed):
    for query, query_labels, gallery, gallery_labels, leave_one_out in reference_cases(seed):
        first, ap = reference(query, query_labels, gallery, gallery_labels, leave_one_out)
        scores = per_query_scores(query, query_labels, gallery, gallery_labels, leave_one_out=leave_one_out)
        np.testing.assert_array_equal(scores["first_rank"], first)
        np.testing.assert_allclose(scores["ap"], ap, rtol=0, atol=1e-12)
        counted = per_query_scores(query, query_labels, gallery, gallery_labels, leave_one_out=leave_one_out,
                                   with_ap=False)
        np.testing.assert_array_equal(counted["first_rank"], first)
        assert set(counted) == {"first_rank"}


@pytest.mark.parametrize("seed", range(4))
def test_shared_ties_map_matches_scikit_learn(seed):
    for query, query_labels, gallery, gallery_labels, leave_one_out in reference_cases(seed):
        expected = sklearn_ap(query, query_labels, gallery, gallery_labels, leave_one_out)
        scores = per_query_scores(query, query_labels, gallery, gallery_labels, leave_one_out=leave_one_out,
                                  map_ties="shared")
        np.testing.assert_allclose(scores["ap"], expected, rtol=0, atol=1e-12)
        first, _ = reference(query, query_labels, gallery, gallery_labels, leave_one_out)
        np.testing.assert_array_equal(scores["first_rank"], first)  # CMC keeps the lower-index rule
        lower_index = per_query_scores(query, query_labels, gallery, gallery_labels, leave_one_out=leave_one_out)
        assert not np.allclose(lower_index["ap"], expected, equal_nan=True)  # the duplicates make them differ


@pytest.mark.parametrize("map_ties", ["lower-index", "shared"])
def test_results_do_not_depend_on_the_query_block_size(monkeypatch, map_ties):
    rng = np.random.default_rng(11)
    labels, (x,) = with_duplicates(rng, 400, 12, dims=(96,), share=0.25)
    results = []
    for rows_per_block in (400, 37, 4, 1):  # one block; blocks of 37 rows; ...; one query at a time
        monkeypatch.setattr("orchestrator.evaluation.retrieval._BLOCK_ELEMENTS", 400 * rows_per_block)
        results.append((per_query_scores(x, labels, x, labels, leave_one_out=True, map_ties=map_ties),
                        per_query_scores(x, labels, x, labels, leave_one_out=True, with_ap=False)))
    for scores, counted in results[1:]:
        np.testing.assert_array_equal(scores["first_rank"], results[0][0]["first_rank"])
        np.testing.assert_array_equal(scores["ap"], results[0][0]["ap"])
        np.testing.assert_array_equal(counted["first_rank"], results[0][0]["first_rank"])


def test_leave_one_out_needs_the_same_samples():
    x = np.eye(3)
    with pytest.raises(DataError, match="same samples"):
        retrieval_scores(x, np.array([0, 0, 1]), x, np.array([0, 1, 1]), leave_one_out=True)
    with pytest.raises(DataError, match="labels"):
        retrieval_scores(x, np.array([0, 0]), x, np.array([0, 0, 1]), leave_one_out=False)


# ---- protocol (a): class templates --------------------------------------------------------------------------

def test_template_top1_by_hand():
    # class 0: (1,0) stored with norm 10, and (.6,.8) -> mean of the *normalised* features (.8,.4) -> (.894,.447)
    # class 1: (0,1), (-.6,.8)                        -> mean (-.3,.9)                              -> (-.316,.949)
    gallery = np.array([[10.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.6, 0.8]])
    gallery_labels = np.array([0, 0, 1, 1])
    # q0 (1,0):    .894 vs -.316 -> 0, right
    # q1 (.2,1):   .626 vs  .886 -> 1, wrong (label 0)
    # q2 (-1,.2): -.805 vs  .506 -> 1, right
    # q3 (.5,1):   .894 vs  .791 -> 0, right; a mean of unnormalised features ((.997,.075)) would say 1
    query = np.array([[1.0, 0.0], [0.2, 1.0], [-1.0, 0.2], [0.5, 1.0]])
    result = template_top1(query, np.array([0, 0, 1, 0]), gallery, gallery_labels)
    assert result == pytest.approx({"cmc1": 0.75})


# ---- protocol (c): cross-modal Recall@K ---------------------------------------------------------------------

def test_cross_modal_recall_by_hand():
    images = np.array([[1.0, 0, 0], [0, 1.0, 0]])  # image 0, image 1 (queries and gallery alike)
    caption_of = np.array([0, 0, 0, 1, 1])
    text_gallery = np.array([[0.1, 0, 1], [0.7, 0, 0.714], [0, 0, 1], [0.8, 0.6, 0], [0, 1, 0]])
    # I2T image 0: captions by similarity c3 (.8, image 1), c1 (.7, image 0) ... -> first own caption at rank 2
    # I2T image 1: c4 (1.0, its own) first -> rank 1.   R@1 = 1/2, R@5 = 1
    text_q = np.array([[1, 0.2, 0], [0.3, 1, 0], [1, 0, 0], [0, 1, 0], [1, 0.5, 0]])
    # T2I: caption 0 -> image 0 first (hit); caption 1 -> image 1 first (miss); caption 2 -> hit;
    #      caption 3 -> image 1 (hit); caption 4 (of image 1) -> image 0 first (miss).  R@1 = 3/5, R@5 = 1
    result = cross_modal_recall(images, text_gallery, caption_of, text_q, images, ks=(1, 5))
    assert result == pytest.approx({"i2t_r1": 0.5, "i2t_r5": 1.0, "t2i_r1": 0.6, "t2i_r5": 1.0})
    with pytest.raises(DataError, match="caption_of"):
        cross_modal_recall(images, text_gallery, caption_of + 1, text_q, images)


# ---- compatibility matrix -----------------------------------------------------------------------------------

def test_compatibility_matrix_list_and_csv_round_trip(tmp_path):
    matrix = CompatibilityMatrix(3)
    matrix.set(0, 0, 0.0)  # a genuine zero is a value, not a missing cell
    matrix.set(1, 0, 0.123456789012345)
    matrix.set(1, 1, 0.5)
    assert not matrix.complete
    assert matrix.to_list() == [[0.0, None, None], [0.123456789012345, 0.5, None], [None, None, None]]
    path = tmp_path / "matrix.csv"
    matrix.to_csv(path)
    assert path.read_text().splitlines()[:2] == ["query\\gallery,0,1,2", "0,0.0,,"]
    back = CompatibilityMatrix.from_csv(path)
    assert back.to_list() == matrix.to_list()
    np.testing.assert_array_equal(back.mask, matrix.mask)
    assert CompatibilityMatrix.from_list(matrix.to_list()).to_list() == matrix.to_list()
    for i, j in [(2, 0), (2, 1), (2, 2)]:
        matrix.set(i, j, 0.25)
    assert matrix.complete
    with pytest.raises(ValueError, match="lower triangle"):
        matrix.set(0, 1, 0.5)


@pytest.mark.parametrize("text", [
    "0.5,0,0\n0.6,0.7,0\n0.5,0.65,0.8\n",  # bare square, 0 above the diagonal (iamcl2r)
    "0.5\n0.6,0.7\n0.5,0.65,0.8\n",  # bare lower triangle
    ",0,1,2\n0,0.5,,\n1,0.6,0.7,\n2,0.5,0.65,0.8\n",  # pandas-style header and index
    "0,1,2\n0.5,,\n0.6,0.7,\n0.5,0.65,0.8\n",  # numeric header only
    "v0,0.5,,\nv1,0.6,0.7,\nv2,0.5,0.65,0.8\n",  # text index only
    "query\\gallery,0,1,2\n0,0.5,,\n1,0.6,0.7,\n2,0.5,0.65,0.8\n",  # the to_csv format
    "q/g,a,b,c\nv0,0.5,,\nv1,0.6,0.7,\nv2,0.5,0.65,0.8\n",  # text header and text index
])
def test_matrix_csv_with_or_without_header_and_index(tmp_path, text):
    path = tmp_path / "m.csv"
    path.write_text(text)
    assert CompatibilityMatrix.from_csv(path).to_list() == [[0.5, None, None], [0.6, 0.7, None], [0.5, 0.65, 0.8]]


def test_matrix_csv_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0.5,,\n0.6,x,\n0.5,0.65,0.8\n")
    with pytest.raises(DataError, match="bad.csv"):
        CompatibilityMatrix.from_csv(path)
    path.write_text("0.5,0.1,0.2,0.3\n0.6,0.7,0.1,0.3\n")
    with pytest.raises(DataError, match="square"):
        CompatibilityMatrix.from_csv(path)


# ---- over the store -----------------------------------------------------------------------------------------

class FakeStore:
    def __init__(self, tables):
        self.tables = tables
        self.reads = []

    def read(self, method_key, version, eval_set):
        self.reads.append((method_key, version, eval_set))
        return self.tables[(version, eval_set)]


def make_table(embeddings, labels, sample_ids=None):
    return SimpleNamespace(embeddings=embeddings, labels=labels,
                           sample_ids=np.arange(len(labels)) if sample_ids is None else sample_ids)


def diagonal_top1(store, cfg, version, block_of_label=None):
    """The top-1 correctness rows 0..version-1 record for their diagonal cells, row by row as the driver does."""
    earlier = []
    for v in range(version):
        earlier.append(unpack_correct(compatibility_row(store, "m", v, cfg, block_of_label,
                                                        earlier_top1=earlier)[TOP1_CORRECT]))
    return earlier


def test_evaluate_pair_and_row_leave_one_out():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, 40)
    versions = [rng.standard_normal((40, 8)).astype(np.float32) for _ in range(3)]
    for x in versions:
        x.setflags(write=False)  # the store serves read-only memory maps
    store = FakeStore({(v, "test"): make_table(x, labels) for v, x in enumerate(versions)})
    cfg = EvaluationConfig()
    cell = evaluate_pair(store, "m", 2, 0, cfg)
    assert cell == retrieval_scores(versions[2], labels, versions[0], labels, leave_one_out=True)
    row = compatibility_row(store, "m", 2, cfg, earlier_top1=diagonal_top1(store, cfg, 2))
    assert set(row) == {"cmc1", "cmc5", "map", *FLIP_KEYS} and all(len(row[k]) == 3 for k in ("cmc1", "map"))
    assert row["map"][0] == cell["map"]
    assert store.reads[-4:] == [("m", 2, "test"), ("m", 0, "test"), ("m", 1, "test"), ("m", 2, "test")]
    store.tables[(1, "test")] = make_table(versions[1], labels, np.arange(40)[::-1])
    with pytest.raises(StoreError, match="different"):
        evaluate_pair(store, "m", 2, 1, cfg)


def test_evaluate_pair_query_gallery_with_templates():
    rng = np.random.default_rng(6)
    query, gallery = rng.standard_normal((30, 5)), rng.standard_normal((12, 5))
    query_labels, gallery_labels = rng.integers(0, 3, 30), np.arange(12) % 3
    store = FakeStore({(1, "train"): make_table(query, query_labels),
                       (0, "test"): make_table(gallery, gallery_labels)})
    sets = {"train": EvalSetConfig(split="train"), "test": EvalSetConfig(split="test")}
    with_templates = EvaluationConfig(protocol="query-gallery", sets=sets, query="train", gallery="test",
                                      templates=True)
    assert evaluate_pair(store, "m", 1, 0, with_templates) == template_top1(query, query_labels, gallery,
                                                                            gallery_labels)
    plain = EvaluationConfig(protocol="query-gallery", sets=sets, query="train", gallery="test")
    assert evaluate_pair(store, "m", 1, 0, plain) == retrieval_scores(query, query_labels, gallery, gallery_labels,
                                                                      leave_one_out=False)


def test_class_block_top1_by_hand():
    first_rank = np.array([1, 2, 1, np.nan, 1, 3])  # 1-based; NaN: no relevant gallery item
    blocks = np.array([0, 0, 1, 1, 2, 2])
    assert class_block_top1(first_rank, blocks, 4) == [0.5, 1.0, 0.5, None]


def test_row_by_block_splits_top1_by_the_classes_of_each_block():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 6, 60)
    versions = [rng.standard_normal((60, 8)).astype(np.float32) for _ in range(2)]
    store = FakeStore({(v, "test"): make_table(x, labels) for v, x in enumerate(versions)})
    block_of_label = np.array([0, 0, 0, 1, 1, 2])
    earlier = diagonal_top1(store, EvaluationConfig(), 1)
    row = compatibility_row(store, "m", 1, EvaluationConfig(), block_of_label, earlier_top1=earlier)
    assert row["cmc1"] == compatibility_row(store, "m", 1, EvaluationConfig(), earlier_top1=earlier)["cmc1"]
    for j in range(2):
        counts = np.bincount(block_of_label[labels], minlength=3)
        assert np.dot(row[BY_BLOCK][j], counts) / counts.sum() == pytest.approx(row["cmc1"][j])
    templates = EvaluationConfig(protocol="query-gallery", query="test", gallery="test", templates=True)
    assert BY_BLOCK not in compatibility_row(store, "m", 1, templates, block_of_label,
                                             earlier_top1=diagonal_top1(store, templates, 1))


# ---- negative flips of a row ---------------------------------------------------------------------------------

def test_row_flips_by_hand():
    # Row 2. Queries 0..4; query 4 has no relevant item (NaN) and is left out of every rate.
    first_ranks = [np.array([1, 2, 1, 3, np.nan]),   # cell (2, 0)
                   np.array([2, 1, 1, 1, np.nan]),   # cell (2, 1)
                   np.array([1, 1, 2, 2, np.nan])]   # cell (2, 2)
    earlier = [np.array([True, True, False, True, False]),   # cell (0, 0) right on 0, 1, 3
               np.array([True, False, True, True, False])]   # cell (1, 1) right on 0, 2, 3
    flips = row_flips(first_ranks, earlier)
    # new/old: (2,0) wrong on 1, 3 -> flips {1, 3} of 4 queries; (2,1) wrong on 0 -> flips {0}.
    assert flips["nfr_new_old"] == [0.5, 0.25, None]
    # new/new: (2,2) wrong on 2, 3 -> against (0,0): {3}; against (1,1): {2, 3}.
    assert flips["nfr_new_new"] == [0.25, 0.5, None]
    np.testing.assert_array_equal(unpack_correct(flips[TOP1_CORRECT]), [True, True, False, False, False])
    assert row_flips([np.array([1.0, 2.0])], [])["nfr_new_old"] == [None]
    with pytest.raises(ValueError, match="older diagonal"):
        row_flips(first_ranks, earlier[:1])
    with pytest.raises(StoreError, match="same evaluation set"):
        row_flips(first_ranks, [earlier[0][:3], earlier[1]])


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 1001])
def test_packed_correctness_round_trips(size):
    correct = np.random.default_rng(size).random(size) < 0.5
    np.testing.assert_array_equal(unpack_correct(pack_correct(correct)), correct)


def test_row_flip_rates_match_the_float64_reference():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 5, 50)
    versions = [rng.standard_normal((50, 6)).astype(np.float32) + labels[:, None] % 2 for _ in range(3)]
    store = FakeStore({(v, "test"): make_table(x, labels) for v, x in enumerate(versions)})
    row = compatibility_row(store, "m", 2, EvaluationConfig(), earlier_top1=diagonal_top1(store, EvaluationConfig(), 2))
    right = {(i, j): reference(versions[i], labels, versions[j], labels, True)[0] == 1
             for i, j in ((0, 0), (1, 1), (2, 0), (2, 1), (2, 2))}
    for j in range(2):
        assert row["nfr_new_old"][j] == pytest.approx(np.mean(right[j, j] & ~right[2, j]))
        assert row["nfr_new_new"][j] == pytest.approx(np.mean(right[j, j] & ~right[2, 2]))
    assert row["nfr_new_old"][2] is None and 0 < max(row["nfr_new_old"][:2])

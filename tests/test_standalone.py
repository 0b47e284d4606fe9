"""The ``metrics`` and ``compare`` commands through their parsers, on files written in tmp_path."""

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.errors import DataError, StoreError
from orchestrator.evaluation import CompatibilityMatrix
from orchestrator.evaluation.standalone import add_compare_parser, add_metrics_parser, read_embedding_file
from ranking_reference import reference_summary

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "iamcl2r_matrices.json").read_text())


def run(argv, capsys):
    parser = argparse.ArgumentParser(prog="compat")
    subparsers = parser.add_subparsers(required=True)
    add_metrics_parser(subparsers)
    add_compare_parser(subparsers)
    args = parser.parse_args([str(a) for a in argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def data(n=60, d=12, classes=4, seed=0, shift=0.0):
    """Clustered embeddings; ``shift`` > 0 gives a second model that drifts away from the first one."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = np.random.default_rng(99).standard_normal((classes, d)) * 2
    embeddings = centres[labels] + rng.standard_normal((n, d)) + shift * rng.standard_normal((1, d))
    return embeddings.astype(np.float32), labels


def write_parquet(path, embeddings, labels, split=None, fixed=False):
    value_type = pa.float32()
    list_type = pa.list_(value_type, embeddings.shape[1]) if fixed else pa.list_(value_type)
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1]) \
        if fixed else pa.array(list(embeddings), type=list_type)
    columns = {"label": pa.array(labels, pa.int64()), "embedding": embedding}
    if split is not None:
        columns["split"] = pa.array(split)
    pq.write_table(pa.table(columns), path)
    return path


# ---- compat metrics -----------------------------------------------------------------------------------------

def test_metrics_json_on_the_published_hoc_matrix(tmp_path, capsys):
    path = tmp_path / "hoc.csv"
    CompatibilityMatrix.from_list(FIXTURES["hoc_7tasks"]["matrix"]).to_csv(path)
    code, out = run(["metrics", path, "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and set(result) == {"AC", "AM", "BC", "FC"}
    assert result["AC"] == pytest.approx(20 / 21) and result["AM"] == pytest.approx(68.899, abs=5e-4)


def test_metrics_accepts_a_bare_matrix_with_zeros_above_the_diagonal(tmp_path, capsys):
    path = tmp_path / "er.csv"
    np.savetxt(path, np.array(FIXTURES["er_7tasks"]["matrix"]), delimiter=",")
    code, out = run(["metrics", path], capsys)
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and set(lines) == {"AC", "AM", "BC", "FC"}
    assert lines["AC"].startswith("0.0000") and lines["AM"] == "35.179"


def test_metrics_ties_option_and_single_model(tmp_path, capsys):
    path = tmp_path / "m.csv"
    path.write_text("0.5\n0.5,0.6\n")  # the cross-test equals the old self-test
    assert json.loads(run(["metrics", path, "--json"], capsys)[1])["AC"] == 0.0
    assert json.loads(run(["metrics", path, "--json", "--ties", "pass"], capsys)[1])["AC"] == 1.0
    path.write_text("0.5\n")
    result = json.loads(run(["metrics", path, "--json"], capsys)[1])
    assert result == {"AC": 1.0, "AM": 50.0, "BC": None, "FC": None}


def test_metrics_rejects_a_missing_lower_cell(tmp_path, capsys):
    path = tmp_path / "holes.csv"
    path.write_text("0.5,,\n0.6,0.7,\n0.5,,0.8\n")
    with pytest.raises(DataError, match=r"holes.csv.*\(2, 1\)"):
        run(["metrics", path], capsys)


# ---- reading embedding files --------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["list", "fixed", "npz"])
def test_read_embedding_file_formats(tmp_path, fmt):
    embeddings, labels = data(n=10, d=3)
    split = np.array(["query", "gallery"] * 5)
    if fmt == "npz":
        path = tmp_path / "e.npz"
        np.savez(path, embeddings=embeddings.astype(np.float64), labels=labels.astype(np.int32), split=split)
    else:
        path = write_parquet(tmp_path / "e.parquet", embeddings, labels, split, fixed=fmt == "fixed")
    read_embeddings, read_labels, read_split = read_embedding_file(path)
    assert read_embeddings.dtype == np.float32 and read_labels.dtype == np.int64
    np.testing.assert_array_equal(read_embeddings, embeddings)
    np.testing.assert_array_equal(read_labels, labels)
    np.testing.assert_array_equal(read_split, split)


def test_truncated_parquet_is_a_store_error_naming_the_file(tmp_path):
    path = write_parquet(tmp_path / "old.parquet", *data())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StoreError, match=r"old\.parquet.*(truncated|corrupt)"):
        read_embedding_file(path)


def test_truncated_npz_is_a_store_error(tmp_path):
    path = tmp_path / "old.npz"
    embeddings, labels = data()
    np.savez(path, embeddings=embeddings, labels=labels)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(StoreError, match=r"old\.npz"):
        read_embedding_file(path)


def test_bad_embedding_files(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        read_embedding_file(tmp_path / "nowhere.parquet")
    no_label = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"embedding": pa.array([[1.0, 2.0]])}), no_label)
    with pytest.raises(StoreError, match="nolabel.parquet has no column 'label'"):
        read_embedding_file(no_label)
    ragged = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"label": [0, 1], "embedding": pa.array([[1.0, 2.0], [1.0]])}), ragged)
    with pytest.raises(StoreError, match="ragged.parquet: embeddings have different lengths"):
        read_embedding_file(ragged)
    bad_split = write_parquet(tmp_path / "split.parquet", *data(n=2), split=np.array(["query", "test"]))
    with pytest.raises(StoreError, match="'test'"):
        read_embedding_file(bad_split)


# ---- compat compare -----------------------------------------------------------------------------------------

def hand_case():
    """Four samples of two classes, leave-one-out, worked out by hand. Old model: a0=(1,0), a1=(.8,.6) of
    class 0, b0=(.6,.8), b1=(0,1) of class 1, so a1 and b0 (cosine .96) each find the other class first:
    old/old CMC top-1 = 2/4, AP = 1, 1/2, 1/2, 1 -> mAP 0.75. New model: (1,0) for class 0 and (0,1) for
    class 1; against the old gallery every query's own-class item ranks first: new/old top-1 = mAP = 1.
    Each query has 3 candidates, so top-5 is 1 on every cell: a tie."""
    old = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], dtype=np.float32)
    new = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    return old, new, np.array([0, 0, 1, 1])


def test_compare_leave_one_out_by_hand(tmp_path, capsys):
    old_x, new_x, labels = hand_case()
    old = write_parquet(tmp_path / "old.parquet", old_x, labels)
    new = tmp_path / "new.npz"
    np.savez(new, embeddings=new_x, labels=labels)
    code, out = run(["compare", "--old", old, "--new", new, "--json"], capsys)
    result = json.loads(out)
    assert code == 0
    assert result["old_old"] == pytest.approx({"cmc1": 0.5, "cmc5": 1.0, "map": 0.75})
    assert result["new_old"] == pytest.approx({"cmc1": 1.0, "cmc5": 1.0, "map": 1.0})
    assert result["new_new"] == pytest.approx({"cmc1": 1.0, "cmc5": 1.0, "map": 1.0})
    assert result["ecc"] == {"cmc1": True, "cmc5": False, "map": True}  # top-5 ties, and ties fail by default
    passing = json.loads(run(["compare", "--old", old, "--new", new, "--ties", "pass", "--json"], capsys)[1])
    assert passing["ecc"] == {"cmc1": True, "cmc5": True, "map": True}


def test_compare_leave_one_out_matches_the_float64_reference(tmp_path, capsys):
    old_x, labels = data(seed=1)
    new_x, _ = data(seed=2, shift=3.0)
    old = write_parquet(tmp_path / "old.parquet", old_x, labels)
    new = write_parquet(tmp_path / "new.parquet", new_x, labels)
    result = json.loads(run(["compare", "--old", old, "--new", new, "--json"], capsys)[1])
    for cell, (query, gallery) in {"old_old": (old_x, old_x), "new_old": (new_x, old_x),
                                   "new_new": (new_x, new_x)}.items():
        assert result[cell] == pytest.approx(reference_summary(query, labels, gallery, labels, leave_one_out=True),
                                             abs=1e-12)


def test_compare_same_model_fails_ecc_because_it_is_strict(tmp_path, capsys):
    path = write_parquet(tmp_path / "same.parquet", *data())
    code, out = run(["compare", "--old", path, "--new", path], capsys)
    assert code == 0
    assert "old/old" in out and "new/old" in out and "new/new" in out
    assert "cmc1 fails, cmc5 fails, map fails" in out


def test_compare_query_gallery_matches_the_float64_reference_on_every_cell(tmp_path, capsys):
    old_x, labels = data(n=40, seed=3)
    new_x, _ = data(n=40, seed=4, shift=2.0)
    split = np.where(np.arange(40) < 30, "query", "gallery")
    old = write_parquet(tmp_path / "old.parquet", old_x, labels, split)
    new = write_parquet(tmp_path / "new.parquet", new_x, labels, split)
    result = json.loads(run(["compare", "--old", old, "--new", new, "--protocol", "query-gallery", "--json"],
                            capsys)[1])
    query, gallery = slice(0, 30), slice(30, 40)
    for cell, (q, g) in {"old_old": (old_x, old_x), "new_old": (new_x, old_x), "new_new": (new_x, new_x)}.items():
        expected = reference_summary(q[query], labels[query], g[gallery], labels[gallery], leave_one_out=False)
        assert result[cell] == pytest.approx(expected, abs=1e-12)
    no_split = write_parquet(tmp_path / "nosplit.parquet", old_x, labels)
    with pytest.raises(StoreError, match="nosplit.parquet has no 'split' column"):
        run(["compare", "--old", no_split, "--new", new, "--protocol", "query-gallery"], capsys)


def test_compare_leave_one_out_needs_the_same_rows(tmp_path, capsys):
    x, labels = data()
    old = write_parquet(tmp_path / "old.parquet", x, labels)
    new = write_parquet(tmp_path / "new.parquet", x[:-1], labels[:-1])
    with pytest.raises(DataError, match="same samples in the same order"):
        run(["compare", "--old", old, "--new", new], capsys)


def test_compare_ties_option_decides_a_tied_cross_test(tmp_path, capsys):
    # The same embeddings as old and new: every new/old cell equals old/old, a tie in every metric.
    path = write_parquet(tmp_path / "same.parquet", *data())
    strict = json.loads(run(["compare", "--old", path, "--new", path, "--json"], capsys)[1])
    assert strict["ecc"] == {"cmc1": False, "cmc5": False, "map": False}
    lenient = json.loads(run(["compare", "--old", path, "--new", path, "--ties", "pass", "--json"], capsys)[1])
    assert lenient["ecc"] == {"cmc1": True, "cmc5": True, "map": True}
    assert "cmc1 holds, cmc5 holds, map holds" in run(["compare", "--old", path, "--new", path, "--ties", "pass"],
                                                        capsys)[1]


def test_compare_map_ties_shared_is_scikit_learns_average_precision(tmp_path, capsys):
    from sklearn.metrics import average_precision_score

    # Exact duplicates (rows 0-1, 2-3, 4-5) make ties; other similarities are far apart (0, 0.6, 0.8, 1).
    x = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0.6, 0.8], [0.6, 0.8], [0.8, 0.6]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    path = write_parquet(tmp_path / "x.parquet", x, labels)
    expected = []
    for n in range(len(x)):
        others = np.arange(len(x)) != n
        expected.append(average_precision_score(labels[others] == labels[n], x[others] @ x[n].astype(np.float64)))
    shared = json.loads(run(["compare", "--old", path, "--new", path, "--map-ties", "shared", "--json"], capsys)[1])
    assert shared["old_old"]["map"] == pytest.approx(np.mean(expected), abs=1e-12)
    by_index = json.loads(run(["compare", "--old", path, "--new", path, "--json"], capsys)[1])
    assert by_index["old_old"]["map"] != pytest.approx(np.mean(expected), abs=1e-6)


def test_check_and_compare_take_the_same_protocol_and_ties_options():
    """Both commands score embedding files the same way, so both --help texts explain both protocols."""
    from orchestrator.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("compare", "check"):
        options = {action.dest: action for action in commands[name]._actions}
        assert options["protocol"].choices == ("leave-one-out", "query-gallery")
        assert "query-gallery: the split column separates queries from the gallery" in options["protocol"].help
        assert options["ties"].choices == ("fail", "pass") and options["ties"].default == "fail"
    assert commands["compare"].parse_args(["--old", "a", "--new", "b"]).protocol == "leave-one-out"
    assert commands["check"].parse_args(["--old", "a", "--new", "b"]).protocol is None  # a run brings its own

"""``compat check``: the paired bootstrap's coverage on data with a known answer, the per-class breaks and
the negative flips against an independent ranking, and the exit codes through the real CLI."""

import json

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.evaluation.gate import class_breaks
from orchestrator.evaluation.metrics import paired_bootstrap
from ranking_reference import reference


# -- the bootstrap ---------------------------------------------------------------------------------
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_intervals_cover_the_true_mean_at_about_the_stated_rate(confidence):
    """200 synthetic test sets of 200 queries with known population means: new/old - old/old top-1 has
    mean 0.5 x (0.7 - 0.6) = 0.05 (half the queries keep their old outcome), a negative flip has
    probability 0.5 x 0.6 x 0.3 = 0.09. The share of intervals holding the truth is binomial around the
    stated level (sd ~0.015 at 95 %, ~0.028 at 80 %); the band allows about 3 sd."""
    rng = np.random.default_rng(7)
    truth = np.array([0.05, 0.09])
    covered = np.zeros(2)
    for repetition in range(200):
        old = rng.random(200) < 0.6
        new = np.where(rng.random(200) < 0.5, old, rng.random(200) < 0.7)
        _, low, high = paired_bootstrap(np.stack([new.astype(float) - old, old & ~new]), resamples=400,
                                        confidence=confidence, seed=repetition)
        covered += (low <= truth) & (truth <= high)
    band = 3 * np.sqrt(confidence * (1 - confidence) / 200)
    assert np.all(np.abs(covered / 200 - confidence) <= band), covered / 200


def test_bootstrap_by_hand():
    constant = paired_bootstrap(np.array([[0.25, 0.25, 0.25]]), resamples=50, confidence=0.9, seed=0)
    assert [float(a[0]) for a in constant] == [0.25, 0.25, 0.25]
    values = np.array([[0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0], [-0.0, -1.0, -1.0, -0.0, -1.0]])
    mean, low, high = paired_bootstrap(values, resamples=300, confidence=0.95, seed=3)
    assert mean.tolist() == pytest.approx([0.6, 0.6, -0.6])
    assert low[0] == low[1] and high[0] == high[1]  # one resample for every row: paired
    assert low[2] == pytest.approx(-high[0]) and high[2] == pytest.approx(-low[0])
    assert 0 <= low[0] < 0.6 < high[0] <= 1
    again = paired_bootstrap(values, resamples=300, confidence=0.95, seed=3)
    assert np.array_equal(again[1], low) and np.array_equal(again[2], high)  # seeded
    for bad in ({"confidence": 1.0}, {"confidence": 0.0}, {"resamples": 0}):
        with pytest.raises(ValueError):
            paired_bootstrap(values, **{"resamples": 10, "confidence": 0.9, "seed": 0, **bad})
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap(np.array([[0.0, np.nan]]), resamples=10, confidence=0.9, seed=0)


# -- per-class breaks ----------------------------------------------------------------------------
def test_class_breaks_by_hand():
    labels = np.array([3, 3, 3, 3, 5, 5, 5, 5, 8, 8, 9, 9, 9, 9])
    old = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1], dtype=bool)
    new = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    # class 3: 0.75 -> 0.5 (flips at rows 1, 2); class 5: 0.5 -> 0.75 gains; class 8: 1 -> 0 but 2 queries;
    # class 9: 1 -> 1 ties, not a break.
    assert class_breaks(labels, old, new, min_queries=3) == [
        {"label": 3, "queries": 4, "old_old": 0.75, "new_old": 0.5, "negative_flips": 2}]
    assert [b["label"] for b in class_breaks(labels, old, new, min_queries=1)] == [8, 3]  # largest drop first


# -- the command ---------------------------------------------------------------------------------
def clusters(n=240, d=16, classes=6, noise=1.0, seed=0):
    """Labels and embeddings around fixed class centres; lower ``noise`` is a better model of the same space."""
    labels = np.arange(n) % classes
    centres = np.random.default_rng(99).standard_normal((classes, d)) * 1.5
    return (centres[labels] + noise * np.random.default_rng(seed).standard_normal((n, d))).astype(np.float32), labels


def write(path, embeddings, labels, **extra):
    np.savez(path, embeddings=embeddings, labels=labels, **extra)
    return str(path)


def check(capsys, *argv):
    code = main(["check", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def files(tmp_path):
    old, labels = clusters(noise=1.3)
    better, _ = clusters(noise=0.6, seed=1)
    rotation = np.linalg.qr(np.random.default_rng(5).standard_normal((16, 16)))[0].astype(np.float32)
    return {"labels": labels, "old": write(tmp_path / "old.npz", old, labels),
            "better": write(tmp_path / "better.npz", better, labels),
            "rotated": write(tmp_path / "rotated.npz", better @ rotation, labels),
            "arrays": {"old": old, "better": better}}


def test_exit_codes_compatible_incompatible_and_ties(files, capsys):
    code, out, _ = check(capsys, "--old", files["old"], "--new", files["better"], "--resamples", 300)
    assert code == 0 and "COMPATIBLE at 95 %" in out and "NOT" not in out
    code, out, _ = check(capsys, "--old", files["old"], "--new", files["rotated"], "--resamples", 300, "--json")
    result = json.loads(out)
    assert code == 1 and result["compatible"] is False and result["ecc"] == {"cmc1": False, "map": False}
    assert result["difference"]["cmc1"]["high"] < 0 and result["class_breaks"]
    # The same model on both sides: every resampled difference is 0, so the interval is [0, 0]: ECC's
    # strict inequality fails it, ties pass lets it through.
    for ties, expected in (("fail", 1), ("pass", 0)):
        code, out, _ = check(capsys, "--old", files["old"], "--new", files["old"], "--ties", ties, "--json")
        result = json.loads(out)
        assert code == expected and result["difference"]["map"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
        assert result["negative_flip_rate"]["new_old"]["estimate"] == 0.0


def test_scores_and_negative_flips_match_an_independent_ranking(files, capsys):
    code, out, _ = check(capsys, "--old", files["old"], "--new", files["rotated"], "--json", "--resamples", 50,
                         "--min-class-queries", 1)
    result = json.loads(out)
    old, new, labels = files["arrays"]["old"], files["arrays"]["better"], files["labels"]
    rotated = new @ np.linalg.qr(np.random.default_rng(5).standard_normal((16, 16)))[0].astype(np.float32)
    right = {cell: reference(q, labels, g, labels, True)[0] == 1
             for cell, q, g in (("old_old", old, old), ("new_old", rotated, old), ("new_new", rotated, rotated))}
    for cell in right:
        assert result[cell]["cmc1"] == pytest.approx(right[cell].mean())
    assert result["negative_flip_rate"]["new_old"]["estimate"] == pytest.approx(
        np.mean(right["old_old"] & ~right["new_old"]))
    assert result["negative_flip_rate"]["new_new"]["estimate"] == pytest.approx(
        np.mean(right["old_old"] & ~right["new_new"]))
    drops = {c for c in range(6) if right["new_old"][labels == c].mean() < right["old_old"][labels == c].mean()}
    assert {b["label"] for b in result["class_breaks"]} == drops
    assert sum(b["negative_flips"] for b in result["class_breaks"]) <= round(
        result["negative_flip_rate"]["new_old"]["estimate"] * result["queries"])


def test_bad_input_names_the_file_or_flag_before_any_work(files, tmp_path, capsys):
    old = files["arrays"]["old"]
    shorter = write(tmp_path / "shorter.npz", old[:-6], files["labels"][:-6])
    relabelled = write(tmp_path / "relabelled.npz", old, np.roll(files["labels"], 1))
    cases = [
        (["--new", shorter], ["old.npz has 240 rows", "shorter.npz has 234"]),
        (["--new", relabelled], ["different labels", "relabelled.npz"]),
        (["--new", tmp_path / "missing.npz"], ["missing.npz does not exist"]),
        (["--new", tmp_path], [str(tmp_path), "neither an embedding file"]),
        (["--new", files["better"], "--confidence", 1.5], ["--confidence", "1.5"]),
        (["--new", files["better"], "--confidence", 0], ["--confidence"]),
        (["--new", files["better"], "--resamples", 0], ["--resamples"]),
        (["--new", files["better"], "--new-version", 1], ["embedding file", "--new-version"]),
        (["--new", files["better"], "--new-config", tmp_path], ["better.npz is an embedding file", "--new-config"]),
        (["--new", tmp_path / "model.pt"], ["model.pt is a checkpoint", "--new-config is needed"]),
        (["--new", files["better"], "--protocol", "query-gallery"], ["old.npz has no 'split' column"]),
    ]
    for argv, fragments in cases:
        code, out, err = check(capsys, "--old", files["old"], *argv)
        assert code == 2 and out == "", (argv, out)
        assert all(f in err for f in fragments), (argv, err)


def test_query_gallery_files_use_their_split(files, tmp_path, capsys):
    old, better, labels = files["arrays"]["old"], files["arrays"]["better"], files["labels"]
    split = np.where(np.arange(len(labels)) < 60, "query", "gallery")
    code, out, _ = check(capsys, "--old", write(tmp_path / "o.npz", old, labels, split=split),
                         "--new", write(tmp_path / "n.npz", better, labels, split=split),
                         "--protocol", "query-gallery", "--json", "--resamples", 50)
    result = json.loads(out)
    expected = reference(old[:60], labels[:60], old[60:], labels[60:], False)[0] == 1
    assert code in (0, 1) and result["queries"] == 60 and result["old_old"]["cmc1"] == pytest.approx(expected.mean())

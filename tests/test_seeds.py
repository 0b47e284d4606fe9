"""Multi-seed runs in-process: per-seed numbers equal single-seed runs, mean ± std, resume, bad seeds."""

import json

import numpy as np
import pytest

from orchestrator.evaluation import seeds
from orchestrator.engine import driver
from orchestrator.engine import executor
from orchestrator.cli import main
from orchestrator.reporting.report import format_seed_table
from orchestrator import load_config

TINY = [
    "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=0", "methods=[{name: bct}]",
]


def cli_run(*args):
    return main(["run", "--no-progress", *(a for item in TINY for a in ("--set", item)), *args])


def numbers(metrics):
    """Every number of every method entry except wall-clock seconds."""
    return {key: {k: v for k, v in entry.items() if k != "seconds"} for key, entry in metrics["methods"].items()}


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seeds")
    assert cli_run("--seeds", "0,1", "--output-dir", str(tmp / "multi")) == 0
    assert cli_run("--set", "seed=1", "--output-dir", str(tmp / "single")) == 0
    return tmp / "multi" / "quickstart", tmp / "single" / "quickstart"


def read(path):
    return json.loads((path / "metrics.json").read_text())


def test_each_seed_equals_a_separate_single_seed_run(two_seeds):
    parent, single = two_seeds
    assert sorted(p.name for p in parent.iterdir() if p.is_dir()) == ["seed-0", "seed-1"]
    assert numbers(read(parent / "seed-1")) == numbers(read(single))
    assert numbers(read(parent / "seed-0")) != numbers(read(single))  # the seed does change the run
    assert read(parent / "seed-1")["seed"] == 1


def test_every_metric_is_reported_as_mean_and_sample_std(two_seeds):
    parent, _ = two_seeds
    metrics, per_seed = read(parent), [read(parent / f"seed-{s}") for s in (0, 1)]
    am = [m["methods"]["bct"]["summary"]["AM"] for m in per_seed]
    assert metrics["seeds"]["values"] == [0, 1]
    assert metrics["seeds"]["per_seed"]["1"]["bct"]["AM"] == am[1]
    assert metrics["seeds"]["mean"]["bct"]["AM"] == pytest.approx(np.mean(am))
    assert metrics["seeds"]["std"]["bct"]["AM"] == pytest.approx(abs(am[0] - am[1]) / np.sqrt(2))
    cell = [m["methods"]["bct"]["matrices"]["map"][1][0] for m in per_seed]
    assert metrics["methods"]["bct"]["matrices"]["map"][1][0] == pytest.approx(np.mean(cell))
    assert metrics["methods_std"]["bct"]["matrices"]["map"][1][0] == pytest.approx(np.std(cell, ddof=1))
    flips = [m["methods"]["bct"]["negative_flip_rate"]["new_old"][1][0] for m in per_seed]
    assert metrics["methods"]["bct"]["negative_flip_rate"]["new_old"][1][0] == pytest.approx(np.mean(flips))
    assert metrics["methods_std"]["bct"]["negative_flip_rate"]["new_old"][1][0] == pytest.approx(np.std(flips, ddof=1))
    flags = [m["methods"]["bct"]["ecc"]["cmc1"][1][0] for m in per_seed]
    assert metrics["methods"]["bct"]["ecc"]["cmc1"][1][0] == all(flags)
    assert "Over seeds 0, 1" in (parent / "report.md").read_text()


def test_resume_of_a_multi_seed_run_redoes_nothing(two_seeds, monkeypatch, capsys):
    parent, _ = two_seeds
    before = read(parent)
    monkeypatch.setattr(executor, "_run_group", lambda *a, **k: pytest.fail("a finished step was re-run"))
    assert main(["run", "--resume", str(parent), "--no-progress"]) == 0
    assert "mean ± sample std" in capsys.readouterr().out
    assert numbers(read(parent)) == numbers(before)


def test_aggregate_keeps_names_and_counts_and_ands_flags():
    cfg = load_config(None, [*TINY, "seeds=[3, 4]"])

    def run(am, ecc):
        entry = {"method": "bct", "num_versions": 2, "matrices": {"cmc1": [[0.5, None], [0.6, 0.7]]},
                 "summary": {"AC": 1.0, "AM": am, "BC": 0.1, "FC": -0.1}, "ecc": {"cmc1": [[None, None], [ecc, None]]},
                 "accuracy": None}
        entry["summary_by_metric"] = {"cmc1": entry["summary"]}
        return {"schema_version": 1, "protocol": "leave-one-out", "primary": "cmc1", "methods": {"bct": entry}}

    out = seeds.aggregate(cfg, [run(60.0, True), run(64.0, False)])
    bct = out["methods"]["bct"]
    assert bct["method"] == "bct" and bct["num_versions"] == 2 and bct["accuracy"] is None
    assert bct["summary"]["AM"] == 62.0 and bct["summary"]["AC"] == 1.0 and bct["ecc"]["cmc1"][1][0] is False
    assert out["methods_std"]["bct"]["summary"]["AM"] == pytest.approx(np.std([60, 64], ddof=1))
    assert out["seeds"]["runs"] == {"3": "seed-3", "4": "seed-4"} and out["seed"] is None
    single = seeds.aggregate(load_config(None, [*TINY, "seeds=[3]"]), [run(60.0, True)])
    assert single["seeds"]["std"]["bct"]["AM"] is None  # one seed has no spread


@pytest.mark.parametrize("value", ["0,0", "0,x"])
def test_bad_seeds_fail_before_anything_is_written(tmp_path, capsys, value):
    assert cli_run("--seeds", value, "--output-dir", str(tmp_path)) == 2
    assert "'seeds" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_seed_verdicts_on_every_metric():
    cfg = load_config(None, [*TINY, "seeds=[3, 4, 5]"])

    def run(ac_cmc1, held_cmc1, ac_map):
        by_metric = {"cmc1": {"AC": ac_cmc1, "AM": 60.0, "BC": 0.0, "FC": 0.0, "ECC_every_pair": held_cmc1},
                     "map": {"AC": ac_map, "AM": 40.0, "BC": 0.0, "FC": 0.0, "ECC_every_pair": ac_map == 1.0}}
        entry = {"method": "bct", "num_versions": 2, "matrices": {"cmc1": [[0.5, None], [0.6, 0.7]],
                                                                   "map": [[0.3, None], [0.4, 0.5]]},
                 "summary": by_metric["map"], "summary_by_metric": by_metric, "accuracy": None,
                 "ecc": {"cmc1": [[None, None], [held_cmc1, None]], "map": [[None, None], [ac_map == 1.0, None]]}}
        return {"schema_version": 1, "protocol": "leave-one-out", "primary": "map", "methods": {"bct": entry}}

    out = seeds.aggregate(cfg, [run(1.0, True, 1.0), run(0.0, False, 1.0), run(1.0, True, 0.0)])
    verdicts = out["seeds"]["verdicts"]["bct"]
    # cmc1: AC 1, 0, 1 -> mean 2/3, sample std sqrt(1/3); ECC on every pair in 2 of 3 seeds; map likewise
    assert verdicts["cmc1"]["AC"] == pytest.approx(2 / 3) and verdicts["cmc1"]["AC_std"] == pytest.approx(np.sqrt(1 / 3))
    assert verdicts["cmc1"]["ECC_every_pair_seeds"] == 2 and verdicts["map"]["ECC_every_pair_seeds"] == 2
    assert verdicts["cmc1"]["AM"] == 60.0 and verdicts["cmc1"]["AM_std"] == 0.0
    text = format_seed_table(out)
    lines = text.splitlines()
    assert lines[1].split() == ["method", "metric", "AC", "AM", "ECC"]
    assert lines[2].split() == ["bct", "mAP", "(primary)", "0.667", "±", "0.577", "40.000", "±", "0.000", "2/3"]
    assert lines[3].split() == ["bct", "CMC", "top-1", "0.667", "±", "0.577", "60.000", "±", "0.000", "2/3"]
    assert "on map" in text and " AC " not in text.split("on map")[1]  # the rest, without repeating AC/AM


def test_the_gate_of_every_seed_and_how_many_pass(two_seeds):
    """Over seeds the gate is not averaged: each seed's verdict and intervals as its own run has them."""
    parent, _ = two_seeds
    metrics, per_seed = read(parent), {s: read(parent / f"seed-{s}") for s in (0, 1)}
    (pair,) = metrics["methods"]["bct"]["gate"]
    assert (pair["new_version"], pair["old_version"]) == (1, 0) and "gate" not in metrics["methods_std"]["bct"]
    passed = 0
    for seed, run in per_seed.items():
        (own,) = run["methods"]["bct"]["gate"]
        assert pair["by_seed"][str(seed)] == {k: own[k] for k in ("queries", "difference", "negative_flip_rate",
                                                                   "ecc", "compatible")}
        passed += own["compatible"]
    assert pair["compatible_seeds"] == passed
    assert f"| bct | 1 vs 0 | all |  |  |  | **{passed}/2 seeds compatible** |" in (parent / "report.md").read_text()

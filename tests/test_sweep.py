"""Sweeps: invalid search spaces fail before any trial starts; on a local Ray, an ASHA sweep of 4 tiny
trials is interrupted, resumed without re-running finished trials, ranked, and its best config
reproduces its trial's number with `compat run`; seeds run as concurrent Ray tasks match in-process runs."""

import csv
import json
import signal

import pytest
import yaml
from ray import tune

from orchestrator.engine import driver
from orchestrator.cli import main
from orchestrator.config import load_raw
from orchestrator.errors import ConfigError
from orchestrator.evaluation.objectives import parse_name
from orchestrator.tuning.sweep import load_sweep_dir, parse_sweep, run_sweep

TINY = [
    "data.num_classes=6", "data.train_per_class=24", "data.test_per_class=8",
    "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=2",
    "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}", "training.batch_size=16",
    "resources.num_workers=0", "methods=[{name: bct}]",
]
# The toy objective: AM after each step is dominated by how separable the synthetic classes are: near
# 100 on the easy datasets (difficulty 0.3, 0.25), near chance on the hard ones (3, 4). Trials run one
# at a time in grid order, so the last hard trial meets at least one easy trial at ASHA's first rung
# and is stopped there, whether or not the scheduler's records survive the interruption.
SWEEP = ("sweep={space: {data.difficulty: {grid: [0.3, 3.0, 0.25, 4.0]}}, search: grid, objective: {metric: AM},"
         " scheduler: {type: asha, grace_period: 1, reduction_factor: 2}, max_concurrent: 1}")


def sweep_document(tmp_path, *extra):
    return load_raw(None, [*TINY, f"output_dir={tmp_path}", SWEEP, *extra])


@pytest.mark.parametrize("patch, key, message", [
    ({"space": {"training.epoch": {"choice": [1, 2]}}}, "sweep.space.training.epoch", "unknown key"),
    ({"space": {"methods.0.params.wieght": {"choice": [0.1]}}}, "sweep.space.methods.0.params.wieght", "unknown key"),
    ({"space": {"training.lr": {"choice": []}}}, "sweep.space.training.lr", "non-empty"),
    ({"space": {"training.lr": {"grid": [0.1, 0.001]}}, "search": "optuna"}, "sweep.space.training.lr", "use choice"),
    ({"space": {"training.lr": {"loguniform": [0.1, 0.001]}}, "search": "random"}, "sweep.space.training.lr",
     "smaller than high"),
    ({"space": {"training.epochs": {"int": [0, 3]}}, "search": "random"}, "sweep.space.training.epochs", "must be >= 1"),
    ({"space": {"training.lr": {"normal": [0, 1]}}}, "sweep.space.training.lr", "kind one of"),
    ({"space": {"name": {"choice": ["a", "b"]}}}, "sweep.space.name", "set by the sweep"),
    ({"space": {"data.difficulty": {"uniform": [0.5, 2.0]}}}, "sweep.space.data.difficulty", "discrete"),
    ({"objective": {"metric": "M[2][0]"}}, "sweep.objective.metric", "2 versions"),
    ({"objective": {"method": "oca"}}, "sweep.objective.method", "not a method"),
    ({"constraints": ["AC = 1"]}, "sweep.constraints.0", "not a constraint"),
    ({"scheduler": {"type": "asha", "grace_period": 3}}, "sweep.scheduler.grace_period", "at most"),
    ({"num_samples": 0}, "sweep.num_samples", ">= 1"),
])
def test_invalid_sweeps_name_the_key(tmp_path, patch, key, message):
    document = sweep_document(tmp_path)
    document["sweep"].update(patch)
    with pytest.raises(ConfigError) as err:
        parse_sweep(document)
    assert err.value.key == key and message in str(err.value)


@pytest.mark.parametrize("name", ["sweep_bct_synthetic", "sweep_oca_synthetic", "sweep_hoc_synthetic"])
def test_shipped_sweep_configs_validate(name):
    from orchestrator.tuning.sweep import load_sweep

    sweep = load_sweep(name)
    assert sweep.num_versions == 3 and sweep.objective.constraints and sweep.config.scheduler.type == "asha"


def test_invalid_space_fails_before_any_trial_starts(tmp_path, capsys):
    import ray

    config = tmp_path / "sweep.yaml"
    document = sweep_document(tmp_path / "out")
    document["sweep"]["space"] = {"training.lr": {"uniform": [0.01, 0.001]}}
    config.write_text(yaml.safe_dump(document))
    assert main(["sweep", str(config)]) == 2
    assert "sweep.space.training.lr" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_ranking_puts_violating_and_failed_trials_last():
    from orchestrator.tuning.results import TrialOutcome, best_of, rank_trials

    def trial(name, objective, steps=3, violations="", error=None):
        return TrialOutcome(name, {}, steps, 3, objective, violations, {}, [], error)

    trials = [trial("violates", 90.0, violations="AC >= 1 (0.5)"), trial("failed", float("nan"), 1, error="boom"),
              trial("stopped", 80.0, steps=2), trial("good", 60.0), trial("better", 70.0), trial("undefined", float("nan"))]
    ranked = rank_trials(trials, "max")
    assert [t.trial_id for t in ranked] == ["better", "good", "undefined", "stopped", "violates", "failed"]
    assert best_of(ranked).trial_id == "better"
    assert [t.trial_id for t in rank_trials(trials, "min")][:2] == ["good", "better"]
    assert best_of(rank_trials([trials[0], trials[2]], "max")) is None  # nothing complete and feasible


class InterruptAfterFirstTrial(tune.Callback):
    """Ctrl-C as soon as one trial has run every step."""

    finished: list = []

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result
        if not InterruptAfterFirstTrial.finished and result.get("steps_done") == result.get("steps_total"):
            InterruptAfterFirstTrial.finished.append(trial.trial_id)
            signal.raise_signal(signal.SIGINT)


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    sweep = parse_sweep(sweep_document(tmp))
    assert run_sweep(sweep, progress=False, callbacks=[InterruptAfterFirstTrial()], echo=lambda s: None) is None
    (first,) = InterruptAfterFirstTrial.finished
    before = files_of(sweep.directory / "runs" / first)
    results = run_sweep(load_sweep_dir(sweep.directory), progress=False, echo=lambda s: None)
    return sweep, results, first, files_of(sweep.directory / "runs" / first) == before


def files_of(run_dir):
    """Every file of a run directory with its modification time: any re-run rewrites some of them."""
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


integration = pytest.mark.integration


@integration
def test_asha_completes_and_stops_a_weak_trial_early(asha_sweep):
    sweep, results, _, _ = asha_sweep
    assert len(results.trials) == 4 and not any(t.error for t in results.trials)
    stopped = [t for t in results.trials if t.status == "stopped early"]
    assert stopped and all(t.params["data.difficulty"] >= 3 for t in stopped)
    assert all(t.steps_done == 1 and len(t.history) == 1 for t in stopped)
    assert results.best is not None and results.best.params["data.difficulty"] < 1
    assert [t.status for t in results.trials][:2] == ["complete", "complete"]


@integration
def test_resume_does_not_rerun_finished_trials(asha_sweep):
    sweep, results, first, untouched = asha_sweep
    assert untouched  # the trial finished before the interruption kept its run directory as it was
    assert first in {t.trial_id for t in results.trials}


@integration
def test_cli_resume_of_a_finished_sweep_reruns_nothing(asha_sweep, capsys):
    sweep, results, _, _ = asha_sweep
    before = files_of(sweep.directory / "runs")
    assert main(["sweep", "--resume", str(sweep.directory), "--no-progress"]) == 0
    assert files_of(sweep.directory / "runs") == before
    assert results.best.trial_id in capsys.readouterr().out


@integration
def test_table_plots_and_best_config_are_written(asha_sweep):
    sweep, results, _, _ = asha_sweep
    for name in ["results.csv", "results.md", "best_config.yaml", "objective_vs_params.png", "objective_per_step.png"]:
        assert (sweep.directory / name).is_file(), name
    with (sweep.directory / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["trial"] for r in rows] == [t.trial_id for t in results.trials]
    assert {r["status"] for r in rows} == {"complete", "stopped early"} and rows[0]["rank"] == "1"
    assert "data.difficulty" in rows[0] and "| stopped early |" in results.markdown()


@integration
def test_best_config_reproduces_its_trial_with_compat_run(asha_sweep, tmp_path):
    sweep, results, _, _ = asha_sweep
    best_config = sweep.directory / "best_config.yaml"
    assert main(["run", str(best_config), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    rerun = json.loads((tmp_path / "quickstart-best" / "metrics.json").read_text())
    with (sweep.directory / "results.csv").open() as handle:
        best_row = next(csv.DictReader(handle))
    objective = parse_name("AM", "k").value(rerun["methods"]["bct"], rerun["primary"])  # AM of the primary metric
    assert objective == float(best_row["objective (max AM)"])
    trial_run = json.loads((sweep.directory / "runs" / results.best.trial_id / "metrics.json").read_text())
    assert rerun["methods"]["bct"]["matrices"] == trial_run["methods"]["bct"]["matrices"]


@integration
def test_seeds_of_one_graph_equal_the_trial_run(asha_sweep, tmp_path):
    from orchestrator import load_config

    sweep, results, _, _ = asha_sweep
    cfg = load_config(str(sweep.directory / "best_config.yaml"), ["seeds=[0, 1]"])
    driver.run_experiment(cfg, tmp_path / "multi", echo=lambda s: None)
    trial_run = json.loads((sweep.directory / "runs" / results.best.trial_id / "metrics.json").read_text())
    seed_zero = json.loads((tmp_path / "multi" / "seed-0" / "metrics.json").read_text())
    assert seed_zero["methods"]["bct"]["matrices"] == trial_run["methods"]["bct"]["matrices"]

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
from orchestrator.tuning.trial import TrialNeed, share_out, trial_need

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


@pytest.mark.parametrize("cpus, gpus, need, max_concurrent, expected", [
    (2, 0, TrialNeed(0.25, 1, 0, 1, False), None, (1, 1)),  # 2 // (0.25 + 1) = 1 trial with its one group
    (2, 0, TrialNeed(0.25, 0.75, 0, 1, False), None, (2, 1)),  # the shipped configs: one core per trial
    (16, 0, TrialNeed(0.25, 1, 0, 3, False), None, (4, 3)),  # 16 // 3.25 = 4; (4 - 0.25) // 1 = 3 seeds side by side
    (2, 0, TrialNeed(0.25, 1, 0, 3, False), None, (1, 1)),  # 3 seeds do not fit: one trial, one group, step by step
    (16, 4, TrialNeed(1, 1, 1, 3, False), None, (1, 3)),  # GPUs decide: 4 // 3 = 1 trial; min(3, 15 CPUs, 4 GPUs) = 3
    (8, 0, TrialNeed(1, 2, 0, 4, False), 2, (2, 1)),  # 2 trials by hand: (8 / 2 - 1) // 2 = 1 group each
    (2, 0, TrialNeed(1, 1, 0, 1, False), 4, (4, 1)),  # more by hand than the cluster holds: still one group each
    (2, 0, TrialNeed(1, 0, 0, 1, True), None, (2, 1)),  # in-process: 2 // 1 trials, training on their own CPU
])
def test_trials_and_their_worker_groups_share_out_the_cluster(cpus, gpus, need, max_concurrent, expected):
    assert share_out(need, cpus, gpus, max_concurrent) == expected


def test_a_trials_need_counts_its_seeds_and_its_largest_worker_group():
    from orchestrator.config import parse_config

    raw = sweep_document("out", "resources.num_workers=2", "resources.cpus_per_worker=0.5", "seeds=[0, 1, 2]")
    raw.pop("sweep")
    assert trial_need(parse_config(raw)) == TrialNeed(0.25, 1.0, 0, 3, False)
    raw["resources"]["num_workers"] = 0
    assert trial_need(parse_config(raw), trial_cpus=2) == TrialNeed(2, 0, 0, 3, True)


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


# -- a sweep on Train workers -----------------------------------------------------------------------
# Two trials over two seeds on the 4-CPU test cluster, each step on one Train worker of 2 CPUs:
# share_out gives one trial at a time (4 // (0.25 + 2 seeds x 2) = 0, at least 1) its driver (0.25 CPU)
# and one worker group ((4 - 0.25) // 2), in which its seeds take turns, step by step. Grid order runs
# the easy trial first, so ASHA stops the hard one after its first step.
WORKER_SWEEP = ("sweep={space: {data.difficulty: {grid: [0.3, 4.0]}}, search: grid, objective: {metric: AM},"
                " seeds: [0, 1], scheduler: {type: asha, grace_period: 1, reduction_factor: 2}}")
WORKER_CPUS, AT_ONCE, GROUPS_PER_TRIAL = 2.0, 1, 1


@pytest.fixture(scope="module")
def worker_sweep(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    overrides = [*TINY, "resources.num_workers=1", f"resources.cpus_per_worker={WORKER_CPUS}", f"output_dir={tmp}"]
    sweep = parse_sweep(load_raw(None, [*overrides, WORKER_SWEEP]))
    return sweep, run_sweep(sweep, progress=False, echo=lambda s: None)


def tasks_of(sweep, trial_id):
    """(seed, version, manifest entry) of every step the trial's seeds finished."""
    from orchestrator.storage import runfiles

    runs = sweep.directory / "runs" / trial_id
    found = [(seed, v, runfiles.manifest_entry(runs / f"seed-{seed}", "bct", v)) for v in range(2) for seed in (0, 1)]
    return [task for task in found if task[2] is not None]


def tune_results(sweep, trial_id):
    lines = (sweep.directory / trial_id / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines]


def spans(tasks):
    """Placement group -> (first start, last finish) of the tasks that ran in it."""
    out = {}
    for _, _, entry in tasks:
        pg = entry["placement"]["placement_group"]
        start, end = out.get(pg, (entry["started_at"], entry["finished_at"]))
        out[pg] = (min(start, entry["started_at"]), max(end, entry["finished_at"]))
    return out


def most_at_once(intervals) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    count = peak = 0
    for _, change in events:  # at the same instant an end sorts before a start
        count += change
        peak = max(peak, count)
    return peak


@integration
def test_each_trials_steps_run_on_train_workers_inside_its_reservation(worker_sweep):
    """The workers' own record (node, placement group and pid in each manifest entry) against Ray's
    placement group table and Tune's record of each trial's process: every step of every trial trained
    in a Train worker group's placement group (one 2-CPU bundle, not the trial's 0.25-CPU driver bundle)
    in another process than the trial's; no trial held more worker groups than its budget, nor all trials
    together more than share_out allowed; and every group's placement group is gone once the sweep ends,
    the stopped trial's included."""
    from ray.util import placement_group_table

    sweep, results = worker_sweep
    assert len(results.trials) == 2 and not any(t.error for t in results.trials)
    assert share_out(TrialNeed(0.25, WORKER_CPUS, 0, 2, False), 4, 0, None) == (AT_ONCE, GROUPS_PER_TRIAL)
    every_span, worker_groups = [], set()
    for trial in results.trials:
        tasks = tasks_of(sweep, trial.trial_id)
        assert len(tasks) >= 2 * trial.steps_done
        driver_pids = {r["pid"] for r in tune_results(sweep, trial.trial_id)}
        for _, _, entry in tasks:
            assert entry["placement"]["placement_group"] and entry["placement"]["pid"] not in driver_pids
        groups = spans(tasks)
        assert most_at_once(groups.values()) <= GROUPS_PER_TRIAL
        every_span += groups.values()
        worker_groups |= set(groups)
    assert most_at_once(every_span) <= AT_ONCE * GROUPS_PER_TRIAL
    table = placement_group_table()
    drivers = [pg for pg in table.values() if list(pg["bundles"].values()) == [{"CPU": 0.25}]]
    assert len(drivers) == 2 and not worker_groups & {pg["placement_group_id"] for pg in drivers}
    for pg in worker_groups:
        assert list(table[pg]["bundles"].values()) == [{"CPU": WORKER_CPUS}], table[pg]
        assert table[pg]["state"] == "REMOVED", table[pg]


@integration
def test_asha_stops_a_trial_on_workers_after_its_first_step(worker_sweep):
    """One result per step, once both seeds finished it: the seeds train step by step in the trial's
    one group, so ASHA stopped the hard trial after both seeds' first step, not after a whole seed."""
    sweep, results = worker_sweep
    assert [(t.params["data.difficulty"], t.status, t.steps_done) for t in results.trials] == [
        (0.3, "complete", 2), (4.0, "stopped early", 1)]
    for trial in results.trials:
        tasks = tasks_of(sweep, trial.trial_id)
        by_start = [(seed, version) for seed, version, _ in sorted(tasks, key=lambda t: t[2]["started_at"])]
        assert by_start == [(0, 0), (1, 0), (0, 1), (1, 1)][:len(tasks)]
        reports = tune_results(sweep, trial.trial_id)
        assert [r["steps_done"] for r in reports] == list(range(1, trial.steps_done + 1))
        for report in reports:  # Tune's timestamp is in whole seconds
            finished = [e["finished_at"] for _, v, e in tasks if v == report["steps_done"] - 1]
            assert len(finished) == 2 and report["timestamp"] >= int(max(finished))
    assert (sweep.directory / "runs" / results.trials[0].trial_id / "metrics.json").is_file()

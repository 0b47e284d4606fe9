"""One sweep trial: the Tune trainable, which runs the trial's simulation as a Ray task it owns and
reports every step the simulation finishes, computed from the run directory as manifest entries appear.

Steps that share one worker group still reach the scheduler one by one, and a stopped trial ends its
task (and the task's Train runs) with it. The simulation cannot run in the trial's own process: Ray
refuses in-process Train runs (``num_workers: 0``) inside a Tune trial.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from orchestrator.config import ExperimentConfig, parse_config
from orchestrator.errors import CompatError
from orchestrator.evaluation.objectives import Objective, table_values
from orchestrator.storage import runfiles

if TYPE_CHECKING:
    from orchestrator.tuning.sweep import Sweep

POLL_SECONDS = 0.5
VIOLATION_SCORE = 1e9  # the score of a trial that violates a constraint (negated for max): it ranks last


def run_trial(params: dict[str, Any], sweep: "Sweep", setup: "TaskSetup") -> None:
    """The Tune trainable: one trial's simulation, one Tune result per finished step."""
    import ray
    from ray import tune

    run_dir = sweep.directory / "runs" / tune.get_context().get_trial_id()
    cfg = parse_config(sweep.trial_raw(params))
    watcher = StepWatcher(cfg, run_dir, sweep.objective, sweep.num_versions)
    simulation = submit(cfg, run_dir, num_cpus=0, setup=setup)  # it trains on the CPU the trial reserved
    try:
        while True:
            finished = bool(ray.wait([simulation], timeout=POLL_SECONDS)[0])
            for result in watcher.new_results():
                tune.report(result)
            if finished:
                result_of(simulation)  # raises the simulation's error, if any
                return
    finally:
        ray.cancel(simulation, force=True)  # a stopped trial takes its simulation with it


class StepWatcher:
    """One Tune result per step that every seed of a trial has finished, from the run directories."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, objective: Objective, num_versions: int):
        from orchestrator.evaluation.seeds import seed_runs

        self.runs = seed_runs(cfg, run_dir)
        self.objective = objective
        self.num_versions = num_versions
        self.reported = 0

    def new_results(self) -> Iterator[dict]:
        while self.reported < self.num_versions and all(
                runfiles.step_done(run_dir, self.objective.method, self.reported) for _, run_dir in self.runs):
            self.reported += 1
            entries = [prefix_entry(cfg, run_dir, self.objective.method, self.reported) for cfg, run_dir in self.runs]
            yield step_result(self.objective, entries, self.reported, self.num_versions)


def prefix_entry(cfg: ExperimentConfig, run_dir: Path, method: str, num_versions: int) -> dict:
    """The metrics.json entry of ``method`` over its first ``num_versions`` versions (rows computed if missing)."""
    from orchestrator.engine.driver import assemble_metrics, ensure_row

    spec = next(m for m in cfg.methods if m.key == method)
    for version in range(num_versions):
        ensure_row(cfg, run_dir, method, version)
    return assemble_metrics(dataclasses.replace(cfg, methods=[spec]), run_dir, num_versions)["methods"][method]


def step_result(objective: Objective, entries: list[dict], steps_done: int, steps_total: int) -> dict:
    """One Tune result: the objective (mean over seeds), the score searchers and schedulers rank by (the
    objective, or ∓VIOLATION_SCORE once a constraint is violated), and the table names."""
    evaluation = objective.evaluate(entries)
    score = evaluation.value if evaluation.feasible else (-VIOLATION_SCORE if objective.mode == "max" else VIOLATION_SCORE)
    return {"steps_done": steps_done, "steps_total": steps_total, "objective": evaluation.value, "score": score,
            "feasible": evaluation.feasible, "violations": "; ".join(evaluation.violations),
            "metrics": table_values(entries, objective.matrix)}


def cpu_needs(cfg: ExperimentConfig) -> tuple[float, bool]:
    """(CPUs of the largest worker group, whether some step trains in-process)."""
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.scenarios import plan_steps

    steps = plan_steps(cfg, dataset_num_classes(cfg.data))
    worker_cpus = max(s.resources.num_workers * s.resources.cpus_per_worker for s in steps)
    return worker_cpus, any(s.resources.num_workers == 0 for s in steps)


@dataclass(frozen=True)
class TaskSetup:
    """What a simulation task takes over from the process that launched the work: its torch thread
    count, so the task's numbers equal an in-process run there (CPU kernels round differently with other
    thread counts), and its dataset cache when COMPAT_CACHE_DIR is set."""

    threads: int
    cache_dir: Optional[str]

    @classmethod
    def here(cls) -> "TaskSetup":
        import torch

        return cls(torch.get_num_threads(), os.environ.get("COMPAT_CACHE_DIR"))


def submit(cfg: ExperimentConfig, run_dir: Path, num_cpus: float, setup: TaskSetup):
    """Start :func:`run` of ``cfg`` (one seed, or several one after another) in a Ray task outside any
    placement group (a Tune trial's included), on a driver node when the cluster has one; returns its
    object ref."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.engine.executor import driver_resources

    task = ray.remote(_run_in_task).options(
        num_cpus=num_cpus, resources=driver_resources(ray.cluster_resources()), max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return task.remote(cfg.to_dict(), str(run_dir), setup)


def result_of(ref) -> Any:
    """``ray.get`` that re-raises our own errors (a bad config, missing data) as themselves."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CompatError):
            raise exc.cause from None
        raise


def _run_in_task(cfg_dict: dict, run_dir: str, setup: TaskSetup) -> dict:
    import torch

    torch.set_num_threads(setup.threads)
    if setup.cache_dir:
        os.environ["COMPAT_CACHE_DIR"] = setup.cache_dir
    from orchestrator.engine.driver import run_experiment

    # a restarted trial may find the lease of its previous, killed simulation: wait for it to expire
    return run_experiment(parse_config(cfg_dict), Path(run_dir), progress=False, echo=lambda line: None,
                          wait_for_lease=True)

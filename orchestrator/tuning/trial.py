"""One sweep trial: the Tune trainable, which drives the trial's simulation and hands Tune one result per
step that every seed of the trial has finished.

Where the steps train (Ray 2.60, Ray Train V2):

- **On Train workers** (every step has ``resources.num_workers >= 1``): the trial is the driver, as in
  Ray's Train-in-Tune pattern: it runs the executor in its own process, and each worker group is a
  ``TorchTrainer`` run it starts, whose controller lives in the trial's placement group. Ray Train V2
  gang-schedules a group's workers in a placement group of its own, never in bundles of the trial's
  (a Tune reservation that also held the workers' bundles would hold them twice), so a trial's
  reservation is its driver's bundle plus a budget of worker groups (:func:`share_out`) that its
  executor never exceeds, and Tune runs no more trials at once than the cluster holds with their budgets.
- **In-process** (some step has ``num_workers: 0``; tiny steps): Ray refuses in-process Train runs inside
  a Tune trial, so the trial runs its simulation as a Ray task it owns, which trains on the CPU the
  trial reserved.

Either way the seeds of a trial are runs of one task graph, handed out step by step, and the trial
follows them through the run directory: each :meth:`Trial.step` returns once every seed has finished
one more step, so the scheduler decides at step boundaries. (Ray's ``TuneReportCallback`` would forward
every Train report of every worker group, i.e. one seed's task with its training loss; the scheduler
needs the objective over all seeds after each step.) The last step is returned once metrics.json and
report.md exist. The trial is a class trainable for its ``cleanup``, which Tune runs to the end before it
ends a stopped trial's process: it ends the trial's worker groups the way Ray Train ends a failed one.
A Train controller that merely dies with its trial leaves its workers' placement group reserved, since
Ray Train's cleaner of such groups needs Ray's dashboard (the state API).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from ray import tune

from orchestrator.config import ExperimentConfig, parse_config
from orchestrator.errors import CompatError, RunCancelled, RunError
from orchestrator.evaluation.objectives import Objective, table_values
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

if TYPE_CHECKING:
    from orchestrator.tuning.sweep import Sweep

POLL_SECONDS = 0.5
STOP_TIMEOUT_S = 120  # how long a stopped trial waits for its worker groups to end
VIOLATION_SCORE = 1e9  # the score of a trial that violates a constraint (negated for max): it ranks last
IN_PROCESS_DRIVER_CPUS = 1.0  # a trial's default reservation when its steps train in-process, on it
WORKERS_DRIVER_CPUS = 0.25  # ... when they train on Train workers: the driver only schedules and computes rows


class Trial(tune.Trainable):
    """The Tune trainable: one trial's simulation (at most ``groups`` worker groups at once), one result
    per step every seed has finished."""

    def setup(self, config: dict[str, Any], sweep: "Sweep", task_setup: "TaskSetup", groups: int) -> None:
        run_dir = sweep.storage.child(f"runs/{self.trial_id}")
        cfg = parse_config(sweep.trial_raw(config))
        self.watcher = StepWatcher(cfg, run_dir, sweep.objective, sweep.num_versions)
        self.pending: list[dict] = []
        on_workers = not trial_need(cfg).in_process
        self.simulation = (SimulationThread if on_workers else SimulationTask)(cfg, run_dir, task_setup, groups)

    def step(self) -> dict:
        while not self.pending:
            finished = self.simulation.finished(POLL_SECONDS)  # raises the simulation's error, if any
            self.pending += self.watcher.new_results(last=finished)
            if finished and not self.pending:
                raise RunError(f"the trial's simulation ended after {self.watcher.reported} of "
                               f"{self.watcher.num_versions} steps")
        result = self.pending.pop(0)
        return {**result, "done": result["steps_done"] == result["steps_total"]}

    def cleanup(self) -> None:
        self.simulation.stop()


class SimulationThread:
    """The simulation of a trial on Train workers, driven from a thread of the trial's process."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunStorage, setup: "TaskSetup", groups: int):
        from orchestrator.engine.driver import run_experiment

        setup.apply()
        self.cancel = threading.Event()
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                run_experiment(cfg, run_dir, progress=False, echo=lambda line: None, max_groups=groups,
                               step_by_step=True, cancel=self.cancel, wait_for_lease=True)  # as in _run_in_task
            except RunCancelled:
                pass
            except BaseException as exc:  # handed to the trial's next step
                self.error = exc

        self.thread = threading.Thread(target=run, name="compat-trial", daemon=True)
        self.thread.start()

    def finished(self, timeout: float) -> bool:
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()

    def stop(self) -> None:
        self.cancel.set()
        self.thread.join(STOP_TIMEOUT_S)


class SimulationTask:
    """The simulation of a trial whose steps train in-process, in a Ray task the trial owns."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunStorage, setup: "TaskSetup", groups: int):
        self.ref = submit(cfg, run_dir, num_cpus=0, setup=setup, max_groups=groups)  # it trains on the trial's CPU

    def finished(self, timeout: float) -> bool:
        import ray

        if not ray.wait([self.ref], timeout=timeout)[0]:
            return False
        result_of(self.ref)  # raises the simulation's error, if any
        return True

    def stop(self) -> None:
        import ray

        ray.cancel(self.ref, force=True)


class StepWatcher:
    """One Tune result per step that every seed of a trial has finished, from the run directories."""

    def __init__(self, cfg: ExperimentConfig, run_dir: RunStorage, objective: Objective, num_versions: int):
        from orchestrator.data import dataset_num_classes
        from orchestrator.evaluation.seeds import seed_runs

        self.runs = seed_runs(cfg, run_dir)
        self.objective = objective
        self.num_versions = num_versions
        self.num_classes = dataset_num_classes(cfg.data)  # the seeds share the data
        self.reported = 0

    def new_results(self, last: bool) -> list[dict]:
        """Results of the steps whose rows every seed has written since the previous call; the last
        step's only when ``last``. The rows are the simulation's (its row tasks', or its driver's): the
        watcher reads them, never computes one beside them."""
        until = self.num_versions if last else self.num_versions - 1
        results = []
        while self.reported < until and all(
                row_written(run_dir, self.objective.method, self.reported) for _, run_dir in self.runs):
            self.reported += 1
            entries = [prefix_entry(cfg, run_dir, self.objective.method, self.reported, self.num_classes)
                       for cfg, run_dir in self.runs]
            results.append(step_result(self.objective, entries, self.reported, self.num_versions))
        return results


def row_written(run_dir: RunStorage, method: str, version: int) -> bool:
    """Whether the simulation has written row ``version`` (one it will compute again does not count)."""
    from orchestrator.engine.driver import current_row

    return runfiles.step_done(run_dir, method, version) and current_row(run_dir, method, version) is not None


def prefix_entry(cfg: ExperimentConfig, run_dir: RunStorage, method: str, num_versions: int, num_classes: int) -> dict:
    """The metrics.json entry of ``method`` over its first ``num_versions`` versions (their rows written)."""
    from orchestrator.engine.driver import assemble_metrics

    spec = next(m for m in cfg.methods if m.key == method)
    only = dataclasses.replace(cfg, methods=[spec], service=None)  # the objective reads the method entry alone
    return assemble_metrics(only, run_dir, num_versions, num_classes)["methods"][method]


def step_result(objective: Objective, entries: list[dict], steps_done: int, steps_total: int) -> dict:
    """One Tune result: the objective (mean over seeds), the score searchers and schedulers rank by (the
    objective, or ∓VIOLATION_SCORE once a constraint is violated), and the table names."""
    evaluation = objective.evaluate(entries)
    score = evaluation.value if evaluation.feasible else (-VIOLATION_SCORE if objective.mode == "max" else VIOLATION_SCORE)
    return {"steps_done": steps_done, "steps_total": steps_total, "objective": evaluation.value, "score": score,
            "feasible": evaluation.feasible, "violations": "; ".join(evaluation.violations),
            "metrics": table_values(entries, objective.matrix)}


@dataclass(frozen=True)
class TrialNeed:
    """What one trial holds at most at once: its driver's bundle, and worker groups of its largest shape,
    at most one per chain of its task graph (a method of a seed, an upstream model: they can all train
    side by side)."""

    driver_cpus: float
    group_cpus: float  # CPUs of its largest worker group (0: every step trains in-process)
    group_gpus: float
    chains: int
    in_process: bool  # some step trains in-process: the simulation runs in a task the trial owns


def trial_need(cfg: ExperimentConfig, trial_cpus: Optional[float] = None) -> TrialNeed:
    """The :class:`TrialNeed` of a trial of ``cfg``; ``trial_cpus`` None: the default for where it trains."""
    from orchestrator.engine.graph import plan

    tasks = list(plan(cfg).tasks.values())
    in_process = any(t.resources.num_workers == 0 for t in tasks)
    if trial_cpus is None:
        trial_cpus = IN_PROCESS_DRIVER_CPUS if in_process else WORKERS_DRIVER_CPUS
    return TrialNeed(
        driver_cpus=trial_cpus,
        group_cpus=max(t.resources.num_workers * t.resources.cpus_per_worker for t in tasks),
        group_gpus=max(t.resources.num_workers if t.resources.use_gpu else 0 for t in tasks),
        chains=len({t.chain for t in tasks}), in_process=in_process)


def share_out(need: TrialNeed, cpus: float, gpus: float, max_concurrent: Optional[int]) -> tuple[int, int]:
    """(trials at once, worker groups per trial) on a cluster of ``cpus`` and ``gpus``.

    Trials at once: ``max_concurrent``, or as many as the cluster holds when each has its driver and a
    worker group per chain (at least one). Then each trial's budget: the groups, up to one per chain,
    that its share of the cluster holds beside its driver (at least one; with ``max_concurrent`` set
    beyond what the cluster holds, trials wait for their groups)."""
    slack = 1e-9  # 0.1 + 0.2 CPUs fit in 0.3
    demands = [(total, fixed, group) for total, fixed, group in
               [(cpus, need.driver_cpus, need.group_cpus), (gpus, 0.0, need.group_gpus)] if fixed + group > 0]
    at_once = max_concurrent or max(1, min(int((total + slack) // (fixed + need.chains * group))
                                           for total, fixed, group in demands))
    budgets = [int((total / at_once - fixed + slack) // group) for total, fixed, group in demands if group > 0]
    return at_once, max(1, min([need.chains, *budgets]))


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

    def apply(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        if self.cache_dir:
            os.environ["COMPAT_CACHE_DIR"] = self.cache_dir


def submit(cfg: ExperimentConfig, run_dir: RunStorage, num_cpus: float, setup: TaskSetup, max_groups: Optional[int] = None):
    """Start the simulation of ``cfg`` (every seed, step by step) in a Ray task outside any placement
    group (a Tune trial's included), on a driver node when the cluster has one; returns its object ref."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from orchestrator.engine.executor import driver_resources

    task = ray.remote(_run_in_task).options(
        num_cpus=num_cpus, resources=driver_resources(ray.cluster_resources()), max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return task.remote(cfg.to_dict(), run_dir, setup, max_groups)


def result_of(ref) -> Any:
    """``ray.get`` that re-raises our own errors (a bad config, missing data) as themselves."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, CompatError):
            raise exc.cause from None
        raise


def _run_in_task(cfg_dict: dict, run_dir: RunStorage, setup: TaskSetup, max_groups: Optional[int]) -> dict:
    from orchestrator.engine.driver import run_experiment

    setup.apply()
    # a restarted trial may find the lease of its previous, killed simulation: wait for it to expire
    return run_experiment(parse_config(cfg_dict), run_dir, progress=False, echo=lambda line: None,
                          max_groups=max_groups, step_by_step=True, wait_for_lease=True)

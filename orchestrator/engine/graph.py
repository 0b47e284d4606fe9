"""The task graph: every experiment, whatever it simulates, planned as tasks with dependencies.

A *run* is one directory of run state with its own config (the experiment, each seed of it, each
upstream model a replacement swaps in). A *task* trains (or copies) one version of one method of one
run; it may start once every task it depends on is committed to the manifest:

- a method's step t needs its step t-1 (the previous version is the model it starts from or aligns to);
- a step that swaps in upstream model k needs the upstream run that trains it;
- a version 0 that is another method's version 0 (``resources.share_first_version``) is a copy task
  that needs that method's step 0.

Everything else is independent: each method's chain, each seed, each upstream model can run at the
same time as the others when the cluster holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Optional

from orchestrator.config import ExperimentConfig
from orchestrator.scenarios import Resources, Step, plan_steps

TRAIN, COPY = "train", "copy"


@dataclass(frozen=True)
class RunPlan:
    """One run of the graph: where it lives (relative to the experiment's location), its config, steps."""

    path: str  # "" is the experiment's own location; "seed-3", "seed-3/upstream/<digest>", ...
    config: ExperimentConfig
    steps: tuple[Step, ...]
    role: str  # "experiment" (metrics and report of its own) | "seed" (aggregated) | "upstream"


@dataclass(frozen=True)
class Task:
    """One version of one method of one run."""

    id: str  # "<run>/<method key>/step-NNN" (no run prefix for the experiment itself): stable across resumes
    run: str
    method: int  # index into the run's ``config.methods``
    step: int
    action: str  # TRAIN | COPY
    resources: Resources
    deps: tuple[str, ...] = ()
    copy_from: Optional[int] = None  # for COPY: the method (index) whose version 0 this is

    @property
    def chain(self) -> str:
        """Tasks of one chain share a method's datasets and state when one worker group runs them in turn."""
        return f"{self.run}/{self.method}"


@dataclass
class TaskGraph:
    runs: dict[str, RunPlan] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)  # in a topological order

    def add_run(self, run: RunPlan) -> None:
        self.runs.setdefault(run.path, run)

    def add(self, task: Task) -> None:
        missing = [d for d in task.deps if d not in self.tasks]
        assert not missing, f"{task.id} depends on unplanned {missing}"  # plan order is topological
        self.tasks.setdefault(task.id, task)

    def tasks_of(self, run: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.run == run]

    def describe(self, task_id: str) -> str:
        task = self.tasks[task_id]
        key = self.runs[task.run].config.methods[task.method].key
        where = f" of {task.run}" if task.run else ""
        return f"{key} step {task.step}{where}" + (" (copy of version 0)" if task.action == COPY else "")


def task_id(run: str, method_key: str, step: int) -> str:
    return str(PurePosixPath(run or ".", method_key, f"step-{step:03d}")).removeprefix("./")


def plan(cfg: ExperimentConfig) -> TaskGraph:
    """Every task of ``cfg``: one run, or one per seed, plus the upstream runs their replacements need."""
    graph = TaskGraph()
    if cfg.seeds is None:
        _plan_run(graph, "", cfg, "experiment")
    else:
        for seed in cfg.seeds:
            _plan_run(graph, f"seed-{seed}", cfg.with_seed(seed), "seed")
    return graph


def _plan_run(graph: TaskGraph, path: str, cfg: ExperimentConfig, role: str) -> None:
    from orchestrator.data import dataset_num_classes
    from orchestrator.upstream import upstream_config

    steps = tuple(plan_steps(cfg, dataset_num_classes(cfg.data)))
    graph.add_run(RunPlan(path, cfg, steps, role))
    twins = first_version_twins(cfg, steps)
    for m, spec in enumerate(cfg.methods):
        upstream_tasks = {}
        for index in sorted({s.upstream for s in cfg.scenario.replacements if s.upstream is not None}):
            sub = upstream_config(cfg, spec, index)
            sub_path = str(PurePosixPath(path or ".", "upstream", sub.digest())).removeprefix("./")
            _plan_run(graph, sub_path, sub, "upstream")
            upstream_tasks[index] = task_id(sub_path, sub.methods[0].key, 0)
        for step in steps:
            deps = [task_id(path, spec.key, step.index - 1)] if step.index > 0 else []
            if step.index in cfg.scenario.replace_at:
                source = cfg.scenario.replacements[cfg.scenario.replace_at.index(step.index)]
                if source.upstream is not None:
                    deps.append(upstream_tasks[source.upstream])
            twin = twins.get(m) if step.index == 0 else None
            if twin is not None:
                deps.append(task_id(path, cfg.methods[twin].key, 0))
            graph.add(Task(id=task_id(path, spec.key, step.index), run=path, method=m, step=step.index,
                           action=COPY if twin is not None else TRAIN, resources=step.resources,
                           deps=tuple(deps), copy_from=twin))


def first_version_twins(cfg: ExperimentConfig, steps: tuple[Step, ...]) -> dict[int, int]:
    """Method index -> the earlier method whose version 0 is the very model it would train: the same
    :meth:`Method.first_version_recipe` and step-0 training recipe, in a scenario whose first step trains
    from scratch without replay memory. That version is trained once and copied."""
    from methods.base import create_method
    from orchestrator.upstream_clip import resolved_model_config

    if not cfg.resources.share_first_version or steps[0].event != "train" or cfg.scenario.replay is not None:
        return {}
    model_cfg = resolved_model_config(cfg)
    recipes = [create_method(spec.name, spec.params, model_cfg).first_version_recipe() for spec in cfg.methods]
    twins = {}
    for m, spec in enumerate(cfg.methods):
        if recipes[m] is None:
            continue
        for earlier in range(m):
            if (earlier not in twins and recipes[earlier] == recipes[m]
                    and cfg.method_training(cfg.methods[earlier], 0) == cfg.method_training(spec, 0)):
                twins[m] = earlier
                break
    return twins

"""The task graph: every experiment, whatever it simulates, planned as tasks with dependencies.

A *run* is one directory of run state with its own config (the experiment, each seed of it, each
upstream model a replacement swaps in). A *task* trains (or copies) one version of one method of one
run; it may start once every task it depends on is committed to the manifest:

- a method's step t needs its step t-1 (the previous version is the model it starts from or aligns to);
- a step that swaps in upstream model k needs the upstream run that trains it;
- a method that adapts another method's versions (``Method.weights_from``) needs that method's same step;
- a version 0 that is another method's version 0 (``resources.share_first_version``) is a copy task
  that needs that method's step 0;
- a cross-modal stage needs both CLIPs' encodings and its method's earlier stage;
- every task that builds on an upstream CLIP (the experiment's ``upstream_clip``, a cross-modal model's
  ``upstream``) needs the task that pretrains it, once for the whole experiment.

Everything else is independent: each method's chain, each seed, each upstream model can run at the
same time as the others when the cluster holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Optional

from orchestrator.config import ExperimentConfig
from orchestrator.engine.scenarios import Resources, Step, plan_steps

TRAIN, COPY = "train", "copy"  # a method's step: trained, or version 0 copied from a twin
ENCODE, STAGE = "encode", "stage"  # cross-modal: a CLIP embeds the evaluation set; a stage of a method
PRETRAIN = "pretrain"  # the upstream CLIP: a web-scale CLIP's offline stand-in, pretrained once per location


@dataclass(frozen=True)
class RunPlan:
    """One run of the graph: where it lives (relative to the experiment's location), its config, steps."""

    path: str  # "" is the experiment's own location; "seed-3", "seed-3/upstream/<digest>", ...
    config: Any  # ExperimentConfig, or CrossModalExperiment for role "cross-modal"
    steps: tuple[Step, ...]
    role: str  # "experiment" (metrics and report of its own) | "seed" (aggregated) | "upstream" | "cross-modal"
    num_classes: Optional[int] = None  # the dataset's, counted once here (rows need it, not the data); None: cross-modal


@dataclass(frozen=True)
class Task:
    """One unit of work of one run: a version of a method, or a cross-modal encoding or stage."""

    id: str  # "<run>/<name>" ("<name>" for the experiment itself): stable across resumes
    run: str
    name: str  # within its run: "<method key>/step-NNN", "encode-old", "seed-0/<method key>/<stage>"
    action: str  # TRAIN | COPY | ENCODE | STAGE
    resources: Resources
    deps: tuple[str, ...] = ()
    method: Optional[int] = None  # index into the run's ``config.methods``
    step: Optional[int] = None
    copy_from: Optional[int] = None  # for COPY: the method (index) whose version 0 this is
    payload: Optional[dict] = None  # for ENCODE/STAGE: what the worker needs, nothing more

    @property
    def chain(self) -> str:
        """Tasks of one chain share a method's datasets and state when one worker group runs them in turn."""
        return f"{self.run}/{self.method if self.payload is None else self.name.rsplit('/', 1)[0]}"


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
        where = f" of {task.run}" if task.run else ""
        if task.method is None:
            return f"{task.name}{where}"
        key = self.runs[task.run].config.methods[task.method].key
        return f"{key} step {task.step}{where}" + (" (copy of version 0)" if task.action == COPY else "")


def step_name(method_key: str, step: int) -> str:
    """The name of a method's step within its run (also its manifest entry's path)."""
    return f"{method_key}/step-{step:03d}"


def task_id(run: str, name: str) -> str:
    return str(PurePosixPath(run or ".", name)).removeprefix("./")


def plan(cfg) -> TaskGraph:
    """Every task of ``cfg``: one run, or one per seed, plus the upstream runs their replacements need;
    a cross-modal experiment is one run of encodings and stages."""
    from orchestrator.config.crossmodal import CrossModalExperiment

    graph = TaskGraph()
    if isinstance(cfg, CrossModalExperiment):
        _plan_crossmodal(graph, cfg)
    elif cfg.seeds is None:
        _plan_run(graph, "", cfg, "experiment")
    else:
        for seed in cfg.seeds:
            _plan_run(graph, f"seed-{seed}", cfg.with_seed(seed), "seed")
    return graph


def _plan_run(graph: TaskGraph, path: str, cfg: ExperimentConfig, role: str) -> None:
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.upstream import upstream_config

    num_classes = dataset_num_classes(cfg.data)
    steps = tuple(plan_steps(cfg, num_classes))
    graph.add_run(RunPlan(path, cfg, steps, role, num_classes))
    twins = first_version_twins(cfg, steps)
    bases = weight_sources(cfg)
    clip = () if cfg.upstream_clip is None else (_pretrain(graph, cfg.model.name, cfg.upstream_clip, cfg.data, steps[0].resources),)
    for m, spec in enumerate(cfg.methods):
        upstream_tasks = {}
        for index in sorted({s.upstream for s in cfg.scenario.replacements if s.upstream is not None}):
            sub = upstream_config(cfg, spec, index)
            sub_path = str(PurePosixPath(path or ".", "upstream", sub.digest())).removeprefix("./")
            _plan_run(graph, sub_path, sub, "upstream")
            upstream_tasks[index] = task_id(sub_path, step_name(sub.methods[0].key, 0))
        for step in steps:
            deps = [task_id(path, step_name(spec.key, step.index - 1))] if step.index > 0 else [*clip]
            if step.index in cfg.scenario.replace_at:
                source = cfg.scenario.replacements[cfg.scenario.replace_at.index(step.index)]
                if source.upstream is not None:
                    deps.append(upstream_tasks[source.upstream])
            if m in bases:  # its versions are another method's, loaded untrained
                deps.append(task_id(path, step_name(cfg.methods[bases[m]].key, step.index)))
            twin = twins.get(m) if step.index == 0 else None
            if twin is not None and twin != bases.get(m):
                deps.append(task_id(path, step_name(cfg.methods[twin].key, 0)))
            name = step_name(spec.key, step.index)
            graph.add(Task(id=task_id(path, name), run=path, name=name, method=m, step=step.index,
                           action=COPY if twin is not None else TRAIN, resources=step.resources,
                           deps=tuple(deps), copy_from=twin))


def _plan_crossmodal(graph: TaskGraph, cfg) -> None:
    """Both CLIPs embed the evaluation set (and the old one the gallery, once); then each method's stages
    in order, per seed, each needing both encodings and the method's earlier stage."""
    from orchestrator.engine.crossmodal import stage_payloads

    res = cfg.resources
    resources = Resources(num_workers=res.num_workers, use_gpu=res.use_gpu, cpus_per_worker=res.cpus_per_worker)
    graph.add_run(RunPlan("", cfg, (), "cross-modal"))
    encodings = []
    for role in ("old", "new"):
        spec = getattr(cfg.models, role)
        clip = () if spec.upstream is None else (_pretrain(graph, spec.name, spec.upstream, cfg.data.synthetic, resources),)
        name = f"encode-{role}"
        graph.add(Task(id=name, run="", name=name, action=ENCODE, resources=resources, deps=clip,
                       payload={"kind": "encode", "role": role, "config": cfg.to_dict(), "use_gpu": res.use_gpu}))
        encodings.append(name)
    for name, payload, earlier in stage_payloads(cfg):
        graph.add(Task(id=name, run="", name=name, action=STAGE, resources=resources,
                       deps=(*encodings, *earlier), payload=payload))


def _pretrain(graph: TaskGraph, model_name: str, recipe, data, resources: Resources) -> str:
    """The task that pretrains this upstream CLIP at the experiment's location (planned once)."""
    from orchestrator.engine.upstream_clip import clip_task

    name, payload = clip_task(model_name, recipe, data)
    graph.add(Task(id=name, run="", name=name, action=PRETRAIN, resources=resources, payload=payload))
    return name


def weight_sources(cfg: ExperimentConfig) -> dict[int, int]:
    """Method index -> the earlier method whose versions it loads instead of training
    (:meth:`Method.weights_from`); its step k needs that method's step k. Validation guarantees the
    label names an earlier method."""
    from methods.base import create_method

    keys = [spec.key for spec in cfg.methods]
    sources = {m: create_method(spec.name, spec.params, cfg.model).weights_from() for m, spec in enumerate(cfg.methods)}
    return {m: keys.index(label) for m, label in sources.items() if label is not None}


def first_version_twins(cfg: ExperimentConfig, steps: tuple[Step, ...]) -> dict[int, int]:
    """Method index -> the earlier method whose version 0 is the very model it would train: the same
    :meth:`Method.first_version_recipe` and step-0 training recipe, in a scenario whose first step trains
    from scratch without replay memory. That version is trained once and copied."""
    from methods.base import create_method

    if not cfg.resources.share_first_version or steps[0].event != "train" or cfg.scenario.replay is not None:
        return {}
    recipes = [create_method(spec.name, spec.params, cfg.model).first_version_recipe() for spec in cfg.methods]
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

"""``compat sweep``: Ray Tune over any config key; each trial is a whole simulation, reported step by step.

A sweep config is an experiment config plus a ``sweep:`` section (keys: :class:`SweepConfig`). All of
it is validated before Ray starts. Each trial is a Tune trainable that drives one simulation, its steps
on Ray Train workers within the trial's share of the cluster or in-process (see trial.py). Its run
directory is ``runs/<trial id>``: the trial id is stable across ``Tuner.restore``, so a resumed trial
continues its run from the manifest, and the Train runs inside it keep their deterministic names.
Outputs are written by results.py.

::

    EXPERIMENT_DIR = <output_dir>/<sweep name>      (a path, or a URI such as s3://bucket/prefix/<sweep name>)
      sweep.yaml                      the experiment + sweep section as launched (resume reads it)
      runs/<trial id>/                each trial's run directory (seed-N/ inside with sweep.seeds)
      <trial id>/, tuner.pkl, ...     Tune's files (per-trial results, experiment state)
      results.csv, results.md         one row per trial, best first
      best_config.yaml                the best trial as a config for `compat run`
      objective_vs_params.png, objective_per_step.png
"""

from __future__ import annotations

import copy
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence

import yaml

from orchestrator.storage.run_storage import Location, RunStorage
from orchestrator.config.typed import from_dict, require, require_name
from orchestrator.config import ExperimentConfig, load_raw, parse_config, set_key
from orchestrator.engine.validate import parse_experiment
from orchestrator.errors import ConfigError, RunError
from orchestrator.registry import Registry
from orchestrator.evaluation.objectives import Objective, parse_constraint, parse_name

if TYPE_CHECKING:
    from orchestrator.tuning.results import SweepResults

_RANGE_KINDS = ("uniform", "loguniform", "int")
_RESERVED_KEYS = ("name", "output_dir", "seeds")  # set by the sweep itself
SWEEP_STATE = "sweep.yaml"  # the sweep's document, written when it starts (resume checks it)


@dataclass
class ObjectiveConfig:
    metric: str = "AM"  # a name of orchestrator/evaluation/objectives.py: AC, AM, M[1][0], margin[-1][0], accuracy, Avg, ...
    mode: Literal["max", "min"] = "max"  # maximise or minimise the metric
    method: Optional[str] = None  # the method key (label) it is read from; None: the experiment's only method
    matrix: Optional[str] = None  # cmc1, cmc5, map, ...; None: evaluation.primary


@dataclass
class SchedulerConfig:
    type: Literal["fifo", "asha"] = "fifo"  # asha: stop trials whose objective after a step lags the others
    grace_period: int = 1  # steps every trial runs before it can be stopped
    reduction_factor: float = 2.0  # asha: a trial continues past a rung only if it is in the top 1/reduction_factor

    def __post_init__(self):
        require(self.grace_period >= 1, "grace_period", "must be >= 1 (steps)")
        require(self.reduction_factor > 1, "reduction_factor", "must be > 1")


@dataclass
class SweepConfig:
    """The ``sweep:`` section."""

    space: dict[str, Any]  # config key -> {choice|grid: [values]} or {uniform|loguniform|int: [low, high]}
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    constraints: list[str] = field(default_factory=list)  # e.g. "AC >= 1": ECC on every pair
    search: str = "random"  # random, grid, optuna or hyperopt (SEARCH_ALGORITHMS); optuna, hyperopt: pip install -e ".[sweep]"
    num_samples: Optional[int] = None  # trials to sample (grid: repeats of the grid); None: 1 for grid, else 8
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_concurrent: Optional[int] = None  # None: as many trials as the cluster holds, each with its driver and a worker group per seed and method
    trial_cpus: Optional[float] = None  # Tune's reservation for a trial's driver; None: 1 when a step trains in-process (on it), else 0.25
    max_failures: int = 0  # Tune restarts of a failed trial (its run resumes from the manifest)
    seed: int = 0  # seeds the search algorithm
    seeds: Optional[list[int]] = None  # evaluate every trial over these seeds (mean)
    name: Optional[str] = None  # a safe name (letters, digits, . _ -); None: "<experiment name>-sweep"
    output_dir: Optional[str] = None  # None: the experiment's output_dir

    def __post_init__(self):
        require(bool(self.space), "space", "needs at least one key to sweep")
        require(self.num_samples is None or self.num_samples >= 1, "num_samples", "must be >= 1")
        require(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        require(self.trial_cpus is None or self.trial_cpus > 0, "trial_cpus", "must be > 0")
        require(self.max_failures >= 0, "max_failures", "must be >= 0")
        require(self.seeds is None or (bool(self.seeds) and len(set(self.seeds)) == len(self.seeds)), "seeds",
                "must be a non-empty list of distinct seeds")


@dataclass(frozen=True)
class Dimension:
    """One swept key: ``values`` are the choices, or (low, high) of a range (``int``: both included)."""

    key: str
    kind: Literal["choice", "grid", "uniform", "loguniform", "int"]
    values: tuple

    def domain(self, as_grid: bool = False):
        from ray import tune

        if self.kind == "grid" or (as_grid and self.kind == "choice"):
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)
        return tune.loguniform(low, high) if self.kind == "loguniform" else tune.uniform(low, high)


@dataclass
class Sweep:
    """A validated sweep: the experiment it varies, what it varies, what it optimises and where it lives."""

    document: dict  # the experiment mapping with its sweep section, as launched
    config: SweepConfig
    dimensions: list[Dimension]
    objective: Objective
    experiment: ExperimentConfig  # the experiment with no key changed
    num_versions: int
    storage: RunStorage  # where the sweep lives: Tune's state, every trial's run, the outputs

    @property
    def name(self) -> str:
        return self.storage.root.rsplit("/", 1)[-1]

    @property
    def directory(self) -> Path:
        """The sweep's local directory (a sweep on object storage has none)."""
        return self.storage.local_path()

    @property
    def experiment_raw(self) -> dict:
        return {k: v for k, v in self.document.items() if k != "sweep"}

    def trial_raw(self, params: dict[str, Any], with_tracking: bool = False) -> dict:
        """The experiment mapping of a trial: every swept key set, plus the sweep's seeds. Its ``tracking``
        section only ``with_tracking`` (a trial's own run is tracked by Tune's callbacks, see run_sweep)."""
        raw = copy.deepcopy(self.experiment_raw)
        if not with_tracking:
            raw.pop("tracking", None)
        for key, value in params.items():
            set_key(raw, key, value)
        if self.config.seeds is not None:
            raw["seeds"] = list(self.config.seeds)
        return raw


def load_sweep(config: Optional[str], overrides: Sequence[str] = (), output_dir: Optional[str] = None) -> Sweep:
    """Read, override and validate a sweep config; nothing is written and no trial is started."""
    document = load_raw(config, list(overrides))
    if output_dir is not None and isinstance(document.get("sweep"), dict):
        document["sweep"]["output_dir"] = output_dir
    return parse_sweep(document)


def load_sweep_dir(location: Location) -> Sweep:
    """The sweep a location holds (for ``--resume``): a path or a URI."""
    storage = RunStorage.at(location)
    if not storage.exists(SWEEP_STATE):
        raise RunError(f"{storage.location} is not a sweep directory (no sweep.yaml); pass the location `compat sweep` "
                       "created")
    return parse_sweep(yaml.safe_load(storage.read_text(SWEEP_STATE)), location=storage)


def parse_sweep(document: dict, location: Optional[RunStorage] = None) -> Sweep:
    """Validate everything a sweep needs before any trial starts, naming the offending key."""
    from orchestrator.data import dataset_num_classes
    from orchestrator.engine.scenarios import plan_steps

    if not isinstance(document.get("sweep"), dict):
        raise ConfigError("sweep", "a sweep config needs a 'sweep:' section (space, objective, ...)")
    config = from_dict(SweepConfig, document["sweep"], "sweep")
    experiment_raw = {k: v for k, v in document.items() if k != "sweep"}
    experiment = parse_experiment(experiment_raw)
    num_versions = len(plan_steps(experiment, dataset_num_classes(experiment.data)))
    dimensions = [_parse_dimension(key, spec, config) for key, spec in config.space.items()]
    for dimension in dimensions:
        _check_values(experiment_raw, dimension)
    objective = _parse_objective(config, experiment, num_versions)
    if config.scheduler.type == "asha":
        require(config.scheduler.grace_period <= num_versions, "sweep.scheduler.grace_period",
                f"must be at most the number of steps ({num_versions})")
    SEARCH_ALGORITHMS.get(config.search, "sweep.search")
    if config.search in ("optuna", "hyperopt") and importlib.util.find_spec(config.search) is None:
        raise ConfigError("sweep.search", f"{config.search} is not installed; pip install 'compat-orchestrator[sweep]'")
    name = config.name or f"{experiment.name}-sweep"
    require_name(name, "sweep.name")
    storage = location or RunStorage.at(config.output_dir or experiment.output_dir).child(name)
    return Sweep(document, config, dimensions, objective, experiment, num_versions, storage)


def _parse_dimension(key: str, spec: Any, config: SweepConfig) -> Dimension:
    where = f"sweep.space.{key}"
    kinds = ("choice", "grid", *_RANGE_KINDS)
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in kinds:
        raise ConfigError(where, f"must be one mapping {{kind: values}} with kind one of {', '.join(kinds)}, got {spec!r}")
    if key in _RESERVED_KEYS or key.split(".")[0] == "sweep" or (key == "seed" and config.seeds is not None):
        raise ConfigError(where, "is set by the sweep itself and cannot be swept")
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        require(isinstance(values, list) and len(values) > 0, where, f"{kind} needs a non-empty list of values")
    else:
        require(isinstance(values, list) and len(values) == 2 and all(_is_number(v) for v in values), where,
                f"{kind} needs [low, high], got {values!r}")
        low, high = values
        require(low < high, where, f"low ({low}) must be smaller than high ({high})")
        require(kind != "loguniform" or low > 0, where, f"loguniform needs low > 0, got {low}")
        require(kind != "int" or all(isinstance(v, int) for v in values), where, f"int needs integer bounds, got {values}")
    if config.search == "grid":
        require(kind in ("choice", "grid"), where, "grid search needs discrete values (choice or grid)")
    elif config.search != "random":
        require(kind != "grid", where, f"{config.search} samples its trials; use choice instead of grid")
    return Dimension(key, kind, tuple(values))


def _check_values(experiment_raw: dict, dimension: Dimension) -> None:
    """The experiment must validate with each choice, and with both ends of a range."""
    for value in dimension.values:
        raw = copy.deepcopy(experiment_raw)
        try:
            set_key(raw, dimension.key, value)
            parse_experiment(raw)
        except ConfigError as exc:
            raise ConfigError(f"sweep.space.{dimension.key}", f"value {value!r} is rejected: {exc}") from None


def _parse_objective(config: SweepConfig, experiment: ExperimentConfig, num_versions: int) -> Objective:
    keys = [m.key for m in experiment.methods]
    method = config.objective.method
    if method is None:
        require(len(keys) == 1, "sweep.objective.method",
                f"the experiment has several methods ({', '.join(keys)}); name the one to optimise")
        method = keys[0]
    require(method in keys, "sweep.objective.method", f"{method!r} is not a method key; methods: {', '.join(keys)}")
    name = parse_name(config.objective.metric, "sweep.objective.metric")
    name.check_defined(num_versions, "sweep.objective.metric")
    constraints = []
    for index, text in enumerate(config.constraints):
        constraint = parse_constraint(text, f"sweep.constraints.{index}")
        constraint.name.check_defined(num_versions, f"sweep.constraints.{index}")
        constraints.append(constraint)
    return Objective(name, config.objective.mode, method, config.objective.matrix or experiment.evaluation.primary,
                     tuple(constraints))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- running ---------------------------------------------------------------------------------------
def run_sweep(sweep: Sweep, *, progress: bool = True, callbacks: Sequence[Any] = (),
              echo: Callable[[str], None] = print) -> Optional["SweepResults"]:
    """Run the sweep, or continue it when its directory already holds it; then write the outputs.

    Finished trials are never re-run; unfinished and failed ones continue from their run directories.
    Returns None when the sweep was interrupted (Ctrl-C): continue it with ``compat sweep --resume``.
    ``callbacks`` are Ray Tune callbacks (e.g. loggers) added to the Tune run, after those of the
    experiment's ``tracking`` section.
    """
    import ray
    from ray import tune

    from orchestrator.engine.driver import check_decode_nodes
    from orchestrator.engine.executor import driver_resources, ensure_ray
    from orchestrator.reporting.tracking import track_sweep, tune_callbacks
    from orchestrator.tuning.results import collect_results
    from orchestrator.tuning.trial import TaskSetup, Trial, share_out, trial_need

    storage = sweep.storage
    resuming = storage.exists(SWEEP_STATE)
    if resuming and yaml.safe_load(storage.read_text(SWEEP_STATE)) != sweep.document:
        raise RunError(f"{storage.location} already holds a different sweep; continue it with "
                       f"`compat sweep --resume {storage.location}`, or set sweep.name/sweep.output_dir")
    ensure_ray(echo)
    cluster = ray.cluster_resources()
    trial_cfg = parse_config(sweep.trial_raw({}))
    check_decode_nodes(trial_cfg)  # each trial checks again, but one clear error beats one per trial
    need = trial_need(trial_cfg, sweep.config.trial_cpus)
    at_once, groups = share_out(need, cluster.get("CPU", 0.0), cluster.get("GPU", 0.0), sweep.config.max_concurrent)
    trainable = tune.with_resources(tune.with_parameters(Trial, sweep=sweep, task_setup=TaskSetup.here(), groups=groups),
                                    {"cpu": need.driver_cpus, **driver_resources(cluster)})
    path, filesystem = tune_location(storage)
    if resuming and tune.Tuner.can_restore(path, **filesystem):
        echo(f"Resuming sweep {storage.location}")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True, **filesystem)
    else:
        storage.write_text(SWEEP_STATE, yaml.safe_dump(sweep.document, sort_keys=False))
        echo(f"Sweep of '{sweep.experiment.name}' in {storage.location}: {len(sweep.dimensions)} key(s), "
             f"objective {sweep.objective.mode} {sweep.objective.name.text} of {sweep.objective.method}; "
             f"{describe_share(need, at_once, groups)}")
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: d.domain(as_grid=sweep.config.search == "grid") for d in sweep.dimensions},
            tune_config=tune.TuneConfig(
                metric="score", mode=sweep.objective.mode, search_alg=_search_algorithm(sweep, at_once),
                scheduler=_scheduler(sweep), num_samples=_num_samples(sweep.config),
                max_concurrent_trials=None if sweep.config.search in ("random", "grid") else at_once,
                trial_dirname_creator=trial_id_of, trial_name_creator=trial_id_of,
                reuse_actors=False,  # a stopped trial's process ends, and with it its simulation or Train runs
            ),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=path.rpartition("/")[0], **filesystem,
                failure_config=tune.FailureConfig(max_failures=sweep.config.max_failures),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),  # a trial's state is its run directory
                callbacks=[*tune_callbacks(sweep.experiment.tracking, storage), *callbacks],
                verbose=1 if progress else 0,
            ),
        )
    grid = tuner.fit()
    if _unfinished(sweep):
        echo(f"Sweep interrupted; continue it with `compat sweep --resume {storage.location}`")
        return None
    results = collect_results(sweep, grid)
    track_sweep(sweep.experiment.tracking, sweep.name, sweep.document, storage,
                {t.trial_id: storage.child(f"runs/{t.trial_id}") for t in results.trials})
    return results


def tune_location(storage: RunStorage) -> tuple[str, dict]:
    """The sweep's path as Ray Tune's calls take it, and the filesystem keyword they need with it: a local
    path alone, or the path inside the sweep's filesystem (an object store) and that filesystem."""
    if storage.is_local:
        return str(storage.local_path()), {}
    return storage.root, {"storage_filesystem": storage.filesystem}


def trial_id_of(trial) -> str:
    """Tune trial directory and display name: the trial id (stable across Tuner.restore)."""
    return trial.trial_id


SEARCH_ALGORITHMS: Registry[Callable[[int, int], Any]] = Registry("search algorithm", "sweep.search")


@SEARCH_ALGORITHMS.register("random")
@SEARCH_ALGORITHMS.register("grid")
def _basic_variants(seed: int, at_once: int):
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed, max_concurrent=at_once)  # it takes the limit itself


@SEARCH_ALGORITHMS.register("optuna")
def _optuna(seed: int, at_once: int):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=seed)


@SEARCH_ALGORITHMS.register("hyperopt")
def _hyperopt(seed: int, at_once: int):
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def _search_algorithm(sweep: Sweep, at_once: int):
    """The searcher; Tune limits concurrency through it."""
    return SEARCH_ALGORITHMS.get(sweep.config.search, "sweep.search")(sweep.config.seed, at_once)


def _scheduler(sweep: Sweep):
    if sweep.config.scheduler.type == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.config.scheduler
    return ASHAScheduler(time_attr="steps_done", max_t=sweep.num_versions, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def _unfinished(sweep: Sweep) -> bool:
    """Whether a resume would run more, read from the state Tune saved last. (After Ctrl-C the ResultGrid
    shows the trials it cut off as terminated; the saved state keeps them to continue.)"""
    from ray.tune import ExperimentAnalysis

    path, filesystem = tune_location(sweep.storage)
    trials = ExperimentAnalysis(path, **filesystem).trials
    return len(trials) < _total_trials(sweep) or any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _total_trials(sweep: Sweep) -> int:
    """Trials the sweep makes: num_samples times the size of the grid (Tune's grid_search semantics)."""
    total = _num_samples(sweep.config)
    for dimension in sweep.dimensions:
        if dimension.kind == "grid" or (sweep.config.search == "grid" and dimension.kind == "choice"):
            total *= len(dimension.values)
    return total


def _num_samples(config: SweepConfig) -> int:
    if config.num_samples is not None:
        return config.num_samples
    return 1 if config.search == "grid" else 8


def describe_share(need, at_once: int, groups: int) -> str:
    """``up to 2 trials at once, each a driver (0.25 CPU) and up to 3 worker group(s) of 1 CPU``."""
    where = "its steps in-process" if need.in_process and not need.group_cpus else (
        f"up to {groups} worker group(s) of {need.group_cpus:g} CPU" + (f", {need.group_gpus:g} GPU" if need.group_gpus else ""))
    return f"up to {at_once} trial(s) at once, each a driver ({need.driver_cpus:g} CPU) and {where}"

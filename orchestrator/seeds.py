"""Several seeds of one experiment: one complete run per seed, every metric as mean ± std over seeds.

::

    RUN_DIR/config.yaml     the experiment with its ``seeds`` list
    RUN_DIR/seed-N/         the run of seed N, exactly what ``compat run --set seed=N`` makes
    RUN_DIR/metrics.json    ``methods``: the mean over seeds of every number of every method entry
                            (ECC flags: held in every seed); ``methods_std``: the same tree of sample
                            standard deviations; ``seeds``: the table names of objectives.py per seed,
                            with their mean and std
    RUN_DIR/report.md       heatmaps of the mean matrices plus the mean ± std table

A seed's run never depends on the others: its tasks are independent chains of the experiment's task
graph, trained side by side as far as the cluster holds their worker groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from orchestrator import runfiles
from orchestrator.config import ExperimentConfig, parse_config
from orchestrator.errors import CompatError
from orchestrator.objectives import table_values


def seed_runs(cfg: ExperimentConfig, run_dir: Path) -> list[tuple[ExperimentConfig, Path]]:
    """(config, run directory) of every seed; an experiment without ``seeds`` is its own single run."""
    if cfg.seeds is None:
        return [(cfg, Path(run_dir))]
    return [(cfg.with_seed(seed), Path(run_dir) / f"seed-{seed}") for seed in cfg.seeds]


def run(cfg: ExperimentConfig, run_dir: Optional[Path] = None, *, concurrency: Optional[int] = None,
        progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """``compat run``: the experiment once, or once per seed of ``cfg.seeds`` followed by the aggregate.
    Every seed's tasks are tasks of one graph (:func:`orchestrator.engine.graph.plan`), so seeds train
    side by side as far as the cluster holds their worker groups; ``concurrency`` caps the worker groups
    at once. Finished steps are never recomputed, so this also resumes."""
    from orchestrator.simulation import run_experiment

    return run_experiment(cfg, run_dir, progress=progress, echo=echo, max_groups=concurrency)


def cpu_needs(cfg: ExperimentConfig) -> tuple[float, bool]:
    """(CPUs of the largest worker group, whether some step trains in-process)."""
    from orchestrator.data import dataset_num_classes
    from orchestrator.scenarios import plan_steps

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


def aggregate(cfg: ExperimentConfig, per_seed: Sequence[dict]) -> dict:
    """metrics.json of a multi-seed run from the metrics.json of each seed (in ``cfg.seeds`` order)."""
    first = per_seed[0]
    primary = first["primary"]
    table = {str(seed): {key: table_values([m["methods"][key]], primary) for key in m["methods"]}
             for seed, m in zip(cfg.seeds, per_seed)}
    return {
        "schema_version": first["schema_version"], "experiment": cfg.name, "seed": None,
        "config_digest": cfg.digest(), "protocol": first["protocol"], "primary": primary,
        "methods": {key: _combine([m["methods"][key] for m in per_seed], "mean") for key in first["methods"]},
        "methods_std": {key: _combine([m["methods"][key] for m in per_seed], "std") for key in first["methods"]},
        "seeds": {"values": list(cfg.seeds), "runs": {str(s): f"seed-{s}" for s in cfg.seeds}, "per_seed": table,
                  "mean": _combine(list(table.values()), "mean"), "std": _combine(list(table.values()), "std")},
    }


def format_seed_table(metrics: dict) -> str:
    """Plain-text mean ± std of the table names per method (the CLI prints it after a multi-seed run)."""
    seeds = metrics["seeds"]
    mean, std = seeds["mean"], seeds["std"]
    names = list(next(iter(mean.values())))
    rows = [["method", *names]]
    rows += [[key, *(f"{_fmt(mean[key].get(n))} ± {_fmt(std[key].get(n))}" for n in names)] for key in mean]
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return f"Over seeds {', '.join(map(str, seeds['values']))} (mean ± sample std), on {metrics['primary']}:\n" + "\n".join(lines)


# -- internals -------------------------------------------------------------------------------------
def _run_in_task(cfg_dict: dict, run_dir: str, setup: TaskSetup) -> dict:
    import torch

    torch.set_num_threads(setup.threads)
    if setup.cache_dir:
        os.environ["COMPAT_CACHE_DIR"] = setup.cache_dir
    return run(parse_config(cfg_dict), Path(run_dir), concurrency=1, progress=False, echo=lambda line: None)


def _combine(values: list, how: str) -> Any:
    """Mean (``how="mean"``) or sample std (``"std"``; None for one seed) of every number in equally shaped
    trees; flags are True only when true in every tree; equal leaves (names, counts) are kept as they are."""
    first = values[0]
    if isinstance(first, dict):
        return {k: _combine([v[k] for v in values], how) for k in first}
    if isinstance(first, list):
        return [_combine(list(items), how) for items in zip(*values)]
    if isinstance(first, bool):
        return all(values) if how == "mean" else None
    if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
        array = np.asarray(values, dtype=np.float64)
        if how == "mean":
            return first if all(v == first for v in values) else float(array.mean())
        return float(array.std(ddof=1)) if len(values) > 1 else None
    return first


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.3f}"

"""The driver: plan -> worker groups on Ray Train -> manifest -> matrix rows -> metrics and report.

The driver holds no tensors of the workers: versions, embeddings and progress pass through the run
directory. A finished step is never recomputed, and a matrix row is computed once, from the store,
right after its version exists.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from orchestrator import runfiles
from orchestrator.config import ExperimentConfig, parse_config
from orchestrator.errors import CompatError, RunError
from orchestrator.scenarios import Task, describe_tasks, group_tasks, plan_steps

SCHEMA_VERSION = 1
HEALTH_CHECK_INTERVAL_S = 0.2  # Ray Train's default is 2 s; an environment variable of the same name wins


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def load_run_config(run_dir: Path) -> ExperimentConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.yaml); pass the directory `compat run` created")
    return parse_config(yaml.safe_load(path.read_text()))


def prepare_run_dir(cfg: ExperimentConfig, run_dir: Path) -> bool:
    """Create ``run_dir`` for ``cfg``, or check that it already belongs to ``cfg``. Returns True when resuming.
    A replacement checkpoint that is missing, unsafe or does not fit fails here, before anything is written."""
    from orchestrator.upstream import check_replacements

    check_replacements(cfg)
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        existing = parse_config(yaml.safe_load(config_file.read_text()))
        if existing.digest() != cfg.digest():
            raise RunError(
                f"{run_dir} already holds a run of a different config (digest {existing.digest()} != {cfg.digest()}); "
                f"resume it with `compat run --resume {run_dir}`, or set another `name`/`output_dir`, or delete it"
            )
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    runfiles.atomic_write_bytes(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
    runfiles.atomic_write_json(run_dir / "run.json", run_provenance(cfg))
    return False


def run_provenance(cfg: ExperimentConfig) -> dict:
    import ray
    import torch

    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"experiment": cfg.name, "seed": cfg.seed, "config_digest": cfg.digest(), "code_revision": revision,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


def run_experiment(cfg: ExperimentConfig, run_dir: Optional[Path] = None, *, progress: bool = True,
                   echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) every method's scenario, then write metrics.json, CSVs, plots and report.md."""
    from orchestrator.data import dataset_num_classes
    from orchestrator.report import render_report
    from orchestrator.upstream import train_upstream
    from orchestrator.upstream_clip import record_upstream

    run_dir = Path(run_dir or default_run_dir(cfg)).resolve()
    resuming = prepare_run_dir(cfg, run_dir)
    record_upstream(cfg, run_dir)  # the offline upstream CLIP, built once before any worker needs it
    steps = plan_steps(cfg, dataset_num_classes(cfg.data))
    total = len(steps) * len(cfg.methods)
    done = sum(runfiles.step_done(run_dir, m.key, s.index) for m in cfg.methods for s in steps)
    echo(f"{'Resuming' if resuming else 'Running'} '{cfg.name}' in {run_dir}: {len(cfg.methods)} method(s) x "
         f"{len(steps)} step(s), {done}/{total} already done")
    display = ProgressDisplay(run_dir, total, done, enabled=progress, echo=echo, keys=[m.key for m in cfg.methods])
    tasks = [Task(i, s) for i, spec in enumerate(cfg.methods) for s in steps
             if not runfiles.step_done(run_dir, spec.key, s.index)]
    for method_index in sorted({t.method for t in tasks}):
        train_upstream(cfg, run_dir, cfg.methods[method_index], echo)
    with RowUpdater(cfg, run_dir, len(steps)):  # each matrix row as soon as its step is done
        for group in group_tasks(tasks, cfg.resources.group_steps):
            display.start_group(group)
            run_group(cfg, run_dir, group)
            display.finish_group(len(group))
    for spec in cfg.methods:
        for step in steps:
            ensure_row(cfg, run_dir, spec.key, step.index)
    display.close()
    metrics = assemble_metrics(cfg, run_dir, len(steps))
    runfiles.atomic_write_json(run_dir / "metrics.json", metrics)
    render_report(run_dir)
    return metrics


def run_group(cfg: ExperimentConfig, run_dir: Path, group: list[Task]) -> None:
    """One Ray Train run (one worker group) that trains every task of ``group`` in turn."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.session import train_group

    resources = group[0].step.resources
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default)
    # and each ray.train.report() waits for the next poll: 2 s per epoch, and up to 2 s to notice the end.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    if resources.num_workers > 0:
        ensure_ray()
    elif os.environ.get("COMPAT_RAY_LOGS") != "1":
        # in-process runs log every reported metric at INFO into this terminal, over the progress line
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    keys = [m.key for m in cfg.methods]
    first, last = group[0], group[-1]
    name = (f"{keys[first.method]}-steps-{first.step.index:03d}-{last.step.index:03d}" if first.method == last.method
            else f"{keys[first.method]}-step-{first.step.index:03d}-to-{keys[last.method]}-step-{last.step.index:03d}")
    scaling = ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.use_gpu,
        resources_per_worker={"CPU": resources.cpus_per_worker} if resources.num_workers else None,
    )
    trainer = TorchTrainer(
        train_group,
        train_loop_config={"run_dir": str(run_dir), "config": cfg.to_dict(),
                           "tasks": [[t.method, t.step.index] for t in group]},
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir / "ray"),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError and friends
        raise explain_failure(exc, describe_tasks(group, keys)) from exc
    missing = [describe_tasks([t], keys) for t in group if not runfiles.step_done(run_dir, keys[t.method], t.step.index)]
    if missing:
        raise RunError(f"the Train run ended without finishing {', '.join(missing)}; see the log above")


def explain_failure(exc: Exception, tasks: str) -> Exception:
    """The worker's own error when it is one of ours (a clear sentence), else a RunError that names
    the tasks; the original traceback stays attached as the cause (shown with --debug)."""
    failures = getattr(exc, "worker_failures", None) or {0: exc}
    for rank, failure in sorted(failures.items()):
        seen = failure
        while seen is not None:
            if isinstance(seen, CompatError):
                return seen
            seen = seen.__cause__ or getattr(seen, "cause", None)
    rank, failure = sorted(failures.items())[0]
    first_line = (str(failure).strip().splitlines() or [""])[-1]
    return RunError(f"{tasks} failed on worker rank {rank}: {type(failure).__name__}: {first_line} "
                    f"(rerun with --debug for the traceback; finished steps are kept, --resume continues)")


def ensure_ray() -> None:
    """Connect to the cluster named by RAY_ADDRESS (as under `ray job submit`), or start a local one.
    Worker logs stay in Ray's session log directory unless COMPAT_RAY_LOGS=1 (set by --debug)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, log_to_driver=os.environ.get("COMPAT_RAY_LOGS") == "1")


def ensure_row(cfg: ExperimentConfig, run_dir: Path, method: str, version: int) -> dict:
    """Row ``version`` of every compatibility matrix, computed once from the store and cached."""
    from orchestrator.evaluation import compatibility_row
    from orchestrator.store import EmbeddingStore

    path = runfiles.row_path(run_dir, method, version)
    if path.is_file():
        return runfiles.read_json(path)
    blocks = class_blocks(cfg)
    row = compatibility_row(EmbeddingStore(runfiles.store_dir(run_dir)), method, version, cfg.evaluation,
                            None if blocks is None else blocks[1])
    runfiles.atomic_write_json(path, row)
    return row


def class_blocks(cfg: ExperimentConfig) -> Optional[tuple[list[str], "np.ndarray"]]:
    """Block names and each label's block: the classes version k first trained on form block ``vk``,
    classes no version trained on form ``none``. Only where the evaluation ranks the experiment's own
    classes (not templates, not another dataset, not a class order read from session files)."""
    import numpy as np

    from orchestrator.data import dataset_num_classes
    from orchestrator.scenarios import class_order

    ev = cfg.evaluation
    own_data = all(ev.sets[name].data is None for name in {ev.query, ev.gallery or ev.query} if name in ev.sets)
    if ev.templates or not own_data or cfg.scenario.session_files is not None or cfg.scenario.replace_at:
        return None
    num_classes = dataset_num_classes(cfg.data)
    steps = plan_steps(cfg, num_classes)
    order = class_order(cfg, num_classes)
    block_of_label = np.full(num_classes, len(steps), dtype=np.int64)
    for step in steps:
        block_of_label[order[step.num_previous:step.num_seen]] = step.index
    names = [f"v{step.index}" for step in steps] + (["none"] if steps[-1].num_seen < num_classes else [])
    return names, block_of_label


class RowUpdater:
    """Computes each method's next matrix row as soon as its step is in the manifest, while the workers
    train on, so the matrix grows row by row inside a grouped Train run. An error here is left for the
    driver's final ``ensure_row`` pass, which raises it where the user sees it."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, num_versions: int, interval: float = 0.5):
        import threading

        self.cfg, self.run_dir, self.num_versions, self.interval = cfg, run_dir, num_versions, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compat-rows", daemon=True)

    def __enter__(self) -> "RowUpdater":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_version = {spec.key: 0 for spec in self.cfg.methods}
        while not self._stop.wait(self.interval):
            for key, version in next_version.items():
                while version < self.num_versions and runfiles.step_done(self.run_dir, key, version):
                    try:
                        ensure_row(self.cfg, self.run_dir, key, version)
                    except Exception:
                        return
                    version += 1
                    if self._stop.is_set():
                        return
                next_version[key] = version


def assemble_metrics(cfg: ExperimentConfig, run_dir: Path, num_versions: int) -> dict:
    """metrics.json: per method every matrix by metric name and the summary metrics (stable schema)."""
    from orchestrator import metrics as M
    from orchestrator.evaluation import BY_BLOCK, CompatibilityMatrix

    blocks = class_blocks(cfg)

    out: dict = {"schema_version": SCHEMA_VERSION, "experiment": cfg.name, "seed": cfg.seed,
                 "config_digest": cfg.digest(), "protocol": cfg.evaluation.protocol,
                 "primary": cfg.evaluation.primary, "methods": {}}
    for spec in cfg.methods:
        rows = [runfiles.read_json(runfiles.row_path(run_dir, spec.key, v)) for v in range(num_versions)]
        matrices, summaries, ecc = {}, {}, {}
        for name in [n for n in rows[0] if n != BY_BLOCK]:
            matrix = CompatibilityMatrix(num_versions)
            for i, row in enumerate(rows):
                for j, value in enumerate(row[name]):
                    matrix.set(i, j, value)
            values = matrix.values
            matrices[name] = matrix.to_list()
            summaries[name] = {
                "AC": M.average_compatibility(values, ties=cfg.evaluation.ties),
                "AM": M.average_multimodel_accuracy(values),
                "BC": M.backward_compatibility(values),
                "FC": M.forward_compatibility(values),
            }
            flags = M.ecc_matrix(values)
            ecc[name] = [[bool(flags[i][j]) if j < i else None for j in range(num_versions)] for i in range(num_versions)]
        entries = [runfiles.manifest_entry(run_dir, spec.key, v) or {} for v in range(num_versions)]
        accuracy = [e.get("accuracy") for e in entries]
        method_params = runfiles.read_json(runfiles.versions_dir(run_dir, spec.key) / "v0" / "meta.json").get("params", {})
        out["methods"][spec.key] = {
            "method": spec.name, "params": method_params, "num_versions": num_versions,
            "matrices": matrices, "summary": summaries.get(cfg.evaluation.primary, next(iter(summaries.values()))),
            "summary_by_metric": summaries, "ecc": ecc,
            "accuracy": accuracy if any(a is not None for a in accuracy) else None,
            "accuracy_summary": accuracy_summary(entries),
            "trainable_parameters": entries[-1].get("trainable_parameters"),
            "seconds": [e.get("seconds") for e in entries],
        }
        if blocks is not None and all(BY_BLOCK in row for row in rows):
            out["methods"][spec.key][BY_BLOCK] = {
                "blocks": blocks[0],
                "cells": [[row[BY_BLOCK][j] if j <= i else None for j in range(num_versions)]
                          for i, row in enumerate(rows)],
            }
    add_update_gain(out)
    return out


def accuracy_summary(entries: list[dict]) -> Optional[dict]:
    """The FSCIL view of per-session accuracy (docs/methods/cpe-clip.md): Avg (mean over sessions), PD
    (first - last) and the accuracy on base vs novel classes per session; None without accuracies."""
    from orchestrator import metrics as M

    accuracy = [e.get("accuracy") for e in entries]
    if not accuracy or any(a is None for a in accuracy):
        return None
    return {"avg": M.session_average(accuracy), "pd": M.performance_drop(accuracy),
            "base": [e.get("accuracy_base") for e in entries], "novel": [e.get("accuracy_novel") for e in entries]}


def add_update_gain(out: dict) -> None:
    """With an ``independent`` method present: gain of every other method's last version over its first
    (docs/guide/evaluation.md), per metric, with the independent last version as new*."""
    from orchestrator.metrics import update_gain

    reference = next((m for m in out["methods"].values() if m["method"] == "independent"), None)
    if reference is None or reference["num_versions"] < 2:
        return
    for entry in out["methods"].values():
        gains = {}
        for name, matrix in entry["matrices"].items():
            ref = reference["matrices"].get(name)
            if ref is None:
                continue
            last = len(matrix) - 1
            gains[name] = update_gain(matrix[last][0], matrix[0][0], ref[last][last])
        entry["update_gain"] = gains


class ProgressDisplay:
    """Steps done/total, the current step's epoch and loss, and an ETA, read from progress.json while
    the workers run (the driver never sees their tensors)."""

    def __init__(self, run_dir: Path, total: int, done: int, enabled: bool, echo: Callable[[str], None],
                 keys: list[str]):
        import threading

        self.run_dir, self.total, self.done, self.enabled, self.echo = run_dir, total, done, enabled, echo
        self.keys = keys
        self.started = time.time()
        self.finished_here = 0
        self.group: list[tuple[str, int]] = []  # (method key, step) of the running worker group, in order
        self._stop = threading.Event()
        self._tty = os.isatty(1)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if enabled:
            self._thread.start()

    def start_group(self, group: list[Task]) -> None:
        self.group = [(self.keys[t.method], t.step.index) for t in group]
        runfiles.progress_path(self.run_dir).unlink(missing_ok=True)
        if self.enabled:
            workers = group[0].step.resources.num_workers or "in-process"
            self._print(f"[{describe_tasks(group, self.keys)}] on {workers} worker(s)", newline=True)

    def finish_group(self, count: int) -> None:
        self.done += count
        self.finished_here += count

    def line(self, p: dict) -> str:
        """Steps done (finished tasks of the running group included), the running step's epoch and
        loss, and an ETA from the pace so far."""
        running = (p["method"], p["step"])
        in_group = self.group.index(running) if running in self.group else 0
        current = in_group + p["epoch"] / p["epochs"]
        elapsed = time.time() - self.started
        work = self.finished_here + current
        eta = _clock(elapsed / work * (self.total - self.done - current)) if work > 0 else "--:--"
        return (f"  {self.done + in_group}/{self.total} steps done | {p['method']} step {p['step']} "
                f"epoch {p['epoch']}/{p['epochs']} loss {p.get('loss', float('nan')):.4f} | "
                f"elapsed {_clock(elapsed)} ETA {eta}")

    def _poll(self) -> None:
        last = None
        while not self._stop.wait(0.5):
            progress = runfiles.read_progress(self.run_dir)
            if not progress:
                continue
            if self._tty:  # a live line, refreshed in place
                self._print(self.line(progress), newline=False)
            elif progress != last:  # logs get one line per finished epoch
                self._print(self.line(progress), newline=True)
            last = progress

    def _print(self, text: str, newline: bool) -> None:
        if self._tty and not newline:
            print("\r" + text.ljust(110), end="", flush=True)
        else:
            if self._tty:
                print()
            self.echo(text)

    def close(self) -> None:
        self._stop.set()
        if self.enabled and self._thread.is_alive():
            self._thread.join(timeout=2)
            if self._tty:
                print()
        self.echo(f"All {self.total} steps done in {_clock(time.time() - self.started)}")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


"""Experiment tracking: MLflow, Weights & Biases and TensorBoard, fed by the driver at named points.

A :class:`Tracker` sends the same events to every tracker the ``tracking:`` section configures::

    open            the resolved config (MLflow params and config.yaml, W&B config, a TensorBoard text)
    step_finished   a method's version, as its task finishes (steps done before a resume are sent first):
                    each epoch's mean losses against the method's epochs so far, and against the version
                    its accuracies, seconds, training throughput (images/s, FLOPs per image, MFU) and
                    its row of every compatibility matrix
    run_finished    the summary of every metrics.json (AC, AM, BC, FC, ECC per metric; over seeds the
                    means and stds), every matrix as a table, and the report's files (report.md,
                    metrics.json, config.yaml, run.json, the matrix CSVs, the plots)
    close           finished, or failed when the run raised

Metric names are ``<method>/<name>``, ``seed-N/<method>/<name>`` for a seed of a multi-seed run.
Sweeps (:func:`tune_callbacks`, :func:`track_sweep`): Ray Tune's logger callbacks log each trial's
per-step results, and one more tracker run holds the sweep's table, plots and each trial's report.

Ray's integrations do the setup: ``setup_mlflow`` / ``MLflowLoggerCallback`` and ``setup_wandb`` /
``WandbLoggerCallback``; TensorBoard files are written with tensorboardX, as Ray Tune's own
``TBXLoggerCallback`` writes them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

from orchestrator.config.tracking import MLflowTracking, TrackingConfig, WandbTracking
from orchestrator.errors import ConfigError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

INSTALL = "pip install 'compat-orchestrator[tracking]'"
MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}  # config key -> module it needs
FILES_FOLDER = "compat"  # W&B: the report's files go into the run's files/compat/
NOT_REPORTED = re.compile(r"lease\.json|tuner\.pkl|.*state-.*\.json")  # the run's lease; Tune's state in a sweep
STEP_VALUES = ("accuracy", "accuracy_base", "accuracy_novel", "accuracy_new_classes", "accuracy_previous_classes",
               "seconds", "train_seconds")  # manifest-entry numbers logged against the version
THROUGHPUT_VALUES = ("images_per_second", "images_per_second_per_device", "train_flops_per_image",
                     "mfu")  # the entry's ``throughput`` numbers (orchestrator/engine/throughput.py), as <method>/throughput/<name>


def check_tracking(tracking: TrackingConfig, key: str = "tracking") -> None:
    """Every configured tracker's package is installed (checked before a run writes anything)."""
    for name, module in MODULES.items():
        if getattr(tracking, name) is not None and not _installed(module):
            raise ConfigError(f"{key}.{name}", f"needs the Python package {module!r}, which is not installed: {INSTALL}")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # in sys.modules as None: imports of it are blocked
        return False


# -- the tracker the driver feeds ---------------------------------------------------------------------
class Tracker:
    """The configured backends behind one set of events; without backends every call does nothing.
    A context manager: leaving it closes every backend, as failed when an exception left it."""

    def __init__(self, backends: Sequence["Backend"] = ()):
        self.backends = list(backends)

    @classmethod
    def open(cls, tracking: TrackingConfig, *, name: str, config: dict, run: RunStorage, tags: dict[str, str]) -> "Tracker":
        """Start a tracker run named ``name`` in every configured backend and log ``config``. Tracker
        files that have no place of their own go into ``run`` (it must then be local)."""
        check_tracking(tracking)
        backends: list[Backend] = []
        try:
            if tracking.mlflow is not None:
                backends.append(MLflowBackend(tracking.mlflow, name, config, tags))
            if tracking.wandb is not None:
                backends.append(WandbBackend(tracking.wandb, name, config, _local_dir(tracking.wandb.dir, run, "", "tracking.wandb.dir"), tags))
            if tracking.tensorboard is not None:
                backends.append(TensorBoardBackend(_local_dir(tracking.tensorboard.dir, run, "tensorboard", "tracking.tensorboard.dir"), config))
        except BaseException:
            for backend in backends:
                backend.close(failed=True)
            raise
        return cls(backends)

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        """Close every backend; the first error a backend raises while closing is raised after all are
        closed, unless the run itself failed (its own error is the one to see)."""
        backends, self.backends = self.backends, []
        errors = []
        for backend in backends:
            try:
                backend.close(failed)
            except Exception as exc:  # each backend gets its close
                errors.append(exc)
        if errors and not failed:
            raise errors[0]

    def step_finished(self, run_path: str, method: str, version: int, entry: dict, row: Optional[dict],
                      epochs_before: int) -> None:
        """One version of ``method``: its epochs' losses (x: epochs of the method so far, counted from 1;
        ``epochs_before`` is what its earlier steps trained) and its numbers (x: the version)."""
        if not self.enabled:
            return
        prefix = _join(run_path, method)
        for point in entry.get("losses") or []:
            losses = {f"{prefix}/train/{k}": float(v) for k, v in point.items() if k != "epoch" and _number(v)}
            self._metrics(losses, "epoch", epochs_before + int(point["epoch"]) + 1)
        self._metrics({f"{prefix}/{k}": float(entry[k]) for k in STEP_VALUES if _number(entry.get(k))}, "version", version)
        self._metrics(throughput_metrics(entry, prefix), "version", version)
        self._metrics(row_metrics(row or {}, prefix), "version", version)

    def run_finished(self, runs: Sequence[tuple[str, RunStorage]]) -> None:
        """The end of a run: for each (path, storage) of ``runs`` (the run itself at "", its seeds), its
        metrics.json summary and matrices and its top-level files, under ``path``."""
        if not self.enabled:
            return
        for path, storage in runs:
            metrics = storage.read_json_or_none(runfiles.METRICS)
            if metrics is None:
                continue
            summary = summary_metrics(metrics, path)
            for backend in self.backends:
                backend.log_summary(summary)
                for table_name, (columns, rows) in matrix_tables(metrics, path).items():
                    backend.log_table(table_name, columns, rows)
        with tempfile.TemporaryDirectory(prefix="compat-tracking-") as scratch:
            for path, storage in runs:
                copy_top_level_files(storage, Path(scratch, path))
            for backend in self.backends:
                backend.log_files(Path(scratch))

    def _metrics(self, metrics: dict[str, float], axis: str, step: int) -> None:
        if metrics:
            for backend in self.backends:
                backend.log_metrics(metrics, axis, step)


def open_run_tracker(cfg, root: RunStorage) -> Tracker:
    """The tracker of one experiment (either kind) run at ``root``."""
    tags = {"compat.run_dir": root.location, "compat.config_digest": cfg.digest(),
            "compat.kind": getattr(cfg, "kind", "class-incremental")}
    return Tracker.open(cfg.tracking, name=cfg.name, config=cfg.to_dict(), run=root, tags=tags)


# -- what is logged -----------------------------------------------------------------------------------
def throughput_metrics(entry: dict, prefix: str) -> dict[str, float]:
    """A step's training throughput: ``<prefix>/throughput/<name>``, each number its manifest entry has
    (none for a copied version; no MFU where the device's peak is unknown, a CPU's included)."""
    throughput = entry.get("throughput") or {}
    return {f"{prefix}/throughput/{k}": float(throughput[k]) for k in THROUGHPUT_VALUES
            if _number(throughput.get(k))}


def row_metrics(row: dict, prefix: str) -> dict[str, float]:
    """A compatibility-matrix row of version i: ``<prefix>/<metric>/gallery_v<j>`` = M[i][j] for j <= i."""
    out = {}
    for metric, values in row.items():
        if isinstance(values, list) and all(v is None or _number(v) for v in values):
            out.update({f"{prefix}/{metric}/gallery_v{j}": float(v) for j, v in enumerate(values) if v is not None})
    return out


def summary_metrics(metrics: dict, path: str) -> dict[str, float]:
    """The final numbers of a metrics.json (a run, a multi-seed aggregate or a cross-modal run)."""
    out: dict[str, float] = {}
    if metrics.get("kind") == "cross-modal":
        for cell in ("old_old", "new_new"):
            out.update({_join(path, cell, name): v for name, v in metrics.get(cell, {}).items() if _number(v)})
        for key, method in metrics["methods"].items():
            for part, suffix in (("mean", ""), ("std", "_std"), ("compatible", "_compatible")):
                out.update({_join(path, key, name + suffix): float(v)
                            for name, v in method.get(part, {}).items() if _number(v)})
        return out
    stds = metrics.get("methods_std", {})
    for key, method in metrics["methods"].items():
        for entry, suffix in ((method, ""), (stds.get(key, {}), "_std")):
            for metric, summary in (entry.get("summary_by_metric") or {}).items():
                out.update({_join(path, key, metric, name + suffix): float(v) for name, v in summary.items() if _number(v)})
        accuracy = method.get("accuracy_summary") or {}
        out.update({_join(path, key, f"accuracy_{name}"): float(accuracy[name])
                    for name in ("avg", "pd") if _number(accuracy.get(name))})
        out.update({_join(path, key, metric, "update_gain"): float(v)
                    for metric, v in (method.get("update_gain") or {}).items() if _number(v)})
    return out


def matrix_tables(metrics: dict, path: str) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """Every compatibility matrix of a metrics.json as (columns, rows): row i holds M[i][0..i]."""
    tables = {}
    for key, method in metrics.get("methods", {}).items():
        for metric, matrix in (method.get("matrices") or {}).items():
            columns = ["query \\ gallery", *(f"v{j}" for j in range(len(matrix)))]
            tables[_join(path, key, metric)] = (columns, [[f"v{i}", *row] for i, row in enumerate(matrix)])
    return tables


def copy_top_level_files(storage: RunStorage, target: Path) -> None:
    """The files right in a run directory (report, metrics, config, matrices, plots; not its lease) or a
    sweep directory (its results, best config and plots; not Tune's own state) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for key in storage.list("", recursive=False):
        if not NOT_REPORTED.fullmatch(key):
            (target / key).write_bytes(storage.read_bytes(key))


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bools count: an ECC verdict is logged as 1 or 0


def _local_dir(configured: Optional[str], run: RunStorage, sub: str, key: str) -> Path:
    """A tracker's local directory: the configured one, else ``sub`` in the run directory."""
    if configured is not None:
        return Path(configured).expanduser().absolute()
    if not run.is_local:
        raise ConfigError(key, f"the run directory {run.location} is not on a local filesystem; set a local directory")
    return run.local_path(sub)


# -- backends -----------------------------------------------------------------------------------------
class Backend:
    """One tracker; ``axis`` names the x of a metric ("epoch" or "version")."""

    def log_metrics(self, metrics: dict[str, float], axis: str, step: int) -> None: ...

    def log_summary(self, metrics: dict[str, float]) -> None: ...

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_files(self, directory: Path) -> None: ...

    def close(self, failed: bool) -> None: ...


class MLflowBackend(Backend):
    """One MLflow run (Ray's ``setup_mlflow``): the config as params and config.yaml, metrics with
    their step, the files as artefacts (the matrices are the CSVs among them)."""

    def __init__(self, section: MLflowTracking, name: str, config: dict, tags: dict[str, str]):
        from mlflow.exceptions import MlflowException
        from ray.air.integrations.mlflow import setup_mlflow

        try:
            self.mlflow = setup_mlflow(config, tracking_uri=section.tracking_uri, experiment_name=section.experiment or name,
                                       run_name=name, create_experiment_if_not_exists=True, tags=tags, rank_zero_only=False)
        except MlflowException as exc:
            raise ConfigError("tracking.mlflow.tracking_uri", f"MLflow refused it: {exc.message}") from None
        self.mlflow.log_dict(config, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], axis: str, step: int) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in metrics.items()}, step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in metrics.items()})

    def log_files(self, directory: Path) -> None:
        self.mlflow.log_artifacts(str(directory))

    def close(self, failed: bool) -> None:
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


def _mlflow_key(name: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / space``: an index ``[k]`` becomes ``_k``
    (``M[-1][0]`` -> ``M_-1_0``), anything else ``_``."""
    return re.sub(r"[^\w\-./ ]", "_", re.sub(r"\[(-?\d+)\]", r"_\1", name))


class WandbBackend(Backend):
    """One W&B run (Ray's ``setup_wandb``): the config, metrics against their axis (``define_metric``),
    the matrices as tables, the plots as images and every file in the run's files (under compat/)."""

    def __init__(self, section: WandbTracking, name: str, config: dict, directory: Path, tags: dict[str, str]):
        from ray.air.integrations.wandb import setup_wandb

        directory.mkdir(parents=True, exist_ok=True)
        options = {"project": section.project or os.environ.get("WANDB_PROJECT") or name, "entity": section.entity,
                   "dir": str(directory), "name": name, "group": name, "resume": None, "notes": tags.get("compat.run_dir")}
        if section.mode is not None:
            options["mode"] = section.mode
        with wandb_mode(section.mode):
            try:
                self.run = setup_wandb(config, rank_zero_only=False, **options)
            except ValueError as exc:  # Ray's check for an API key
                raise ConfigError("tracking.wandb.mode", f"W&B cannot log online ({exc}); run `wandb login`, set "
                                  "WANDB_API_KEY, or set tracking.wandb.mode: offline") from None
        self.axes: dict[str, str] = {}

    def log_metrics(self, metrics: dict[str, float], axis: str, step: int) -> None:
        for key in metrics:
            if key not in self.axes:
                self.axes[key] = axis
                self.run.define_metric(key, step_metric=axis)
        self.run.log({**metrics, axis: step})

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.run.summary.update(metrics)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({f"matrices/{name}": wandb.Table(columns=columns, data=rows)})

    def log_files(self, directory: Path) -> None:
        import wandb

        # the run's files (uploaded when online), in a folder of their own: W&B keeps its own config.yaml there
        shutil.copytree(directory, Path(self.run.dir) / FILES_FOLDER, dirs_exist_ok=True)
        images = {f"plots/{p.relative_to(directory).with_suffix('')}": wandb.Image(str(p)) for p in sorted(directory.rglob("*.png"))}
        if images:
            self.run.log(images)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def wandb_mode(mode: Optional[str]) -> Iterator[None]:
    """WANDB_MODE set to ``mode`` inside (Ray's W&B setup asks for an API key unless it says offline)."""
    if mode is None:
        yield
        return
    previous = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = mode
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = previous


class TensorBoardBackend(Backend):
    """Event files of one log directory: scalars, the config, matrices and report.md as text, plots as images."""

    def __init__(self, directory: Path, config: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(directory))
        self.writer.add_text("config", _code_block(yaml.safe_dump(config, sort_keys=False)))

    def log_metrics(self, metrics: dict[str, float], axis: str, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_summary(self, metrics: dict[str, float]) -> None:
        self.log_metrics({f"summary/{k}": v for k, v in metrics.items()}, "version", 0)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |"
                  for row in rows]
        self.writer.add_text(f"matrices/{name}", "\n".join(lines))

    def log_files(self, directory: Path) -> None:
        import numpy as np
        from PIL import Image

        for path in sorted(directory.rglob("*")):
            tag = str(path.relative_to(directory).with_suffix(""))
            if path.suffix == ".png":
                with Image.open(path) as image:
                    self.writer.add_image(f"plots/{tag}", np.asarray(image.convert("RGB")), dataformats="HWC")
            elif path.suffix == ".md":
                self.writer.add_text(tag, path.read_text())

    def close(self, failed: bool) -> None:
        self.writer.close()


def _code_block(text: str) -> str:
    """Text shown verbatim by TensorBoard's markdown (an indented block)."""
    return "\n".join("    " + line for line in text.splitlines())


# -- sweeps ---------------------------------------------------------------------------------------------
def tune_callbacks(tracking: TrackingConfig, sweep: RunStorage) -> list:
    """Ray Tune logger callbacks that log every trial's per-step results (and its swept values) to the
    configured trackers, for the sweep at ``sweep``; the trials' own simulations are not tracked
    separately."""
    if not tracking.enabled:
        return []
    check_tracking(tracking)
    name = sweep.root.rsplit("/", 1)[-1]
    callbacks: list = []
    if tracking.mlflow is not None:
        callbacks.append(_mlflow_callback(tracking.mlflow, name))
    if tracking.wandb is not None:
        callbacks.append(_wandb_callback(tracking.wandb, name, sweep))
    if tracking.tensorboard is not None:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())  # event files in each trial's directory, as Tune writes them
    return callbacks


def _mlflow_callback(section: MLflowTracking, name: str):
    """Ray's MLflowLoggerCallback, with each result's names made ones MLflow accepts (``M[-1][0]``)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class Callback(MLflowLoggerCallback):
        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, {_mlflow_key(k): v for k, v in _flat(result).items()})

    return Callback(section.tracking_uri, experiment_name=section.experiment or name, tags={"compat.sweep": name})


def _flat(result: dict, prefix: str = "") -> dict:
    """A nested Tune result as ``a/b`` keys (what MLflow's callback would flatten it to)."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _wandb_callback(section: WandbTracking, name: str, sweep: RunStorage):
    """Ray's WandbLoggerCallback, its W&B files in ``tracking.wandb.dir`` or the sweep directory (a local one)."""
    from ray.air.integrations.wandb import WandbLoggerCallback

    class Callback(WandbLoggerCallback):
        def setup(self, *args, **kwargs):
            with wandb_mode(section.mode):  # Ray's setup asks for an API key unless WANDB_MODE says offline
                super().setup(*args, **kwargs)

    options = {"entity": section.entity, **({"mode": section.mode} if section.mode else {})}
    options["dir"] = str(_local_dir(section.dir, sweep, "", "tracking.wandb.dir"))
    return Callback(project=section.project or os.environ.get("WANDB_PROJECT") or name, group=name, **options)


def track_sweep(tracking: TrackingConfig, name: str, document: dict, directory: RunStorage,
                trial_runs: dict[str, RunStorage]) -> None:
    """One tracker run for a finished sweep: its document as the config; its results table, plots and
    best config, and under ``trials/<trial id>/`` each trial's report (with its seeds), as files."""
    if not tracking.enabled:
        return
    runs = [("", directory)]
    for trial_id, storage in sorted(trial_runs.items()):
        runs.append((f"trials/{trial_id}", storage))
        runs += [(f"trials/{trial_id}/{sub}", storage.child(sub)) for sub in _seed_dirs(storage)]
    with Tracker.open(tracking, name=name, config=document, run=directory, tags={"compat.sweep": name}) as tracker:
        tracker.run_finished(runs)


def _seed_dirs(storage: RunStorage) -> list[str]:
    return sorted({key.split("/")[0] for key in storage.list("") if re.fullmatch(r"seed-[^/]+/metrics\.json", key)})

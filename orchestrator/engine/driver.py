"""The driver: plan -> worker groups on Ray Train -> manifest -> matrix rows -> metrics and report.

The driver holds no tensors of the workers: versions, embeddings and progress pass through the run
directory. A finished step is never recomputed, and a matrix row is computed once, from the store,
right after its version exists: as a Ray task next to the data when the version trained on the
cluster (orchestrator/engine/rows.py), else in the driver.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union


from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import Location, RunStorage
from orchestrator.config import ExperimentConfig
from orchestrator.config.crossmodal import CrossModalExperiment, parse_any
from orchestrator.errors import RunError
from orchestrator.engine.scenarios import plan_steps

if TYPE_CHECKING:
    import numpy as np
    from orchestrator.storage.lease import RunLease

SCHEMA_VERSION = 1


def default_run_dir(cfg: Union[ExperimentConfig, CrossModalExperiment]) -> RunStorage:
    """``<output_dir>/<name>``: ``output_dir`` is a path or a URI (``s3://bucket/prefix?...``), whose
    options stay at the end. A URI with a password is refused: ``output_dir`` is stored in the run's
    config.yaml, so credentials belong in the environment."""
    from orchestrator.errors import ConfigError

    if urllib.parse.urlsplit(cfg.output_dir).password is not None:
        raise ConfigError("output_dir", "holds a password, and output_dir is stored in the run's config.yaml; pass "
                                        "credentials in the environment instead (AWS_ACCESS_KEY_ID and "
                                        "AWS_SECRET_ACCESS_KEY for s3://, see docs/guide/storage.md)")
    return RunStorage.at(cfg.output_dir).child(cfg.name)


def load_run_config(run: runfiles.Run):
    """The config stored in a run (either kind of experiment)."""
    document = runfiles.read_config(run)
    if document is None:
        raise RunError(f"{RunStorage.of(run).location} is not a run directory (no config.yaml); pass the "
                       "location `compat run` created (a path or a URI such as s3://bucket/prefix/name)")
    return parse_any(document)


def check_run_dir(cfg: ExperimentConfig, run: runfiles.Run) -> bool:
    """Every check of starting or resuming ``cfg``'s run at ``run``, writing nothing: a replacement checkpoint
    that is missing, unsafe or does not fit fails here, and so does a run of another config. Returns True
    when ``run`` already holds ``cfg``'s run."""
    from orchestrator.engine.upstream import check_replacements

    if isinstance(cfg, ExperimentConfig):
        check_replacements(cfg)
    return _holds_run_of(cfg, RunStorage.of(run))


def _holds_run_of(cfg: ExperimentConfig, run: RunStorage) -> bool:
    try:
        document = runfiles.read_config(run)
    except OSError as exc:  # an unreachable server, no credentials: before anything starts
        raise RunError(f"cannot read the run location {run.location}: {str(exc).strip()}") from None
    if document is None:
        return False
    existing = parse_any(document)
    if existing.digest() != cfg.digest():
        raise RunError(
            f"{run.location} already holds a run of a different config (digest {existing.digest()} != "
            f"{cfg.digest()}); resume it with `compat run --resume {run.location}`, or set another "
            "`name`/`output_dir`, or delete it"
        )
    return True


def prepare_run_dir(cfg: ExperimentConfig, run: runfiles.Run) -> bool:
    """Start the run of ``cfg`` at ``run``, or check that it already belongs to ``cfg`` (:func:`check_run_dir`
    first). Returns True when resuming."""
    check_run_dir(cfg, run)
    return start_run_dir(cfg, run)


def start_run_dir(cfg: ExperimentConfig, run: runfiles.Run) -> bool:
    """Write a new run's config.yaml and run.json; True (and nothing written) when ``run`` already holds
    ``cfg``'s run. The top run calls it under its lease, so the config is checked again there: another
    driver may have started the run since :func:`check_run_dir`."""
    run = RunStorage.of(run)
    if _holds_run_of(cfg, run):
        return True
    runfiles.write_config(run, cfg.to_dict())
    run.write_json(runfiles.PROVENANCE, run_provenance(cfg))
    return False


def take_lease(root: RunStorage, wait: bool) -> "RunLease":
    """The run's lease (its first write): a location that cannot be written (no such bucket, no
    credentials) fails here, as a RunError, before anything runs."""
    from orchestrator.storage.lease import RunLease

    try:
        return RunLease.take(root, wait=wait)
    except OSError as exc:
        raise RunError(f"cannot write the run at {root.location}: {str(exc).strip()}") from None


def run_provenance(cfg: ExperimentConfig) -> dict:
    import ray
    import torch

    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                  cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"experiment": cfg.name, "kind": getattr(cfg, "kind", "class-incremental"),
            "seed": getattr(cfg, "seed", None), "seeds": cfg.seeds, "config_digest": cfg.digest(),
            "code_revision": revision, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__}


def check_decode_nodes(cfg: ExperimentConfig) -> None:
    """Before anything is written: a streamed dataset with ``decode_on: cpu_nodes`` needs CPU-only worker
    nodes in the cluster (a ConfigError naming the key otherwise). Connects to Ray only in that case."""
    from orchestrator.data.streaming import decode_nodes, streamed_sections

    pinned = [key for key, data in streamed_sections(cfg) if data.decode_on == "cpu_nodes"]
    if pinned:
        import ray

        from orchestrator.engine.executor import ensure_ray

        ensure_ray()
        nodes = ray.nodes()
        for key in pinned:
            decode_nodes(nodes, "cpu_nodes", f"{key}.decode_on")


def run_experiment(cfg: ExperimentConfig, run_dir: Optional[Union[RunStorage, Location]] = None, *, progress: bool = True,
                   echo: Callable[[str], None] = print, max_groups: Optional[int] = None, step_by_step: bool = False,
                   cancel: Optional[threading.Event] = None, wait_for_lease: bool = False, verify: bool = False) -> dict:
    """Run (or resume) the experiment: plan its task graph (every method, seed and upstream model),
    execute it, then write each run's metrics.json, CSVs, plots and report.md; the trackers of its
    ``tracking`` section follow along (orchestrator/reporting/tracking.py).

    Resuming first checks every finished task's artefacts against its manifest entry (sizes; SHA-256 too
    with ``verify``) and recomputes exactly the damaged tasks and what was derived from them
    (orchestrator/engine/repair.py).

    The run's lease (orchestrator/storage/lease.py) is held from the first write to the last, and every
    write, the workers' included, is fenced by it: a second driver on a live run refuses and names the
    holder. ``wait_for_lease`` waits instead while the holder may be gone (see ``RunLease.take``).
    ``max_groups`` caps the worker groups training at once (default: as many as the cluster holds);
    ``step_by_step`` trains every run's step k before any step k+1 where the groups are fewer than the
    chains; setting ``cancel`` ends the worker groups at once and raises :class:`RunCancelled`."""
    from orchestrator.engine.validate import validate

    if isinstance(cfg, CrossModalExperiment):
        from orchestrator.engine.crossmodal import run_crossmodal

        return run_crossmodal(cfg, run_dir, echo=echo, progress=progress, wait_for_lease=wait_for_lease, verify=verify)
    validate(cfg)
    check_decode_nodes(cfg)
    root = RunStorage.of(run_dir or default_run_dir(cfg))
    check_run_dir(cfg, root)  # before the lease is written
    with take_lease(root, wait_for_lease) as lease:
        return _run_leased(cfg, lease.guard(root), progress=progress, echo=echo, max_groups=max_groups,
                           step_by_step=step_by_step, cancel=cancel, verify=verify)


def _run_leased(cfg: ExperimentConfig, root: RunStorage, **options) -> dict:
    """:func:`run_experiment` once the lease is held; ``root`` is fenced by it. The trackers' run spans
    the rest (closed as failed when the run raises)."""
    from orchestrator.reporting.tracking import open_run_tracker

    resuming = start_run_dir(cfg, root)
    with open_run_tracker(cfg, root) as tracker:
        return _run_graph(cfg, root, resuming, tracker, **options)


def _run_graph(cfg: ExperimentConfig, root: RunStorage, resuming: bool, tracker, *, progress: bool,
               echo: Callable[[str], None], max_groups: Optional[int], step_by_step: bool,
               cancel: Optional[threading.Event], verify: bool) -> dict:
    from orchestrator.engine.executor import execute
    from orchestrator.engine.graph import plan
    from orchestrator.engine.rows import RowTasks
    from orchestrator.reporting.report import render_report, skipped_images_line
    from orchestrator.engine.upstream_clip import record_upstream

    graph = plan(cfg)
    for path, run in graph.runs.items():
        if path:
            prepare_run_dir(run.config, root.child(path))
    if resuming:
        from orchestrator.engine.repair import repair_run

        repair_run(graph, root, digests=verify, echo=echo)
    done = [t.id for t in graph.tasks.values() if runfiles.task_done(root.child(t.run), t.name)]
    echo(f"{'Resuming' if resuming else 'Running'} '{cfg.name}' in {root.location}: {describe_graph(graph)}, "
         f"{len(done)}/{len(graph.tasks)} already done")
    skipped = skipped_images_of(cfg)
    line = skipped_images_line(skipped)  # one line, only when something was skipped
    if line:
        echo(line)
    display = ProgressDisplay(root, graph, len(done), enabled=progress, echo=echo)

    def track(task_id: str) -> None:  # a version's numbers to the trackers, once per task
        task, run = graph.tasks[task_id], graph.runs[graph.tasks[task_id].run]
        if not tracker.enabled or task.method is None or run.role == "upstream":
            return
        spec, storage = run.config.methods[task.method], root.child(task.run)
        tracker.step_finished(task.run, spec.key, task.step, runfiles.manifest_entry(storage, spec.key, task.step) or {},
                              ensure_row(run.config, storage, spec.key, task.step, run.num_classes),
                              sum(run.config.method_training(spec, s).epochs for s in range(task.step)))

    for task_id in done:  # what a resumed run finished before, so its tracker run is complete
        track(task_id)
    rows = RowTasks(graph, root, on_row=track)  # each row once its version is committed (orchestrator/engine/rows.py)
    try:
        execute(graph, root, on_finished=rows.submit, display=display, max_groups=max_groups,
                step_by_step=step_by_step, cancel=cancel)
        rows.collect()
    except BaseException:
        rows.cancel()
        raise
    display.close()
    finished: dict[str, dict] = {}
    for path, run in sorted(graph.runs.items(), key=lambda item: item[1].role != "upstream"):
        for task in graph.tasks_of(path):  # rows written above are read; one a resumed run lacks is computed here
            if task.method is not None:
                spec = run.config.methods[task.method]
                ensure_row(run.config, root.child(path), spec.key, task.step, run.num_classes)
        record_upstream(run.config, root.child(path), root)
        metrics = assemble_metrics(run.config, root.child(path), len(run.steps), run.num_classes)
        add_release_gates(run.config, root.child(path), metrics)
        facts = skipped_images_of(run.config)  # the split indexes are cached: cheap
        if facts:
            metrics["skipped_images"] = facts
        root.child(path).write_json(runfiles.METRICS, metrics)
        render_report(root.child(path))
        finished[path] = metrics
    if cfg.seeds is None:
        tracker.run_finished([("", root)])
        return finished[""]
    from orchestrator.evaluation.seeds import aggregate

    metrics = aggregate(cfg, [finished[f"seed-{seed}"] for seed in cfg.seeds])
    if skipped:  # the seeds share the data
        metrics["skipped_images"] = skipped
    root.write_json(runfiles.METRICS, metrics)
    render_report(root)
    tracker.run_finished([("", root), *((f"seed-{seed}", root.child(f"seed-{seed}")) for seed in cfg.seeds)])
    return metrics


def describe_graph(graph) -> str:
    """``2 method(s) x 3 step(s) x 4 seeds (+2 upstream models) = 26 tasks``, for the first line of a run."""
    runs = [r for r in graph.runs.values() if r.role != "upstream"]
    upstream = sum(len(graph.tasks_of(p)) for p, r in graph.runs.items() if r.role == "upstream")
    text = f"{len(runs[0].config.methods)} method(s) x {len(runs[0].steps)} step(s)"
    text += f" x {len(runs)} seeds" if len(runs) > 1 or runs[0].role == "seed" else ""
    text += f" (+{upstream} upstream model(s))" if upstream else ""
    return f"{text} = {len(graph.tasks)} tasks"


def current_row(run: runfiles.Run, method: str, version: int) -> Optional[dict]:
    """Row ``version`` as stored, or None when it is missing or was written before rows held their top-1
    correctness (negative flips need it: :func:`ensure_row` computes such a row again)."""
    from orchestrator.evaluation.flips import TOP1_CORRECT

    row = runfiles.read_row(run, method, version)
    return row if row is not None and TOP1_CORRECT in row else None


def ensure_row(cfg: ExperimentConfig, run: runfiles.Run, method: str, version: int, num_classes: int) -> dict:
    """Row ``version`` of every compatibility matrix, computed once from the store and cached.

    It reads the run storage and nothing else: ``num_classes`` (the planned run's, counted once by the
    driver) is all it needs of the dataset, so a row task runs where the training data cannot be read.
    Its negative flips compare with the top-1 correctness the older rows recorded, so those rows come
    first; a row written before rows held flips (no ``top1_correct``) is computed again, to the same scores."""
    from orchestrator.engine.gallery_upgrade import stored_vector_upgrade
    from orchestrator.evaluation import compatibility_row
    from orchestrator.evaluation.search import GalleryIndexes
    from orchestrator.evaluation.flips import TOP1_CORRECT, unpack_correct
    from orchestrator.storage.store import EmbeddingStore

    row = current_row(run, method, version)
    if row is not None:
        return row
    earlier = [unpack_correct(ensure_row(cfg, run, method, j, num_classes)[TOP1_CORRECT]) for j in range(version)]
    blocks = class_blocks(cfg, num_classes)
    index = cfg.evaluation.search.index
    row = compatibility_row(EmbeddingStore(runfiles.store_dir(run)), method, version, cfg.evaluation,
                            None if blocks is None else blocks[1], earlier_top1=earlier,
                            indexes=None if index is None else GalleryIndexes(RunStorage.of(run), index,
                                                                            cfg.evaluation.search.k),
                            upgrade=stored_vector_upgrade(run, method, version))
    runfiles.write_row(run, method, version, row)
    return row


def class_blocks(cfg: ExperimentConfig, num_classes: int) -> Optional[tuple[list[str], "np.ndarray"]]:
    """Block names and each label's block: the classes version k first trained on form block ``vk``,
    classes no version trained on form ``none``. Only where the evaluation ranks the experiment's own
    classes (not templates, not another dataset, not a class order read from session files). From the
    config and the dataset's ``num_classes`` alone: no file is read."""
    import numpy as np

    from orchestrator.engine.scenarios import class_order

    ev = cfg.evaluation
    own_data = all(ev.sets[name].data is None for name in {ev.query, ev.gallery or ev.query} if name in ev.sets)
    if ev.templates or not own_data or cfg.scenario.session_files is not None or cfg.scenario.replace_at:
        return None
    steps = plan_steps(cfg, num_classes)
    order = class_order(cfg, num_classes)
    block_of_label = np.full(num_classes, len(steps), dtype=np.int64)
    for step in steps:
        block_of_label[order[step.num_previous:step.num_seen]] = step.index
    names = [f"v{step.index}" for step in steps] + (["none"] if steps[-1].num_seen < num_classes else [])
    return names, block_of_label


def assemble_metrics(cfg: ExperimentConfig, run: runfiles.Run, num_versions: int, num_classes: int) -> dict:
    """metrics.json: per method every matrix by metric name and the summary metrics (stable schema).

    Every verdict (AC, the per-pair ECC flags, ECC on every pair) is decided on every metric with the
    configured ``evaluation.ties``; ``primary`` only picks which metric's summary is ``summary``."""
    from orchestrator.evaluation import metrics as M
    from orchestrator.evaluation import BY_BLOCK, CompatibilityMatrix
    from orchestrator.evaluation.flips import FLIP_KEYS, flip_matrices
    from orchestrator.evaluation.health import version_health

    blocks = class_blocks(cfg, num_classes)
    ties = cfg.evaluation.ties

    out: dict = {"schema_version": SCHEMA_VERSION, "experiment": cfg.name, "seed": cfg.seed,
                 "config_digest": cfg.digest(), "protocol": cfg.evaluation.protocol,
                 "primary": cfg.evaluation.primary, "ties": ties, "map_ties": cfg.evaluation.map_ties,
                 "methods": {}}
    for spec in cfg.methods:
        rows = [runfiles.read_row(run, spec.key, v) for v in range(num_versions)]
        matrices, summaries, ecc = {}, {}, {}
        for name in [n for n in rows[0] if n != BY_BLOCK and n not in FLIP_KEYS]:
            matrix = CompatibilityMatrix(num_versions)
            for i, row in enumerate(rows):
                for j, value in enumerate(row[name]):
                    matrix.set(i, j, value)
            values = matrix.values
            matrices[name] = matrix.to_list()
            summaries[name] = {
                "AC": M.average_compatibility(values, ties=ties),
                "AM": M.average_multimodel_accuracy(values),
                "BC": M.backward_compatibility(values),
                "FC": M.forward_compatibility(values),
                "ECC_every_pair": M.ecc_every_pair(values, ties=ties),
            }
            flags = M.ecc_matrix(values, ties=ties)
            ecc[name] = [[bool(flags[i][j]) if j < i else None for j in range(num_versions)] for i in range(num_versions)]
        entries = [runfiles.manifest_entry(run, spec.key, v) or {} for v in range(num_versions)]
        accuracy = [e.get("accuracy") for e in entries]
        method_params = runfiles.version_meta(run, spec.key, 0).get("params", {})
        out["methods"][spec.key] = {
            "method": spec.name, "params": method_params, "num_versions": num_versions,
            "matrices": matrices, "summary": _primary_summary(summaries, cfg.evaluation.primary),
            "summary_by_metric": summaries, "ecc": ecc,
            "accuracy": accuracy if any(a is not None for a in accuracy) else None,
            "accuracy_summary": accuracy_summary(entries),
            "health": version_health(entries, matrices, cfg.evaluation.min_new_class_ratio),
            "trainable_parameters": entries[-1].get("trainable_parameters"),
            "seconds": [e.get("seconds") for e in entries],
            "negative_flip_rate": flip_matrices(rows),
        }
        if blocks is not None and all(BY_BLOCK in row for row in rows):
            out["methods"][spec.key][BY_BLOCK] = {
                "blocks": blocks[0],
                "cells": [[row[BY_BLOCK][j] if j <= i else None for j in range(num_versions)]
                          for i, row in enumerate(rows)],
            }
    add_update_gain(out)
    if cfg.service is not None and num_versions >= 2:
        from orchestrator.engine.gallery_upgrade import stored_vector_upgrade
        from orchestrator.evaluation.mixed_gallery import service_metrics
        from orchestrator.storage.store import EmbeddingStore

        out["service"] = service_metrics(EmbeddingStore(runfiles.store_dir(run)), cfg, num_versions,
                                         None if blocks is None else blocks[1],
                                         lambda method: stored_vector_upgrade(run, method, num_versions - 1),
                                         lambda method, table: runfiles.write_served_versions(run, method, table))
    return out


def skipped_images_of(cfg: ExperimentConfig) -> dict:
    """metrics.json's ``skipped_images``: for each dataset with ``bad_images: skip`` (by its config key,
    ``data`` or ``evaluation.sets.<name>.data``), what each split left out (see encoded.skipped_images)."""
    from orchestrator.data.encoded import skipped_images

    datasets = {"data": cfg.data, **{f"evaluation.sets.{name}.data": s.data
                                     for name, s in cfg.evaluation.sets.items() if s.data is not None}}
    return {key: facts for key, data in datasets.items() if (facts := skipped_images(data)) is not None}


def add_release_gates(cfg: ExperimentConfig, run: runfiles.Run, metrics: dict) -> None:
    """Each method's ``gate``: the release gate of every upgrade, from the stored vectors (see
    gate.version_gates). Kept out of :func:`assemble_metrics`, which tuning trials call after every step."""
    from orchestrator.engine.gallery_upgrade import stored_vector_upgrade
    from orchestrator.evaluation.gate import version_gates

    for key, entry in metrics["methods"].items():
        entry["gate"] = version_gates(RunStorage.of(run), cfg.evaluation, key, entry["num_versions"],
                                      stored_vector_upgrade)


def _primary_summary(summaries: dict[str, dict], primary: str) -> dict:
    """metrics.json's ``summary`` as it has always been: AC, AM, BC and FC of the primary metric (of the
    first metric when the protocol lacks it); ``summary_by_metric`` holds every metric and the verdicts."""
    chosen = summaries.get(primary, next(iter(summaries.values())))
    return {key: chosen[key] for key in ("AC", "AM", "BC", "FC")}


def accuracy_summary(entries: list[dict]) -> Optional[dict]:
    """The FSCIL view of per-session accuracy (docs/methods/cpe-clip.md): Avg (mean over sessions), PD
    (first - last) and the accuracy on base vs novel classes per session; None without accuracies."""
    from orchestrator.evaluation import metrics as M

    accuracy = [e.get("accuracy") for e in entries]
    if not accuracy or any(a is None for a in accuracy):
        return None
    return {"avg": M.session_average(accuracy), "pd": M.performance_drop(accuracy),
            "base": [e.get("accuracy_base") for e in entries], "novel": [e.get("accuracy_novel") for e in entries]}


def add_update_gain(out: dict) -> None:
    """With an ``independent`` method present: gain of every other method's last version over its first
    (docs/guide/evaluation.md), per metric, with the independent last version as new*."""
    from orchestrator.evaluation.metrics import update_gain

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
    """Tasks done/total, each running task's epoch and loss, and an ETA, from the executor's events and
    the progress files the workers write (the driver never sees their tensors)."""

    def __init__(self, root: RunStorage, graph, done: int, enabled: bool, echo: Callable[[str], None]):
        self.root, self.graph, self.enabled, self.echo = root, graph, enabled, echo
        self.total, self.done, self.finished_here = len(graph.tasks), done, 0
        self.started = time.time()
        self._tty = os.isatty(1)
        self._last: Optional[str] = None

    def event(self, kind: str, task_id: str) -> None:
        if kind == "finished":
            self.done += 1
            self.finished_here += 1
        if self.enabled and kind in ("started", "failed"):
            self._print(f"[{self.graph.describe(task_id)}] {kind}", newline=True)

    def tick(self, running: list[str]) -> None:
        if not self.enabled:
            return
        line = self.line([(task_id, self._progress(task_id)) for task_id in running])
        if self._tty:  # a live line, refreshed in place
            self._print(line, newline=False)
        elif line != self._last:  # logs get one line per change
            self._print(line, newline=True)
        self._last = line

    def line(self, running: list[tuple[str, Optional[dict]]]) -> str:
        """Tasks done, each running task's epoch and loss, and an ETA from the pace so far."""
        parts, current = [], 0.0
        for task_id, p in running:
            what = self.graph.describe(task_id)
            if p is None:
                parts.append(f"{what} starting")
                continue
            current += p["epoch"] / p["epochs"]
            parts.append(f"{what} epoch {p['epoch']}/{p['epochs']} loss {p.get('loss', float('nan')):.4f}")
        elapsed = time.time() - self.started
        work = self.finished_here + current
        eta = _clock(elapsed / work * (self.total - self.done - current)) if work > 0 else "--:--"
        return (f"  {self.done}/{self.total} tasks done | {'; '.join(parts) or 'waiting for a worker group'} | "
                f"elapsed {_clock(elapsed)} ETA {eta}")

    def _progress(self, task_id: str) -> Optional[dict]:
        task = self.graph.tasks[task_id]
        return runfiles.read_progress(self.root.child(task.run), task.name)

    def _print(self, text: str, newline: bool) -> None:
        if self._tty and not newline:
            print("\r" + text.ljust(110), end="", flush=True)
        else:
            if self._tty:
                print()
            self.echo(text)

    def close(self) -> None:
        if self.enabled and self._tty:
            print()
        self.echo(f"All {self.total} tasks done in {_clock(time.time() - self.started)}")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


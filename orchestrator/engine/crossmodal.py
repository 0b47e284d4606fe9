"""The cross-modal driver: old gallery once, new queries per method, Recall@K both ways (docs/guide/evaluation.md).

Every step is a task of the engine's graph (orchestrator/engine/graph.py), trained by a worker group,
and recorded in the manifest when done, so a re-run resumes where it stopped::

    encode-old    the old model embeds the evaluation images and captions (the deployed gallery) and,
                  with its text tower, the caption corpus: the only time the old model runs
    encode-new    the new base model embeds the same (new->new reference, and the corpus for stage text)
    seed-S/<method>/<stage>
                  one step per stage of each method ("text": corpus embedding pairs; "pairs": the new
                  model and image-caption pairs, the old model not even named in the step's config); the
                  last stage also embeds the evaluation set with the method's query encoder

Layout: RUN_DIR/store holds the two models' embeddings (method keys ``old``, ``new``), RUN_DIR/seed-S/
store each method's projected queries, RUN_DIR/seed-S/states/<method>/<stage>.pt the stage states
(tensors only), RUN_DIR/manifest/... one JSON per finished step. Nothing here knows any method.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch

from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage
from orchestrator.config.typed import to_dict
from orchestrator.config.crossmodal import ClipSpec, CrossModalExperiment

SCHEMA_VERSION = 1


# -- driver ------------------------------------------------------------------------------------
def stage_payloads(cfg: CrossModalExperiment) -> list[tuple[str, dict, tuple[str, ...]]]:
    """(task name, worker payload, earlier stage) of every method's stage per seed, in order. A stage's
    payload holds what that stage needs and nothing more: the new model, the data, its recipe, and the
    old model's width, never the old model."""
    from methods.nets.clip_models import embedding_dim
    from methods.crossmodal_base import create_crossmodal

    config = cfg.to_dict()
    out = []
    for seed in cfg.seeds:
        for index, spec in enumerate(cfg.methods):
            stages = list(create_crossmodal(spec.name, spec.params, f"methods.{index}").stages())
            for position, stage in enumerate(stages):
                earlier = (f"seed-{seed}/{spec.key}/{stages[position - 1]}",) if position else ()
                out.append((f"seed-{seed}/{spec.key}/{stage}", {
                    "kind": "stage", "use_gpu": cfg.resources.use_gpu, "seed": seed, "stage": stage,
                    "method_index": index, "method": {"name": spec.name, "key": spec.key, "params": spec.params},
                    "training": to_dict(cfg.stage_training(index, stage)), "earlier": stages[:position],
                    "last": position == len(stages) - 1, "new_model": config["models"]["new"],
                    "old_dim": embedding_dim(cfg.models.old.name), "data": config["data"],
                    "batch_size": cfg.evaluation.batch_size}, earlier))
    return out


def run_crossmodal(cfg: CrossModalExperiment, run_dir: Optional[runfiles.Run] = None,
                   echo: Callable[[str], None] = print, progress: bool = False, wait_for_lease: bool = False,
                   verify: bool = False) -> dict:
    """Run (or resume) every task on the engine's executor, then write metrics.json and report.md, under
    the run's lease and with a resume's verification (as :func:`~orchestrator.engine.driver.run_experiment`);
    the trackers of ``tracking`` receive the config, and at the end the Recall@K cells and the report."""
    from orchestrator.data.crossmodal import check_data
    from orchestrator.evaluation.crossmodal import evaluate_run
    from orchestrator.reporting.crossmodal import render_crossmodal_report
    from orchestrator.reporting.tracking import open_run_tracker
    from orchestrator.engine.executor import execute
    from orchestrator.engine.graph import plan
    from orchestrator.engine.driver import ProgressDisplay, check_run_dir, default_run_dir, start_run_dir, take_lease

    from orchestrator.engine.validate import validate

    validate(cfg)
    check_data(cfg.data)
    run_dir = runfiles.storage(run_dir or default_run_dir(cfg))
    check_run_dir(cfg, run_dir)  # before the lease is written
    with take_lease(run_dir, wait_for_lease) as lease:
        run_dir = lease.guard(run_dir)
        resuming = start_run_dir(cfg, run_dir)
        with open_run_tracker(cfg, run_dir) as tracker:
            graph = plan(cfg)
            if resuming:
                from orchestrator.engine.repair import repair_run

                repair_run(graph, run_dir, digests=verify, echo=echo)
            done = sum(runfiles.task_done(run_dir, t.name) for t in graph.tasks.values())
            echo(f"{'Resuming' if resuming else 'Running'} '{cfg.name}' in {run_dir.location}: {len(graph.tasks)} tasks "
                 f"({len(cfg.seeds)} seed(s) x {len(cfg.methods)} method(s)), {done} already done")
            display = ProgressDisplay(run_dir, graph, done, enabled=progress, echo=echo)
            execute(graph, run_dir, display=display)
            display.close()
            metrics = evaluate_run(cfg, run_dir)
            run_dir.write_json(runfiles.METRICS, metrics)
            render_crossmodal_report(run_dir)
            tracker.run_finished([("", run_dir)])
            return metrics


# -- workers -----------------------------------------------------------------------------------
def run_task(name: str, payload: dict, run_dir: RunStorage, worker, group: str) -> None:
    """A worker's part of one cross-modal task; the chief commits its manifest entry."""
    from orchestrator.engine.crossmodal_steps import encode_step, stage_step

    started = time.time()
    entry, written, partitions = (encode_step if payload["kind"] == "encode" else stage_step)(payload, run_dir, worker)
    worker.barrier()  # every rank's shards are published before the chief records them
    if worker.is_chief:
        artefacts = dict(written)
        for prefix, method, version, eval_set in partitions:
            artefacts.update(runfiles.store_records(run_dir, [(method, version, eval_set)], prefix))
        runfiles.mark_task_done(run_dir, name, {
            "step": name, "seconds": round(time.time() - started, 3), "world_size": worker.world_size,
            "started_at": round(started, 3), "finished_at": round(time.time(), 3), "group": group, **entry,
            "artefacts": artefacts})


def resolve_clip(spec: ClipSpec, synthetic, run_dir: runfiles.Run) -> tuple[str, Optional[str]]:
    """(architecture, weights) of a model spec; an ``upstream`` spec's weights were pretrained by its task."""
    if spec.upstream is None:
        return spec.name, spec.pretrained
    from orchestrator.engine.upstream_clip import clip_checkpoint

    return spec.name, str(clip_checkpoint(spec.name, spec.upstream, synthetic, run_dir))


def recorded_weights(spec: ClipSpec, synthetic) -> Optional[str]:
    """A model spec's weights as a manifest records them: the open_clip tag or file it names, or the key
    of its upstream CLIP in the run (not the local copy a worker loaded, which is no part of the run)."""
    if spec.upstream is None:
        return spec.pretrained
    from orchestrator.engine.upstream_clip import upstream_key

    return f"{upstream_key(spec.name, spec.upstream, synthetic)}/model.pt"


def train_module(module: torch.nn.Module, num_items: int, loss_fn, *, training, worker, seed: int,
                 label: str, run_dir: runfiles.Run, throughputs: list[dict]) -> None:
    """The engine's loop for every stage: seeded sharded batches, the step's optimiser and schedule,
    DDP across workers, a progress line per epoch and one report per stage. Appends the training's
    throughput record (pairs per second, FLOPs per pair, MFU; as a unimodal step's) to ``throughputs``."""
    from orchestrator.engine.loop import ProgressFile, build_optimizer, distributed, lr_at, report, train_epochs
    from orchestrator.engine.precision import Precision
    from orchestrator.engine.throughput import Throughput

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    optimizer = build_optimizer(params, training)
    precision = Precision.of(training, worker.device)
    wrapped = precision.prepare(module, partial(distributed, worker=worker))
    throughput = Throughput(worker.device, training.precision, warmup_batches=2 if training.compile else 1,
                            count=len, unit="pairs")  # a batch is its pairs' indices; first: see Throughput
    progress = [ProgressFile(run_dir, label, label, training.epochs)] if worker.is_chief else []
    means = train_epochs(
        module, optimizer, training.epochs, lr=partial(lr_at, training=training), hooks=[throughput, *progress],
        batches=lambda epoch: epoch_batches(num_items, training.batch_size, seed, epoch, worker.rank, worker.world_size),
        loss=lambda idx, epoch: loss_fn(wrapped, torch.from_numpy(idx).to(worker.device), epoch), precision=precision)
    throughputs.append({**throughput.record(worker.world_size), **precision.describe()})
    report({"step": label, **means})
    module.eval()


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """A seeded permutation of the items, sharded across ranks with equal counts (DDP needs equal step
    counts), cut into batches; the ragged last batch is dropped when there is more than one batch
    (contrastive losses degrade on tiny batches)."""
    order = np.random.default_rng([seed, 7919, epoch, num_items]).permutation(num_items)
    order = order[rank::world][: num_items // world]
    if len(order) > batch_size:
        order = order[: len(order) - len(order) % batch_size]
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def train_fn(training, worker, seed: int, label: str, run_dir: runfiles.Run, throughputs: list[dict]) -> Callable:
    """``StageContext.train`` bound to this step; each training's throughput record lands in ``throughputs``."""
    return partial(train_module, training=training, worker=worker, seed=seed, label=label, run_dir=run_dir,
                   throughputs=throughputs)

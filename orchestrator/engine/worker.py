"""What a Ray Train worker does: train a run of consecutive steps, embed, write the store, checkpoint.

One worker group trains every step of its group in turn, so a long scenario does not pay the worker
start-up cost per step; each step still leaves its own checkpoint, store partition and manifest entry,
so resume and fault tolerance keep step granularity. Nothing here knows any particular method.
"""

from __future__ import annotations

import itertools
import os
from functools import partial
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from methods.base import Method, StepContext, create_method
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage
from orchestrator.config import ExperimentConfig, MethodSpec, parse_config
from orchestrator.data import LabeledImages, array_batches
from orchestrator.data.streaming import open_split
from orchestrator.data.display_names import display_names
from orchestrator.data.transforms import BatchTransform, make_transform
from orchestrator.engine.graph import COPY, PRETRAIN, step_name
from orchestrator.engine.loop import Hook, ProgressFile, build_optimizer, distributed, lr_at, report, train_epochs
from orchestrator.engine.precision import Precision
from orchestrator.engine.throughput import Throughput
from orchestrator.engine.replay import ReplayMemory, balanced_order
from orchestrator.engine.scenarios import Step, class_order, plan_steps, train_indices
from orchestrator.engine.session_files import session_plan
from orchestrator.storage.store import EmbeddingStore
from orchestrator.engine.upstream_clip import resolved_model_config
from orchestrator.engine.upstream import replacement_checkpoint


@dataclass
class Worker:
    """Where this process sits in the worker group, and in the cluster."""

    rank: int
    world_size: int
    device: torch.device
    placement: Optional[dict] = None  # node, placement group and pid, recorded in each step's manifest entry

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def current_worker(use_gpu: bool) -> Worker:
    import ray.train

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    return Worker(rank=rank, world_size=world, device=device, placement=placement())


def placement() -> dict:
    """The node, the placement group (None outside one: an in-process group) and the process this code
    runs in: the worker's own record of where a step trained (a sweep's test checks it against the trial)."""
    import ray

    if not ray.is_initialized():  # an in-process run without a cluster
        return {"node": None, "placement_group": None, "pid": os.getpid()}
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "placement_group": context.get_placement_group_id(), "pid": os.getpid()}


def work(loop_config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` of every worker group: take tasks from the executor's queue
    until it has none for this group. A task whose manifest entry exists (finished before a restart of
    the group) is skipped; a chain's consecutive tasks reuse one :class:`Session`. Before anything else
    each worker checks that it sees the run its driver writes (a local directory on another node does
    not), so a run without shared storage fails at its first step with what to set, and the group
    starts its attempt, whose fence refuses the writes of a group it replaced (and its own, once a
    restart replaces it)."""
    from orchestrator.engine.executor import QueueClient

    root, group = loop_config["root"], loop_config["group"]
    queue = QueueClient(loop_config["queue"])
    worker = current_worker(loop_config["use_gpu"])
    number = queue.call("start_attempt", group) if worker.is_chief else 0  # first: orders the group's starts
    runfiles.check_driver(root)
    queue.join(group)
    root = start_attempt(root, loop_config["attempts"], group, number, worker)
    configs: dict[str, ExperimentConfig] = {}
    session: Optional[Session] = None
    for seq in itertools.count():
        task_id = queue.next_task(group, seq)
        if task_id is None:
            return
        task = loop_config["tasks"][task_id]
        run_dir = root.child(task["run"])
        if not runfiles.task_done(run_dir, task["name"]):
            kept = runfiles.pending_reembed(run_dir, task["name"])  # weights verified, embeddings not
            if task["action"] == PRETRAIN:
                from orchestrator.engine.upstream_clip import run_clip_task

                run_clip_task(task["name"], task["payload"], root, worker, group)
            elif task["payload"] is not None:  # a cross-modal encoding or stage
                from orchestrator.engine.crossmodal import run_task

                run_task(task["name"], task["payload"], run_dir, worker, group)
            else:
                if task["run"] not in configs:
                    configs[task["run"]] = parse_config(loop_config["runs"][task["run"]])
                cfg = configs[task["run"]]
                spec = cfg.methods[task["method"]]
                if session is None or session.spec is not spec:
                    session = Session(cfg, spec, run_dir, worker, root)
                step = session.steps[task["step"]]
                if step.resources.num_workers > 0:  # a Train worker granted N CPUs trains on N threads, not Ray's default
                    torch.set_num_threads(max(1, int(step.resources.cpus_per_worker)))
                if task["action"] == COPY:
                    session.copy_first_version(cfg.methods[task["copy_from"]].key, group)
                elif kept is not None:
                    session.embed_again(step, kept, group)
                else:
                    session.run_step(step, group)
            if kept is not None and worker.is_chief:
                run_dir.delete(runfiles.reembed_key(task["name"]))  # the task committed again
        if worker.is_chief:
            queue.call("complete", task_id)


def start_attempt(root: RunStorage, prefix: str, group: str, number: int, worker: Worker) -> RunStorage:
    """``root`` fenced by this start of the group (orchestrator/storage/attempts.py): rank 0 writes the
    attempt's record under the number the queue gave it, then hands the number to the other ranks over
    the group's own process group, which only this start's workers belong to."""
    from orchestrator.storage import attempts

    if worker.is_chief:
        root = attempts.start(root, prefix, group, number)
    if worker.world_size > 1:
        shared = torch.tensor([number], dtype=torch.int64, device=worker.device)
        dist.broadcast(shared, src=0)
        number = int(shared.item())
    return root if worker.is_chief else attempts.joined(root, prefix, group, number)


class Session:
    """Trains steps of one method; holds the datasets and the method across steps of a group."""

    def __init__(self, cfg: ExperimentConfig, spec: MethodSpec, run_dir: RunStorage, worker: Worker, root: RunStorage):
        from orchestrator.data import dataset_num_classes

        self.cfg, self.spec, self.run_dir, self.worker = cfg, spec, run_dir, worker
        self.training = cfg.method_training(spec)
        self.model_cfg = resolved_model_config(cfg, root)  # the upstream CLIP lives at the experiment's root
        self.method: Method = create_method(spec.name, spec.params, self.model_cfg)
        num_classes = dataset_num_classes(cfg.data)
        self.order = class_order(cfg, num_classes)
        self.positions = np.empty(num_classes, dtype=np.int64)
        self.positions[self.order] = np.arange(num_classes)
        self.steps = plan_steps(cfg, num_classes)
        self.store = EmbeddingStore(runfiles.store_dir(run_dir))
        self.train_data = open_split(cfg.data, "train")  # in memory, or streamed by Ray Data (data.loading)
        self.sessions = session_plan(cfg, self.steps, self.train_data.labels, num_classes)
        if self.sessions is not None:  # the session files fix the class order
            self.order = self.sessions.order
            self.positions[self.order] = np.arange(num_classes)
        names = display_names(cfg.data, self.train_data.class_names)
        self.class_names = [names[label] for label in self.order]  # in class order, as text-based methods need
        self.train_positions = self.positions[self.train_data.labels]
        self.train_tf = input_transform(self.method, cfg.data, self.train_data, train=True)
        self.test_tf = input_transform(self.method, cfg.data, self.train_data, train=False)
        replay = cfg.scenario.replay
        self.replay = ReplayMemory(replay, run_dir, spec.key, cfg.seed, self.train_positions) if replay else None

    # -- contexts ------------------------------------------------------------------------------
    def context(self, step: Step) -> StepContext:
        previous = runfiles.version_checkpoint(self.run_dir, self.spec.key, step.index - 1) if step.index > 0 else None
        init = previous if step.event == "finetune" else None
        if step.event == "replace":
            init = replacement_checkpoint(self.cfg, self.run_dir, self.spec, step.index)
        return StepContext(
            index=step.index, num_steps=len(self.steps), num_seen=step.num_seen, num_previous=step.num_previous,
            event=step.event, model=self.model_cfg, training=self.cfg.method_training(self.spec, step.index),
            seed=self.cfg.seed, shots=step.shots,
            previous_checkpoint=previous, init_checkpoint=init, device=str(self.worker.device),
            world_size=self.worker.world_size, rank=self.worker.rank,
            extras={"class_names": self.class_names}, load_version=self._load_own_version,
        )

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, step: Step, group: str = "") -> None:
        started = time.time()
        ctx = self.context(step)
        self.training = ctx.training  # the step's own recipe (incremental steps may override it)
        device = self.worker.device
        model = self.method.init_model(ctx).to(device)
        source = self.method.weights_from()
        if source is not None:  # another method's version, loaded untrained (a training-free method on top of it)
            self.method.load_weights(model, runfiles.version_checkpoint(self.run_dir, source, step.index), strict=False)
        previous = None
        anchor = self.method.anchor_checkpoint(ctx) if self.method.needs_previous else None
        if isinstance(anchor, int):  # one of this method's earlier versions, loaded into that version's network
            previous = self._load_own_version(anchor)
        elif anchor is not None:  # a model trained elsewhere (a replacement), loaded into this step's network
            previous = self.method.load_version(ctx, anchor, strict=False).to(device)
        indices = (self.sessions.indices[step.index] if self.sessions is not None
                   else train_indices(self.train_positions, step, self.cfg.seed))
        memory = self.replay.before(step) if self.replay else None
        prepare_tf = self.train_tf if self.method.prepare_transform() == "train" else self.test_tf
        state = self.method.prepare(ctx, model, previous, self._batches(indices, prepare_tf, shuffle_epoch=None, memory=memory))
        trainable = [] if source is not None else list(self.method.trainable_parameters(model))
        optimizer = build_optimizer(trainable, self.training) if trainable else None  # None: nothing to train
        start_epoch = 0 if trainable else self.training.epochs
        precision = Precision.of(self.training, device)
        resume = runfiles.load_epoch_state(self.run_dir, self.spec.key, step.index)
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            precision.load_state_dict(resume.get("precision"))
            start_epoch = int(resume["epoch"]) + 1
        ddp_model = precision.prepare(model, partial(distributed, worker=self.worker)) if trainable else model
        throughput = Throughput(device, self.training.precision, warmup_batches=2 if self.training.compile else 1,
                                count=lambda batch: len(batch[1]))  # first: its timing ends before the checkpoint
        train_started = time.time()
        hooks = StepHooks(self, step, model, optimizer, precision, state, ctx,
                          losses=resume.get("losses", []) if resume else [])
        progress = [ProgressFile(self.run_dir, step_name(self.spec.key, step.index), step.index, self.training.epochs)
                    ] if self.worker.is_chief else []
        means = train_epochs(
            ddp_model, optimizer, self.training.epochs, lr=partial(lr_at, training=self.training),
            start_epoch=start_epoch, hooks=[throughput, hooks, *progress], precision=precision,
            batches=lambda epoch: self._batches(indices, self.train_tf, shuffle_epoch=epoch, memory=memory),
            loss=lambda batch, epoch: self.method.loss(ddp_model(batch[0]), batch[0], batch[1], state, ctx))
        trained_images = hooks.images
        train_seconds = time.time() - train_started
        model.eval()
        upgrade = self.method.after_training(ctx, model, previous, self._batches(indices, self.test_tf, shuffle_epoch=None))
        self._write_embeddings(step, model)
        accuracy = self._accuracy(ctx, model)
        self.worker.barrier()  # every rank's store shard is written before the manifest calls the step done
        if self.worker.is_chief:
            artefacts = self.replay.after(step, indices) if self.replay else {}
            artefacts.update(runfiles.save_version(self.run_dir, self.spec.key, step.index, model.state_dict(), {
                "method": self.spec.name, "version": step.index, "num_seen": step.num_seen,
                "event": step.event, "params": self.method.describe(),
            }))
            if upgrade is not None:
                artefacts.update(runfiles.save_gallery_upgrade(self.run_dir, self.spec.key, step.index, upgrade))
            artefacts.update(self._store_records(step.index))
            runfiles.mark_step_done(self.run_dir, self.spec.key, step.index, {
                "method": self.spec.key, "version": step.index, "num_seen": step.num_seen, "num_previous": step.num_previous,
                "event": step.event, "train_samples": int(len(indices)), **accuracy,
                "trainable_parameters": sum(p.numel() for p in trainable), "weights_from": source,
                "init_checkpoint": runfiles.relative_to_run(ctx.init_checkpoint, self.run_dir), "replay_samples": 0 if memory is None else int(len(memory)),
                "seconds": round(time.time() - started, 3), "world_size": self.worker.world_size,
                "train_seconds": round(train_seconds, 3), "trained_images_per_worker": trained_images,
                "started_at": round(started, 3), "finished_at": round(time.time(), 3), "group": group,
                "placement": self.worker.placement, "losses": hooks.losses, "artefacts": artefacts,
                "throughput": {**throughput.record(self.worker.world_size), **precision.describe()},
            })
            runfiles.clear_epoch_state(self.run_dir, self.spec.key, step.index)
        self.worker.barrier()
        report({"method": self.spec.key, "step": step.index, **means, **accuracy}, [hooks, *progress])

    def embed_again(self, step: Step, entry: dict, group: str = "") -> None:
        """A finished step whose weights passed verification but whose store partitions did not
        (orchestrator/engine/repair.py): embed the evaluation sets again with the stored version and
        commit its former manifest entry with the new partitions' records. Nothing is trained, so every
        version trained from this one stays valid."""
        import ray.train

        model = self._load_own_version(step.index)
        self._write_embeddings(step, model)
        self.worker.barrier()
        if self.worker.is_chief:
            kept = {key: record for key, record in entry["artefacts"].items() if not runfiles.is_store_key(key)}
            runfiles.mark_step_done(self.run_dir, self.spec.key, step.index, {
                **entry, "artefacts": {**kept, **self._store_records(step.index)},
                "embedded_again_at": round(time.time(), 3), "embedded_again_by": group})
        self.worker.barrier()
        ray.train.report({"method": self.spec.key, "step": step.index, "embedded_again": True})

    def _store_records(self, version: int) -> dict[str, dict]:
        """The records of this version's store partitions (every evaluation set), for its manifest entry."""
        return runfiles.store_records(self.run_dir, [(self.spec.key, version, name) for name in self.cfg.evaluation.sets])

    # -- a version 0 shared between methods ---------------------------------------------------
    def copy_first_version(self, twin: str, group: str = "") -> None:
        """Version 0 of ``twin`` (the method whose version 0 is the model this one would train, see
        :func:`~orchestrator.engine.graph.first_version_twins`) becomes this method's: weights, store
        partitions and manifest entry, each written atomically, the manifest entry last."""
        import ray.train

        started = time.time()
        if self.worker.is_chief:
            state = runfiles.version_weights(self.run_dir, twin, 0)
            meta = runfiles.version_meta(self.run_dir, twin, 0)
            artefacts = runfiles.save_version(self.run_dir, self.spec.key, 0, state, {
                **meta, "method": self.spec.name, "params": self.method.describe(), "copied_from": twin})
            for name in self.cfg.evaluation.sets:
                table = self.store.read(twin, 0, name)
                self.store.write(self.spec.key, 0, name, table.embeddings, table.labels, table.sample_ids,
                                 session=table.sessions,
                                 metadata=self._store_metadata(table.metadata.get("normalized", True)))
            entry = {key: value for key, value in runfiles.manifest_entry(self.run_dir, twin, 0).items()
                     if not key.startswith("embedded_again")}  # the twin's own history
            runfiles.mark_step_done(self.run_dir, self.spec.key, 0, {
                **entry, "method": self.spec.key, "copied_from": twin, "seconds": round(time.time() - started, 3),
                "train_seconds": 0.0, "trained_images_per_worker": 0, "started_at": round(started, 3),
                "finished_at": round(time.time(), 3), "group": group, "placement": self.worker.placement,
                "artefacts": {**artefacts, **self._store_records(0)}})
        self.worker.barrier()
        ray.train.report({"method": self.spec.key, "step": 0, "copied_from": twin})

    def _load_own_version(self, version: int) -> torch.nn.Module:
        """This method's finished ``version``, built for its own step, frozen, on this worker's device."""
        checkpoint = runfiles.version_checkpoint(self.run_dir, self.spec.key, version)
        return self.method.load_version(self.context(self.steps[version]), checkpoint).to(self.worker.device)

    def _store_metadata(self, normalized: bool = True) -> dict:
        return {"method": self.spec.name, "normalized": normalized, "config_digest": self.cfg.digest()}

    # -- data ----------------------------------------------------------------------------------
    def _batches(self, indices: np.ndarray, transform, shuffle_epoch: Optional[int],
                 memory: Optional[np.ndarray] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (transformed images, class positions) on the worker's device. Training batches are
        a seeded permutation sharded across ranks with equal counts (DDP needs equal step counts); with a
        non-empty replay ``memory`` they are balanced memory/new batches (orchestrator/engine/replay.py)."""
        bs = self.training.batch_size
        if shuffle_epoch is None:
            order = indices if memory is None else np.concatenate([indices, memory])
        elif memory is not None and len(memory):
            order = balanced_order(indices, memory, bs, self.cfg.scenario.replay.batch_share,
                                   [self.cfg.seed, 7919, shuffle_epoch, int(len(indices))],
                                   self.worker.rank, self.worker.world_size)
        else:
            rng = np.random.default_rng([self.cfg.seed, 7919, shuffle_epoch, int(len(indices))])
            order = indices[rng.permutation(len(indices))]
            per_rank = len(order) // self.worker.world_size
            order = order[self.worker.rank::self.worker.world_size][:per_rank]
            if len(order) > bs and self.cfg.scenario.kind != "few-shot":  # few-shot sessions keep every
                order = order[: len(order) - len(order) % bs]  # shot, as the reference's loader; others drop the ragged batch
        rank = self.worker.rank if shuffle_epoch is not None else 0  # the unsharded pass is the same on every rank
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + (shuffle_epoch or 0) * 101 + rank) % 2**31)
        pin = self.worker.device.type == "cuda"
        for start, images in zip(range(0, len(order), bs), self.train_data.batches(order, bs)):
            if pin:
                images = images.pin_memory()
            images = transform(images.to(self.worker.device, non_blocking=True), generator=gen)
            labels = torch.from_numpy(self.train_positions[order[start:start + bs]])
            labels = (labels.pin_memory() if pin else labels).to(self.worker.device, non_blocking=True)
            yield images, labels

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _write_embeddings(self, step: Step, model) -> None:
        """Embed each evaluation set once with this version; each rank writes its own shard."""
        for name in self.cfg.evaluation.sets:
            data, shard, feats = self.embed_evaluation_set(name, step, model)
            self.store.write(self.spec.key, step.index, name, feats, data.labels[shard].astype(np.int32),
                             data.sample_ids[shard], session=step.index, shard=self.worker.rank,
                             num_shards=self.worker.world_size,
                             metadata=self._store_metadata())

    @torch.no_grad()
    def embed_evaluation_set(self, name: str, step: Step, model) -> tuple[LabeledImages, np.ndarray, np.ndarray]:
        """This rank's share of evaluation set ``name`` as ``model`` (the version of ``step``) embeds it:
        the set's data, the rows embedded and their features. What the store holds for a version, and what
        ``compat check`` computes from a checkpoint without a run."""
        eval_set = self.cfg.evaluation.sets[name]
        data = self._eval_data(name)
        keep = np.arange(len(data.labels))
        if eval_set.classes == "seen":  # only allowed on the experiment's own dataset (validated)
            keep = keep[self.positions[data.labels] < step.num_seen]
        shard = keep[self.worker.rank::self.worker.world_size]
        transform = input_transform(self.method, eval_set.data or self.cfg.data, data, train=False)
        feats = embed_images(lambda x: self.method.embed(model, x), data.batches, shard, transform,
                             self.cfg.evaluation.batch_size, self.worker.device)
        return data, shard, feats

    def _eval_data(self, name: str) -> LabeledImages:
        eval_set = self.cfg.evaluation.sets[name]
        cache = getattr(self, "_eval_cache", {})
        self._eval_cache = cache
        if name not in cache:
            cache[name] = open_split(eval_set.data or self.cfg.data, eval_set.split)
        return cache[name]

    @torch.no_grad()
    def _accuracy(self, ctx: StepContext, model) -> dict[str, Optional[float]]:
        """Top-1 classification accuracy on the test images of the classes seen so far (chief only):
        overall (sample-weighted), on the first step's classes (base) and on later ones (novel) — the FSCIL
        split — and, for the health check, on the classes known before this step (previous) and on the
        ones this step added (new)."""
        unknown = {"accuracy": None, "accuracy_base": None, "accuracy_novel": None,
                   "accuracy_previous_classes": None, "accuracy_new_classes": None}
        if not self.worker.is_chief:
            return unknown
        test = open_split(self.cfg.data, "test")
        positions = self.positions[test.labels]
        keep = np.flatnonzero(positions < ctx.num_seen)
        correct = np.zeros(len(keep), dtype=bool)
        batch_size = self.cfg.evaluation.batch_size
        for start, batch in zip(range(0, len(keep), batch_size), test.batches(keep, batch_size)):
            idx = keep[start:start + batch_size]
            images = self.test_tf(batch.to(self.worker.device))
            logits = self.method.classify(model, images, ctx)
            if logits is None:
                return unknown
            correct[start:start + len(idx)] = logits.argmax(1).cpu().numpy() == positions[idx]
        base = positions[keep] < self.steps[0].num_seen
        previous = positions[keep] < ctx.num_previous
        return {"accuracy": _fraction(correct), "accuracy_base": _fraction(correct[base]),
                "accuracy_novel": _fraction(correct[~base]),
                "accuracy_previous_classes": _fraction(correct[previous]),
                "accuracy_new_classes": _fraction(correct[~previous])}


class StepHooks(Hook):
    """A method step's hooks: the method's gradient surgery after each backward, the images trained on,
    each epoch's mean losses (the manifest entry's ``losses``, which trackers plot), and at each epoch's
    end the resume point (written by the chief; it keeps the losses so far)."""

    def __init__(self, session: "Session", step: Step, model, optimizer, precision: Precision, state, ctx: StepContext,
                 losses: list[dict]):
        self.session, self.step, self.model, self.optimizer, self.state, self.ctx = session, step, model, optimizer, state, ctx
        self.precision = precision
        self.images = 0
        self.losses = list(losses)  # [{"epoch": e, "loss": ..., <part>: ...}], e counted from 0 within the step

    def after_backward(self) -> None:
        self.session.method.after_backward(self.model, self.state, self.ctx)

    def after_batch(self, batch, loss) -> None:
        self.images += len(batch[1])

    def after_epoch(self, epoch: int, means: dict[str, float]) -> None:
        self.losses.append({"epoch": epoch, **{name: round(value, 6) for name, value in means.items()}})
        if self.session.worker.is_chief:
            runfiles.save_epoch_state(self.session.run_dir, self.session.spec.key, self.step.index, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "precision": self.precision.state_dict(), "losses": self.losses})


def _fraction(hits: np.ndarray) -> Optional[float]:
    """Share of True entries; None for an empty selection (e.g. novel classes before the first increment)."""
    return float(hits.mean()) if hits.size else None


def input_transform(method: Method, data_cfg, data: LabeledImages, train: bool) -> BatchTransform:
    """The data section's transform, or the size and normalisation the method's network declares
    (augmentation still follows ``data.augment``)."""
    spec = method.input_spec()
    if spec is None:
        return make_transform(data_cfg, data, train=train)
    return BatchTransform(spec.mean, spec.std, augment=train and data_cfg.augment, size=spec.size,
                          interpolation=spec.interpolation)


@torch.no_grad()
def embed_images(embed, batches, indices: np.ndarray, transform, batch_size: int, device) -> np.ndarray:
    """Embed the images at ``indices``, read by ``batches(indices, batch_size)`` (an in-memory or a
    streamed split's); returns float32 (len(indices), d)."""
    chunks = [embed(transform(batch.to(device))).float().cpu().numpy() for batch in batches(indices, batch_size)]
    if not chunks:
        probe = embed(transform(next(iter(batches(np.zeros(1, dtype=np.int64), 1))).to(device)))
        return np.zeros((0, probe.shape[1]), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def embed_array(embed, images: np.ndarray, indices: np.ndarray, transform, batch_size: int, device) -> np.ndarray:
    """Embed ``images[indices]`` in batches; returns float32 (len(indices), d)."""
    return embed_images(embed, partial(array_batches, images), indices, transform, batch_size, device)

"""What a Ray Train worker does: train a run of consecutive steps, embed, write the store, checkpoint.

One worker group trains every step of its group in turn, so a long scenario does not pay the worker
start-up cost per step; each step still leaves its own checkpoint, store partition and manifest entry,
so resume and fault tolerance keep step granularity. Nothing here knows any particular method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from methods.base import Method, StepContext, create_method
from orchestrator import runfiles
from orchestrator.config import ExperimentConfig, MethodSpec, parse_config
from orchestrator.data import LabeledImages, load_split
from orchestrator.data.transforms import make_transform
from orchestrator.scenarios import Step, class_order, plan_steps, train_indices
from orchestrator.store import EmbeddingStore


@dataclass
class Worker:
    """Where this process sits in the worker group."""

    rank: int
    world_size: int
    device: torch.device

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
    return Worker(rank=rank, world_size=world, device=device)


def train_group(loop_config: dict) -> None:
    """Ray Train ``train_loop_per_worker``: train every unfinished step listed in ``loop_config``."""
    run_dir = Path(loop_config["run_dir"])
    cfg = parse_config(loop_config["config"])
    spec = cfg.methods[loop_config["method_index"]]
    worker = current_worker(cfg.resources.use_gpu)
    session = Session(cfg, spec, run_dir, worker)
    for index in loop_config["steps"]:
        if runfiles.step_done(run_dir, spec.key, index):
            continue  # finished before a worker-group restart
        session.run_step(session.steps[index])


class Session:
    """Trains steps of one method; holds the datasets and the method across steps of a group."""

    def __init__(self, cfg: ExperimentConfig, spec: MethodSpec, run_dir: Path, worker: Worker):
        from orchestrator.data import dataset_num_classes

        self.cfg, self.spec, self.run_dir, self.worker = cfg, spec, run_dir, worker
        self.training = cfg.method_training(spec)
        self.method: Method = create_method(spec.name, spec.params, cfg.model)
        num_classes = dataset_num_classes(cfg.data)
        self.order = class_order(cfg, num_classes)
        self.positions = np.empty(num_classes, dtype=np.int64)
        self.positions[self.order] = np.arange(num_classes)
        self.steps = plan_steps(cfg, num_classes)
        self.store = EmbeddingStore(runfiles.store_dir(run_dir))
        self.train_data = load_split(cfg.data, "train")
        self.train_positions = self.positions[self.train_data.labels]
        self.train_images = torch.from_numpy(np.ascontiguousarray(self.train_data.images))
        self.train_tf = make_transform(cfg.data, self.train_data, train=True)
        self.test_tf = make_transform(cfg.data, self.train_data, train=False)

    # -- contexts ------------------------------------------------------------------------------
    def context(self, step: Step) -> StepContext:
        versions = runfiles.versions_dir(self.run_dir, self.spec.key)
        previous = str(versions / f"v{step.index - 1}") if step.index > 0 else None
        init = previous if step.event == "finetune" else None
        return StepContext(
            index=step.index, num_steps=len(self.steps), num_seen=step.num_seen, num_previous=step.num_previous,
            event=step.event, model=self.cfg.model, training=self.training, seed=self.cfg.seed, shots=step.shots,
            previous_checkpoint=previous, init_checkpoint=init, device=str(self.worker.device),
            world_size=self.worker.world_size, rank=self.worker.rank,
        )

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, step: Step) -> None:
        started = time.time()
        ctx = self.context(step)
        device = self.worker.device
        model = self.method.init_model(ctx).to(device)
        previous = None
        if self.method.needs_previous and ctx.previous_checkpoint:
            previous = self.method.load_version(self.context(self.steps[step.index - 1]), ctx.previous_checkpoint).to(device)
        indices = train_indices(self.train_positions, step, self.cfg.seed)
        state = self.method.prepare(ctx, model, previous, self._batches(indices, self.test_tf, shuffle_epoch=None))
        optimizer = build_optimizer(self.method.trainable_parameters(model), self.training)
        start_epoch = 0
        resume = runfiles.load_epoch_state(self.run_dir, self.spec.key, step.index)
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            start_epoch = int(resume["epoch"]) + 1
        ddp_model = self._distributed(model)
        train_started, trained_images = time.time(), 0
        for epoch in range(start_epoch, self.training.epochs):
            set_lr(optimizer, lr_at(epoch, self.training))
            ddp_model.train()
            totals: dict[str, float] = {}
            batches = 0
            for images, labels in self._batches(indices, self.train_tf, shuffle_epoch=epoch):
                outputs = ddp_model(images)
                loss, parts = self.method.loss(outputs, images, labels, state, ctx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.method.after_backward(model, state, ctx)
                optimizer.step()
                batches += 1
                trained_images += len(labels)
                for name, value in {"loss": loss, **parts}.items():
                    totals[name] = totals.get(name, 0.0) + float(value.detach())
            means = {k: v / max(batches, 1) for k, v in totals.items()}
            self._end_epoch(step, epoch, model, optimizer, means)
        train_seconds = time.time() - train_started
        model.eval()
        self._write_embeddings(step, model)
        accuracy = self._accuracy(ctx, model)
        if self.worker.is_chief:
            runfiles.save_version(self.run_dir, self.spec.key, step.index, model.state_dict(), {
                "method": self.spec.name, "version": step.index, "num_seen": step.num_seen,
                "event": step.event, "params": self.method.describe(),
            })
            runfiles.mark_step_done(self.run_dir, self.spec.key, step.index, {
                "method": self.spec.key, "version": step.index, "num_seen": step.num_seen, "num_previous": step.num_previous,
                "event": step.event, "train_samples": int(len(indices)), "accuracy": accuracy,
                "seconds": round(time.time() - started, 3), "world_size": self.worker.world_size,
                "train_seconds": round(train_seconds, 3), "trained_images_per_worker": trained_images,
            })
            runfiles.clear_epoch_state(self.run_dir, self.spec.key, step.index)
        self.worker.barrier()

    def _end_epoch(self, step: Step, epoch: int, model, optimizer, means: dict[str, float]) -> None:
        import ray.train

        if self.worker.is_chief:
            runfiles.save_epoch_state(self.run_dir, self.spec.key, step.index,
                                      {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch})
            runfiles.write_progress(self.run_dir, {
                "method": self.spec.key, "step": step.index, "epoch": epoch + 1, "epochs": self.training.epochs,
                **{k: round(v, 5) for k, v in means.items()},
            })
        ray.train.report({"method": self.spec.key, "step": step.index, "epoch": epoch, **means})

    # -- data ----------------------------------------------------------------------------------
    def _batches(self, indices: np.ndarray, transform, shuffle_epoch: Optional[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (transformed images, class positions) on the worker's device. Training batches are
        a seeded permutation sharded across ranks with equal counts (DDP needs equal step counts)."""
        bs = self.training.batch_size
        if shuffle_epoch is None:
            order = indices
        else:
            rng = np.random.default_rng([self.cfg.seed, 7919, shuffle_epoch, int(len(indices))])
            order = indices[rng.permutation(len(indices))]
            per_rank = len(order) // self.worker.world_size
            order = order[self.worker.rank::self.worker.world_size][:per_rank]
            if len(order) > bs:
                order = order[: len(order) - len(order) % bs]  # drop the ragged last batch when training
        gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + (shuffle_epoch or 0) * 101 + self.worker.rank) % 2**31)
        pin = self.worker.device.type == "cuda"
        for start in range(0, len(order), bs):
            idx = torch.from_numpy(order[start:start + bs])
            images = self.train_images[idx]
            if pin:
                images = images.pin_memory()
            images = transform(images.to(self.worker.device, non_blocking=True), generator=gen)
            labels = torch.from_numpy(self.train_positions[order[start:start + bs]]).to(self.worker.device)
            yield images, labels

    def _distributed(self, model):
        if self.worker.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.worker.device.index] if self.worker.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def _write_embeddings(self, step: Step, model) -> None:
        """Embed each evaluation set once with this version; each rank writes its own shard."""
        for name, eval_set in self.cfg.evaluation.sets.items():
            data = self._eval_data(name)
            keep = np.arange(len(data.labels))
            if eval_set.classes == "seen":  # only allowed on the experiment's own dataset (validated)
                keep = keep[self.positions[data.labels] < step.num_seen]
            shard = keep[self.worker.rank::self.worker.world_size]
            transform = make_transform(eval_set.data or self.cfg.data, data, train=False)
            feats = embed_array(lambda x: self.method.embed(model, x), data.images, shard, transform,
                                self.cfg.evaluation.batch_size, self.worker.device)
            self.store.write(self.spec.key, step.index, name, feats, data.labels[shard].astype(np.int32),
                             data.sample_ids[shard], session=step.index, shard=self.worker.rank,
                             num_shards=self.worker.world_size,
                             metadata={"method": self.spec.name, "normalized": True, "config_digest": self.cfg.digest()})

    def _eval_data(self, name: str) -> LabeledImages:
        eval_set = self.cfg.evaluation.sets[name]
        cache = getattr(self, "_eval_cache", {})
        self._eval_cache = cache
        if name not in cache:
            cache[name] = load_split(eval_set.data or self.cfg.data, eval_set.split)
        return cache[name]

    @torch.no_grad()
    def _accuracy(self, ctx: StepContext, model) -> Optional[float]:
        """Top-1 classification accuracy on the test images of the classes seen so far (chief only)."""
        if not self.worker.is_chief:
            return None
        test = load_split(self.cfg.data, "test")
        positions = self.positions[test.labels]
        keep = np.flatnonzero(positions < ctx.num_seen)
        correct = 0
        for start in range(0, len(keep), self.cfg.evaluation.batch_size):
            idx = keep[start:start + self.cfg.evaluation.batch_size]
            images = self.test_tf(torch.from_numpy(test.images[idx]).to(self.worker.device))
            logits = self.method.classify(model, images, ctx)
            if logits is None:
                return None
            correct += int((logits.argmax(1).cpu().numpy() == positions[idx]).sum())
        return correct / max(len(keep), 1)


@torch.no_grad()
def embed_array(embed, images: np.ndarray, indices: np.ndarray, transform, batch_size: int, device) -> np.ndarray:
    """Embed ``images[indices]`` in batches; returns float32 (len(indices), d)."""
    chunks = []
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(images[indices[start:start + batch_size]]).to(device)
        chunks.append(embed(transform(batch)).float().cpu().numpy())
    if not chunks:
        probe = embed(transform(torch.from_numpy(images[:1]).to(device)))
        return np.zeros((0, probe.shape[1]), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)


def build_optimizer(params, training) -> torch.optim.Optimizer:
    params = list(params)
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)


def lr_at(epoch: int, training) -> float:
    """Per-epoch learning rate: linear warm-up lr·(e+1)/W, then cosine from lr to min_lr (or constant)."""
    if epoch < training.warmup_epochs:
        return training.lr * (epoch + 1) / training.warmup_epochs
    if training.schedule == "constant":
        return training.lr
    span = max(training.epochs - training.warmup_epochs, 1)
    progress = (epoch - training.warmup_epochs) / span
    return training.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (training.lr - training.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

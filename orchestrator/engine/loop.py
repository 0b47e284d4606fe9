"""The one training loop every task uses, with named hooks for everything that is not the loop itself.

A task (a method's step, a cross-modal stage) brings its batches and its loss; the loop owns the
order of operations — learning rate of the epoch, forward, ``zero_grad``, backward, the
``after_backward`` hooks, the optimiser step — so that every task trains the same way and nothing
grows a loop of its own. Checkpoints, the progress file, gradient surgery of a method and counters
plug in as :class:`Hook` objects; how the device computes (autocast, gradient scaling, memory
format, batches copied ahead) is a :class:`~orchestrator.engine.precision.Precision`. The module
imports only torch, so the loop runs where Ray is not installed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from orchestrator.engine.precision import Precision


class Hook:
    """Named points of the loop; a hook overrides the ones it needs. A *step* is one call of
    :func:`train_epochs` (one training episode); ``after_report`` follows the task's one Ray Train report."""

    def before_step(self) -> None: ...

    def after_step(self, means: dict[str, float]) -> None: ...

    def after_report(self, result: dict) -> None: ...

    def before_epoch(self, epoch: int) -> None: ...

    def during_batch(self, batch: Any) -> contextlib.AbstractContextManager:
        """A context around one batch's forward, loss and backward (e.g. a FLOP counter)."""
        return contextlib.nullcontext()

    def after_backward(self) -> None: ...

    def after_batch(self, batch: Any, loss: torch.Tensor) -> None: ...

    def after_epoch(self, epoch: int, means: dict[str, float]) -> None: ...


class ProgressFile(Hook):
    """The running task's epoch and mean losses in its progress file, which the driver's display reads."""

    def __init__(self, run_dir, name: str, step, epochs: int):
        self.run_dir, self.name, self.step, self.epochs = run_dir, name, step, epochs

    def after_epoch(self, epoch: int, means: dict[str, float]) -> None:
        from orchestrator.storage import runfiles

        runfiles.write_progress(self.run_dir, self.name, {
            "method": self.name, "step": self.step, "epoch": epoch + 1, "epochs": self.epochs,
            **{k: round(v, 5) for k, v in means.items()}})


def train_epochs(module: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int, *,
                 lr: Optional[Callable[[int], float]],
                 batches: Callable[[int], Iterable[Any]],
                 loss: Callable[[Any, int], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 hooks: Sequence[Hook] = (), start_epoch: int = 0,
                 precision: Optional[Precision] = None) -> dict[str, float]:
    """Epochs ``start_epoch .. epochs-1``; returns the last epoch's mean of every loss part.

    ``lr(epoch)`` is the epoch's learning rate (None: a hook schedules it); ``batches(epoch)`` yields
    the epoch's batches, ``loss(batch, epoch)`` returns (loss, named parts) of one batch, forward
    included; ``module`` is put in train mode at every epoch. ``precision`` (default: fp32, nothing
    ahead) runs the forward and loss under autocast, scales fp16 gradients and fetches batches ahead.
    Loss values stay on the device until the epoch ends (no per-batch synchronisation)."""
    precision = precision or Precision()
    means: dict[str, float] = {}
    for hook in hooks:
        hook.before_step()
    for epoch in range(start_epoch, epochs):
        if lr is not None:
            set_lr(optimizer, lr(epoch))
        module.train()
        for hook in hooks:
            hook.before_epoch(epoch)
        values: dict[str, list[torch.Tensor]] = {}
        count = 0
        for batch in precision.batches(batches(epoch)):
            with contextlib.ExitStack() as around:
                for hook in hooks:
                    around.enter_context(hook.during_batch(batch))
                with precision.autocast():
                    value, parts = loss(batch, epoch)
                optimizer.zero_grad(set_to_none=True)
                precision.backward(value)
            precision.unscale(optimizer)
            for hook in hooks:
                hook.after_backward()
            precision.step(optimizer)
            count += 1
            for name, part in {"loss": value, **parts}.items():
                values.setdefault(name, []).append(part.detach())
            for hook in hooks:
                hook.after_batch(batch, value)
        means = {k: sum(float(v) for v in vs) / max(count, 1) for k, vs in values.items()}
        for hook in hooks:
            hook.after_epoch(epoch, means)
    for hook in hooks:
        hook.after_step(means)
    return means


def report(result: dict, hooks: Sequence[Hook] = ()) -> None:
    """The task's one Ray Train report (every report waits for the controller's next poll, so once per
    task, not per epoch), then the ``after_report`` hooks."""
    import ray.train

    ray.train.report(result)
    for hook in hooks:
        hook.after_report(result)


def build_optimizer(params, training) -> torch.optim.Optimizer:
    params = list(params)
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)


def lr_at(epoch: int, training) -> float:
    """Per-epoch learning rate: the explicit ``lr_schedule`` entry when given, else linear warm-up
    lr·(e+1)/W, then cosine from lr to min_lr (or constant)."""
    if training.lr_schedule is not None:
        return training.lr_schedule[epoch]
    if epoch < training.warmup_epochs:
        return training.lr * (epoch + 1) / training.warmup_epochs
    if training.schedule == "constant":
        return training.lr
    span = max(training.epochs - training.warmup_epochs, 1)
    progress = (epoch - training.warmup_epochs) / span
    return training.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (training.lr - training.min_lr)


def set_lr(optimizer: Optional[torch.optim.Optimizer], lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def distributed(module: torch.nn.Module, worker) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when the worker group has several ranks."""
    if worker.world_size <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [worker.device.index] if worker.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)

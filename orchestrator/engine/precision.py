"""How the device computes a training step: autocast precision, gradient scaling, memory format,
compilation, and batches copied one ahead.

Everything is off by default (fp32, NCHW, eager), and on CPU the copy-ahead is not used, so a CPU
run computes exactly what it computed before these options existed. ``bf16`` and ``fp16`` autocast
the forward and the loss (weights, gradients and optimiser state stay fp32); ``fp16`` adds a gradient
scaler so small gradients do not underflow. This module imports only torch and the project's errors:
the training loop runs on a machine that has torch and no Ray (bench/gpu_step.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from orchestrator.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)


class Precision:
    """The training options of ``training`` (precision, channels_last, compile) on one device; the
    loop calls :meth:`batches`, :meth:`autocast`, :meth:`backward`, :meth:`unscale` and :meth:`step`."""

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False):
        if precision not in PRECISIONS:
            raise ConfigError("training.precision", f"got {precision!r}, allowed values: {', '.join(PRECISIONS)}")
        self.device = torch.device(device)
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("training.precision", f"bf16 needs a GPU with bfloat16 units (Ampere or later), and "
                              f"{torch.cuda.get_device_name(self.device)} has none; use fp16 there")
        self.precision, self.channels_last, self.compile = precision, channels_last, compile
        # fp16 has a narrow exponent range: scale the loss so gradients stay representable (bf16 needs none)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    @classmethod
    def of(cls, training, device: torch.device | str) -> "Precision":
        """The options of a training section (``orchestrator.config.TrainingConfig``) on ``device``."""
        return cls(device, training.precision, training.channels_last, training.compile)

    # -- the module -----------------------------------------------------------------------------------
    def prepare(self, module: torch.nn.Module,
                distribute: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None) -> torch.nn.Module:
        """The module to run the forward through: ``module`` converted to channels-last in place (so its
        own ``state_dict`` is still the one to save), wrapped by ``distribute`` (DDP), then compiled."""
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        run = distribute(module) if distribute is not None else module
        return torch.compile(run) if self.compile else run

    # -- the batches ----------------------------------------------------------------------------------
    def batches(self, batches: Iterable[Any]) -> Iterable[Any]:
        """``batches`` with image tensors in the module's memory format, one batch ahead on a side CUDA
        stream when the device is a GPU (its copy and transform overlap the current batch's compute)."""
        if self.channels_last:
            batches = (map_tensors(batch, to_channels_last) for batch in batches)
        return prefetched(batches, self.device) if self.device.type == "cuda" else batches

    # -- forward, backward, step ----------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients from here on, so a method's gradient surgery (after_backward) sees them."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step; with a scaler, skipped when a gradient overflowed (the scale then shrinks)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    # -- the resume point -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What an epoch checkpoint keeps: fp16's loss scale and growth tracker (plain numbers, loadable with
        ``weights_only=True``), so a resumed step continues with the scale it had reached; empty otherwise."""
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Continue from :meth:`state_dict`; a checkpoint without a scaler's state (older, or of another
        precision) leaves the scaler fresh."""
        if self.scaler is not None and state and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> dict:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compile}


def to_channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """A floating 4-D tensor (a batch of images) in NHWC memory order; anything else unchanged."""
    if tensor.dim() == 4 and tensor.is_floating_point():
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a batch (nested tuples, lists and dicts); other leaves kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(item, fn) for item in batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, fn) for key, value in batch.items()}
    return batch


def prefetched(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """One batch ahead: the next batch is produced (host gather, pinned non-blocking copy, transform)
    on a side CUDA stream before the current one is handed out; the compute stream waits for it."""
    stream = torch.cuda.Stream(device)
    iterator = iter(batches)
    end = object()

    def fetch():
        with torch.cuda.stream(stream):
            return next(iterator, end)

    ahead = fetch()
    while ahead is not end:
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(stream)
        map_tensors(ahead, _used_on(compute))
        batch, ahead = ahead, fetch()
        yield batch


def _used_on(stream) -> Callable[[torch.Tensor], torch.Tensor]:
    """Marks a CUDA tensor made on the side stream as used on ``stream``, so the allocator does not
    hand its memory to the next prefetched batch while this one is still being computed on."""
    def use(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_cuda:
            tensor.record_stream(stream)
        return tensor
    return use

"""Training throughput of a step: images per second and an MFU (model FLOPs utilisation) estimate.

MFU = (FLOPs per trained image × images per second) / the device's peak FLOP/s at the step's precision.
FLOPs per image are counted, not modelled: torch's ``FlopCounterMode`` watches the forward, the loss and
the backward of the step's first batch, as the step runs it (frozen parts without a backward, a
previous model's forward in a distillation loss: all as they happen); it counts matrix products,
convolutions and attention, the convention of MFU figures. The peak is the vendor's dense (no
sparsity) datasheet figure, looked up by device name in :data:`PEAK_TFLOPS`. So the MFU is an estimate:
real clocks, the kernels chosen and the ops not counted all move it. On a CPU or an unlisted GPU it is
None, with the reason in ``mfu_note``. Imports only torch (the loop runs where Ray is not installed).
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from typing import Any, Callable, Optional

import torch

from orchestrator.engine.loop import Hook

# Dense datasheet peaks in TFLOP/s: (pattern matched against torch.cuda.get_device_name, peaks by arithmetic).
# tf32 is what fp32 convolutions and (when allowed) matrix products run at on Ampere and later GPUs.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.2, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    (r"V100", {"fp16": 125.0, "fp32": 15.7}),  # no bf16 or tf32 units
    (r"\bT4\b", {"fp16": 65.0, "fp32": 8.1}),
]


def peak_tflops(device_name: str, arithmetic: str) -> Optional[float]:
    """The table's peak of ``arithmetic`` (bf16, fp16, tf32, fp32) for a device name; tf32 falls back to
    fp32 on GPUs without tf32 units; None for a device not in the table."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peaks.get(arithmetic, peaks["fp32"] if arithmetic == "tf32" else None)
    return None


def arithmetic_of(precision: str) -> str:
    """The arithmetic a step of ``precision`` runs its products in: fp32 steps use tf32 where torch
    lets cuDNN or cuBLAS (``torch.backends.cudnn.allow_tf32`` is on by default)."""
    if precision != "fp32":
        return precision
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def device_peak(device: torch.device, precision: str) -> tuple[Optional[float], str]:
    """(peak FLOP/s or None, what it is or why there is none) for one device."""
    if device.type != "cuda":
        return None, (f"no peak figure for a {device.type} device: it depends on its cores, vector units and "
                      "clock; the MFU is estimated on listed GPUs only")
    name = torch.cuda.get_device_name(device)
    arithmetic = arithmetic_of(precision)
    peak = peak_tflops(name, arithmetic)
    if peak is None:
        return None, f"{name} ({arithmetic}) is not in the peak-FLOPs table (orchestrator/engine/throughput.py)"
    return peak * 1e12, f"estimate against {name} {arithmetic} dense datasheet peak {peak:g} TFLOP/s"


def mfu(flops_per_image: float, images_per_second: float, peak_flops: float) -> float:
    """Achieved FLOP/s over peak FLOP/s, all of one device."""
    return flops_per_image * images_per_second / peak_flops


UNITS = {"images": "image", "pairs": "pair"}  # what a step's batches hold: its record's keys name them


class Throughput(Hook):
    """Items (images; image-caption or text pairs in cross-modal stages) per second of a step's batches
    and FLOPs counted on its first batch.

    The timed span is each epoch's batches (fetching, transform, forward, backward, step), ending before
    later hooks' ``after_epoch`` (checkpoints), so list this hook first. The first ``warmup_batches``
    (the counted one; with torch.compile also the one that compiles) are left out of the rate."""

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32", warmup_batches: int = 1,
                 count: Callable[[Any], int] = lambda batch: len(batch[0]),
                 clock: Callable[[], float] = time.perf_counter, unit: str = "images"):
        self.device, self.precision, self.warmup_batches = torch.device(device), precision, warmup_batches
        self.count, self.clock, self.unit = count, clock, unit
        self.before_step()

    def before_step(self) -> None:
        self.batches, self.images, self.seconds = 0, 0, 0.0
        self.warmup_images, self.warmup_seconds = 0, 0.0
        self.flops_per_image: Optional[float] = None
        self._started = 0.0

    def before_epoch(self, epoch: int) -> None:
        self._synchronize()
        self._started = self.clock()

    def during_batch(self, batch: Any) -> contextlib.AbstractContextManager:
        return self._counting(batch) if self.flops_per_image is None and self.batches == 0 else contextlib.nullcontext()

    @contextlib.contextmanager
    def _counting(self, batch: Any):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, warnings.catch_warnings():
            # the counter's module tracker is a global hook; a compiled module warns about it (harmless here)
            warnings.filterwarnings("ignore", message=".*global hooks on modules.*")
            yield
        self.flops_per_image = counter.get_total_flops() / max(self.count(batch), 1)

    def after_batch(self, batch: Any, loss: torch.Tensor) -> None:
        self.batches += 1
        if self.batches > self.warmup_batches:
            self.images += self.count(batch)
            return
        self._synchronize()
        now = self.clock()
        self.warmup_images += self.count(batch)
        self.warmup_seconds += now - self._started
        self._started = now

    def after_epoch(self, epoch: int, means: dict[str, float]) -> None:
        self._synchronize()
        self.seconds += self.clock() - self._started

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def record(self, world_size: int = 1) -> dict:
        """The step's manifest fields. Ranks train equal batch counts in lockstep, so the group's rate is
        this rank's times ``world_size``; the MFU is per device. A step with no batch past the warm-up is
        timed with it (``includes_warmup``)."""
        images, seconds, warm = self.images, self.seconds, False
        if images == 0:
            images, seconds, warm = self.warmup_images, self.warmup_seconds + self.seconds, True
        rate = images / seconds if images and seconds > 0 else None
        peak, note = device_peak(self.device, self.precision)
        estimate = None
        if rate is not None and peak is not None and self.flops_per_image:
            estimate = mfu(self.flops_per_image, rate, peak)
        unit = self.unit
        return {f"{unit}_per_second": None if rate is None else round(rate * world_size, 2),
                f"{unit}_per_second_per_device": None if rate is None else round(rate, 2),
                f"timed_{unit}": images, "timed_seconds": round(seconds, 4), "includes_warmup": warm,
                f"train_flops_per_{UNITS[unit]}": self.flops_per_image,
                "mfu": None if estimate is None else round(estimate, 5), "mfu_note": note}

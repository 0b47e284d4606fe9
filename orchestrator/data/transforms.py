"""Batched tensor transforms: uint8 image batches in, normalised float32 (B, 3, H, W) out.

Everything works on whole batches on whatever device the batch lives on, so the training loop never
touches PIL or per-sample Python; randomness comes from a caller-supplied ``torch.Generator`` so a
seeded run augments identically every time.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.config import DataConfig

if TYPE_CHECKING:
    from orchestrator.data import LabeledImages

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

# Per-channel (mean, std) in [0, 1] units; the CIFAR values are those of the respective training sets.
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_FIXED_STATS: dict[str, Stats] = {
    "cifar100": CIFAR100_STATS,
    "imagenet": IMAGENET_STATS,
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def _to_nhwc(images: torch.Tensor) -> torch.Tensor:
    """Accept uint8 (B, H, W, 3) or (B, 3, H, W); a trailing dimension of 3 means channels-last."""
    if images.dtype != torch.uint8 or images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected a uint8 image batch (B, H, W, 3) or (B, 3, H, W), "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    return images if images.shape[-1] == 3 else images.permute(0, 2, 3, 1)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float (B, C, H, W) batch to (size, size), antialiased when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


Filter = Literal["bilinear", "bicubic"]


def _pil_filter(x: np.ndarray, kind: Filter) -> np.ndarray:
    """PIL's resampling kernels: the triangle (support 1) and the cubic with a = -0.5 (support 2)."""
    x = np.abs(x)
    if kind == "bilinear":
        return np.clip(1.0 - x, 0.0, None)
    a = -0.5
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int, kind: Filter) -> torch.Tensor:
    """(out_size, in_size) weights of one resampling pass as PIL computes them: pixel centres aligned, the
    kernel stretched by the scale when shrinking (antialiasing), each row's weights normalised to 1."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = (1.0 if kind == "bilinear" else 2.0) * stretch
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        centre = (out + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), in_size)
        taps = _pil_filter((np.arange(lo, hi) - centre + 0.5) / stretch, kind)
        weights[out, lo:hi] = taps / taps.sum()
    return torch.from_numpy(weights).float()


def _quantize(x: torch.Tensor) -> torch.Tensor:
    """Round half up to whole grey levels in [0, 255], as PIL stores each 8-bit pass."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def pil_resize(x: torch.Tensor, size: int, kind: Filter) -> torch.Tensor:
    """Resize a float (B, C, H, W) batch of grey levels 0..255 to (size, size) as PIL's ``Image.resize``
    does on 8-bit images: a horizontal pass, then a vertical one, each rounded to 8 bits."""
    height, width = x.shape[-2:]
    if width != size:
        x = _quantize(x @ resample_matrix(width, size, kind).to(x.device).T)
    if height != size:
        x = _quantize(resample_matrix(height, size, kind).to(x.device) @ x)
    return x


def resize_images(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    """Resize a uint8 (N, H, W, 3) array to (N, size, size, 3), in chunks to bound memory."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        x = torch.from_numpy(images[start:start + chunk]).permute(0, 3, 1, 2).float()
        y = _resize(x, size).round_().clamp_(0, 255).to(torch.uint8)
        out[start:start + chunk] = y.permute(0, 2, 3, 1).numpy()
    return out


class BatchTransform:
    """uint8 batch -> optional random crop (zero padding) + horizontal flip -> optional resize -> normalise.

    Crop and flip are one gather with per-sample offsets, so augmenting a batch costs about as much as
    copying it. ``interpolation`` None resizes bilinearly (the data pipeline's own resize); ``"bicubic"``
    or ``"bilinear"`` resize exactly as PIL does, which is how a pretrained CLIP's own preprocessing
    resizes (its pretrained configuration names the filter; batches are square, so resizing the shortest
    side and centre-cropping is the same square resize).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], augment: bool, pad: int = 4,
                 size: Optional[int] = None, interpolation: Optional[Filter] = None):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment = augment
        self.pad = pad
        self.size = size
        self.interpolation = interpolation

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = _to_nhwc(images)
        if self.augment:
            x = self._crop_and_flip(x, generator)
        x = x.permute(0, 3, 1, 2).float()
        if self.size is not None and self.interpolation is not None:
            x = pil_resize(x, self.size, self.interpolation)
        x = x.div_(255.0)
        if self.size is not None and self.interpolation is None:
            x = _resize(x, self.size)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std).contiguous()

    def _crop_and_flip(self, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        b, h, w, _ = x.shape
        p = self.pad
        rand_device = generator.device if generator is not None else x.device
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator, device=rand_device).to(x.device)
        flip = (torch.rand(b, generator=generator, device=rand_device) < 0.5).to(x.device)
        padded = F.pad(x, (0, 0, p, p, p, p)) if p else x
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)
        cols_index = torch.arange(w, device=x.device).expand(b, w)
        cols = offsets[1, :, None] + torch.where(flip[:, None], cols_index.flip(1), cols_index)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded[batch, rows[:, :, None], cols[:, None, :]]


def make_transform(cfg: DataConfig, data: LabeledImages, train: bool, size: Optional[int] = None) -> BatchTransform:
    """The transform for ``data``: mean/std per ``cfg.normalization`` ("dataset" = the data's own),
    augmentation only for training and only if ``cfg.augment``, resize when a model needs ``size``."""
    if cfg.normalization == "dataset":
        mean, std = data.mean, data.std
    else:
        mean, std = _FIXED_STATS[cfg.normalization]
    return BatchTransform(mean, std, augment=train and cfg.augment, size=size)

"""Synthetic images whose captions describe the individual image, not only its class.

Why: image-text retrieval (the cross-modal protocol, docs/guide/evaluation.md) is instance-level: a
caption must find *its* image. With class-only captions every image of a class shares the same few
texts, so Recall@K is decided by ties among identical captions. Here each synthetic image gets a
coloured square painted in one of three rows, small or large, and its captions name the class, the
square's colour, size and row, each caption a different phrasing that mentions all or only some of them
(as real captions mention different details). With 8 colours x 3 rows x 2 sizes per class, most images
of an evaluation set have a description of their own, while partial captions keep text-to-image
retrieval ambiguous, as on Flickr30k. The attributes survive horizontal flips and small crops, the usual
CLIP augmentations.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import Split
from orchestrator.data.captions import CaptionedImages, load_captioned

COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30),
           "magenta": (220, 40, 220), "cyan": (40, 220, 230), "white": (250, 250, 250), "black": (10, 10, 10)}
ROWS = ("top", "middle", "bottom")
SIZES = ("small", "large")
TEMPLATES = (
    "a photo of a {cls} with a {size} {colour} square at the {row}.",
    "a {size} {colour} square at the {row} of a {cls} pattern.",
    "{cls}, {colour} mark, {row}.",
    "this {cls} has a {size} {colour} square.",
    "a {cls} with a {colour} square.",
    "a {cls} with a mark at the {row}.",
    "a {size} {colour} square at the {row}.",
    "an image of a {cls}.",
)
_STREAM = 211  # random stream of the painted attributes, distinct from the generator's streams


def paint_squares(images: np.ndarray, colours: np.ndarray, rows: np.ndarray, sizes: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """A copy of ``images`` (N, S, S, 3) uint8 with a square (side S/5 or S/3) centred on the given row
    (at 20, 50 or 80% of the height, jittered by S/16) at a random horizontal position."""
    out = images.copy()
    n, size = len(images), images.shape[1]
    sides = np.where(sizes == 1, max(3, size // 3), max(2, size // 5))
    centre = (np.array([0.2, 0.5, 0.8])[rows] * size).round().astype(np.int64)
    jitter = max(1, size // 16)
    top = np.clip(centre - sides // 2 + rng.integers(-jitter, jitter + 1, n), 0, size - sides)
    left = (rng.random(n) * (size - sides + 1)).astype(np.int64)
    pixels = np.arange(size)
    mask = (((pixels >= top[:, None]) & (pixels < (top + sides)[:, None]))[:, :, None]
            & ((pixels >= left[:, None]) & (pixels < (left + sides)[:, None]))[:, None, :])
    palette = np.array(list(COLOURS.values()), dtype=np.uint8)
    out[mask] = np.repeat(palette[colours], sides * sides, axis=0)
    return out


def describe(labels: np.ndarray, colours: np.ndarray, rows: np.ndarray, sizes: np.ndarray,
             class_names: list[str], per_image: int, rng: np.random.Generator) -> list[list[str]]:
    """``per_image`` distinct phrasings per image (templates drawn without replacement)."""
    if not 1 <= per_image <= len(TEMPLATES):
        raise ValueError(f"per_image must be in 1..{len(TEMPLATES)}, got {per_image}")
    names = list(COLOURS)
    picks = np.argsort(rng.random((len(labels), len(TEMPLATES))), axis=1)[:, :per_image]
    return [[TEMPLATES[t].format(cls=class_names[label], colour=names[colour], row=ROWS[row], size=SIZES[big])
             for t in pick] for label, colour, row, big, pick in
            zip(labels.tolist(), colours.tolist(), rows.tolist(), sizes.tolist(), picks)]


def load_described(cfg: DataConfig, split: Split = "train", captions_per_image: int = 5, shift: float = 0.0,
                   per_class: Optional[int] = None) -> CaptionedImages:
    """Painted images of ``split`` (or of the shifted distribution, see :func:`load_captioned`) with
    instance captions; deterministic in (cfg.variant, split, shift)."""
    base = load_captioned(cfg, split, captions_per_image=1, shift=shift, per_class=per_class)
    images = base.images
    rng = np.random.default_rng([_STREAM, cfg.variant, split == "test", int(round(shift * 1000))])
    colours, rows, sizes = (rng.integers(0, k, len(images)) for k in (len(COLOURS), len(ROWS), len(SIZES)))
    painted = paint_squares(images.images, colours, rows, sizes, rng)
    texts = describe(images.labels, colours, rows, sizes, images.class_names, captions_per_image, rng)
    images = type(images)(painted, images.labels, images.class_names, images.sample_ids, images.mean, images.std)
    captions = [text for per_image in texts for text in per_image]
    return CaptionedImages(images, captions, np.repeat(images.sample_ids, captions_per_image),
                           np.arange(len(captions), dtype=np.int64))

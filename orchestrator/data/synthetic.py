"""A procedurally generated image dataset with CIFAR's shape, for tests and fast simulations.

Why it looks like this (see docs/methods/bct.md): a dataset the old model solves perfectly cannot
show compatibility, so classes come in super-classes of :data:`SIBLINGS`. Siblings share a base pattern
(background, gratings, blobs) and differ only by a weaker class-specific pattern, and class ``c``
belongs to super-class ``c % num_supers`` so any contiguous block of classes spans every super-class:
an old model trained on the first classes meets unseen siblings of what it knows. Each image then gets
nuisance (translation, colour gain, brightness, a distractor blob, an occluding rectangle, pixel noise)
so retrieval is not template matching. ``difficulty`` weakens the class-specific pattern and
strengthens the nuisance.

Variants. By default each variant draws everything, super-classes included, from its own random
stream, so two variants share no structure. With ``super_classes = K`` the K super-class prototypes
(background and shared pattern) are drawn once, from a stream no variant uses, and shared by every
variant; class ``c`` belongs to super-class ``c % K`` and its template is that prototype plus a
class-specific pattern of its own variant (the variant-specific offset, as strong as the difference
between siblings). Class ``c`` of one variant is then a relative of class ``c`` (and of ``c + K``,
``c + 2K``, ...) of every other variant, as CIFAR-10's classes are relatives of ImageNet's: a model
trained on one variant maps another variant's images near the classes of the same super-class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import (DatasetSource, LabeledImages, Split, cache_entry, channel_stats, read_array, read_meta,
                               register_dataset)

GENERATOR_VERSION = 1  # part of the cache key: bump whenever generated pixels change
SIBLINGS = 4  # classes per super-class (unless super_classes is set)
SHARED_SUPERS_STREAM = 3  # random stream of the shared super-class prototypes; no variant draws from it
CLASS_STRENGTH = 0.7  # amplitude of the class-specific pattern relative to the shared one, at difficulty 1
SHIFT = 0.125  # maximal translation, as a fraction of the image size
GAIN_SD, BRIGHTNESS_SD, NOISE_SD = 0.15, 0.08, 0.06  # per-image nuisance at difficulty 1
DISTRACTOR_AMPLITUDE, OCCLUSION_PROB = 0.4, 0.5
_CHUNK = 2048  # images rendered at once: bounds memory for large datasets

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"


def word_names(num_classes: int) -> list[str]:
    """Distinct pronounceable lowercase words (three consonant-vowel syllables); class i keeps its name
    whatever ``num_classes`` is, so captions and logs stay comparable across configs."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    n = len(syllables)
    codes = np.random.default_rng(20240817).permutation(n ** 3)[:num_classes]
    return [syllables[k // n ** 2] + syllables[k // n % n] + syllables[k % n] for k in codes.tolist()]


def _rng(variant: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, variant % 2 ** 64])


def _patterns(rng: np.random.Generator, count: int, canvas: int, gratings: int, blobs: int) -> np.ndarray:
    """``count`` random colour patterns (count, canvas, canvas, 3): oriented gratings plus Gaussian blobs."""
    y, x = (np.mgrid[0:canvas, 0:canvas].astype(np.float32) + 0.5) / canvas
    freq = rng.uniform(1.5, 4.0, (count, gratings, 1, 1))
    angle = rng.uniform(0, np.pi, (count, gratings, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (count, gratings, 1, 1))
    waves = np.cos(2 * np.pi * freq * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    centre = rng.uniform(0.15, 0.85, (2, count, blobs, 1, 1))
    radius = rng.uniform(0.08, 0.2, (count, blobs, 1, 1))
    bumps = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * radius ** 2))
    wave_colour = rng.normal(0, 0.12, (count, gratings, 3))
    blob_colour = rng.normal(0, 0.3, (count, blobs, 3))
    return (np.einsum("nkhw,nkc->nhwc", waves, wave_colour)
            + np.einsum("nkhw,nkc->nhwc", bumps, blob_colour)).astype(np.float32)


def _super_prototypes(rng: np.random.Generator, supers: int, canvas: int) -> np.ndarray:
    """Super-class prototypes (supers, canvas, canvas, 3): a background colour plus a shared pattern."""
    background = rng.uniform(0.3, 0.7, (supers, 1, 1, 3)).astype(np.float32)
    return background + _patterns(rng, supers, canvas, gratings=2, blobs=3)


def _templates(cfg: DataConfig, canvas: int) -> np.ndarray:
    """Class templates (C, canvas, canvas, 3), larger than the image so translation reveals new content."""
    rng = _rng(cfg.variant, 0)
    if cfg.super_classes is None:  # super-classes of this variant's own, drawn from its stream
        supers = -(-cfg.num_classes // SIBLINGS)
        prototypes = _super_prototypes(rng, supers, canvas)
    else:  # shared by every variant: drawn from a stream that does not depend on the variant
        supers = cfg.super_classes
        prototypes = _super_prototypes(np.random.default_rng([SHARED_SUPERS_STREAM, supers]), supers, canvas)
    super_of = np.arange(cfg.num_classes) % supers
    own = _patterns(rng, cfg.num_classes, canvas, gratings=1, blobs=2)
    # Per-class strength varies, so some siblings are much harder to tell apart than others.
    strength = rng.uniform(0.6, 1.4, (cfg.num_classes, 1, 1, 1)) * CLASS_STRENGTH / cfg.difficulty
    return prototypes[super_of] + strength.astype(np.float32) * own


def _render(rng: np.random.Generator, templates: np.ndarray, labels: np.ndarray, size: int,
            difficulty: float) -> np.ndarray:
    """Images (N, size, size, 3) uint8: a translated crop of each label's template plus nuisance."""
    n, d = len(labels), difficulty
    span = templates.shape[1] - size
    dy, dx = rng.integers(0, span + 1, (2, n, 1, 1))
    pixels = np.arange(size)
    img = templates[labels[:, None, None], dy + pixels[:, None], dx + pixels[None, :]]
    img *= 1 + rng.normal(0, GAIN_SD * d, (n, 1, 1, 3)).astype(np.float32)
    img += rng.normal(0, BRIGHTNESS_SD * d, (n, 1, 1, 1)).astype(np.float32)
    y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    cy, cx = rng.uniform(0, 1, (2, n, 1, 1))
    radius = rng.uniform(0.1, 0.25, (n, 1, 1))
    bump = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius ** 2)).astype(np.float32)
    img += bump[..., None] * rng.normal(0, DISTRACTOR_AMPLITUDE * d, (n, 1, 1, 3)).astype(np.float32)
    top, left = rng.integers(0, size, (2, n, 1))
    height, width = rng.integers(size // 5, size * 2 // 5 + 1, (2, n, 1))
    occluded = rng.random((n, 1, 1)) < OCCLUSION_PROB
    mask = (((pixels >= top) & (pixels < top + height))[:, :, None]
            & ((pixels >= left) & (pixels < left + width))[:, None, :] & occluded)
    img = np.where(mask[..., None], rng.uniform(0, 1, (n, 1, 1, 3)).astype(np.float32), img)
    img += rng.normal(0, NOISE_SD * d, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _split_images(cfg: DataConfig, templates: np.ndarray, per_class: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(cfg.variant, stream)
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), per_class)
    images = np.concatenate([_render(rng, templates, labels[i:i + _CHUNK], cfg.image_size, cfg.difficulty)
                             for i in range(0, len(labels), _CHUNK)])
    return images, labels


def generator_key(cfg: DataConfig) -> dict:
    """The settings that fix a synthetic dataset's class templates, for cache keys. ``super_classes``
    enters only when set, so the keys of datasets cached before the option existed do not change."""
    key = {"num_classes": cfg.num_classes, "image_size": cfg.image_size, "difficulty": cfg.difficulty,
           "variant": cfg.variant}
    if cfg.super_classes is not None:
        key["super_classes"] = cfg.super_classes
    return key


def generate(cfg: DataConfig) -> tuple[dict[str, np.ndarray], dict]:
    """Both splits (from independent random streams) and the train split's channel stats."""
    margin = max(1, round(SHIFT * cfg.image_size))
    templates = _templates(cfg, cfg.image_size + 2 * margin)
    train_images, train_labels = _split_images(cfg, templates, cfg.train_per_class, stream=1)
    test_images, test_labels = _split_images(cfg, templates, cfg.test_per_class, stream=2)
    mean, std = channel_stats(train_images)
    arrays = {"train_images": train_images, "train_labels": train_labels,
              "test_images": test_images, "test_labels": test_labels}
    return arrays, {"mean": mean, "std": std}


@register_dataset("synthetic")
class Synthetic(DatasetSource):
    def class_names(self, cfg: DataConfig) -> list[str]:
        return word_names(cfg.num_classes)

    def load(self, cfg: DataConfig, split: Split, cache_dir: Path) -> LabeledImages:
        key = {"version": GENERATOR_VERSION, **generator_key(cfg), "train_per_class": cfg.train_per_class,
               "test_per_class": cfg.test_per_class}
        entry = cache_entry(cache_dir, "synthetic", key, lambda: generate(cfg))
        meta = read_meta(entry)
        labels = read_array(entry, f"{split}_labels")
        return LabeledImages(read_array(entry, f"{split}_images"), labels, self.class_names(cfg),
                             np.arange(len(labels), dtype=np.int64), tuple(meta["mean"]), tuple(meta["std"]))

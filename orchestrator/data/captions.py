"""A deterministic captioned image dataset built on the synthetic image generator.

Why it exists (docs/methods/cpe-clip.md): offline CLIP experiments need a CLIP that already "knows"
the names of every class, as a web-scale CLIP does. Captions name the class with one of several
templates; images come from the synthetic classes, optionally from a *shifted* distribution (rotated
colours, lower contrast, stronger nuisance) so that a CLIP pretrained on them transfers imperfectly to
the unshifted images an experiment trains and evaluates on.

API (stable; shared by the upstream CLIP stage and the cross-modal methods):

- ``CAPTION_TEMPLATES``: the caption templates; ``{}`` is the class name.
- ``CaptionedImages``: ``images`` (a :class:`LabeledImages` with stable ``sample_ids``), ``captions``
  (list of str), ``caption_of`` (int64: the sample id of the image each caption describes) and
  ``caption_ids`` (int64, stable).
- ``load_captioned(cfg, split, captions_per_image=2, shift=0.0, per_class=None)``: captions for a
  split of the synthetic dataset ``cfg``; ``shift > 0`` draws a shifted image distribution of
  ``per_class`` images per class from its own random stream (disjoint from the train/test images).
- ``caption_texts(labels, class_names, per_image, seed)``: the captions alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from orchestrator.config import DataConfig
from orchestrator.data import LabeledImages, Split, cache_entry, load_split, read_array, read_meta
from orchestrator.data.synthetic import GENERATOR_VERSION, SHIFT, _render, _rng, _templates, generator_key, word_names
from orchestrator.errors import DataError

CAPTION_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "{}.",
    "an image of a {}.",
    "a picture showing a {}.",
    "a blurry photo of a {}.",
    "this is a {}.",
    "the {} pattern.",
)
SHIFTED_STREAM = 101  # random stream of shifted images (the synthetic train/test streams are 1 and 2)
MAX_HUE_ROTATION = np.pi / 2  # colour rotation at shift 1, around the grey axis
MAX_CONTRAST_LOSS = 0.35  # fraction of the template contrast removed at shift 1
MAX_EXTRA_NUISANCE = 0.5  # relative increase of the per-image nuisance at shift 1


def cache_root(cache_dir: Optional[Path] = None) -> Path:
    """Where generated artefacts are cached: ``cache_dir``, else ``$COMPAT_CACHE_DIR``, else
    ``~/.cache/compat-orchestrator`` (the same rule as :func:`load_split`)."""
    root = cache_dir or os.environ.get("COMPAT_CACHE_DIR") or Path.home() / ".cache" / "compat-orchestrator"
    return Path(root).expanduser()


@dataclass
class CaptionedImages:
    """Images with captions; several captions may describe one image (``caption_of`` links them)."""

    images: LabeledImages
    captions: list[str]
    caption_of: np.ndarray  # int64 (num_captions,): sample id of the described image
    caption_ids: np.ndarray  # int64 (num_captions,)

    @property
    def caption_labels(self) -> np.ndarray:
        """Class label of each caption (that of the image it describes)."""
        position = np.empty(int(self.images.sample_ids.max()) + 1, dtype=np.int64)
        position[self.images.sample_ids] = np.arange(len(self.images))
        return self.images.labels[position[self.caption_of]]


def caption_texts(labels: np.ndarray, class_names: list[str], per_image: int, seed: int) -> list[list[str]]:
    """``per_image`` distinct captions per image (templates drawn without replacement, seeded)."""
    if not 1 <= per_image <= len(CAPTION_TEMPLATES):
        raise ValueError(f"per_image must be in 1..{len(CAPTION_TEMPLATES)}, got {per_image}")
    rng = np.random.default_rng([seed, 7])
    keys = rng.random((len(labels), len(CAPTION_TEMPLATES)))
    picks = np.argsort(keys, axis=1)[:, :per_image]
    return [[CAPTION_TEMPLATES[t].format(class_names[label]) for t in row] for label, row in zip(labels.tolist(), picks)]


def _colour_rotation(angle: float) -> np.ndarray:
    """3x3 rotation of RGB deviations around the grey axis (a hue rotation)."""
    axis = np.ones(3) / np.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return (np.cos(angle) * np.eye(3) + np.sin(angle) * cross
            + (1 - np.cos(angle)) * np.outer(axis, axis)).astype(np.float32)


def shifted_templates(templates: np.ndarray, shift: float) -> np.ndarray:
    """The class templates seen through the shift: hue-rotated and with reduced contrast."""
    centre = templates.mean(axis=(1, 2, 3), keepdims=True)
    deviation = (templates - centre) @ _colour_rotation(shift * MAX_HUE_ROTATION).T
    return centre + (1 - shift * MAX_CONTRAST_LOSS) * deviation


def _generate_shifted(cfg: DataConfig, shift: float, per_class: int) -> tuple[dict[str, np.ndarray], dict]:
    from orchestrator.data import channel_stats

    margin = max(1, round(SHIFT * cfg.image_size))
    templates = shifted_templates(_templates(cfg, cfg.image_size + 2 * margin), shift)
    labels = np.repeat(np.arange(cfg.num_classes, dtype=np.int64), per_class)
    difficulty = cfg.difficulty * (1 + shift * MAX_EXTRA_NUISANCE)
    images = _render(_rng(cfg.variant, SHIFTED_STREAM), templates, labels, cfg.image_size, difficulty)
    mean, std = channel_stats(images)
    return {"images": images, "labels": labels}, {"mean": mean, "std": std}


def _shifted_images(cfg: DataConfig, shift: float, per_class: int, cache_dir: Path) -> LabeledImages:
    key = {"version": GENERATOR_VERSION, **generator_key(cfg), "shift": shift, "per_class": per_class}
    entry = cache_entry(cache_dir, "synthetic-shifted", key, lambda: _generate_shifted(cfg, shift, per_class))
    meta = read_meta(entry)
    labels = read_array(entry, "labels")
    return LabeledImages(read_array(entry, "images"), labels, word_names(cfg.num_classes),
                         np.arange(len(labels), dtype=np.int64), tuple(meta["mean"]), tuple(meta["std"]))


def load_captioned(cfg: DataConfig, split: Split = "train", captions_per_image: int = 2, shift: float = 0.0,
                   per_class: Optional[int] = None, cache_dir: Optional[Path] = None) -> CaptionedImages:
    """Captioned synthetic images: ``split`` of the dataset itself (``shift == 0``), or ``per_class``
    images per class of the shifted distribution (``shift`` in (0, 1]; ``split`` then only seeds the
    captions)."""
    if cfg.dataset != "synthetic":
        raise DataError(f"captioned images are generated from the synthetic dataset, not {cfg.dataset!r}")
    if not 0.0 <= shift <= 1.0:
        raise DataError(f"shift must be in [0, 1], got {shift}")
    if shift > 0:
        images = _shifted_images(cfg, shift, per_class or cfg.train_per_class, cache_root(cache_dir))
    else:
        images = load_split(cfg, split, cache_dir)
    texts = caption_texts(images.labels, images.class_names, captions_per_image,
                          seed=cfg.variant * 4 + (split == "test") + 2 * (shift > 0))
    captions = [text for per_image in texts for text in per_image]
    caption_of = np.repeat(images.sample_ids, captions_per_image)
    return CaptionedImages(images, captions, caption_of, np.arange(len(captions), dtype=np.int64))

"""The three data sets of a cross-modal experiment, as arrays: evaluation set, caption corpus, pairs.

- evaluation set: images and all their captions; the old model's embeddings of both are the gallery;
- corpus: distinct captions only (stage ``text``); a seeded draw of ``corpus_size`` per seed;
- pairs: a seeded draw of ``pair_count`` images with all their captions (stage ``pairs``).

Synthetic runs take them from the instance-captioned synthetic dataset (test split for evaluation, train
split for corpus and pairs); file runs from annotation files (:mod:`orchestrator.data.caption_files`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.config.crossmodal import CaptionSource, CrossModalDataConfig
from orchestrator.data.caption_files import (CaptionIndex, load_images, read_caption_file, read_text_corpus,
                                             select_captions)
from orchestrator.errors import DataError


@dataclass(frozen=True)
class CaptionedArrays:
    """Images in memory and their captions; caption ``c`` describes image ``caption_of[c]``."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    captions: list[str]
    caption_of: np.ndarray  # int64 image index per caption

    def subset(self, images: np.ndarray) -> "CaptionedArrays":
        """The given images, in that order, with all their captions."""
        keep, caption_of = select_captions(self.caption_of, len(self.images), images)
        return CaptionedArrays(self.images[images], [self.captions[c] for c in keep], caption_of)


def _synthetic(cfg: CrossModalDataConfig, split: str) -> CaptionedArrays:
    from orchestrator.data.instance_captions import load_described

    data = load_described(cfg.synthetic, split, cfg.captions_per_image)
    position = np.empty(int(data.images.sample_ids.max()) + 1, dtype=np.int64)
    position[data.images.sample_ids] = np.arange(len(data.images))
    return CaptionedArrays(data.images.images, data.captions, position[data.caption_of])


def _index(source: CaptionSource) -> CaptionIndex:
    return read_caption_file(source.path, source.image_root, source.splits)


def check_data(cfg: CrossModalDataConfig) -> None:
    """Parse every annotation file (and check its images exist) before a run writes anything."""
    if cfg.source == "files":
        _index(cfg.eval)
        corpus_captions(cfg)
        pairs = _index(cfg.pairs)
        if len(pairs) < cfg.pair_count:
            raise DataError(f"data.pair_count is {cfg.pair_count} but {cfg.pairs.path} lists {len(pairs)} images")


def eval_set(cfg: CrossModalDataConfig, image_size: int) -> CaptionedArrays:
    if cfg.source == "synthetic":
        return _synthetic(cfg, "test")
    index = _index(cfg.eval)
    return CaptionedArrays(load_images(index.image_paths, image_size), index.captions, index.caption_of)


def corpus_captions(cfg: CrossModalDataConfig) -> list[str]:
    """Every distinct caption of the corpus, in order of first appearance."""
    if cfg.source == "synthetic":
        captions = _synthetic(cfg, "train").captions
    elif cfg.corpus.path.endswith(".txt"):
        captions = read_text_corpus(cfg.corpus.path)
    else:
        captions = _index(cfg.corpus).captions
    return list(dict.fromkeys(captions))


def corpus_draw(num_captions: int, size: int | None, seed: int) -> np.ndarray:
    """Indices of the corpus captions a seed's stage ``text`` uses (all of them when ``size`` is None)."""
    if size is None or size >= num_captions:
        return np.arange(num_captions)
    return np.sort(np.random.default_rng([seed, 31]).choice(num_captions, size, replace=False))


def pair_set(cfg: CrossModalDataConfig, seed: int, image_size: int) -> CaptionedArrays:
    """``pair_count`` images drawn with ``seed``, with all their captions."""
    if cfg.source == "synthetic":
        full = _synthetic(cfg, "train")
        count = len(full.images)
    else:
        index = _index(cfg.pairs)
        count = len(index)
    if count < cfg.pair_count:
        raise DataError(f"data.pair_count is {cfg.pair_count} but the pair data has {count} images")
    draw = np.sort(np.random.default_rng([seed, 37]).choice(count, cfg.pair_count, replace=False))
    if cfg.source == "synthetic":
        return full.subset(draw)
    chosen = index.subset(draw)
    return CaptionedArrays(load_images(chosen.image_paths, image_size), chosen.captions, chosen.caption_of)

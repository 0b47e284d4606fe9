"""The three data sets of a cross-modal experiment, as arrays: evaluation set, caption corpus, pairs.

- evaluation set: images and all their captions; the old model's embeddings of both are the gallery;
- corpus: distinct captions only (stage ``text``); a seeded draw of ``corpus_size`` per seed;
- pairs: a seeded draw of ``pair_count`` images with all their captions (stage ``pairs``).

Synthetic runs take them from the instance-captioned synthetic dataset (test split for evaluation, train
split for corpus and pairs); file runs from annotation files (:mod:`orchestrator.data.caption_files`).

Training never sees an evaluation caption, as on COCO, whose train and test captions were written for
different images: every caption that also occurs in the evaluation set (compared as CLIP's tokenizer
reads text, ignoring case and spacing) is left out of the corpus and of the pairs, and an image left
without captions is not drawn as a pair. The synthetic captions need this: they are templates over a
few attributes, so without it most evaluation captions also occur, verbatim, in the train split.
"""

from __future__ import annotations

import dataclasses
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


def caption_key(caption: str) -> str:
    """A caption as CLIP's tokenizer reads it: lower case, runs of whitespace as one space."""
    return " ".join(caption.lower().split())


def _eval_caption_keys(cfg: CrossModalDataConfig) -> set[str]:
    captions = _synthetic(cfg, "test").captions if cfg.source == "synthetic" else _index(cfg.eval).captions
    return {caption_key(c) for c in captions}


def _unseen_pairs(cfg: CrossModalDataConfig) -> tuple[CaptionedArrays | CaptionIndex, np.ndarray]:
    """The pair data with its evaluation captions left out (images keep their indices), and the images
    that still have a caption: the ones a seed may draw."""
    excluded = _eval_caption_keys(cfg)
    data = _synthetic(cfg, "train") if cfg.source == "synthetic" else _index(cfg.pairs)
    kept = np.array([i for i, c in enumerate(data.captions) if caption_key(c) not in excluded], dtype=np.int64)
    unseen = dataclasses.replace(data, captions=[data.captions[i] for i in kept], caption_of=data.caption_of[kept])
    return unseen, np.unique(unseen.caption_of)


def _check_pair_count(cfg: CrossModalDataConfig, drawable: int) -> None:
    if drawable < cfg.pair_count:
        raise DataError(f"data.pair_count is {cfg.pair_count} but only {drawable} images of the pair data have a "
                        f"caption that is not also an evaluation caption")


def check_data(cfg: CrossModalDataConfig) -> None:
    """Parse every annotation file (and check its images exist) before a run writes anything."""
    if cfg.source == "files":
        _index(cfg.eval)
        corpus_captions(cfg)
        _check_pair_count(cfg, len(_unseen_pairs(cfg)[1]))


def eval_set(cfg: CrossModalDataConfig, image_size: int) -> CaptionedArrays:
    if cfg.source == "synthetic":
        return _synthetic(cfg, "test")
    index = _index(cfg.eval)
    return CaptionedArrays(load_images(index.image_paths, image_size), index.captions, index.caption_of)


def corpus_captions(cfg: CrossModalDataConfig) -> list[str]:
    """Every distinct caption of the corpus that is not an evaluation caption, in order of first appearance."""
    if cfg.source == "synthetic":
        captions = _synthetic(cfg, "train").captions
    elif cfg.corpus.path.endswith(".txt"):
        captions = read_text_corpus(cfg.corpus.path)
    else:
        captions = _index(cfg.corpus).captions
    excluded = _eval_caption_keys(cfg)
    kept = [c for c in dict.fromkeys(captions) if caption_key(c) not in excluded]
    if not kept:
        raise DataError("every caption of the corpus is also an evaluation caption: stage text has nothing to train on")
    return kept


def corpus_draw(num_captions: int, size: int | None, seed: int) -> np.ndarray:
    """Indices of the corpus captions a seed's stage ``text`` uses (all of them when ``size`` is None)."""
    if size is None or size >= num_captions:
        return np.arange(num_captions)
    return np.sort(np.random.default_rng([seed, 31]).choice(num_captions, size, replace=False))


def pair_set(cfg: CrossModalDataConfig, seed: int, image_size: int) -> CaptionedArrays:
    """``pair_count`` images drawn with ``seed`` among those with a caption that is not an evaluation
    caption, each with all such captions."""
    unseen, drawable = _unseen_pairs(cfg)
    _check_pair_count(cfg, len(drawable))
    draw = drawable[np.sort(np.random.default_rng([seed, 37]).choice(len(drawable), cfg.pair_count, replace=False))]
    chosen = unseen.subset(draw)
    if cfg.source == "synthetic":
        return chosen
    return CaptionedArrays(load_images(chosen.image_paths, image_size), chosen.captions, chosen.caption_of)

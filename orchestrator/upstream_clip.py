"""The upstream CLIP stage: contrastive pretraining of a tiny open_clip model, offline, before a scenario.

A web-scale CLIP already knows the names of every class, later sessions' included. Offline, this stage
imitates that: the experiment's architecture (``model.name``) is trained from random weights on captions
that name every class of the synthetic dataset, with images drawn from a *shifted* distribution
(:mod:`orchestrator.data.captions`), so zero-shot accuracy on the experiment's images is above chance
but imperfect and prompts have a domain gap to close.

API (stable; shared with the cross-modal methods):

- ``pretrain_clip(model_name, recipe, data, cache_dir=None) -> Path``: the checkpoint file (a state
  dict of tensors, loadable with ``create_clip(model_name, str(path))``), built once and cached under
  a digest of everything that determines it; ``meta.json`` beside it records the recipe and the
  zero-shot accuracy per class on the dataset's test split.
- ``upstream_entry(model_name, recipe, data, cache_dir=None) -> Path``: that cache directory.
- ``upstream_checkpoint(cfg) -> Optional[Path]``: the same for an experiment config (``None`` when it
  has no ``upstream_clip`` section).
- ``zero_shot_per_class(model, tokenizer, images, labels, class_names, template, batch_size)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from methods.clip_models import Tokenizer, clip_input_spec, create_clip, encode_images, encode_texts
from orchestrator.config import DataConfig, ExperimentConfig, ModelConfig, UpstreamClipConfig
from orchestrator.data import load_split
from orchestrator.data.captions import cache_root, load_captioned
from orchestrator.data.instance_captions import load_described
from orchestrator.data.synthetic import generator_key
from orchestrator.data.transforms import BatchTransform
from orchestrator.errors import ConfigError
from orchestrator.runfiles import atomic_torch_save, atomic_write_json

RECIPE_VERSION = 1  # part of the cache key: bump whenever the training procedure changes
ZERO_SHOT_TEMPLATE = "{}."


def recipe_key(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> dict:
    """Everything that determines the upstream weights."""
    return {"version": RECIPE_VERSION, "model": model_name, "recipe": dataclasses.asdict(recipe),
            "data": generator_key(data)}


def upstream_entry(model_name: str, recipe: UpstreamClipConfig, data: DataConfig,
                   cache_dir: Optional[Path] = None) -> Path:
    """The cache directory of the upstream CLIP ``(model_name, recipe, data)`` (it may not exist yet)."""
    blob = json.dumps(recipe_key(model_name, recipe, data), sort_keys=True).encode()
    return cache_root(cache_dir) / f"upstream-clip-{hashlib.sha256(blob).hexdigest()[:16]}"


def upstream_checkpoint(cfg: ExperimentConfig, cache_dir: Optional[Path] = None) -> Optional[Path]:
    if cfg.upstream_clip is None:
        return None
    return pretrain_clip(cfg.model.name, cfg.upstream_clip, cfg.data, cache_dir)


def pretrain_clip(model_name: str, recipe: UpstreamClipConfig, data: DataConfig,
                  cache_dir: Optional[Path] = None) -> Path:
    """The cached upstream CLIP checkpoint for ``(model_name, recipe, data)``; trained here if missing.

    ``meta.json`` is written (atomically) after the weights, so its presence marks a finished entry;
    concurrent builders write identical files.
    """
    if data.dataset != "synthetic":
        raise ConfigError("upstream_clip", f"pretrains on the captioned synthetic dataset; data.dataset is "
                                           f"{data.dataset!r} (use model.pretrained for real data)")
    entry = upstream_entry(model_name, recipe, data, cache_dir)
    if not (entry / "meta.json").is_file():
        state, zero_shot = _train(model_name, recipe, data)
        atomic_torch_save(entry / "model.pt", state)
        atomic_write_json(entry / "meta.json", {**recipe_key(model_name, recipe, data), "entry": entry.name,
                                                "zero_shot_template": ZERO_SHOT_TEMPLATE,
                                                "zero_shot_per_class": zero_shot})
    return entry / "model.pt"


def read_upstream_meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint).parent / "meta.json").read_text())


def multi_positive_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                             logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where every caption of the image's class is a positive (captions
    name classes, so another image's caption of the same class is not a negative)."""
    logits = logit_scale * image_features @ text_features.T
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _train(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> tuple[dict, list[float]]:
    torch.manual_seed(recipe.seed)
    model, tokenizer = create_clip(model_name)
    spec = clip_input_spec(model_name)
    load = load_described if recipe.captions == "instance" else load_captioned
    captioned = load(data, "train", recipe.captions_per_image, shift=max(recipe.shift, 1e-6),
                     per_class=recipe.images_per_class)
    images = torch.from_numpy(captioned.images.images)
    # Class captions: any caption of the class is a positive. Instance captions describe one image.
    labels = torch.from_numpy(captioned.images.labels if recipe.captions == "class" else np.arange(len(images)))
    tokens = tokenizer(captioned.captions).view(len(images), recipe.captions_per_image, -1)
    transform = BatchTransform(spec.mean, spec.std, augment=True, size=spec.size)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    steps_per_epoch = max(len(images) // recipe.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, pct_start=0.1,
                                                   total_steps=recipe.epochs * steps_per_epoch)
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, steps_per_epoch * recipe.batch_size, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            which = torch.randint(0, recipe.captions_per_image, (len(idx),), generator=generator)
            image_features = encode_images(model, transform(images[idx], generator=generator))
            text_features = F.normalize(model.encode_text(tokens[idx, which]), dim=-1)
            loss = multi_positive_clip_loss(image_features, text_features, labels[idx], model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    test = load_split(data, "test")
    zero_shot = zero_shot_per_class(model, tokenizer, test.images, test.labels, test.class_names, ZERO_SHOT_TEMPLATE,
                                    BatchTransform(spec.mean, spec.std, augment=False, size=spec.size))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, zero_shot


@torch.no_grad()
def zero_shot_per_class(model, tokenizer: Tokenizer, images: np.ndarray, labels: np.ndarray,
                        class_names: Sequence[str], template: str, transform, batch_size: int = 256) -> list[float]:
    """Top-1 zero-shot accuracy of each class (argmax of cosine to ``template.format(name)``)."""
    text = encode_texts(model, tokenizer, [template.format(name) for name in class_names])
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = transform(torch.from_numpy(images[start:start + batch_size]))
        predictions.append((encode_images(model, batch) @ text.T).argmax(1).numpy())
    correct = np.concatenate(predictions) == labels
    return [float(correct[labels == c].mean()) for c in range(len(class_names))]


def resolved_model_config(cfg: ExperimentConfig) -> ModelConfig:
    """``cfg.model``, with ``pretrained`` pointing at the upstream CLIP when the experiment has one."""
    checkpoint = upstream_checkpoint(cfg)
    return cfg.model if checkpoint is None else dataclasses.replace(cfg.model, pretrained=str(checkpoint))


def record_upstream(cfg: ExperimentConfig, run_dir: Path, echo: Callable[[str], None] = print) -> None:
    """Build (or find) the upstream CLIP in the driver, before any worker needs it, and record its recipe,
    digest and zero-shot accuracy per class in ``run_dir/upstream_clip.json``."""
    if cfg.upstream_clip is None:
        return
    entry = upstream_entry(cfg.model.name, cfg.upstream_clip, cfg.data)
    if not (entry / "meta.json").is_file():
        echo(f"Pretraining the upstream CLIP {cfg.model.name} ({cfg.upstream_clip.epochs} epochs on captioned "
             f"shifted images); it is cached in {entry}")
    checkpoint = upstream_checkpoint(cfg)
    if checkpoint is not None:
        atomic_write_json(Path(run_dir) / "upstream_clip.json", {**read_upstream_meta(checkpoint),
                                                                "checkpoint": str(checkpoint)})

"""The upstream CLIP stage: contrastive pretraining of a tiny open_clip model, offline, before a scenario.

A web-scale CLIP already knows the names of every class, later sessions' included. Offline, this stage
imitates that: the experiment's architecture (``model.name``) is trained from random weights on captions
that name every class of the synthetic dataset, with images drawn from a *shifted* distribution
(:mod:`orchestrator.data.captions`), so zero-shot accuracy on the experiment's images is above chance
but imperfect and prompts have a domain gap to close.

The upstream CLIP is a task of the experiment's graph (``clip_task``), trained by a worker group with
the engine's training loop and stored in the run, under a digest of everything that determines it:

- ``pretrain_clip(model_name, recipe, data, root) -> RunStorage``: the entry ``upstream-clip/<digest>/``
  of the run at ``root``, built once: ``model.pt`` (a state dict of tensors, loadable with
  ``create_clip(model_name, path)``), then ``meta.json``, which records the recipe and the zero-shot
  accuracy per class on the dataset's test split, and marks the entry finished.
- ``clip_checkpoint(model_name, recipe, data, root) -> Path``: the weights as a local file, which its task
  has built (a cached copy when the run is not on the local filesystem, see the function).
- ``zero_shot_per_class(model, tokenizer, images, labels, class_names, template, batch_size)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from methods.nets.clip_models import Tokenizer, clip_input_spec, create_clip, encode_images, encode_texts
from orchestrator.config import DataConfig, ExperimentConfig, ModelConfig, UpstreamClipConfig
from orchestrator.data import cache_root, load_split
from orchestrator.data.captions import load_captioned
from orchestrator.data.instance_captions import load_described
from orchestrator.data.synthetic import generator_key
from orchestrator.data.transforms import BatchTransform
from orchestrator.engine.loop import Hook, train_epochs
from orchestrator.errors import ConfigError, RunError
from orchestrator.storage import runfiles
from orchestrator.storage.run_storage import RunStorage

RECIPE_VERSION = 1  # part of the cache key: bump whenever the training procedure changes
ZERO_SHOT_TEMPLATE = "{}."


def recipe_key(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> dict:
    """Everything that determines the upstream weights."""
    return {"version": RECIPE_VERSION, "model": model_name, "recipe": dataclasses.asdict(recipe),
            "data": generator_key(data)}


def upstream_digest(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> str:
    blob = json.dumps(recipe_key(model_name, recipe, data), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def upstream_key(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> str:
    """The key, inside the run, of the upstream CLIP ``(model_name, recipe, data)``."""
    return f"upstream-clip/{upstream_digest(model_name, recipe, data)}"


def upstream_entry(model_name: str, recipe: UpstreamClipConfig, data: DataConfig, root: runfiles.Run) -> RunStorage:
    """Where the upstream CLIP ``(model_name, recipe, data)`` lives in the run at ``root``: ``model.pt``, then
    ``meta.json`` (its completion record, written last)."""
    return RunStorage.of(root).child(upstream_key(model_name, recipe, data))


def clip_task(model_name: str, recipe: UpstreamClipConfig, data: DataConfig) -> tuple[str, dict]:
    """(task name, worker payload) of the task that pretrains this upstream CLIP."""
    return (upstream_key(model_name, recipe, data),
            {"kind": "clip", "model": model_name, "recipe": dataclasses.asdict(recipe),
             "data": dataclasses.asdict(data)})


def clip_checkpoint(model_name: str, recipe: UpstreamClipConfig, data: DataConfig, root: runfiles.Run) -> Path:
    """The upstream CLIP's weights as a local file, which its task built before any task that needs them
    started.

    A CLIP's weights reach its method as ``model.pretrained``, a config string that names an open_clip tag
    or a local file (validated and read as a file by methods/nets/clip_models.py, and recorded in the
    config), so they cannot be a stream. A run on the local filesystem hands over the stored file itself;
    a run elsewhere (an object store) hands over a copy in the cache directory, named by the SHA-256 of
    the weights, made once per machine and bytes."""
    entry = upstream_entry(model_name, recipe, data, root)
    if not entry.exists("meta.json"):
        raise RunError(f"the upstream CLIP {model_name} is missing from {entry.location}; its task "
                       f"{clip_task(model_name, recipe, data)[0]} must finish first (rerun with --resume)")
    return entry.local_file("model.pt", cache_root() / "stored-weights")


def pretrain_clip(model_name: str, recipe: UpstreamClipConfig, data: DataConfig, root: runfiles.Run,
                  worker=None) -> RunStorage:
    """The upstream CLIP entry for ``(model_name, recipe, data)`` in ``root``; trained here if missing.

    ``meta.json`` is written after the weights, so its presence marks a finished entry.
    """
    if data.dataset != "synthetic":
        raise ConfigError("upstream_clip", f"pretrains on the captioned synthetic dataset; data.dataset is "
                                           f"{data.dataset!r} (use model.pretrained for real data)")
    entry = upstream_entry(model_name, recipe, data, root)
    if not entry.exists("meta.json"):
        state, zero_shot = _train(model_name, recipe, data)
        if worker is not None and not worker.is_chief:
            return entry
        entry.save_torch("model.pt", state)
        entry.write_json("meta.json", {**recipe_key(model_name, recipe, data),
                                       "entry": upstream_digest(model_name, recipe, data),
                                       "zero_shot_template": ZERO_SHOT_TEMPLATE, "zero_shot_per_class": zero_shot})
    return entry


def run_clip_task(name: str, payload: dict, root: RunStorage, worker, group: str) -> None:
    """A worker's part of the upstream-CLIP task (every rank trains the same model; the chief keeps it)."""
    import time

    from orchestrator.config.typed import from_dict

    started = time.time()
    recipe = from_dict(UpstreamClipConfig, payload["recipe"], "upstream_clip")
    data = from_dict(DataConfig, payload["data"], "data")
    pretrain_clip(payload["model"], recipe, data, root, worker)
    worker.barrier()
    if worker.is_chief:
        # measured as stored: trained just now, or by an earlier attempt that stopped before committing
        artefacts = runfiles.artefact_records({key: root.artefact(key) for key in (f"{name}/model.pt", f"{name}/meta.json")})
        runfiles.mark_task_done(root, name, {
            "step": name, "checkpoint": f"{name}/model.pt", "seconds": round(time.time() - started, 3),
            "started_at": round(started, 3), "finished_at": round(time.time(), 3), "group": group,
            "artefacts": artefacts})


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
    transform = BatchTransform(spec.mean, spec.std, augment=True, size=spec.size, interpolation=spec.interpolation)
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    steps_per_epoch = max(len(images) // recipe.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, pct_start=0.1,
                                                   total_steps=recipe.epochs * steps_per_epoch)

    def batches(epoch: int):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, steps_per_epoch * recipe.batch_size, recipe.batch_size):
            yield order[start:start + recipe.batch_size]

    def loss(idx: torch.Tensor, epoch: int):
        which = torch.randint(0, recipe.captions_per_image, (len(idx),), generator=generator)
        image_features = encode_images(model, transform(images[idx], generator=generator))
        text_features = F.normalize(model.encode_text(tokens[idx, which]), dim=-1)
        return multi_positive_clip_loss(image_features, text_features, labels[idx], model.logit_scale.exp()), {}

    train_epochs(model, optimizer, recipe.epochs, lr=None, batches=batches, loss=loss, hooks=[StepScheduler(schedule)])
    model.eval()
    test = load_split(data, "test")
    zero_shot = zero_shot_per_class(model, tokenizer, test.images, test.labels, test.class_names, ZERO_SHOT_TEMPLATE,
                                    BatchTransform(spec.mean, spec.std, augment=False, size=spec.size,
                                                   interpolation=spec.interpolation))
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


class StepScheduler(Hook):
    """A learning-rate schedule that steps after every batch (the upstream CLIP's one-cycle schedule)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def after_batch(self, batch, loss) -> None:
        self.schedule.step()


def resolved_model_config(cfg: ExperimentConfig, root: runfiles.Run) -> ModelConfig:
    """``cfg.model``, with ``pretrained`` pointing at the upstream CLIP when the experiment has one."""
    if cfg.upstream_clip is None:
        return cfg.model
    checkpoint = clip_checkpoint(cfg.model.name, cfg.upstream_clip, cfg.data, root)
    return dataclasses.replace(cfg.model, pretrained=str(checkpoint))


def record_upstream(cfg: ExperimentConfig, run: runfiles.Run, root: runfiles.Run) -> None:
    """Record the upstream CLIP's recipe, digest and zero-shot accuracy per class in ``upstream_clip.json``
    of ``run`` (once its task has built it)."""
    if cfg.upstream_clip is None:
        return
    name = clip_task(cfg.model.name, cfg.upstream_clip, cfg.data)[0]
    entry = upstream_entry(cfg.model.name, cfg.upstream_clip, cfg.data, root)
    if not entry.exists("meta.json"):
        clip_checkpoint(cfg.model.name, cfg.upstream_clip, cfg.data, root)  # raises the missing-CLIP error
    RunStorage.of(run).write_json("upstream_clip.json", {**entry.read_json("meta.json"),
                                                          "checkpoint": f"{name}/model.pt"})

"""``cpe_clip`` (D'Alessandro et al., ICCV-W 2023) and the ``zero_shot_clip`` baseline: few-shot
class-incremental learning with a frozen open_clip CLIP (docs/methods/cpe-clip.md).

CPE-CLIP learns one shared prompt tensor and one projection (:mod:`methods.nets.prompted_clip`) across all
sessions; logits are ``100 * cos`` against the prompted text features of every seen class. In
incremental sessions (step >= 1) the old classes' logits are set to -9999 before the cross-entropy and
the gradients of the prompts and projection are multiplied by α_t = |new classes| / |classes seen|
before the optimiser step (so weight decay, applied inside SGD, is not scaled). Prompts carry over from
session to session when the scenario fine-tunes (``scenario.event: finetune``).

Ablations: ``vision_prompts: false`` (text prompts only), ``vision_mode: replace`` (no accumulation),
``regularization: false`` (no α_t). The reference code's ``no_accumulation`` flag also switches
regularisation off; here they are independent, so its ablation is ``vision_mode: replace`` together
with ``regularization: false``. Naive prompt tuning is ``cpe_clip`` with ``regularization: false``.

``zero_shot_clip`` is the same frozen CLIP without prompts (nothing to train): the reference's sanity
check, which every FSCIL report must include with the same template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch
import torch.nn.functional as F

from methods.base import InputSpec, Method, StepContext, register
from methods.nets.clip_models import clip_input_spec, create_frozen_clip, model_config
from methods.nets.prompted_clip import MASKED_LOGIT, PromptedClip, VisionMode
from orchestrator.config.typed import require
from orchestrator.errors import ConfigError


@dataclass
class ZeroShotClipParams:
    template: str = "{}."  # the authors' template: the class name and a full stop
    logit_scale: float = 100.0  # fixed, not CLIP's learned logit_scale

    def __post_init__(self):
        require(self.template.count("{}") == 1, "template", f"must contain '{{}}' exactly once, got {self.template!r}")
        require(self.logit_scale > 0, "logit_scale", "must be > 0")


@dataclass
class CpeClipParams(ZeroShotClipParams):
    prompt_length: int = 2  # L_g: prompt tokens per layer
    prompt_depth: Optional[int] = None  # deep_g: layers with prompts; None = every text layer
    vision_prompts: bool = True  # False: text prompts only (ablation)
    # vision prompts per layer: keep the earlier prompt outputs and append new prompts (accumulate),
    # overwrite them (replace), or re-append the raw prompts (accumulate_same)
    vision_mode: Literal["accumulate", "replace", "accumulate_same"] = "accumulate"
    regularization: bool = True  # α_t gradient scaling in incremental sessions
    mask_old_classes: bool = True  # old-class logits at -9999 in incremental sessions

    def __post_init__(self):
        super().__post_init__()
        require(self.prompt_length >= 1, "prompt_length", "must be >= 1 (zero_shot_clip is the prompt-free model)")
        require(self.prompt_depth is None or self.prompt_depth >= 1, "prompt_depth", "must be >= 1")


def class_text(template: str, name: str) -> str:
    """A class name as text: a leading numeric id (CUB's ``001.``) dropped, underscores as spaces."""
    return template.format(re.sub(r"^\d+\.", "", name).replace("_", " ").strip())


def session_alpha(num_new: int, num_seen: int) -> float:
    """α_t = |C_t| / Σ_{k<=t} |C_k|: new classes of this session over all classes seen so far."""
    if not 0 < num_new <= num_seen:
        raise ValueError(f"a session needs 0 < new classes ({num_new}) <= classes seen ({num_seen})")
    return num_new / num_seen


def mask_old_logits(logits: torch.Tensor, num_previous: int) -> torch.Tensor:
    """Logits with the first ``num_previous`` (old) classes set to -9999."""
    masked = logits.clone()
    masked[:, :num_previous] = MASKED_LOGIT
    return masked


def scale_gradients(parameters: Iterable[torch.nn.Parameter], factor: float) -> None:
    """Multiply the gradients in place, between ``backward()`` and the optimiser step."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(factor)


@register
class ZeroShotClip(Method):
    """The frozen CLIP, classes as ``template.format(name)``; no trainable parameter, so no training."""

    name = "zero_shot_clip"
    Params = ZeroShotClipParams
    model_keys = frozenset({"name", "pretrained"})

    def check_model(self, key: str) -> None:
        if self.model_cfg.name is None:
            raise ConfigError(f"{key}.name", f"{self.name} needs an open_clip model: set model.name "
                                             f"(e.g. ViT-B-16-quickgelu with model.pretrained: openai, or tiny-vit-w64)")
        model_config(self.model_cfg.name, f"{key}.name")

    def input_spec(self) -> InputSpec:
        return clip_input_spec(self.model_cfg.name, self.model_cfg.pretrained)

    def prompted(self, clip: torch.nn.Module) -> PromptedClip:
        return PromptedClip(clip, 0, 0, None, self.params.logit_scale)

    def build_model(self, ctx: StepContext) -> PromptedClip:
        clip, tokenizer = create_frozen_clip(self.model_cfg.name, self.model_cfg.pretrained)
        model = self.prompted(clip)
        names = ctx.extras["class_names"][:ctx.num_seen]
        model.set_class_tokens(tokenizer([class_text(self.params.template, n) for n in names]))
        return model

    def training_logits(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """The logits the cross-entropy sees: every seen class."""
        return outputs["logits"]

    def loss(self, outputs, images, labels, state, ctx: StepContext):
        ce = F.cross_entropy(self.training_logits(outputs, ctx), labels, label_smoothing=self.label_smoothing(ctx))
        return ce, {"ce": ce}

    def embed(self, model: PromptedClip, images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images)

    def classify(self, model: PromptedClip, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return model(images)["logits"]


@register
class CpeClip(ZeroShotClip):
    """Shared prompts for both towers, α_t-regularised in incremental sessions."""

    name = "cpe_clip"
    Params = CpeClipParams

    def depth(self) -> int:
        return self.params.prompt_depth or int(model_config(self.model_cfg.name)["text_cfg"]["layers"])

    def check_model(self, key: str) -> None:
        super().check_model(key)
        config = model_config(self.model_cfg.name, f"{key}.name")
        layers = min(config["text_cfg"]["layers"], config["vision_cfg"]["layers"])
        if self.depth() > layers:
            raise ConfigError(f"{key}.name", f"{self.model_cfg.name} has {layers} layers per tower, fewer than "
                                             f"{self.name}'s params.prompt_depth {self.depth()}")

    def prompted(self, clip: torch.nn.Module) -> PromptedClip:
        mode: Optional[VisionMode] = self.params.vision_mode if self.params.vision_prompts else None
        return PromptedClip(clip, self.params.prompt_length, self.depth(), mode, self.params.logit_scale)

    def training_logits(self, outputs: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor:
        """Old classes masked in incremental sessions: the cross-entropy is over this session's classes."""
        if ctx.index > 0 and self.params.mask_old_classes:
            return mask_old_logits(outputs["logits"], ctx.num_previous)
        return outputs["logits"]

    def after_backward(self, model: PromptedClip, state: dict, ctx: StepContext) -> None:
        if self.params.regularization and ctx.index > 0:
            scale_gradients(self.trainable_parameters(model), session_alpha(len(ctx.new_classes), ctx.num_seen))

    def describe(self) -> dict:
        return {**super().describe(), "prompt_depth": self.depth(), "text_mode": "replace"}

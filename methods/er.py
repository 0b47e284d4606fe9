"""``er``: experience replay with a growing learnable classifier (docs/methods/er.md).

The baseline d-Simplex-HOC is measured against: cross-entropy only, no old model, no distillation. It
replays exactly as HOC does (the engine's ``scenario.replay``). Its retrieval feature is the backbone
output; at a replacement the replacement's classifier rows are re-initialised (the engine's generic
``replace`` loading) and the classifier grows with the classes as usual.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from methods.nets.backbones import build_backbone
from methods.base import StepContext, register
from methods.independent import Independent
from orchestrator.config import ModelConfig


class BackboneClassifier(nn.Module):
    """backbone -> bias-free Linear(num_classes), as the reference's ER classifier; the backbone output is
    the feature."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.classifier = nn.Linear(self.backbone.out_dim, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.backbone(x)
        return {"feature": feature, "logits": self.classifier(feature)}


@register
class ExperienceReplay(Independent):
    name = "er"
    reference_label_smoothing = 0.0  # plain cross-entropy, as the reference
    model_keys = frozenset({"backbone", "width", "stem"})  # the backbone's output is the feature, as it is

    def first_version_recipe(self) -> Optional[str]:
        return None  # another network than independent's

    def build_model(self, ctx: StepContext) -> BackboneClassifier:
        return BackboneClassifier(self.model_cfg, ctx.num_seen)

    def embed(self, model: BackboneClassifier, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.backbone(images), dim=1)

"""``independent``: cross-entropy only, no compatibility term — the baseline every method must beat."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from methods.base import Method, StepContext, register
from methods.nets.heads import ClassifierNet, served_embedding


@register
class Independent(Method):
    """Each version trains from scratch (or fine-tunes) with label-smoothed cross-entropy alone."""

    name = "independent"
    reference_label_smoothing = 0.1  # the OCA codebase's recipe, shared by its independent, BCT and OCA models
    model_keys = frozenset({"backbone", "width", "stem", "embedding_dim", "final_relu", "normalize", "embedding_bn"})

    def first_version_recipe(self) -> Optional[str]:
        return "independent"  # subclasses whose version 0 is this plain classifier inherit it (bct)

    def build_model(self, ctx: StepContext) -> ClassifierNet:
        return ClassifierNet(self.model_cfg, ctx.num_seen)

    def loss(self, outputs, images, labels, state, ctx: StepContext):
        ce = F.cross_entropy(outputs["logits"], labels, label_smoothing=self.label_smoothing(ctx))
        return ce, {"ce": ce}

    def embed(self, model: ClassifierNet, images: torch.Tensor) -> torch.Tensor:
        return served_embedding(model, images)

    def classify(self, model: ClassifierNet, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return model(images)["logits"]

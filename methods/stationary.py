"""``stationary``: d-Simplex fixed classifier + HOC loss (Biondi et al., CVPR 2024; docs/methods/stationary.md).

The fixed d-Simplex W keeps the features stationary, so models trained at different times — or elsewhere,
as replacements — share one feature space. HOC adds a contrastive pull of the new features towards the
frozen previous model's features of the same (augmented) images:

    L = λ·CE(W z, row(y)) + (1 − λ)·L_HOC,  λ = 0.1, μ = 10, active from the first step.

At a replacement step the "previous model" is the replacement itself (reference), or, with
``anchor: replaced``, the version it replaced. A step with no model to anchor to (step 0 without a
starting checkpoint, or an upstream model) trains with cross-entropy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from methods.nets.backbones import build_backbone
from methods.base import Method, StepContext, Weights, register
from methods.nets.simplex import DSimplexHead, LabelRows, label_rows, other_end
from orchestrator.config.typed import require
from orchestrator.config import ModelConfig
from orchestrator.errors import ConfigError

SameClass = Literal["zero", "mask"]


@dataclass
class StationaryParams:
    num_classes: int = 1024  # K preallocated prototypes; the feature dimension is K − 1
    label_rows: LabelRows = "from_end"  # from_end: label y -> row K−1−y (authors' code); upstream: the other end
    ce_weight: float = 0.1  # λ
    mu: float = 10.0  # μ, the scale of the cosine similarities in L_HOC
    same_class: SameClass = "zero"  # zero (authors' code): same-class entries count e^0 = 1 each; mask: InfoNCE
    anchor: Literal["replacement", "replaced"] = "replacement"  # previous model at a replacement step

    def __post_init__(self):
        require(self.num_classes >= 2, "num_classes", "must be >= 2")
        require(0 <= self.ce_weight <= 1, "ce_weight", "must be in [0, 1]")
        require(self.mu > 0, "mu", "must be > 0")


def hoc_loss(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, mu: float = 10.0,
             same_class: SameClass = "zero") -> torch.Tensor:
    """L_HOC = mean_i [ −μ a_i·b_i + log Σ_j exp(S_ij) ] with a = norm(old), b = norm(new), S = μ a bᵀ.

    ``zero`` (reference): S is multiplied by 𝟙[y_j ≠ y_i], so every same-class entry — the positive
    included — contributes e⁰ = 1 and the partition is Σ_{y_j≠y_i} exp(S_ij) + n_i. ``mask``: same-class
    entries other than the positive are removed, so the partition is exp(S_ii) + Σ_{y_j≠y_i} exp(S_ij).
    """
    a, b = F.normalize(old, dim=1), F.normalize(new, dim=1)
    sims = mu * a @ b.T
    different = labels[:, None] != labels[None, :]
    if same_class == "zero":
        partition = torch.logsumexp(sims * different, dim=1)
    else:
        keep = different | torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        partition = torch.logsumexp(sims.masked_fill(~keep, float("-inf")), dim=1)
    return (partition - sims.diagonal()).mean()


class StationaryNet(nn.Module):
    """backbone -> d-Simplex head; ``forward`` gives the junction ``feature`` and the K ``logits``."""

    def __init__(self, cfg: ModelConfig, num_classes: int, rows: LabelRows):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.head = DSimplexHead(self.backbone.out_dim, num_classes, rows)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(self.backbone(x))


@register
class Stationary(Method):
    name = "stationary"
    Params = StationaryParams
    needs_previous = True
    model_keys = frozenset({"backbone", "width", "stem"})  # the d-Simplex junction fixes the feature's width

    def build_model(self, ctx: StepContext) -> StationaryNet:
        if ctx.num_seen > self.params.num_classes:
            raise ConfigError("params.num_classes", f"preallocates {self.params.num_classes} classes, but step "
                                                    f"{ctx.index} knows {ctx.num_seen}")
        return StationaryNet(self.model_cfg, self.params.num_classes, self.params.label_rows)

    def growable_prefixes(self) -> tuple[str, ...]:
        return ()  # the classifier is fixed and shared: nothing grows, nothing is re-initialised

    def anchor_checkpoint(self, ctx: StepContext) -> Optional[Union[int, Weights]]:
        if ctx.index == 0 or (ctx.event == "replace" and self.params.anchor == "replacement"):
            return ctx.init_checkpoint
        return ctx.index - 1

    @classmethod
    def upstream_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Models trained elsewhere write their classes from the other end of the shared table."""
        rows = params.get("label_rows", StationaryParams.label_rows)
        return {**params, "label_rows": other_end(rows)}

    def prepare(self, ctx: StepContext, model, previous, loader) -> dict:
        return {} if previous is None else {"anchor": previous}

    def loss(self, outputs, images, labels, state, ctx: StepContext):
        targets = label_rows(labels, self.params.num_classes, self.params.label_rows)
        ce = F.cross_entropy(outputs["logits"], targets, label_smoothing=self.label_smoothing(ctx))
        if "anchor" not in state:
            return ce, {"ce": ce}
        with torch.no_grad():
            old = state["anchor"](images)["feature"]
        hoc = hoc_loss(old, outputs["feature"], labels, self.params.mu, self.params.same_class)
        lam = self.params.ce_weight
        return lam * ce + (1 - lam) * hoc, {"ce": ce, "hoc": hoc}

    def embed(self, model: StationaryNet, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.head.junction(model.backbone(images)), dim=1)

    def classify(self, model: StationaryNet, images: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return model.head.classifier.class_logits(model(images)["logits"], ctx.num_seen)

    def describe(self) -> dict:
        return {**super().describe(), "feature_dim": self.params.num_classes - 1}

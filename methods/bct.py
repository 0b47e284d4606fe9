"""``bct``: Backward-Compatible Training (Shen et al., CVPR 2020).

The new model's features must also be classified correctly by the *old* model's classifier (the
"influence loss"), which keeps them in the old embedding space. Two variants (docs/methods/bct.md):

- ``paper``: the old model's real classifier rows for old classes plus *synthesised* rows (old-model
  class means) for classes the old model never saw; λ = 1.
- ``class_means`` (default; ml-fct / BT-2 / OCA codebases): old-model class means for *all* classes.

The logit scale of the influence term decides whether BCT actually satisfies the empirical
compatibility criterion on small data: ``class_means`` defaults to 16, ``paper`` to 1 (the old
classifier already carries its own scale). The resolved value is recorded in run metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from methods.base import StepContext, register
from methods.independent import Independent
from methods.nets.prototypes import compute_prototypes
from orchestrator.config.typed import require


@dataclass
class BCTParams:
    # the old classifier: old-model class means for all classes, or (paper) the old model's real rows
    # plus class means for the classes it never saw
    variant: Literal["class_means", "paper"] = "class_means"
    weight: float = 1.0  # λ, the influence-loss weight
    logit_scale: Optional[float] = None  # None: 16 for class_means, 1 for paper
    normalize_synthesized: bool = False  # paper variant: L2-normalise the synthesised new-class rows
    anchor: Literal["previous", "first"] = "previous"  # the version whose classifier the influence loss uses

    def __post_init__(self):
        require(self.weight >= 0, "weight", "must be >= 0")
        require(self.logit_scale is None or self.logit_scale > 0, "logit_scale", "must be > 0")

    @property
    def resolved_scale(self) -> float:
        if self.logit_scale is not None:
            return self.logit_scale
        return 16.0 if self.variant == "class_means" else 1.0


def influence_loss(features: torch.Tensor, labels: torch.Tensor, old_classifier: torch.Tensor,
                   logit_scale: float, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of the new features under the frozen old classifier (rows = classes)."""
    logits = logit_scale * features @ old_classifier.T
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def paper_old_classifier(old_rows: torch.Tensor, prototypes: torch.Tensor, normalize_synthesized: bool) -> torch.Tensor:
    """Real old-classifier rows for the classes it knows + old-model class means for the rest."""
    synthesized = prototypes[old_rows.shape[0]:]
    if normalize_synthesized:
        synthesized = F.normalize(synthesized, dim=1)
    return torch.cat([old_rows, synthesized])


@register
class BCT(Independent):
    name = "bct"
    Params = BCTParams
    needs_previous = True

    def anchor_checkpoint(self, ctx: StepContext) -> Optional[Union[int, str]]:
        """``first``: every version is aligned to version 0, the model that embedded the oldest gallery,
        instead of through its predecessor (compatibility with v0 is then not left to transitivity)."""
        if ctx.index == 0:
            return None
        return 0 if self.params.anchor == "first" else ctx.index - 1

    def prepare(self, ctx: StepContext, model, previous, loader) -> dict:
        if previous is None:  # the first version has nothing to be compatible with
            return {}
        prototypes = compute_prototypes(lambda x: previous.net(x), loader, ctx.num_seen)
        if self.params.variant == "paper":
            old_rows = previous.classifier.weight.detach()
            return {"old_classifier": paper_old_classifier(old_rows, prototypes, self.params.normalize_synthesized)}
        return {"old_classifier": prototypes}

    def loss(self, outputs, images, labels, state, ctx: StepContext):
        ce, parts = super().loss(outputs, images, labels, state, ctx)
        if "old_classifier" not in state:
            return ce, parts
        influence = influence_loss(outputs["feature"], labels, state["old_classifier"],
                                   self.params.resolved_scale, ctx.training.label_smoothing)
        return ce + self.params.weight * influence, {**parts, "influence": influence}

    def describe(self) -> dict:
        return {**super().describe(), "logit_scale": self.params.resolved_scale}

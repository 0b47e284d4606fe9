"""``bct``: Backward-Compatible Training (Shen et al., CVPR 2020).

The new model's features must also be classified correctly by the *old* model's classifier (the
"influence loss"), which keeps them in the old embedding space (docs/methods/bct.md):

    L = CE(w_new · h, y) + λ · CE(s · h · W_oldᵀ, y)

Two ways to build W_old, each with its own defaults:

- ``paper`` (the default; the paper's setting): the old model's real classifier rows for the classes it
  knew, plus *synthesised* rows — the old model's mean (L2-normalised) feature of each class it never saw,
  over this step's training data — for the rest; λ = 1.
- ``class_means`` (how the BT² and OCA codebases configure BCT): the old model's class means for *all*
  classes, the old classifier unused; λ = 10, and the class means are taken under the training
  augmentation, as those codebases do.

Neither reference scales the influence logits (s = 1); ``logit_scale`` exposes s because on small
data whether BCT satisfies the compatibility criterion depends on it. Every resolved value is recorded
in the run metadata (:meth:`BCT.describe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from methods.base import StepContext, Weights, register
from methods.independent import Independent
from methods.nets.prototypes import compute_prototypes
from orchestrator.config.typed import require

Variant = Literal["paper", "class_means"]
Transform = Literal["train", "test"]

# The values each variant's reference uses when a key is left unset.
VARIANT_DEFAULTS: dict[str, dict] = {
    "paper": {"weight": 1.0, "prototype_transform": "test"},
    "class_means": {"weight": 10.0, "prototype_transform": "train"},
}


@dataclass
class BCTParams:
    # the old classifier: paper = the old model's real rows plus class means for the classes it never
    # saw; class_means = old-model class means for all classes (the BT² and OCA codebases)
    variant: Variant = "paper"
    weight: Optional[float] = None  # λ, the influence-loss weight; None: the variant's (paper 1, class_means 10)
    logit_scale: float = 1.0  # s, the scale of the influence logits; neither reference scales them
    # Transform of the images the class means are computed on; None: the variant's (paper: test-time,
    # class_means: the training augmentation, as the BT² and OCA codebases do)
    prototype_transform: Optional[Transform] = None
    normalize_synthesized: bool = False  # paper variant: L2-normalise the synthesised new-class rows
    anchor: Literal["previous", "first"] = "previous"  # the version whose classifier the influence loss uses

    def __post_init__(self):
        require(self.weight is None or self.weight >= 0, "weight", "must be >= 0")
        require(self.logit_scale > 0, "logit_scale", "must be > 0")
        require(not self.normalize_synthesized or self.variant == "paper", "normalize_synthesized",
                "only applies to variant 'paper' (class_means synthesises no rows of its own: every row is a "
                "class mean); remove it or set variant: paper")

    @property
    def resolved_weight(self) -> float:
        return VARIANT_DEFAULTS[self.variant]["weight"] if self.weight is None else self.weight

    @property
    def resolved_transform(self) -> Transform:
        if self.prototype_transform is None:
            return VARIANT_DEFAULTS[self.variant]["prototype_transform"]
        return self.prototype_transform


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

    def anchor_checkpoint(self, ctx: StepContext) -> Optional[Union[int, Weights]]:
        """``first``: every version is aligned to version 0, the model that embedded the oldest gallery,
        instead of through its predecessor (compatibility with v0 is then not left to transitivity)."""
        if ctx.index == 0:
            return None
        return 0 if self.params.anchor == "first" else ctx.index - 1

    def prepare_transform(self) -> Transform:
        return self.params.resolved_transform

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
                                   self.params.logit_scale, self.label_smoothing(ctx))
        return ce + self.params.resolved_weight * influence, {**parts, "influence": influence}

    def describe(self) -> dict:
        return {**super().describe(), "weight": self.params.resolved_weight,
                "prototype_transform": self.params.resolved_transform}

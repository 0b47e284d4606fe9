"""``oca``: Orthogonal Compatible Aligned representations (Ricci et al., ECCV 2024 BEW, arXiv 2408.08793).

Version t widens the embedding to ``d_t = model.embedding_dim + t * delta_dim``. Its normalised feature
h feeds an orthogonal affine layer Q·h + b (exact by parametrisation, no penalty) and a bias-free
classifier; the first d_{t-1} dims of h are pulled onto fixed class prototypes built once from the
previous version's served feature (docs/methods/oca.md):

    L = w1·LS-CE(fc(Q·h + b), y) + w2·LS-CE(ĥ·Pᵀ, y) + w3·(1 − cos(ĥ, P_y)),  ĥ = norm(h[:d_{t-1}])

The served feature is the normalised pre-orthogonal h, all d_t dims; against an older gallery the
evaluator truncates both sides to the smaller width and re-normalises, which yields exactly ĥ. Version
0 has nothing to align to: it is the plain ``independent`` network and loss, so with the same seed it
is the very same old model as the ``independent`` and ``bct`` runs beside it. Chains of T > 2 versions
align each version to its predecessor only by default, so compatibility with older versions is
transitive; ``align_to: all`` adds one prototype term per earlier version (an ablation), each on
that version's own prefix, the terms averaged so the alignment keeps the weights w2 and w3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from methods.base import StepContext, Weights, register
from methods.nets.heads import ClassifierNet
from methods.independent import Independent
from methods.nets.prototypes import compute_prototype_sets
from orchestrator.config.typed import require
from orchestrator.config import ModelConfig


@dataclass
class OCAParams:
    delta_dim: int = 32  # Δd: dims each version adds to its predecessor's embedding
    classifier_weight: float = 5.0  # w1: LS-CE of the classifier on Q·h + b
    prototype_weight: float = 10.0  # w2: LS-CE of the prototype logits ĥ·Pᵀ (no temperature)
    cosine_weight: float = 5.0  # w3: 1 − cos(ĥ, P_y)
    rotation_bias: bool = True  # the orthogonal layer is affine (Q·h + b), as in the authors' code
    renormalize_prototypes: bool = False  # the authors' code: class means of normalised features, not re-normalised
    prototype_transform: Literal["train", "test"] = "train"  # train: the training augmentation (authors' code)
    align_to: Literal["previous", "all"] = "previous"  # chains: the predecessor only, or every earlier version

    def __post_init__(self):
        require(self.delta_dim >= 0, "delta_dim", "must be >= 0")
        for name in ("classifier_weight", "prototype_weight", "cosine_weight"):
            require(getattr(self, name) >= 0, name, "must be >= 0")


class OCANet(ClassifierNet):
    """Normalised embedding h -> (orthogonal affine layer) -> bias-free classifier.

    Without ``rotation`` (version 0) this is exactly :class:`ClassifierNet` with a normalised feature,
    parameters created in the same order, so the same seed gives the same weights.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, embedding_dim: int, rotation: bool, rotation_bias: bool):
        super().__init__(cfg, num_classes, embedding_dim)
        self.rotation = orthogonal(nn.Linear(embedding_dim, embedding_dim, bias=rotation_bias)) if rotation else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """OCA's h is always L2-normalised: the orthogonal layer and the alignment act on the unit sphere."""
        return F.normalize(self.net(x), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.features(x)
        rotated = feature if self.rotation is None else self.rotation(feature)
        return {"feature": feature, "rotated": rotated, "logits": self.classifier(rotated)}


def oca_loss(logits: torch.Tensor, feature: torch.Tensor, labels: torch.Tensor,
             prototypes: torch.Tensor | list[torch.Tensor], *, classifier_weight: float, prototype_weight: float,
             cosine_weight: float, label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The OCA loss and its three (unweighted) parts.

    ``prototypes`` (C, d_old) fix how many leading dims of ``feature`` (B, d) are aligned: those are
    re-normalised into ĥ; the prototype logits ĥ·Pᵀ have no temperature, so they stay in [−1, 1]. A list
    of prototype sets (one per earlier version, each its own width) averages their two alignment terms.
    """
    sets = prototypes if isinstance(prototypes, list) else [prototypes]
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    prototype_ce = cosine = 0.0
    for protos in sets:
        aligned = F.normalize(feature[:, : protos.shape[1]], dim=1)
        prototype_ce = prototype_ce + F.cross_entropy(aligned @ protos.T, labels, label_smoothing=label_smoothing)
        cosine = cosine + (1 - F.cosine_similarity(aligned, protos[labels], dim=1)).mean()
    prototype_ce, cosine = prototype_ce / len(sets), cosine / len(sets)
    total = classifier_weight * ce + prototype_weight * prototype_ce + cosine_weight * cosine
    return total, {"ce": ce, "prototype_ce": prototype_ce, "cosine": cosine}


@register
class OCA(Independent):
    name = "oca"
    Params = OCAParams
    needs_previous = True
    model_keys = Independent.model_keys - {"normalize"}  # h is always normalised

    def embedding_dim(self, index: int) -> int:
        """Width of version ``index``: the configured width plus Δd per earlier upgrade."""
        return self.model_cfg.embedding_dim + index * self.params.delta_dim

    def first_version_recipe(self) -> Optional[str]:
        """Version 0 is independent's model when that one normalises its feature too (OCA always does)."""
        return super().first_version_recipe() if self.model_cfg.normalize else None

    def build_model(self, ctx: StepContext) -> OCANet:
        return OCANet(self.model_cfg, ctx.num_seen, self.embedding_dim(ctx.index),
                      rotation=not ctx.is_first, rotation_bias=self.params.rotation_bias)

    def growable_prefixes(self) -> tuple[str, ...]:
        return ("classifier.", "net.embedding.")

    def load_weights(self, model: OCANet, checkpoint: Weights, strict: bool, keep_fresh: tuple[str, ...] = ()) -> None:
        """Starting from a narrower version (fine-tuning), backbone and embedding load (the embedding
        grows, its first rows copied) but the orthogonal layer starts fresh: an orthogonal matrix cannot
        be grown by padding, and the layer is a training-only head anyway."""
        super().load_weights(model, checkpoint, strict, keep_fresh if strict else (*keep_fresh, "rotation."))

    def prepare_transform(self) -> Literal["train", "test"]:
        return self.params.prototype_transform

    def prepare(self, ctx: StepContext, model, previous, loader) -> dict:
        if previous is None:  # version 0 has nothing to align to
            return {}
        anchors = [previous]
        if self.params.align_to == "all":
            anchors = [ctx.load_version(k) for k in range(ctx.index - 1)] + anchors
        embeds = [functools.partial(self.embed, anchor) for anchor in anchors]
        return {"prototypes": compute_prototype_sets(embeds, loader, ctx.num_seen, self.params.renormalize_prototypes)}

    def loss(self, outputs, images, labels, state, ctx: StepContext):
        if "prototypes" not in state:
            return super().loss(outputs, images, labels, state, ctx)
        p = self.params
        return oca_loss(outputs["logits"], outputs["feature"], labels, state["prototypes"],
                        classifier_weight=p.classifier_weight, prototype_weight=p.prototype_weight,
                        cosine_weight=p.cosine_weight, label_smoothing=self.label_smoothing(ctx))

"""``adapter``: training-free compatibility — a map fitted on paired embeddings, no compatibility loss.

Each version trains exactly like ``independent`` (or is loaded, untrained, from an earlier method of
the experiment named by ``base``: many adapters then share one trained chain); then a map between its space and an older version's is
fitted in closed form (or, for the residual MLP, by a short full-batch optimisation) on ``pairs``
training images embedded by both models (docs/methods/adapters.md). Two directions:

- ``new_to_old`` (Drift-Adapter style): the version serves its own embedding mapped into version 0's
  space, the space of a gallery that is never re-embedded; the map is part of the version's weights.
- ``old_to_new`` (FCT style): the version serves its own embedding; the map takes the vectors stored
  under the previous version into this version's space, and the protocol applies it to every older
  gallery (orchestrator/engine/gallery_upgrade.py), so nothing is re-embedded.

Kinds: ``orthogonal`` (Procrustes), ``affine`` (least squares), ``low_rank`` (reduced-rank regression),
``residual_mlp`` (affine + a one-hidden-layer ReLU correction). The fits live in methods/alignment.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods import alignment
from methods.base import StepContext, register
from methods.independent import Independent
from methods.nets.heads import ClassifierNet, served_embedding
from orchestrator.config.typed import require
from orchestrator.errors import ConfigError, DataError

Kind = Literal["orthogonal", "affine", "low_rank", "residual_mlp"]
Direction = Literal["new_to_old", "old_to_new"]


@dataclass
class AdapterParams:
    kind: Kind = "affine"  # orthogonal | affine | low_rank | residual_mlp
    direction: Direction = "new_to_old"  # new_to_old: queries into version 0's gallery; old_to_new: upgrade stored vectors
    pairs: int = 1000  # paired (old, new) embeddings of this step's training images the map is fitted on
    # label of an earlier method (same network, e.g. independent) whose versions the maps adapt, loaded
    # untrained; None: each version trains here, exactly as independent's would
    base: Optional[str] = None
    rank: Optional[int] = None  # low_rank only: the rank of the linear part (required there)
    hidden: Optional[int] = None  # residual_mlp only: width of the hidden layer (default 128)
    fit_steps: Optional[int] = None  # residual_mlp only: full-batch Adam steps (default 300)
    fit_lr: Optional[float] = None  # residual_mlp only: Adam's learning rate (default 0.01)

    def __post_init__(self):
        require(self.pairs >= 1, "pairs", "must be >= 1")
        require((self.rank is not None) == (self.kind == "low_rank"), "rank",
                "is required by kind low_rank and applies to no other kind")
        require(self.rank is None or self.rank >= 1, "rank", "must be >= 1")
        for key in ("hidden", "fit_steps", "fit_lr"):
            require(getattr(self, key) is None or self.kind == "residual_mlp", key, "applies only to kind residual_mlp")
            require(getattr(self, key) is None or getattr(self, key) > 0, key, "must be > 0")

    @property
    def resolved(self) -> dict:
        """The residual MLP's optimisation settings, defaults filled in."""
        return {"hidden": self.hidden or 128, "steps": self.fit_steps or 300, "lr": self.fit_lr or 1e-2}


def minimum_pairs(kind: str, dim: int) -> int:
    """Pairs a map from a ``dim``-wide space needs to be determined: a rotation ``dim`` (xᵀy must have full
    rank), any map with an intercept ``dim + 1`` (the coefficients of one output coordinate)."""
    return dim if kind == "orthogonal" else dim + 1


class FittedMap(nn.Module):
    """A map fitted after training, held in buffers (saved with the version, never trained)."""

    def __init__(self, dim_in: int, dim_out: int, hidden: Optional[int]):
        super().__init__()
        shapes = {"weight": (dim_in, dim_out), "bias": (dim_out,)}
        if hidden is not None:
            shapes.update(hidden_weight=(dim_in, hidden), hidden_bias=(hidden,), out_weight=(hidden, dim_out))
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape))

    def load(self, arrays: alignment.MapArrays) -> None:
        for name, buffer in self.named_buffers():
            buffer.copy_(torch.from_numpy(arrays[name]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return alignment.apply_map(dict(self.named_buffers()), x)


class AdaptedClassifier(ClassifierNet):
    """A ClassifierNet whose served embedding passes through ``to_first`` (a map into version 0's space)."""

    def __init__(self, cfg, num_classes: int, hidden: Optional[int]):
        super().__init__(cfg, num_classes)
        self.to_first = FittedMap(self.embedding_dim, self.embedding_dim, hidden)


@register
class Adapter(Independent):
    """Trains like ``independent``, then fits the configured map on paired embeddings."""

    name = "adapter"
    Params = AdapterParams
    needs_previous = True

    def check_params(self, key: str) -> None:
        dim, p = self.model_cfg.embedding_dim, self.params
        needed = minimum_pairs(p.kind, dim)
        if p.pairs < needed:
            raise ConfigError(f"{key}.pairs", f"is {p.pairs}, but a {p.kind} map of {dim}-dimensional embeddings "
                                              f"(model.embedding_dim) needs at least {needed} pairs to be determined")
        if p.rank is not None and p.rank > dim:
            raise ConfigError(f"{key}.rank", f"is {p.rank}, above the embedding width {dim} (model.embedding_dim)")

    def weights_from(self) -> Optional[str]:
        return self.params.base

    def upgrades_stored_vectors(self) -> bool:
        return self.params.direction == "old_to_new"

    def _hidden(self) -> Optional[int]:
        return self.params.resolved["hidden"] if self.params.kind == "residual_mlp" else None

    def build_model(self, ctx: StepContext) -> ClassifierNet:
        if ctx.index > 0 and self.params.direction == "new_to_old":
            return AdaptedClassifier(self.model_cfg, ctx.num_seen, self._hidden())
        return ClassifierNet(self.model_cfg, ctx.num_seen)

    def anchor_checkpoint(self, ctx: StepContext):
        """new_to_old: version 0, whose space every later version serves in; old_to_new: the previous
        version, whose stored vectors this version's map upgrades."""
        if ctx.index == 0:
            return None
        return 0 if self.params.direction == "new_to_old" else ctx.index - 1

    def embed(self, model: ClassifierNet, images: torch.Tensor) -> torch.Tensor:
        own = served_embedding(model, images)
        return F.normalize(model.to_first(own), dim=1) if isinstance(model, AdaptedClassifier) else own

    @torch.no_grad()
    def after_training(self, ctx: StepContext, model, previous, loader) -> Optional[dict[str, torch.Tensor]]:
        if previous is None:
            return None
        new, old = [], []
        for images, _ in loader:
            new.append(served_embedding(model, images).double().cpu())
            old.append(self.embed(previous, images).double().cpu())
        new, old = torch.cat(new).numpy(), torch.cat(old).numpy()
        if len(new) < self.params.pairs:
            raise DataError(f"adapter: params.pairs is {self.params.pairs}, but step {ctx.index} trains on only "
                            f"{len(new)} images; lower pairs to at most {len(new)}")
        pick = np.sort(np.random.default_rng([ctx.seed, ctx.index, 5303]).choice(len(new), self.params.pairs, replace=False))
        if self.params.direction == "new_to_old":
            model.to_first.load(self.fit(new[pick], old[pick], ctx))
            return None
        return {k: torch.from_numpy(v).float() for k, v in self.fit(old[pick], new[pick], ctx).items()}

    def fit(self, x: np.ndarray, y: np.ndarray, ctx: StepContext) -> alignment.MapArrays:
        """The configured kind of map from rows of ``x`` to rows of ``y``."""
        kind = self.params.kind
        if kind == "orthogonal":
            return alignment.affine_map(alignment.orthogonal_procrustes(x, y))
        if kind == "affine":
            return alignment.affine_map(*alignment.affine_least_squares(x, y))
        if kind == "low_rank":
            return alignment.affine_map(*alignment.low_rank_affine(x, y, self.params.rank))
        settings = self.params.resolved
        return alignment.fit_residual_mlp(x, y, settings["hidden"], settings["steps"], settings["lr"],
                                          seed=ctx.seed * 1000 + ctx.index)

    def describe(self) -> dict:
        out = {**super().describe()}
        if self.params.kind == "residual_mlp":
            out.update({f"resolved_{k}": v for k, v in self.params.resolved.items()})
        return out

"""Orthogonal Procrustes: the training-free baseline that maps new embeddings into the old space.

Fitted in closed form on paired embeddings of the same captions (docs/methods/procrustes.md): with the thin
SVD X_newᵀ X_old = U Σ Vᵀ, the map is W = U Vᵀ (d_new × d_old). When d_new ≥ d_old, W has orthonormal
columns (WᵀW = I: the new space is projected onto d_old orthonormal directions); when d_new < d_old,
orthonormal rows (WWᵀ = I: the new space is embedded isometrically in the old one). Either way W is the
semi-orthogonal matrix closest to the cross-covariance, i.e. it maximises tr(Wᵀ X_newᵀ X_old). The fit is
the one the image adapters use (methods/alignment.py).
"""

from __future__ import annotations

import torch
from torch import nn

from methods.alignment import orthogonal_procrustes
from methods.crossmodal_base import CrossModalMethod, ProjectedCLIP, StageContext, State, TextPairs, register_crossmodal


class FixedMap(nn.Module):
    """x -> x W with a fixed (buffer, not parameter) W; :class:`ProjectedCLIP` re-normalises the result."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


@register_crossmodal
class Procrustes(CrossModalMethod):
    """Fit W on the text pairs of the corpus (the published text-only support); no training at all."""

    name = "procrustes"

    def stages(self):
        return {"text": self.fit_text}

    def fit_text(self, pairs: TextPairs, state: State, ctx: StageContext) -> State:
        weight = orthogonal_procrustes(pairs.new.cpu().numpy(), pairs.old.cpu().numpy())
        return {"weight": torch.from_numpy(weight).float()}

    def query_encoder(self, new_clip: nn.Module, state: State, new_dim: int, old_dim: int) -> ProjectedCLIP:
        return ProjectedCLIP(new_clip, FixedMap(state["weight"])).eval()

"""Fixed class prototypes from an old model: per-sample L2-normalised features, averaged per class.

Used by BCT's class-means variant (and its synthesised rows), OCA and the replay-free alignment
losses. The mean is *not* re-normalised (reference behaviour), so ``||P_c|| <= 1``.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int, renormalize: bool = False) -> torch.Tensor:
    """Mean of the L2-normalised ``features`` of each class; rows of absent classes are zero."""
    feats = F.normalize(features.float(), dim=1)
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats.dtype)
    means = sums / counts[:, None]
    return F.normalize(means, dim=1) if renormalize else means


@torch.no_grad()
def compute_prototypes(embed: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       num_classes: int, renormalize: bool = False) -> torch.Tensor:
    """Run ``embed`` once over ``batches`` of (images, labels) and return the class means."""
    return compute_prototype_sets([embed], batches, num_classes, renormalize)[0]


@torch.no_grad()
def compute_prototype_sets(embeds: Sequence[Callable[[torch.Tensor], torch.Tensor]],
                           batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                           renormalize: bool = False) -> list[torch.Tensor]:
    """The class means of several models' features, in one pass over ``batches``."""
    feats: list[list[torch.Tensor]] = [[] for _ in embeds]
    labels = []
    for images, y in batches:
        for out, embed in zip(feats, embeds):
            out.append(embed(images))
        labels.append(y)
    y = torch.cat(labels)
    return [class_means(torch.cat(f), y, num_classes, renormalize) for f in feats]

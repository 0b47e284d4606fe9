"""The network most methods share: an embedding backbone followed by a bias-free linear classifier.

Its ``forward`` returns every tensor a loss may need in one dict, so the engine can run it through
DDP and hand the outputs to the method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.nets.backbones import EmbeddingNet
from orchestrator.config import ModelConfig


class ClassifierNet(nn.Module):
    """EmbeddingNet -> (optional L2 normalisation) -> bias-free Linear(num_classes)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, embedding_dim: int | None = None):
        super().__init__()
        self.net = EmbeddingNet(cfg, embedding_dim)
        self.normalize = cfg.normalize
        self.classifier = nn.Linear(self.net.embedding_dim, num_classes, bias=False)

    @property
    def embedding_dim(self) -> int:
        return self.net.embedding_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature the classifier sees: the embedding, L2-normalised when configured."""
        h = self.net(x)
        return F.normalize(h, dim=1) if self.normalize else h

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feature = self.features(x)
        return {"feature": feature, "logits": self.classifier(feature)}


def served_embedding(model: ClassifierNet, images: torch.Tensor) -> torch.Tensor:
    """Retrieval feature of a ClassifierNet: the L2-normalised embedding."""
    return F.normalize(model.net(images), dim=1)

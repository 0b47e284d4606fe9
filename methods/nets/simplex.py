"""The d-Simplex fixed classifier (docs/methods/stationary.md).

K class prototypes form a regular simplex in R^{K-1}: unit rows, centred at 0, every pairwise cosine
−1/(K−1). The table is built from K alone, so every model that uses the same K shares the identical
classifier without storing it — that shared, frozen W is the contract that makes independently trained
models compatible. K is preallocated (default 1024) so classes can arrive for a long time without the
geometry ever changing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LabelRows = Literal["from_end", "from_start"]


def dsimplex(num_classes: int) -> torch.Tensor:
    """The (K, K−1) d-Simplex prototypes, float32.

    With n = K−1: rows 1..n of T are I_n, every entry of row n+1 is (1 − √(n+1))/n; subtract the column
    means, then L2-normalise the rows. Computed in float64 so K = 1024 keeps its cosines exact to float32.
    """
    if num_classes < 2:
        raise ValueError(f"a d-Simplex needs at least 2 classes, got {num_classes}")
    n = num_classes - 1
    table = torch.cat([torch.eye(n, dtype=torch.float64),
                       torch.full((1, n), (1 - (n + 1) ** 0.5) / n, dtype=torch.float64)])
    table = table - table.mean(dim=0, keepdim=True)
    return F.normalize(table, dim=1).float()


def label_rows(labels: torch.Tensor, num_classes: int, mode: LabelRows) -> torch.Tensor:
    """Prototype row of each class label: ``from_end`` writes label y to row K−1−y (the reference's
    mapping, which leaves the first rows to models trained elsewhere), ``from_start`` to row y."""
    return num_classes - 1 - labels if mode == "from_end" else labels


def other_end(mode: LabelRows) -> LabelRows:
    """The mapping that fills the table from the opposite end, so two class sets never share a row."""
    return "from_start" if mode == "from_end" else "from_end"


class DSimplexClassifier(nn.Module):
    """logits = W z with the fixed d-Simplex W: no bias, no scale, no trainable parameter.

    W is a non-persistent buffer: it moves with the module's device but is not saved in checkpoints,
    because it is rebuilt identically from K (a checkpoint of another K fails on the junction's shape).
    """

    def __init__(self, num_classes: int = 1024, rows: LabelRows = "from_end"):
        super().__init__()
        self.num_classes = num_classes
        self.rows = rows
        self.register_buffer("weight", dsimplex(num_classes), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.num_classes - 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy targets (prototype rows) of class labels."""
        return label_rows(labels, self.num_classes, self.rows)

    def class_logits(self, logits: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Columns of labels 0..num_classes−1, in label order (for accuracy over the classes seen)."""
        rows = self.targets(torch.arange(num_classes, device=logits.device))
        return logits[:, rows]


class DSimplexHead(nn.Module):
    """Backbone features -> trainable junction (bias-free Linear to K−1, only when the widths differ)
    -> fixed d-Simplex classifier. ``forward`` returns the unnormalised junction output as ``feature``
    (the input to W, and the retrieval feature once normalised) and the K ``logits``."""

    def __init__(self, in_dim: int, num_classes: int = 1024, rows: LabelRows = "from_end"):
        super().__init__()
        self.classifier = DSimplexClassifier(num_classes, rows)
        dim = self.classifier.feature_dim
        self.junction = nn.Identity() if in_dim == dim else nn.Linear(in_dim, dim, bias=False)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.junction(features)
        return {"feature": z, "logits": self.classifier(z)}

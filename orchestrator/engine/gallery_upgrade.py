"""Stored vectors upgraded in place: what an older gallery becomes before a newer version's queries search it.

A version may declare a map from the previous version's space into its own (an old-to-new adapter,
FCT-style: the service transforms the vectors it stores instead of re-embedding its items). At each
upgrade the whole stored gallery passes through that version's map, so the gallery embedded by version j
reaches version i's space through the maps of versions j+1..i in turn, each output L2-normalised as the
next map was fitted on (unit vectors). Versions that declare no map leave the vectors as they are.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from methods.alignment import apply_map
from orchestrator.evaluation.retrieval import Upgrade
from orchestrator.storage import runfiles



def stored_vector_upgrade(run: runfiles.Run, method: str, version: int) -> Optional[Upgrade]:
    """``upgrade(j, i, vectors)`` for the compatibility row of ``version``, or None when no version up to
    it declares a map (the row then compares stored vectors as they are)."""
    maps = {k: runfiles.gallery_upgrade(run, method, k) for k in range(1, version + 1)}
    maps = {k: m for k, m in maps.items() if m is not None}
    if not maps:
        return None

    def upgrade(j: int, i: int, vectors: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(vectors, dtype=np.float64))
        for k in (k for k in range(j + 1, i + 1) if k in maps):
            params = {name: t.to(torch.float64) for name, t in maps[k].items()}
            x = torch.nn.functional.normalize(apply_map(params, x), dim=1)
        return np.ascontiguousarray(x.numpy(), dtype=np.float32)

    return upgrade

"""Building a T = 10 compatibility matrix: store-backed vs recomputing the gallery for every pair.

Store-backed (this project): each version embeds the evaluation set once (T forward passes over it),
rows are computed from the stored vectors. Recompute-per-pair (the reference codes' schedule): for
every cell (i, j <= i) the gallery is re-embedded by model j, queries once per row: T(T+1)/2 + T
passes. Both produce the same matrix (checked). Target: >= 5x fewer passes and proportionally less time.

    python bench/matrix.py [--versions 10] [--images 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import ClassifierNet, served_embedding

from orchestrator.config import EvaluationConfig, ModelConfig
from orchestrator.evaluation import compatibility_row, retrieval_scores
from orchestrator.evaluation.flips import TOP1_CORRECT, unpack_correct
from orchestrator.storage.store import EmbeddingStore


class CountingEmbedder:
    """Embeds whole evaluation sets and counts the passes."""

    def __init__(self, images: torch.Tensor):
        self.images, self.passes = images, 0

    @torch.no_grad()
    def __call__(self, model: ClassifierNet) -> np.ndarray:
        self.passes += 1
        return np.concatenate([served_embedding(model, self.images[s:s + 500]).numpy()
                               for s in range(0, len(self.images), 500)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    T, n = args.versions, args.images
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((n, 3, 32, 32), dtype=np.float32))
    labels = rng.integers(0, 20, n)
    models = []
    for t in range(T):
        torch.manual_seed(t)
        models.append(ClassifierNet(ModelConfig(), 20).eval())
    eval_cfg = EvaluationConfig()

    embed = CountingEmbedder(images)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(tmp)
        store_matrix, diagonal_top1 = [], []
        for t, model in enumerate(models):
            store.write("m", t, "test", embed(model), labels.astype(np.int32), np.arange(n), metadata={"normalized": True})
            row = compatibility_row(store, "m", t, eval_cfg, earlier_top1=diagonal_top1)
            store_matrix.append(row["cmc1"])
            diagonal_top1.append(unpack_correct(row[TOP1_CORRECT]))
    store_seconds, store_passes = time.time() - started, embed.passes

    embed = CountingEmbedder(images)
    started = time.time()
    naive_matrix = []
    for i in range(T):
        query = embed(models[i])
        row = [retrieval_scores(query, labels, embed(models[j]), labels, leave_one_out=True)["cmc1"] for j in range(i + 1)]
        naive_matrix.append(row)
    naive_seconds, naive_passes = time.time() - started, embed.passes

    same = all(np.allclose(a, b) for a, b in zip(store_matrix, naive_matrix))
    print(f"T = {T} versions, {n} evaluation images; matrices identical: {same}")
    print(f"{'schedule':22s} {'forward passes':>15s} {'seconds':>9s}")
    print(f"{'store-backed':22s} {store_passes:15d} {store_seconds:9.2f}")
    print(f"{'recompute per pair':22s} {naive_passes:15d} {naive_seconds:9.2f}")
    print(f"fewer passes: {naive_passes / store_passes:.1f}x   less time: {naive_seconds / store_seconds:.1f}x  (target >= 5x)")


if __name__ == "__main__":
    main()

"""Baselines shared by the benchmarks: the same training as a step, as a bare PyTorch loop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from methods.nets.heads import ClassifierNet, served_embedding  # noqa: E402
from methods.independent import Independent  # noqa: E402
from orchestrator.config import ExperimentConfig  # noqa: E402
from orchestrator.data import load_split  # noqa: E402
from orchestrator.data.transforms import make_transform  # noqa: E402
from orchestrator.engine.scenarios import plan_steps  # noqa: E402
from orchestrator.engine.loop import lr_at, set_lr  # noqa: E402


def bare_loop(cfg: ExperimentConfig, embed_test: bool = True) -> dict:
    """Train every step of ``cfg``'s scenario (independent CE, natural class order) in one process with
    a plain loop — no Ray, no checkpoints, no store — and embed the test set once per version."""
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    train_tf, test_tf = make_transform(cfg.data, train, train=True), make_transform(cfg.data, train, train=False)
    images = torch.from_numpy(np.ascontiguousarray(train.images))
    steps = plan_steps(cfg, len(train.class_names))
    started, trained, train_seconds = time.time(), 0, 0.0
    for step in steps:
        training = cfg.method_training(cfg.methods[0], step.index)  # the step's recipe (``incremental`` too)
        smoothing = Independent.reference_label_smoothing if training.label_smoothing is None else training.label_smoothing
        torch.manual_seed(step.index)
        model = ClassifierNet(cfg.model, step.num_seen)
        optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
        indices = np.flatnonzero(train.labels < step.num_seen)
        gen = torch.Generator().manual_seed(step.index)
        bs = training.batch_size
        t0 = time.time()
        for epoch in range(training.epochs):
            set_lr(optimizer, lr_at(epoch, training))
            order = indices[np.random.default_rng(epoch).permutation(len(indices))]
            order = order[: len(order) - len(order) % bs] if len(order) > bs else order
            model.train()
            for start in range(0, len(order), bs):
                idx = order[start:start + bs]
                x = train_tf(images[torch.from_numpy(idx)], generator=gen)
                y = torch.from_numpy(train.labels[idx])
                loss = F.cross_entropy(model(x)["logits"], y, label_smoothing=smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                trained += len(idx)
        train_seconds += time.time() - t0
        if embed_test:
            model.eval()
            with torch.no_grad():
                for start in range(0, len(test.labels), 256):
                    served_embedding(model, test_tf(torch.from_numpy(test.images[start:start + 256])))
    return {"seconds": time.time() - started, "train_seconds": train_seconds, "trained_images": trained,
            "steps": len(steps)}

"""BCT's influence loss, both variants, on tiny tensors against a manual computation."""

import math

import numpy as np
import pytest
import torch

from methods.base import StepContext, parse_params
from methods.bct import BCT, BCTParams, influence_loss, paper_old_classifier
from methods.nets.heads import ClassifierNet
from methods.nets.prototypes import class_means
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator.errors import ConfigError


def manual_ce(logits, label, eps, num_classes):
    logp = [l - math.log(sum(math.exp(x) for x in logits)) for l in logits]
    return -((1 - eps) * logp[label] + eps / num_classes * sum(logp))


def test_class_means_are_means_of_normalised_features_not_renormalised():
    feats = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 2])
    P = class_means(feats, labels, 3)
    assert torch.allclose(P[0], torch.tensor([(0.6 + 0.0) / 2, (0.8 + 1.0) / 2]))
    assert torch.allclose(P[1], torch.zeros(2))  # absent class
    assert torch.allclose(P[2], torch.tensor([1.0, 0.0]))
    assert P[0].norm() < 1


def test_influence_loss_matches_manual_cross_entropy():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    old = torch.tensor([[0.5, 0.5], [1.0, -1.0], [0.0, 0.2]])
    labels = torch.tensor([1, 2])
    scale, eps = 16.0, 0.1
    got = influence_loss(feats, labels, old, scale, eps)
    rows = [[scale * (f[0] * w[0] + f[1] * w[1]) for w in old.tolist()] for f in feats.tolist()]
    want = sum(manual_ce(r, y, eps, 3) for r, y in zip(rows, [1, 2])) / 2
    assert abs(got.item() - want) < 1e-4


def test_paper_variant_keeps_real_old_rows_and_synthesises_new_ones():
    old_rows = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # the old model knew 2 classes
    prototypes = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.4], [0.0, 0.5]])
    W = paper_old_classifier(old_rows, prototypes, normalize_synthesized=False)
    assert torch.equal(W[:2], old_rows) and torch.equal(W[2:], prototypes[2:])
    Wn = paper_old_classifier(old_rows, prototypes, normalize_synthesized=True)
    assert torch.allclose(Wn[2], torch.tensor([0.6, 0.8])) and torch.allclose(Wn[3], torch.tensor([0.0, 1.0]))


def test_each_variant_defaults_to_its_references_values():
    paper, means = BCTParams(), BCTParams(variant="class_means")
    assert paper.variant == "paper" and (paper.resolved_weight, paper.logit_scale, paper.resolved_transform) == (1.0, 1.0, "test")
    assert (means.resolved_weight, means.logit_scale, means.resolved_transform) == (10.0, 1.0, "train")
    old = BCTParams(variant="class_means", weight=1, logit_scale=16, prototype_transform="test")  # the former default
    assert (old.resolved_weight, old.logit_scale, old.resolved_transform) == (1.0, 16.0, "test")
    assert BCT(old, ModelConfig()).prepare_transform() == "test" and BCT(means, ModelConfig()).prepare_transform() == "train"


def test_normalize_synthesized_is_a_config_error_with_class_means():
    with pytest.raises(ConfigError, match="methods.0.params.normalize_synthesized"):
        parse_params("bct", {"variant": "class_means", "normalize_synthesized": True}, "methods.0.params")


def _old_model_and_batches(num_old: int, num_classes: int):
    """A random old ClassifierNet over ``num_old`` classes and batches of images of ``num_classes`` classes."""
    torch.manual_seed(0)
    cfg = ModelConfig(width=4, embedding_dim=6)
    old = ClassifierNet(cfg, num_old).eval()
    images = torch.randn(30, 3, 16, 16)
    labels = torch.arange(30) % num_classes
    return old, [(images[i:i + 7], labels[i:i + 7]) for i in range(0, 30, 7)], images, labels


def _reference_class_means(old, images, labels, num_classes):
    """float64 numpy: mean of each class's L2-normalised old-model features (not re-normalised)."""
    with torch.no_grad():
        feats = old.net(images).double().numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return np.stack([feats[labels.numpy() == c].mean(0) for c in range(num_classes)])


@pytest.mark.parametrize("variant", ["paper", "class_means"])
def test_prepare_builds_the_old_classifier_from_the_old_model(variant):
    """paper: the old classifier's own rows for its 3 classes, then the old features' class means for the
    2 new ones; class_means: the old features' class means for all 5."""
    old, batches, images, labels = _old_model_and_batches(num_old=3, num_classes=5)
    method = BCT(BCTParams(variant=variant), ModelConfig(width=4, embedding_dim=6))
    ctx = StepContext(index=1, num_steps=2, num_seen=5, num_previous=3, event="train", model=method.model_cfg,
                      training=TrainingConfig(), seed=0)
    W = method.prepare(ctx, None, old, iter(batches))["old_classifier"].double().numpy()
    means = _reference_class_means(old, images, labels, 5)
    if variant == "paper":
        assert np.array_equal(W[:3], old.classifier.weight.detach().double().numpy())
        assert np.allclose(W[3:], means[3:], atol=1e-6)
    else:
        assert np.allclose(W, means, atol=1e-6)


def test_anchor_first_aligns_every_version_to_version_zero(tmp_path, monkeypatch):
    """``anchor: first``: step 2's influence loss goes through v0's classifier (2 classes), not v1's: its
    real rows are v0's saved classifier weights, its synthesised rows v0's class means of step 2's data."""
    from helpers import config_under

    from orchestrator.storage import runfiles
    from orchestrator.engine import driver

    seen = {}
    real_prepare = BCT.prepare

    def recording_prepare(self, ctx, model, previous, loader):
        batches = list(loader)
        state = real_prepare(self, ctx, model, previous, iter(batches))
        if previous is not None:
            images, labels = (torch.cat(parts) for parts in zip(*batches))
            seen[ctx.index] = (state["old_classifier"].double().numpy(),
                               _reference_class_means(previous, images.cpu(), labels.cpu(), ctx.num_seen))
        return state

    monkeypatch.setattr(BCT, "prepare", recording_prepare)
    for anchor, anchor_version in [("first", 0), ("previous", 1)]:
        seen.clear()
        cfg = config_under(tmp_path / anchor, "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=4",
                           "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
                           "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}",
                           "resources.num_workers=0",
                           f"methods=[{{name: bct, params: {{variant: paper, anchor: {anchor}}}}}]")
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
        run_dir = tmp_path / anchor / cfg.name
        v0_rows = runfiles.version_weights(run_dir, "bct", 0)["classifier.weight"].double().numpy()
        anchor_rows = runfiles.version_weights(run_dir, "bct", anchor_version)["classifier.weight"].double().numpy()
        W1, means1 = seen[1]
        assert W1.shape == (4, 16) and np.array_equal(W1[:2], v0_rows) and np.allclose(W1[2:], means1[2:], atol=1e-6)
        W2, means2 = seen[2]
        known = len(anchor_rows)  # v0 knew 2 classes, v1 knew 4
        assert W2.shape == (6, 16) and np.array_equal(W2[:known], anchor_rows)
        assert np.allclose(W2[known:], means2[known:], atol=1e-6)

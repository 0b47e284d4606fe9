"""BCT's influence loss, both variants, on tiny tensors against a manual computation."""

import math

import torch

from methods.bct import BCTParams, influence_loss, paper_old_classifier
from methods.nets.prototypes import class_means


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


def test_default_logit_scale_depends_on_variant():
    assert BCTParams().resolved_scale == 16.0
    assert BCTParams(variant="paper").resolved_scale == 1.0
    assert BCTParams(variant="paper", logit_scale=4).resolved_scale == 4.0


def test_anchor_first_aligns_every_version_to_version_zero(tmp_path, monkeypatch):
    """``anchor: first``: step 2's influence loss goes through v0's classifier (2 classes), not v1's (4)."""
    from helpers import config_under

    from methods.bct import BCT
    from orchestrator.engine import driver

    seen = {}
    real_prepare = BCT.prepare

    def recording_prepare(self, ctx, model, previous, loader):
        state = real_prepare(self, ctx, model, previous, loader)
        seen[ctx.index] = (previous.classifier.weight.shape[0] if previous is not None else None,
                           tuple(state["old_classifier"].shape) if state else None)
        return state

    monkeypatch.setattr(BCT, "prepare", recording_prepare)
    for anchor, v0_rows in [("first", 2), ("previous", 4)]:
        cfg = config_under(tmp_path / anchor, "data.num_classes=6", "data.train_per_class=16", "data.test_per_class=4",
                           "scenario.initial_classes=2", "scenario.increment=2", "scenario.num_steps=3",
                           "model.width=8", "model.embedding_dim=16", "training.epochs=1", "training.incremental={}",
                           "resources.num_workers=0",
                           f"methods=[{{name: bct, params: {{variant: paper, anchor: {anchor}}}}}]")
        driver.run_experiment(cfg, progress=False, echo=lambda s: None)
        assert seen[0] == (None, None)
        assert seen[1] == (2, (4, 16))  # v0's 2 real rows + 2 synthesised
        assert seen[2] == (v0_rows, (6, 16))  # all 6 classes, real rows from the anchor

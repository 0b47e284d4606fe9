"""``stationary`` (d-Simplex + HOC): the HOC loss against hand computations, and the method's choices."""

import math

import pytest
import torch
import torch.nn.functional as F

from methods.base import StepContext, create_method
from methods.nets.simplex import dsimplex
from methods.stationary import Stationary, hoc_loss
from orchestrator.config import ModelConfig, TrainingConfig
from orchestrator.errors import ConfigError

# Three samples, labels [0, 1, 0] (a repeated label). With μ = 1, S = A Bᵀ = [[1, 0, 0], [0, 1, 1], [1, 0, 0]].
OLD = torch.tensor([[2.0, 0.0], [0.0, 3.0], [0.5, 0.0]])  # normalised: e1, e2, e1
NEW = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 4.0]])  # normalised: e1, e2, e2
LABELS = torch.tensor([0, 1, 0])


def manual_hoc(old, new, labels, mu, same_class):
    """Per-sample loops straight from the formula in docs/methods/stationary.md."""
    a, b = F.normalize(old, dim=1), F.normalize(new, dim=1)
    total = 0.0
    for i in range(len(labels)):
        positive = mu * float(a[i] @ b[i])
        negatives = sum(math.exp(mu * float(a[i] @ b[j])) for j in range(len(labels)) if labels[j] != labels[i])
        same = sum(1 for j in range(len(labels)) if labels[j] == labels[i])
        partition = negatives + (same if same_class == "zero" else math.exp(positive))
        total += -positive + math.log(partition)
    return total / len(labels)


def test_reference_handling_by_hand():
    # rows: log(1 + 2) - 1, log(e^0 + e^1 + 1) - 1, log(1 + 2) - 0   (same-class entries count e^0 = 1)
    expected = (2 * math.log(3) + math.log(2 + math.e) - 2) / 3
    assert hoc_loss(OLD, NEW, LABELS, mu=1.0).item() == pytest.approx(expected, rel=1e-6)
    expected_mu10 = (2 * math.log(3) + math.log(2 + math.exp(10)) - 20) / 3
    assert hoc_loss(OLD, NEW, LABELS).item() == pytest.approx(expected_mu10, rel=1e-6)  # μ = 10 by default


def test_mask_handling_by_hand():
    # the positive stays in the partition, other same-class entries are removed
    expected = (math.log(math.e + 1) - 1 + math.log(1 + 2 * math.e) - 1 + math.log(2)) / 3
    assert hoc_loss(OLD, NEW, LABELS, mu=1.0, same_class="mask").item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("same_class", ["zero", "mask"])
def test_random_batch_with_repeated_labels_matches_the_loops(same_class):
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    labels = torch.tensor([0, 1, 1, 2, 0, 3, 1, 2])
    got = hoc_loss(old, new, labels, mu=10.0, same_class=same_class).item()
    assert got == pytest.approx(manual_hoc(old, new, labels, 10.0, same_class), rel=1e-5)


def test_mask_with_distinct_labels_is_infonce_and_zero_is_not():
    gen = torch.Generator().manual_seed(1)
    old, new = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.arange(6)
    sims = 10 * F.normalize(old, dim=1) @ F.normalize(new, dim=1).T
    infonce = F.cross_entropy(sims, labels)
    assert hoc_loss(old, new, labels, same_class="mask").item() == pytest.approx(infonce.item(), rel=1e-5)
    assert hoc_loss(old, new, labels).item() != pytest.approx(infonce.item(), rel=1e-3)


def test_identical_features_and_the_gradient_against_float64_numpy():
    """new = old: the positive term is exactly −μ for every sample and the rest is the closed form
    log(Σ_{y_j≠y_i} exp(μ a_i·a_j) + n_i), computed here in float64 numpy; the gradient with respect to the
    new features matches central finite differences of that numpy loss."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5))
    labels = np.array([0, 1, 0, 2, 1, 3])

    def numpy_hoc(old, new, mu=10.0):
        a = old / np.linalg.norm(old, axis=1, keepdims=True)
        b = new / np.linalg.norm(new, axis=1, keepdims=True)
        rows = []
        for i in range(len(labels)):
            others = [np.exp(mu * a[i] @ b[j]) for j in range(len(labels)) if labels[j] != labels[i]]
            rows.append(-mu * a[i] @ b[i] + np.log(sum(others) + np.sum(labels == labels[i])))
        return float(np.mean(rows))

    a = x / np.linalg.norm(x, axis=1, keepdims=True)
    closed = np.mean([-10.0 + np.log(sum(np.exp(10 * a[i] @ a[j]) for j in range(6) if labels[j] != labels[i])
                                     + np.sum(labels == labels[i])) for i in range(6)])
    assert numpy_hoc(x, x) == pytest.approx(closed, rel=1e-12)
    old = torch.tensor(x, requires_grad=True)
    new = torch.tensor(x + 0.3 * rng.standard_normal(x.shape), requires_grad=True)
    assert hoc_loss(old, old.detach(), torch.tensor(labels)).item() == pytest.approx(closed, rel=1e-10)
    loss = hoc_loss(old.detach(), new, torch.tensor(labels))
    assert loss.item() == pytest.approx(numpy_hoc(x, new.detach().numpy()), rel=1e-10)
    loss.backward()
    step, numeric = 1e-6, np.zeros(x.shape)
    for index in np.ndindex(x.shape):
        plus, minus = new.detach().numpy().copy(), new.detach().numpy().copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (numpy_hoc(x, plus) - numpy_hoc(x, minus)) / (2 * step)
    np.testing.assert_allclose(new.grad.numpy(), numeric, atol=1e-6)


def ctx(**kw):
    base = dict(index=1, num_steps=3, num_seen=6, num_previous=4, event="finetune",
                model=ModelConfig(width=8), training=TrainingConfig(label_smoothing=0.0), seed=0)
    return StepContext(**{**base, **kw})


def method(**params):
    return create_method("stationary", {"num_classes": 12, **params}, ModelConfig(width=8))


def test_loss_is_weighted_ce_plus_hoc_against_the_frozen_anchor():
    m = method()
    net, anchor = m.build_model(ctx()), m.build_model(ctx()).eval()
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 5, 5, 2, 3])
    outputs = net(images)
    ce = F.cross_entropy(outputs["logits"], 11 - labels)  # labels are written from the end of the table
    hoc = hoc_loss(anchor(images)["feature"], outputs["feature"], labels)
    total, parts = m.loss(outputs, images, labels, m.prepare(ctx(), net, anchor, None), ctx())
    assert total.item() == pytest.approx((0.1 * ce + 0.9 * hoc).item(), rel=1e-5)
    assert set(parts) == {"ce", "hoc"}
    alone, parts = m.loss(outputs, images, labels, m.prepare(ctx(), net, None, None), ctx())
    assert alone.item() == pytest.approx(ce.item(), rel=1e-5) and set(parts) == {"ce"}
    total.backward()
    assert all(p.grad is None for p in anchor.parameters())


def test_which_model_is_the_anchor():
    m = method()
    assert m.anchor_checkpoint(ctx(index=0, event="train")) is None
    assert m.anchor_checkpoint(ctx(index=0, event="replace", init_checkpoint="up0")) == "up0"
    assert m.anchor_checkpoint(ctx(previous_checkpoint="v0", init_checkpoint="v0")) == 0  # own version 0
    at_replacement = ctx(index=2, event="replace", previous_checkpoint="v1", init_checkpoint="up1")
    assert m.anchor_checkpoint(at_replacement) == "up1"  # reference: the replacement itself
    assert method(anchor="replaced").anchor_checkpoint(at_replacement) == 1  # own version 1
    assert method(anchor="replaced").anchor_checkpoint(ctx(index=0, event="replace", init_checkpoint="up0")) == "up0"


def test_network_features_and_classification():
    m = method()
    net = m.build_model(ctx())
    assert [n for n, _ in net.named_parameters() if not n.startswith("backbone.")] == ["head.junction.weight"]
    images = torch.randn(3, 3, 16, 16)
    emb = m.embed(net, images)
    assert emb.shape == (3, 11) and torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    logits = m.classify(net, images, ctx())
    assert logits.shape == (3, 6)
    assert torch.allclose(logits[:, 0], net(images)["feature"] @ dsimplex(12)[11], atol=1e-5)


def test_upstream_models_use_the_other_end_of_the_table():
    assert Stationary.upstream_params({})["label_rows"] == "from_start"
    assert Stationary.upstream_params({"label_rows": "from_start", "mu": 5})["label_rows"] == "from_end"


def test_too_many_classes_for_the_table():
    with pytest.raises(ConfigError, match="num_classes"):
        method(num_classes=4).build_model(ctx())
    with pytest.raises(ConfigError, match="same_class"):
        method(same_class="drop")


def test_cross_entropy_is_unsmoothed_unless_the_config_says_otherwise():
    """The reference trains d-Simplex and ER with plain cross-entropy: with training.label_smoothing unset
    the CE term is F.cross_entropy without smoothing; an explicit value is honoured. (independent, bct and
    oca keep the OCA recipe's 0.1.)"""
    m = method(ce_weight=1.0)
    net = m.build_model(ctx())
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 5, 2])
    outputs = net(images)
    unset = ctx(training=TrainingConfig())
    assert TrainingConfig().label_smoothing is None and m.label_smoothing(unset) == 0.0
    plain = F.cross_entropy(outputs["logits"], 11 - labels)
    assert m.loss(outputs, images, labels, {}, unset)[0].item() == pytest.approx(plain.item(), rel=1e-6)
    smoothed = F.cross_entropy(outputs["logits"], 11 - labels, label_smoothing=0.1)
    explicit = ctx(training=TrainingConfig(label_smoothing=0.1))
    assert m.loss(outputs, images, labels, {}, explicit)[0].item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert create_method("er", {}, ModelConfig(width=8)).label_smoothing(unset) == 0.0
    assert create_method("independent", {}, ModelConfig(width=8)).label_smoothing(unset) == 0.1


def test_er_classifier_has_no_bias_as_the_reference():
    er = create_method("er", {}, ModelConfig(width=8)).build_model(ctx())
    assert er.classifier.bias is None
    images = torch.randn(3, 3, 16, 16)
    out = er(images)
    assert torch.allclose(out["logits"], out["feature"] @ er.classifier.weight.T, atol=1e-6)

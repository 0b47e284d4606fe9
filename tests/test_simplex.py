"""The d-Simplex fixed classifier: geometry, label mapping, and the frozen head."""

import math

import pytest
import torch

from methods.nets.simplex import DSimplexClassifier, DSimplexHead, dsimplex, label_rows, other_end


@pytest.mark.parametrize("k", [2, 3, 5, 10, 100, 1024])
def test_regular_simplex_geometry(k):
    w = dsimplex(k).double()
    assert w.shape == (k, k - 1) and dsimplex(k).dtype == torch.float32
    assert torch.allclose(w.norm(dim=1), torch.ones(k, dtype=torch.float64), atol=1e-6)
    cos = w @ w.T
    off = cos[~torch.eye(k, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, -1 / (k - 1)), atol=1e-6)
    assert torch.allclose(w.sum(dim=0), torch.zeros(k - 1, dtype=torch.float64), atol=1e-5)  # centred at 0


def test_1024_numbers_of_the_reference():
    cos = dsimplex(1024).double() @ dsimplex(1024).double().T
    assert abs(cos[0, 1].item() - (-9.775e-4)) < 1e-6
    assert abs(cos[5, 1000].item() + 1 / 1023) < 1e-7


def test_hand_computed_k3():
    # n = 2: T = [[1, 0], [0, 1], [c, c]], c = (1 - sqrt 3) / 2; centre, then normalise each row.
    c = (1 - math.sqrt(3)) / 2
    mean = (1 + c) / 3
    rows = torch.tensor([[1 - mean, -mean], [-mean, 1 - mean], [c - mean, c - mean]], dtype=torch.float64)
    expected = rows / rows.norm(dim=1, keepdim=True)
    assert torch.allclose(dsimplex(3).double(), expected, atol=1e-7)


def test_dsimplex_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2"):
        dsimplex(1)


def test_label_mapping_from_the_end_by_default():
    labels = torch.tensor([0, 1, 99])
    assert label_rows(labels, 1024, "from_end").tolist() == [1023, 1022, 924]
    assert label_rows(labels, 1024, "from_start").tolist() == [0, 1, 99]
    assert other_end("from_end") == "from_start" and other_end("from_start") == "from_end"
    assert DSimplexClassifier(8).rows == "from_end"


def test_classifier_is_frozen_bias_free_and_not_saved():
    clf = DSimplexClassifier(10)
    assert list(clf.parameters()) == [] and clf.state_dict() == {}
    z = torch.randn(4, 9)
    assert torch.allclose(clf(z), z @ dsimplex(10).T)
    logits = clf(z)
    # columns of labels 0..2 in label order: rows 9, 8, 7 with the reference mapping
    assert torch.equal(clf.class_logits(logits, 3), logits[:, [9, 8, 7]])


def test_head_junction_only_when_widths_differ():
    head = DSimplexHead(16, num_classes=10)
    assert isinstance(head.junction, torch.nn.Linear) and head.junction.bias is None
    assert head.junction.weight.shape == (9, 16)
    assert [name for name, _ in head.named_parameters()] == ["junction.weight"]
    assert isinstance(DSimplexHead(9, num_classes=10).junction, torch.nn.Identity)
    out = head(torch.randn(4, 16))
    assert out["feature"].shape == (4, 9) and out["logits"].shape == (4, 10)
    assert torch.allclose(out["logits"], out["feature"] @ dsimplex(10).T, atol=1e-6)

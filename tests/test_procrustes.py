"""Orthogonal Procrustes: exact recovery of known maps, semi-orthogonality for unequal widths."""

import numpy as np
import pytest
import torch

from methods.procrustes import FixedMap, orthogonal_procrustes


def random_orthogonal(rng, rows, cols):
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), max(rows, cols))))
    q = q * np.sign(np.diag(r))
    return q[:rows, :cols]


def test_recovers_a_random_orthogonal_map_exactly():
    rng = np.random.default_rng(0)
    q = random_orthogonal(rng, 24, 24)
    x_new = rng.standard_normal((200, 24)) * rng.uniform(0.2, 3.0, 24)  # anisotropic on purpose
    w = orthogonal_procrustes(x_new, x_new @ q)
    np.testing.assert_allclose(w, q, atol=1e-10)


def test_hand_computed_two_dimensional_case():
    # x_new = identity, x_old = a 90-degree rotation: X_newᵀ X_old is the rotation itself.
    rotation = np.array([[0.0, 1.0], [-1.0, 0.0]])
    np.testing.assert_allclose(orthogonal_procrustes(np.eye(2), rotation), rotation, atol=1e-12)
    # A reflection of one axis with a scale: the scale is dropped, the sign kept.
    np.testing.assert_allclose(orthogonal_procrustes(np.eye(2), np.diag([3.0, -0.5])), np.diag([1.0, -1.0]))


def test_wider_new_space_gives_orthonormal_columns_and_recovers_an_isotropic_map():
    rng = np.random.default_rng(1)
    q = random_orthogonal(rng, 48, 16)  # d_new = 48 -> d_old = 16, QᵀQ = I
    x_new = random_orthogonal(rng, 300, 48) * 5.0  # isotropic: X_newᵀ X_new = 25 I
    w = orthogonal_procrustes(x_new, x_new @ q)
    assert w.shape == (48, 16)
    np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(w, q, atol=1e-10)
    # On anisotropic data W is still semi-orthogonal and maximises tr(Wᵀ X_newᵀ X_old) among such maps.
    x_new = rng.standard_normal((300, 48)) * rng.uniform(0.2, 3.0, 48)
    x_old = rng.standard_normal((300, 16))
    w = orthogonal_procrustes(x_new, x_old)
    np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-10)
    best = np.trace(w.T @ x_new.T @ x_old)
    assert all(np.trace(c.T @ x_new.T @ x_old) < best for c in (random_orthogonal(rng, 48, 16) for _ in range(50)))


def test_narrower_new_space_embeds_isometrically_and_recovers_the_map():
    rng = np.random.default_rng(2)
    q = random_orthogonal(rng, 12, 20)  # d_new = 12 < d_old = 20, QQᵀ = I
    x_new = rng.standard_normal((100, 12)) * rng.uniform(0.5, 2.0, 12)
    w = orthogonal_procrustes(x_new, x_new @ q)
    np.testing.assert_allclose(w @ w.T, np.eye(12), atol=1e-10)
    np.testing.assert_allclose(w, q, atol=1e-10)


def test_fixed_map_projects_and_checks_shapes():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(FixedMap(w)(torch.tensor([[3.0, 4.0, 7.0]])), torch.tensor([[3.0, 4.0]]))
    assert not list(FixedMap(w).parameters())  # nothing to train
    with pytest.raises(ValueError, match="paired"):
        orthogonal_procrustes(np.ones((3, 2)), np.ones((4, 2)))

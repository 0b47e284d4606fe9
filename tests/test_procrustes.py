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
    # On anisotropic data W is still semi-orthogonal.
    x_new = rng.standard_normal((300, 48)) * rng.uniform(0.2, 3.0, 48)
    w = orthogonal_procrustes(x_new, rng.standard_normal((300, 16)))
    np.testing.assert_allclose(w.T @ w, np.eye(16), atol=1e-10)


def _stiefel_3x2(theta, phi, psi):
    """Every 3×2 matrix with orthonormal columns: w1 on the unit sphere (θ, φ), w2 at angle ψ in the plane
    orthogonal to w1 (spanned by the sphere's two tangent directions)."""
    w1 = np.stack([np.sin(phi) * np.cos(theta), np.sin(phi) * np.sin(theta), np.cos(phi)], -1)
    e_theta = np.stack([-np.sin(theta), np.cos(theta), np.zeros_like(theta)], -1)
    e_phi = np.stack([np.cos(phi) * np.cos(theta), np.cos(phi) * np.sin(theta), -np.sin(phi)], -1)
    w2 = np.cos(psi)[..., None] * e_theta + np.sin(psi)[..., None] * e_phi
    return np.stack([w1, w2], -1)


def test_closed_form_equals_a_brute_force_search_over_all_semi_orthogonal_maps():
    """d_new = 3 -> d_old = 2 on anisotropic data: a dense grid over every 3×2 matrix with orthonormal
    columns, refined by a local optimiser, finds the same maximum of tr(Wᵀ X_newᵀ X_old) at the same W."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(3)
    x_new = rng.standard_normal((40, 3)) * np.array([2.0, 1.0, 0.3])
    x_old = rng.standard_normal((40, 2)) + x_new[:, :2] @ np.array([[0.6, -0.8], [0.8, 0.6]])
    cross = x_new.T @ x_old
    grid = np.meshgrid(np.linspace(0, 2 * np.pi, 72, endpoint=False), np.linspace(0, np.pi, 37),
                       np.linspace(0, 2 * np.pi, 72, endpoint=False), indexing="ij")
    scores = np.einsum("...ij,ij->...", _stiefel_3x2(*grid), cross)
    start = [g.flat[scores.argmax()] for g in grid]
    found = minimize(lambda p: -np.sum(_stiefel_3x2(*p) * cross), start, method="Nelder-Mead",
                     options={"xatol": 1e-12, "fatol": 1e-14, "maxiter": 20000})
    brute = _stiefel_3x2(*found.x)
    w = orthogonal_procrustes(x_new, x_old)
    assert np.trace(w.T @ cross) == pytest.approx(-found.fun, rel=1e-9)
    np.testing.assert_allclose(w, brute, atol=1e-5)


def test_square_case_is_the_least_squares_optimum_by_brute_force():
    """d_new = d_old = 2: every orthogonal map is a rotation or a reflection by an angle; a grid over both,
    refined by a bounded scalar search, finds the minimum of ‖X_new W − X_old‖_F (the published objective)
    at the closed form."""
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(4)
    x_new = rng.standard_normal((30, 2)) * np.array([1.5, 0.4])
    x_old = x_new @ np.array([[0.28, 0.96], [-0.96, 0.28]]) + 0.2 * rng.standard_normal((30, 2))

    def orthogonal(angle, reflect):
        c, s = np.cos(angle), np.sin(angle)
        return np.array([[c, s], [s, -c]]) if reflect else np.array([[c, -s], [s, c]])

    def distance(angle, reflect):
        return np.linalg.norm(x_new @ orthogonal(angle, reflect) - x_old)

    candidates = []
    grid = np.linspace(0, 2 * np.pi, 3600, endpoint=False)
    for reflect in (False, True):
        coarse = grid[np.argmin([distance(a, reflect) for a in grid])]
        fine = minimize_scalar(distance, bounds=(coarse - 0.01, coarse + 0.01), args=(reflect,), method="bounded",
                               options={"xatol": 1e-12})
        candidates.append((fine.fun, orthogonal(fine.x, reflect)))
    best_distance, best = min(candidates, key=lambda c: c[0])
    w = orthogonal_procrustes(x_new, x_old)
    assert np.linalg.norm(x_new @ w - x_old) == pytest.approx(best_distance, abs=1e-9)
    np.testing.assert_allclose(w, best, atol=1e-6)


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

"""Training-free maps between two embedding spaces, fitted on paired embeddings of the same items.

Every fit takes ``x`` (N × d_in, the space mapped from) and ``y`` (N × d_out, the space mapped to), rows
paired, and returns the map as plain float64 arrays (docs/methods/adapters.md):

- ``weight`` (d_in × d_out) and ``bias`` (d_out): the affine part, y ≈ x·weight + bias;
- for the residual MLP also ``hidden_weight`` (d_in × h), ``hidden_bias`` (h) and ``out_weight`` (h × d_out):
  y ≈ x·weight + bias + relu(x·hidden_weight + hidden_bias)·out_weight.

One representation for every kind means one way to apply a map (:func:`apply_map`), whether it serves a
version's queries or upgrades the vectors a gallery stores. Closed forms are computed in float64: the
least-squares and SVD solutions lose digits quickly in float32 when the embeddings are correlated.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

MapArrays = dict[str, np.ndarray]


def _paired(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need paired (N, d) arrays with the same N > 0, got {x.shape} and {y.shape}")
    return x, y


def orthogonal_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The semi-orthogonal W (d_in × d_out) minimising ‖x W − y‖_F (Schönemann 1966).

    With the thin SVD xᵀy = U Σ Vᵀ, W = U Vᵀ: the semi-orthogonal matrix closest to the cross-covariance,
    i.e. the maximiser of tr(Wᵀ xᵀ y). A rotation keeps every distance of the mapped space, which is why it
    needs the fewest pairs and cannot overfit. Inputs are used as given (normalise them first).
    """
    x, y = _paired(x, y)
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    return u @ vt


def affine_least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) minimising ‖x A + 1 bᵀ − y‖_F: ordinary least squares with an intercept.

    Solved as one least-squares problem on ``[x, 1]`` (``numpy.linalg.lstsq``, SVD based, so a rank-deficient
    ``x`` still gets the minimum-norm solution instead of an error)."""
    x, y = _paired(x, y)
    solution, *_ = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)
    return solution[:-1], solution[-1]


def low_rank_affine(x: np.ndarray, y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) minimising ‖x A + 1 bᵀ − y‖_F subject to rank(A) ≤ ``rank``: reduced-rank regression.

    Why the closed form holds: after centring, the residual splits into the least-squares residual
    (orthogonal to the column space of x) plus ‖Ŷ − x A‖ with Ŷ = x A_ls the least-squares fit, so the best
    rank-r A projects Ŷ onto its top-r right singular vectors V_r (Eckart–Young): A = A_ls V_r V_rᵀ. The
    intercept then restores the means: b = ȳ − x̄ A. Fewer coefficients than the full affine map, so it
    needs fewer pairs when the change between the models is low-dimensional.
    """
    x, y = _paired(x, y)
    if not 1 <= rank <= min(x.shape[1], y.shape[1]):
        raise ValueError(f"rank must be in 1..{min(x.shape[1], y.shape[1])}, got {rank}")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    a_ls, *_ = np.linalg.lstsq(xc, yc, rcond=None)
    _, _, vt = np.linalg.svd(xc @ a_ls, full_matrices=False)
    v = vt[:rank].T
    a = a_ls @ v @ v.T
    return a, y_mean - x_mean @ a


def fit_residual_mlp(x: np.ndarray, y: np.ndarray, hidden: int, steps: int, lr: float, seed: int) -> MapArrays:
    """A least-squares affine map plus a one-hidden-layer ReLU correction, trained on the pairs.

    The affine part starts at its least-squares optimum and the correction's output layer at zero, so
    training starts exactly at the affine fit; full-batch Adam (float64) on the mean squared error then
    fits what the affine map cannot, and the iterate with the lowest training loss is kept. The result is
    therefore never worse than the affine fit on the pairs it was fitted on (on new items it can be: a
    small N overfits, which the data-need curve shows).
    """
    x, y = _paired(x, y)
    a, b = affine_least_squares(x, y)
    generator = torch.Generator().manual_seed(seed)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    params = {
        "weight": torch.from_numpy(a.copy()), "bias": torch.from_numpy(b.copy()),
        "hidden_weight": torch.randn(x.shape[1], hidden, generator=generator, dtype=torch.float64) / np.sqrt(x.shape[1]),
        "hidden_bias": torch.zeros(hidden, dtype=torch.float64),
        "out_weight": torch.zeros(hidden, y.shape[1], dtype=torch.float64),
    }
    for tensor in params.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    best_loss, best = float("inf"), None
    with torch.enable_grad():  # callers may run under no_grad (a method's hooks after training do)
        for _ in range(steps + 1):
            loss = ((apply_map(params, tx) - ty) ** 2).sum(dim=1).mean()
            if loss.item() < best_loss:
                best_loss, best = loss.item(), {k: v.detach().clone() for k, v in params.items()}
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.numpy() for k, v in best.items()}


def affine_map(weight: np.ndarray, bias: np.ndarray | None = None) -> MapArrays:
    """An affine (or, without ``bias``, linear) map in the common representation."""
    weight = np.asarray(weight, dtype=np.float64)
    return {"weight": weight, "bias": np.zeros(weight.shape[1]) if bias is None else np.asarray(bias, dtype=np.float64)}


def apply_map(params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """y = x·weight + bias (+ relu(x·hidden_weight + hidden_bias)·out_weight when the map has a hidden layer)."""
    y = x @ params["weight"] + params["bias"]
    if "hidden_weight" in params:
        y = y + torch.relu(x @ params["hidden_weight"] + params["hidden_bias"]) @ params["out_weight"]
    return y


def mean_squared_error(params: MapArrays, x: np.ndarray, y: np.ndarray) -> float:
    """The objective every fit minimises: mean over pairs of ‖map(x) − y‖², in float64."""
    tensors = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
    mapped = apply_map(tensors, torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
    return float(((mapped - np.asarray(y, dtype=np.float64)) ** 2).sum(axis=1).mean())

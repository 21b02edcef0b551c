"""Functional spectral maps on any 2-D tensor or batch of them (shape ``(..., m, n)``).

With ``Y = U diag(s) V^T``:

* :func:`svt` -- ``U diag(max(s - tau, 0)) V^T``, the prox of ``tau ||.||_*`` (soft thresholding);
* :func:`hard_threshold` -- ``U diag(s [s > sqrt(2 tau)]) V^T``, the prox of ``tau rank(.)``;
* :func:`project_spectral_ball` -- ``U diag(min(s, r)) V^T``, the projection onto
  ``{X : ||X||_2 <= r}``; by Moreau's identity ``svt(Y, t) + project_spectral_ball(Y, t) == Y``;
* :func:`project_rank` -- keep the ``r`` largest singular values, the projection onto
  ``{X : rank(X) <= r}`` (Eckart-Young);
* :func:`prox_step` -- a thresholding prox through a chosen backend, as the optimizer uses it.

Half-precision inputs are computed in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import Backend, ExactBackend, State, SVDResult, compute_dtype
from .prox import HardThreshold, ProxMap, SoftThreshold

__all__ = [
    "ProxResult",
    "hard_threshold",
    "project_rank",
    "project_spectral_ball",
    "prox_step",
    "rank_prox_step",
    "reconstruct",
    "singular_value_map",
    "svt",
]


class ProxResult(NamedTuple):
    """Output of :func:`prox_step`: ``X`` (in the compute dtype), the triplets of the input
    and the mapped singular values ``S_new = phi(svd.S)`` (so ``X = U diag(S_new) Vh``)."""

    X: Tensor
    svd: SVDResult
    S_new: Tensor


def _check_matrix(Y: Tensor, name: str = "Y") -> None:
    if not isinstance(Y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(Y).__name__}")
    if Y.dim() < 2:
        raise ValueError(f"{name} must have shape (..., m, n); got shape {tuple(Y.shape)}")
    if not Y.is_floating_point():
        raise TypeError(
            f"{name} has dtype {Y.dtype}; spectral maps need float16, bfloat16, float32 or float64"
        )


def _threshold_arg(tau: float | Tensor, Y: Tensor, name: str = "tau") -> Tensor:
    """Validate ``Y`` and a non-negative threshold; return it as a tensor in Y's compute dtype."""
    _check_matrix(Y)
    t = torch.as_tensor(tau, dtype=compute_dtype(Y.dtype), device=Y.device)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0, got {tau!r}")
    return t


def reconstruct(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``U diag(S) Vh``, batched."""
    return (U * S.unsqueeze(-2)) @ Vh


def singular_value_map(Y: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``U diag(fn(s)) V^T`` for ``Y = U diag(s) V^T`` (full SVD; ``fn`` acts on ``(..., k)``)."""
    _check_matrix(Y)
    Yc = Y.to(compute_dtype(Y.dtype))
    U, S, Vh = torch.linalg.svd(Yc, full_matrices=False)
    return reconstruct(U, fn(S), Vh).to(Y.dtype)


def svt(Y: Tensor, tau: float | Tensor) -> Tensor:
    """Singular value soft-thresholding: ``argmin_X 0.5 ||X - Y||_F^2 + tau ||X||_*``.

    ``tau`` is a float or a tensor of the batch shape ``Y.shape[:-2]``.
    """
    tau = _threshold_arg(tau, Y)
    return singular_value_map(Y, lambda s: SoftThreshold()(s, tau))


def hard_threshold(Y: Tensor, tau: float | Tensor) -> Tensor:
    """Singular value hard-thresholding: ``argmin_X 0.5 ||X - Y||_F^2 + tau rank(X)``
    (keeps the singular values above ``sqrt(2 tau)``)."""
    tau = _threshold_arg(tau, Y)
    return singular_value_map(Y, lambda s: HardThreshold()(s, tau))


def project_spectral_ball(Y: Tensor, radius: float | Tensor) -> Tensor:
    """Projection onto the spectral-norm ball ``{X : ||X||_2 <= radius}``:
    ``s -> min(s, radius)``."""
    r = _threshold_arg(radius, Y, "radius")
    if r.dim() > 0:
        r = r.unsqueeze(-1)
    return singular_value_map(Y, lambda s: torch.minimum(s, r))


def project_rank(Y: Tensor, rank: int) -> Tensor:
    """Projection onto ``{X : rank(X) <= rank}``: keep the ``rank`` largest singular values."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be an int >= 0, got {rank!r}")

    def keep(s: Tensor) -> Tensor:
        out = s.clone()
        out[..., rank:] = 0
        return out

    return singular_value_map(Y, keep)


def prox_step(
    Y: Tensor,
    tau: float | Tensor,
    prox: ProxMap | None = None,
    backend: Backend | None = None,
    state: State | None = None,
) -> ProxResult:
    """Apply a thresholding prox map to ``Y`` through ``backend``.

    ``Y`` must already be in its compute dtype (float32 or float64). Returns ``X`` together with
    the singular triplets the backend computed, so that callers (diagnostics, schedules) reuse
    them instead of decomposing again. ``state``: the backend's memory, a dict, or one dict
    per matrix for a batch (see :class:`proxrank.backends.Backend`).
    """
    prox = SoftThreshold() if prox is None else prox
    backend = ExactBackend() if backend is None else backend
    tau = torch.as_tensor(tau, dtype=Y.dtype, device=Y.device)
    result = backend.svd(Y, prox.cutoff(tau), {} if state is None else state)
    S_new = prox(result.S, tau)
    return ProxResult(reconstruct(result.U, S_new, result.Vh), result, S_new)


def rank_prox_step(
    Y: Tensor, rank: int, prox: ProxMap, backend: Backend, state: State
) -> ProxResult:
    """Bring ``Y`` (``m x n``, compute dtype) to rank ``rank`` by thresholding at its spectrum.

    :class:`~proxrank.prox.SoftThreshold`: ``s -> max(s - s_{r+1}, 0)`` (the prox of
    ``tau ||.||_*`` with ``tau = s_{r+1}``: the kept values are shrunk); any other map (hard):
    keep the ``r`` largest singular values (Eckart-Young projection). Asks the backend for the
    ``r + 1`` largest triplets only.
    """
    k = min(Y.shape[-2:])
    cutoff = torch.full(Y.shape[:-2], math.inf, dtype=Y.dtype, device=Y.device)
    svd = backend.svd(Y, cutoff, state, min_rank=min(rank + 1, k))
    S = svd.S
    if isinstance(prox, SoftThreshold):
        tau = S[..., rank] if S.shape[-1] > rank else torch.zeros((), dtype=S.dtype)
        S_new = prox(S, tau)
    else:
        S_new = torch.where(torch.arange(S.shape[-1], device=S.device) < rank, S, 0)
    return ProxResult(reconstruct(svd.U, S_new, svd.Vh), svd, S_new)

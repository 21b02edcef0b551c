"""Matrix-products-only singular value thresholding through the polar decomposition.

For ``Y = U diag(s) V^T`` (``m <= n``) and ``Q = polar(Y) = U V^T``, ``M = Y - tau Q =
U diag(s - tau) V^T`` and ``polar(M) Q^T M = U diag(|s - tau|) V^T``, so::

    svt(Y, tau) = U diag(max(s - tau, 0)) V^T = 0.5 (M + polar(M) Q^T M).

Both polar factors come from the scaled cubic Newton-Schulz iteration (Chen & Chow 2014): on
``A / ||A||_F`` (singular values in ``[0, 1]``), ``X <- a_k X + b_k (X X^T) X`` with
``p_k(x) = 1.5 alpha_k x - 0.5 (alpha_k x)^3``, ``alpha_k = sqrt(3 / (1 + l_k + l_k^2))``, the
polynomial of that family closest to one on ``[l_k, 1]``; it maps ``[l_k, 1]`` into ``[l_{k+1},
1]``, ``l_{k+1} = p_k(l_k)`` (``l_{k+1} ~ 2.6 l_k`` while ``l_k`` is small, then quadratic).
``l_0 = floor`` and the number of steps is fixed in advance (until ``1 - l_k`` is below the
dtype's precision), so a call has no data-dependent control flow: no host synchronisation,
traceable by :func:`torch.compile`, batched over same-shape matrices. Each step costs two
``m x m x n`` products (``X X^T`` and ``(X X^T) X``); the last line two more
(``polar(M) Q^T`` then ``(polar(M) Q^T) M``).

Bound (documented, not a proof). In exact arithmetic every quantity above is a spectral
function of ``Y``: ``Q = U g(s) V^T`` with ``g(s) = F(s / ||Y||_F)`` (``F`` the composed
polynomials), ``M = U h(s) V^T`` with ``h = s - tau g``, ``polar(M) = U F(h / ||M||_F) V^T``, so
the result is ``U phi~(s) V^T`` with the scalar map ``phi~(s) = 0.5 h (1 + F(h / ||M||_F)
g)``. Its error against ``max(s - tau, 0)`` is at most ``c ||Y||_F`` with ``c = sup_s |phi~(s) -
max(s - tau, 0)| / s`` over ``0 < s <= ||Y||_F``; ``c`` is evaluated per matrix, on the device,
on a grid of ``GRID`` points (logarithmic from ``1e-12`` and linear, in ``s / ||Y||_F``), so
it is a numerical supremum, not a certified one. Rounding adds ``(steps + 1)`` times the
rounding term of the other fast backends (:mod:`proxrank.backends`), ``lambda u (2 + sqrt(m)
+ sqrt(n)) ||Y||_F`` per polar step; the Newton-Schulz iteration is self-correcting (its
fixed points, the partial isometries, attract), so this over-counts in practice. The CPU
stress test (``tests/test_backend_stress.py``) checks the bound against the float64 exact
prox on random and adversarial spectra.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Backend, State, SVDResult, check_positive, state_list
from .kernels import ROUNDING_LAMBDA, frobenius2, lapack, rounding

__all__ = ["GRID", "PolarBackend", "newton_schulz", "polar", "polar_svt"]

GRID = 4096
"""Points of the grid on which the scalar error map of :func:`polar_svt` is maximised."""


def newton_schulz(floor: float, dtype: torch.dtype) -> list[tuple[float, float]]:
    """Coefficients ``(a_k, b_k)`` of the scaled cubic Newton-Schulz steps ``p_k(x) = a_k x +
    b_k x^3`` that take every singular value in ``[floor, 1]`` to within the precision of
    ``dtype`` of one (see the module docstring)."""
    check_positive(floor, "floor")
    if floor >= 1:
        raise ValueError(f"floor must be < 1, got {floor!r}")
    target = torch.finfo(dtype).eps
    coeffs, low = [], float(floor)
    while 1 - low > target and len(coeffs) < 200:
        alpha = math.sqrt(3 / (1 + low + low * low))
        coeffs.append((1.5 * alpha, -0.5 * alpha**3))
        low = 1.5 * alpha * low - 0.5 * (alpha * low) ** 3
    coeffs.append((1.5, -0.5))  # one plain step: damps what rounding left (fixed point 1)
    return coeffs


def _apply(x: Any, coeffs: list[tuple[float, float]]) -> Any:
    """The composed scalar polynomials (elementwise)."""
    for a, b in coeffs:
        x = a * x + b * x * x * x
    return x


def polar(A: Tensor, coeffs: list[tuple[float, float]]) -> Tensor:
    """Approximate polar factor ``U V^T`` of each ``A = U diag(s) V^T`` (``(..., m, n)``, ``m <=
    n``) by the Newton-Schulz steps ``coeffs`` on ``A / ||A||_F`` (a zero matrix stays zero)."""
    norm = torch.linalg.matrix_norm(A).clamp_min(torch.finfo(A.dtype).tiny)
    X = A / norm[..., None, None]
    for a, b in coeffs:
        X = a * X + b * ((X @ X.mT) @ X)
    return X


def polar_svt(Y: Tensor, tau: Tensor, floor: float = 1e-6) -> tuple[Tensor, Tensor]:
    """``svt(Y, tau)`` by matrix products only, with its bound (see the module docstring).

    ``Y``: ``(..., m, n)`` float32 or float64 (any orientation), finite; ``tau``: broadcastable
    to ``Y.shape[:-2]``, ``>= 0``. Returns ``X`` (``Y``'s shape and dtype) and ``bound``
    (``Y.shape[:-2]``, float64): an upper bound on ``||X - svt(Y, tau)||_F`` (a numerical
    supremum plus a rounding term). No host synchronisation. ``floor``: singular values below
    ``floor ||Y||_F`` and differences ``|s - tau|`` below ``floor ||M||_F`` are not resolved by
    the polar steps; what that costs is in the bound."""
    tall = Y.shape[-2] > Y.shape[-1]
    A = Y.mT if tall else Y
    coeffs = newton_schulz(floor, A.dtype)
    t = torch.as_tensor(tau, dtype=A.dtype, device=A.device).expand(A.shape[:-2])
    # exact power-of-two scaling to a largest entry in [0.5, 1): no square overflows
    _, expo = torch.frexp(A.abs().amax((-2, -1)))
    scale = torch.ldexp(torch.ones_like(t), -expo)
    A, t = A * scale[..., None, None], t * scale
    Q = polar(A, coeffs)
    M = A - t[..., None, None] * Q
    P = polar(M, coeffs)
    X = 0.5 * (M + (P @ Q.mT) @ M)
    T = Q - (Q @ Q.mT) @ Q  # = U (g - g^3) V^T: the unresolved part of polar(Y)
    bound = _bound(A, M, T, t, coeffs, floor) / scale.double()
    X = X / scale[..., None, None]
    return (X.mT if tall else X), bound


def _bound(
    A: Tensor, M: Tensor, T: Tensor, t: Tensor, coeffs: list[tuple[float, float]], floor: float
) -> Tensor:
    """Per matrix, with ``nu = ||A||_F``, ``g = F(s / nu)``, ``eps = 1 - F(floor)`` and
    ``e(s) = |phi~(s) - max(s - tau, 0)|`` (module docstring):

    * resolved values (``s >= floor nu``): at most ``sqrt(m) max_grid e(s)``;
    * the others: ``h = s - tau g``; when ``h <= 0``, ``|phi~| <= 0.5 tau g (1 - g) + 0.5 tau
      eps + 0.5 floor ||M||_F`` (the last for ``|h|`` unresolved by ``polar(M)``); when ``h >
      0``, ``|phi~| <= h <= s < floor nu``; the exact value is at most ``floor nu`` (or
      ``tau`` is below it). Over all of them ``(sum (0.5 tau g (1 - g))^2)^(1/2) <= 0.5 tau
      ||Q - Q Q^T Q||_F`` (``Q Q^T Q`` has the values ``g^3``, ``g - g^3 >= g (1 - g)``), the
      rest at most ``sqrt(m)`` times its largest value;

    plus the rounding term of the module docstring."""
    m, n = A.shape[-2:]
    ny = frobenius2(A).sqrt()
    nm = frobenius2(M).sqrt()
    td = t.double()
    eps = 1 - _apply(floor, coeffs)
    half = GRID // 2
    x = torch.cat(
        [
            torch.logspace(math.log10(floor), 0, half, dtype=torch.float64, device=A.device),
            torch.linspace(floor, 1, half, dtype=torch.float64, device=A.device),
        ]
    )
    s = x * ny.unsqueeze(-1)  # (..., GRID)
    g = _apply(x, coeffs)
    h = s - td.unsqueeze(-1) * g
    nmc = nm.clamp_min(1e-300).unsqueeze(-1)
    f = _apply(h / nmc, coeffs)
    err = (0.5 * h * (1 + f * g) - (s - td.unsqueeze(-1)).clamp_min(0)).abs()
    # a singular value s of A has |h(s)| <= ||M||_F: other grid points are no singular value
    # (and the polynomials, made for [0, 1], diverge there)
    hi = torch.where(h.abs() <= nmc, err, 0).amax(-1)
    lo = 0.5 * td * eps + 0.5 * floor * nm + 2 * floor * ny + torch.where(td < floor * ny, td, 0)
    unresolved = 0.5 * td * torch.linalg.matrix_norm(T).double()
    u = torch.finfo(A.dtype).eps / 2
    steps = len(coeffs) + 1
    rounded = steps * ROUNDING_LAMBDA * u * (2 + math.sqrt(m) + math.sqrt(n)) * ny
    return math.sqrt(m) * (hi + lo) + unresolved + rounded


class PolarBackend(Backend):
    """Singular triplets above the cutoff from :func:`polar_svt` (computed in float64, where
    its bound is far below ``tol``): ``X = svt(Y, c)`` has the triplets ``(u_i, s_i - c,
    v_i)`` of ``Y`` with ``s_i > c``; they come from the eigendecomposition of ``X X^T``
    (``m <= n``) as ``V^T = diag(1/sigma) U^T X``, values ``sigma + c``. Bound: that of
    :func:`polar_svt`, plus the measured distance of the returned triplets' product from
    ``X``, plus the rounding of the returned factors (:mod:`proxrank.backends`). A batch whose
    bound exceeds ``tol ||Y||_F`` somewhere, a rank request (``min_rank``) and an infinite
    cutoff go to the exact SVD (``fallback=True``).

    The engine's prox needs the triplets (diagnostics, schedules): that costs one host
    synchronisation and an ``m x m`` eigendecomposition which :func:`polar_svt` alone, the
    GPU path, avoids. The hard threshold is not non-expansive (see
    :mod:`proxrank.backends`)."""

    name = "polar"

    def __init__(self, tol: float = 1e-4, floor: float = 1e-8) -> None:
        check_positive(tol, "tol")
        newton_schulz(floor, torch.float64)  # validates floor
        self.tol, self.floor = float(tol), float(floor)

    def __repr__(self) -> str:
        return f"PolarBackend(tol={self.tol:g}, floor={self.floor:g})"

    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        batch_shape, (m0, n0) = Y.shape[:-2], Y.shape[-2:]
        transposed = m0 > n0
        A = Y.reshape(-1, m0, n0)
        A = A.mT if transposed else A
        B, m, n = A.shape
        states = state_list(state, B)
        c = torch.as_tensor(cutoff, dtype=torch.float64, device=Y.device).expand(batch_shape)
        c = c.reshape(-1)
        if min_rank or not bool((torch.isfinite(c) & (c >= 0)).all()):
            return self._exact(A, states, batch_shape, transposed)
        Ad = A.double()
        X, bound = polar_svt(Ad, c, self.floor)
        lam, W = lapack(torch.linalg.eigh, X @ X.mT, list(range(B)))
        lam, W = lam.flip(-1), W.flip(-1)
        sigma = lam.clamp_min(0).sqrt()
        keep = sigma > sigma[..., :1] * (m * torch.finfo(torch.float64).eps)
        K = max(int(keep.sum(-1).max()), 1)  # one sync
        U, sig, ok = W[..., :K], sigma[..., :K], keep[..., :K]
        Vh = torch.where(ok.unsqueeze(-1), (U.mT @ X) / torch.where(ok, sig, 1).unsqueeze(-1), 0)
        recon = (U * torch.where(ok, sig, 0).unsqueeze(-2)) @ Vh
        norm2 = frobenius2(Ad)
        total = bound + torch.linalg.matrix_norm(recon - X) + rounding(norm2, A.dtype, m, n)
        if not bool((total <= self.tol * norm2.sqrt()).all()):
            return self._exact(A, states, batch_shape, transposed)
        S = torch.where(ok, sig + c.unsqueeze(-1), 0).to(A.dtype)
        U, Vh, err = U.to(A.dtype), Vh.to(A.dtype), total.to(A.dtype)
        for i, st in enumerate(states):
            st.update(backend="polar", error_bound=err[i].clone(), fallback=False, triplets=K)
        return _result(U, S, Vh, err, batch_shape, transposed)

    def _exact(self, A: Tensor, states, batch_shape, transposed: bool) -> SVDResult:
        U, S, Vh = lapack(
            lambda Z: torch.linalg.svd(Z, full_matrices=False), A, list(range(A.shape[0]))
        )
        zero = A.new_zeros(A.shape[0])
        for st in states:
            st.update(backend="exact", error_bound=zero[0].clone(), fallback=True)
            st["triplets"] = S.shape[-1]
        return _result(U, S, Vh, zero, batch_shape, transposed)


def _result(U, S, Vh, bound, batch_shape, transposed: bool) -> SVDResult:
    """Undo the orientation and the batch flattening."""
    if transposed:
        U, Vh = Vh.mT, U.mT
    return SVDResult(
        U.reshape(*batch_shape, *U.shape[-2:]),
        S.reshape(*batch_shape, S.shape[-1]),
        Vh.reshape(*batch_shape, *Vh.shape[-2:]),
        bound.reshape(batch_shape),
    )

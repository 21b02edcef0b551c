"""Backends: how the singular triplets a prox step needs are computed.

Modules: :mod:`~proxrank.backends.base` (the :class:`Backend` interface), ``exact``, ``polar``,
``kernels`` (the three methods and their certificates), ``planner`` (which method per
matrix), ``certified`` (the orchestration shared by the fast backends).

A thresholding prox (:mod:`proxrank.prox`) maps every singular value at or below a cutoff
``c`` to zero, so it needs only the triplets ``(u_i, s_i, v_i)`` with ``s_i > c``. A backend
returns (at least) those, sorted in descending order, as an :class:`SVDResult` together with
a bound on how far the prox built from them can be from the exact prox.

Backends (``backend=`` of :class:`proxrank.ProxRank`):

``"exact"``
    full SVD (:func:`torch.linalg.svd`); bound zero.
``"gram"``
    eigendecomposition of the smaller Gram matrix ``G = Y Y^T`` (``m <= n``, else of
    ``Y^T Y``), formed and decomposed in float64: ``Y = U diag(s) V^T`` with
    ``G = U diag(s^2) U^T`` and ``V^T = diag(1/s) U^T Y``.
``"subspace"``
    warm-started subspace iteration: the basis ``B`` (``m x k``) kept from the previous step
    takes one block power step on this step's matrix, ``Q = orth(Y Y^T B)`` (the stored basis
    has not seen the latest update, which alone would put the Ritz residual above ``tol``),
    then gives Ritz triplets of ``Q^T Y`` (Rayleigh-Ritz), and ``Y Y^T Q U_c`` (one more block
    power step) becomes the next step's basis. A matrix whose certificate fails gets another
    Rayleigh-Ritz round from that power-iterated basis (``iterations`` rounds at most, then
    the exact SVD).
    The block grows when every Ritz value is above the cutoff and shrinks when many are below;
    every ``refresh`` steps it is rebuilt exactly.
``"polar"``
    matrix products only (:mod:`~proxrank.backends.polar`): ``svt(Y, c)`` from two polar
    factors by scaled Newton-Schulz iterations in float64, then the triplets of the
    thresholded matrix; for GPUs, where :func:`polar_svt` (no triplets, no host
    synchronisation, ``torch.compile``-able) is the fused path.
``"auto"``
    per matrix and step (:class:`~proxrank.backends.planner.AutoPlanner`): while the matrix is
    (nearly) full rank or has no basis yet,
    ``"gram"`` for oblong matrices (long side at least twice the short one) and ``"exact"`` for
    squarish ones (where the SVD is as cheap as the eigendecomposition); ``"subspace"`` once its
    block is at most ``max_ratio`` of the smaller side; ``"exact"`` for small matrices. A
    Gram result that cannot be certified (values clustered at the cutoff) gets a
    Rayleigh-Ritz round from its eigenvectors before the exact SVD; a subspace result still
    uncertified after its rounds gets the Gram route (oblong matrices) before the exact SVD,
    and the step after such a fallback goes to that route directly (``Planner.fallback``);
    one batch may mix plans.

Certificate (all fast backends). Let ``Q`` be the orthonormal basis of the computed left
vectors (``k`` columns), ``(U_1, S_1, V_1)`` the returned triplets with ``s > c`` (Ritz
triplets: ``U_1^T Y = S_1 V_1^T`` exactly). In the bases ``[U_1, U_1^perp]``,
``[V_1, V_1^perp]``::

    Y = [[S_1, 0], [E_21, E_22]],   E_21 = Y V_1 - U_1 S_1 (the Ritz residual).

If ``||E_22||_2 <= c`` the block-diagonal part ``Y_0`` has the prox ``U_1 phi(S_1) V_1^T`` (what
the backend returns), and a non-expansive prox (soft thresholding) satisfies
``||prox(Y) - prox(Y_0)||_F <= ||Y - Y_0||_F = ||E_21||_F``: that is ``error_bound``. When the
condition ``||E_22||_2 <= c`` cannot be certified the bound is ``inf``. ``||E_22||_2`` is bounded by
``sqrt(s_drop^2 + ||(I - Q Q^T) Y||_2^2)`` (``s_drop`` the largest Ritz value outside ``U_1``).
``U_1`` may also hold Ritz triplets below the cutoff (``phi`` maps them to zero, so the prox and
the returned triplets do not change): ``"subspace"`` certifies with the fewest that make
``s_drop`` small enough, which matters when the spectrum is dense at the cutoff.

* the spectrum (``"subspace"``/``"auto"`` with ``spectrum=True``; off by default), when the
  tail bound below fails but the Ritz residual alone is within ``tol``: values dense at the
  cutoff, or a rank request whose ``min_rank``-th value sits in the noise tail an optimizer
  step adds to a low-rank weight, where no cheap bound on ``||(I - Q Q^T) Y||_2`` separates
  it from its neighbours. The eigenvalues ``lambda_i`` of ``G = Y Y^T`` (formed and solved in
  float64 without eigenvectors, within ``eta = (n + 8 m) eps ||Y||_F^2``) replace the tail
  bound: with the first ``j`` Ritz vectors ``U_1`` (re-orthonormalised in float64; their
  defect ``omega`` adds ``3 omega ||Y||_F``) and ``rho >= ||G U_1 - U_1 S_1^2||_F``
  (float64), if ``s_j^2 - rho > lambda_{j+1} + rho``, Weyl's inequality puts the squared
  singular values of ``E_22`` below ``lambda_{j+i} + rho``, so ``||svt(E_22, c)||_F`` is
  bounded from the spectrum and enters the bound in place of the condition ``||E_22||_2 <=
  c`` (:func:`~proxrank.backends.kernels.spectral_bound`). A rank request takes the
  ``min_rank``-th value from the spectrum too (the threshold of the rank prox; its error
  times ``sqrt(j)`` is added). State ``"spectrum"`` says a result was certified so. Cost: one
  float64 ``m x m x n`` product and an eigenvalue solve (no vectors);
* ``"gram"`` bounds it deterministically from the eigen-residuals ``||G q_i - lambda_i q_i||``
  and the float64 rounding of ``G`` (``n eps ||Y||_F^2``);
* ``"subspace"`` takes the smaller of the Frobenius norm ``(||Y||_F^2 - ||Q^T Y||_F^2)^{1/2}``
  (with a rounding margin) and a randomized power bound (Halko, Martinsson & Tropp 2011,
  Lemma 4.1): with ``r`` Gaussian probes ``w_j``, ``B = (R R^T)^q R`` and any ``alpha > 1``,
  ``||B||_2 <= alpha sqrt(2/pi) max_j ||B w_j||`` except with probability ``alpha^-r``;
  ``alpha = 10^(10/r)`` (failure probability ``FAILURE = 1e-10``; ``r = 16``, ``q = 2``). The
  probes and the first power step ride along in the block products of the round.

Rounding. The certificates above hold in exact arithmetic on the computed quantities; the
reported ``error_bound`` adds the rounding of the returned factors in the compute dtype
(precision ``u``): ``lambda u (2 + sqrt(m) + sqrt(n)) ||Y||_F``, a probabilistic bound in the
sense of Higham & Mary (2019): inner products of length ``d`` carry a relative error at most
``lambda sqrt(d) u`` except with probability ``2 exp(-lambda^2 / 2)`` per product
(``lambda = ROUNDING_LAMBDA = 4``). The exact SVD reports zero: it is the reference, its own
rounding that of a backward-stable SVD. Inputs are scaled by a power of two (exact) before
any product, so squares neither overflow nor underflow at any scale.

Rank requests (``min_rank`` with ``cutoff = +inf``): the discarded part must then stay below
the ``min_rank``-th computed value instead of the cutoff, so that the returned triplets are
the largest; a block narrower than ``min_rank`` cannot certify.

A result whose bound exceeds ``tol * ||Y||_F`` (or is ``inf``: not certifiable) is recomputed
with the exact SVD (its state records ``backend="exact"`` and ``fallback=True``).
The hard threshold is not non-expansive: there the bound is the Ritz residual, and the prox
error can exceed it by the Wedin factor ``1 + 2 s_1 / gap``.

A call decides, for a whole batch, with one host synchronisation per round (a second one only
when some matrix needs another round or the exact fallback): no per-matrix ``.item()``.
Per matrix, ``state`` records ``"backend"`` (the method used), ``"error_bound"`` (a 0-dim
tensor), ``"triplets"`` (number of returned triplets), ``"fallback"``, ``"rounds"``,
``"spectrum"``, ``"since_refresh"``, and for ``"subspace"``/``"auto"`` the basis ``"basis"``
and ``"shape"``.
Nothing stored is ever NaN or infinite; the states are only assigned, never mutated in place
(see :class:`Backend`). LAPACK failures are retried in float64, then raised as
:class:`BackendError` with the batch position of the matrix.
"""

from __future__ import annotations

from .base import Backend, BackendError, State, SVDResult, check_positive, compute_dtype
from .certified import AutoBackend, CertifiedBackend, GramBackend, SubspaceBackend
from .exact import ExactBackend
from .kernels import FAILURE, ROUNDING_LAMBDA
from .planner import AutoPlanner, GramPlanner, Planner, SubspacePlanner
from .polar import PolarBackend, polar_svt

__all__ = [
    "FAILURE",
    "ROUNDING_LAMBDA",
    "AutoBackend",
    "AutoPlanner",
    "Backend",
    "BackendError",
    "CertifiedBackend",
    "ExactBackend",
    "GramBackend",
    "GramPlanner",
    "Planner",
    "PolarBackend",
    "SVDResult",
    "State",
    "SubspaceBackend",
    "SubspacePlanner",
    "compute_dtype",
    "get_backend",
    "polar_svt",
]

_BACKENDS: dict[str, type[Backend]] = {
    "exact": ExactBackend,
    "gram": GramBackend,
    "subspace": SubspaceBackend,
    "auto": AutoBackend,
    "polar": PolarBackend,
}


def get_backend(
    backend: str | Backend, *, option: str = "backend", tol: float | None = None
) -> Backend:
    """Resolve a backend name (``tol`` passed to the certified ones) or pass a
    :class:`Backend` instance through."""
    if tol is not None:
        check_positive(tol, "tol")
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in _BACKENDS:
        cls = _BACKENDS[backend]
        if issubclass(cls, CertifiedBackend | PolarBackend) and tol is not None:
            return cls(tol=tol)
        return cls()
    raise ValueError(
        f"{option}={backend!r} is not a known backend; use one of {sorted(_BACKENDS)} "
        "or a proxrank.backends.Backend instance"
    )

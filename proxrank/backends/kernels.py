"""Kernels of the certified backends: the exact SVD, the Gram eigendecomposition and one
Rayleigh-Ritz round of subspace iteration, each on a batch ``(b, m, n)`` with ``m <= n``,
cutoffs ``c`` (``(b,)``) and with its certificate (see :mod:`proxrank.backends`).

Every kernel returns a :class:`Part`: the triplets before the host knows how many each matrix
needs, the certified bound (``inf`` where it cannot certify), and the columns whose span seeds
the next round or the next step's basis. Inputs are expected scaled to a largest entry of
about one (the caller scales by a power of two, which is exact), so that squares neither
overflow nor underflow.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import BackendError

__all__ = [
    "FAILURE",
    "ROUNDING_LAMBDA",
    "Part",
    "exact_part",
    "frobenius2",
    "gram_eigenvalues",
    "gram_part",
    "lapack",
    "spectral_bound",
    "subspace_part",
]

FAILURE = 1e-10
"""Probability that the randomized tail bound of ``"subspace"`` is not an upper bound."""

ROUNDING_LAMBDA = 4.0
"""``lambda`` of the probabilistic rounding bound: an inner product of length ``d`` computed
in precision ``u`` is within ``lambda sqrt(d) u`` (relative to the product of the norms) of
the exact one except with probability at most ``2 exp(-lambda^2 (1 - u)^2 / 2)`` (Higham &
Mary 2019, Theorem 3.1): ``7e-4`` per inner product, and independent errors of the many
inner products that enter a norm average far below that."""


@dataclass
class Part:
    """The result of one method on the matrices ``idx`` of the batch."""

    idx: list[int]
    method: str
    U: Tensor  # (b, m, k), descending
    S: Tensor  # (b, k)
    vh: Callable[[int], Tensor]  # first K right vectors (b, K, n)
    bound: Tensor  # (b,)
    need: Tensor  # (b,) number of triplets to return
    next_src: Tensor  # (b, m, k): columns whose span is the next basis
    spectral: Spectral | None = None  # the certificate from the exact spectrum (subspace)
    floor: Tensor | None = None  # (b,) the part of `bound` that `spectral` cannot lower
    from_spectrum: bool = False  # certified by `spectral`

    def select(self, keep: list[int]) -> Part:
        """The part restricted to its matrices at positions ``keep``."""
        if len(keep) == len(self.idx):
            return self
        vh, spec = self.vh, self.spectral
        return Part(
            [self.idx[j] for j in keep],
            self.method,
            self.U[keep],
            self.S[keep],
            lambda K: vh(K)[keep],
            self.bound[keep],
            self.need[keep],
            self.next_src[keep],
            None if spec is None else lambda rows, lam: spec([keep[r] for r in rows], lam),
            None if self.floor is None else self.floor[keep],
            self.from_spectrum,
        )

    def with_spectrum(self, rows: list[int], spectrum: tuple[Tensor, Tensor, Tensor]) -> Part:
        """The part's matrices at positions ``rows`` recertified from the eigenvalues of their
        Gram matrices (:func:`gram_eigenvalues`) instead of a tail bound; the same
        triplets."""
        assert self.spectral is not None
        sub = self.select(rows)
        bound, S = self.spectral(rows, spectrum)
        return Part(
            sub.idx, sub.method, sub.U, S, sub.vh, bound, sub.need, sub.next_src, from_spectrum=True
        )


Spectral = Callable[[list[int], tuple[Tensor, Tensor, Tensor]], tuple[Tensor, Tensor]]
"""``(rows, (lam, eta, G)) -> (bound, S)``: a subspace part's certificate for its matrices at
``rows`` given their Gram matrices ``G`` (float64), its eigenvalues ``lam`` (descending) and
their error ``eta`` (:func:`gram_eigenvalues`); ``S`` the Ritz values with the
``min_rank``-th replaced by its exact value."""


def lapack(fn: Callable[[Tensor], tuple[Tensor, ...]], A: Tensor, idx: Sequence[int]):
    """``fn(A)`` (a LAPACK decomposition); on non-convergence retried in float64 and cast
    back; if that fails too, :class:`BackendError` naming the batch position (from ``idx``,
    the positions of ``A``'s matrices in the caller's batch)."""
    try:
        return fn(A)
    except torch.linalg.LinAlgError as first:
        try:
            return tuple(t.to(A.dtype) for t in fn(A.double()))
        except torch.linalg.LinAlgError as err:
            found = re.search(r"[Bb]atch element (\d+)", str(err))
            local = int(found.group(1)) if found else (0 if len(idx) == 1 else None)
            index = idx[local] if local is not None and local < len(idx) else None
            raise BackendError(
                f"the decomposition of matrix {index} of the batch failed to converge in "
                f"{A.dtype} and in float64 ({first}); check the weight for extreme or "
                "non-finite values",
                index,
            ) from err


def frobenius2(Y: Tensor) -> Tensor:
    """An upper bound on ``||Y||_F^2`` per matrix, in float64 and within ``(n + 1) eps``
    relative of it: rows summed in ``Y``'s own dtype (the worst-case rounding of ``n``
    squares and sums is added), rows added in float64. Casting ``Y`` to float64 instead
    costs more than the whole prox of a low-rank matrix."""
    k = (Y.shape[-1] + 1) * torch.finfo(Y.dtype).eps
    return Y.square().sum(-1).double().sum(-1) * (1 + k / (1 - k))


def rounding(norm2: Tensor, dtype: torch.dtype, m: int, n: int) -> Tensor:
    """Probabilistic bound (``ROUNDING_LAMBDA``) on the rounding of the returned factors of
    a fast method in ``dtype``, as a Frobenius norm of their prox: ``lambda u (2 + sqrt(m) +
    sqrt(n)) ||Y||_F``: the vectors rounded to ``dtype`` (``u ||phi(S)||_F``), the products
    of length ``m`` and ``n`` that form the right vectors and the Ritz residuals, and the
    needed values below ``eps s_1`` whose right vectors are set to zero (at most
    ``sqrt(m) eps s_1``)."""
    u = torch.finfo(dtype).eps / 2
    return ROUNDING_LAMBDA * u * (2 + math.sqrt(m) + math.sqrt(n)) * norm2.sqrt()


def need_count(S: Tensor, c: Tensor, min_rank: int) -> Tensor:
    """``max(#{s > c}, min_rank)`` per matrix."""
    return (S > c.unsqueeze(-1)).sum(-1).clamp_min(min(min_rank, S.shape[-1]))


def certified_cutoff(S: Tensor, c: Tensor, min_rank: int) -> Tensor:
    """The level the discarded part must stay below: the cutoff, or the ``min_rank``-th
    value when a rank request reaches below it (its triplets must be the largest)."""
    if min_rank == 0:
        return c
    k = S.shape[-1]
    if min_rank > k:
        return torch.full_like(c, -math.inf)  # the block cannot hold them: not certifiable
    return torch.minimum(c, S[..., min_rank - 1].to(c.dtype))


def right_vectors(W: Tensor, Z: Tensor, S: Tensor, K: int) -> Tensor:
    """``diag(1/s) W_K^T Z``; rows for ``s <= eps s_1`` are zero (their values, at most
    ``sqrt(k) eps s_1`` in Frobenius norm, are within :func:`rounding`)."""
    s = S[..., :K]
    tiny = S[..., :1] * torch.finfo(Z.dtype).eps
    ok = (s > tiny).unsqueeze(-1)
    rows = W[..., :K].mT @ Z
    return torch.where(ok, rows / torch.where(ok, s.unsqueeze(-1), 1), 0)


def gather_or_zero(x: Tensor, pos: Tensor) -> Tensor:
    """``x[..., pos]`` per row, zero where ``pos`` is past the end."""
    k = x.shape[-1]
    got = x.gather(-1, pos.clamp_max(k - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(pos < k, got, 0)


def exact_part(Y: Tensor, c: Tensor, min_rank: int, idx: list[int]) -> Part:
    """The full SVD; bound zero (the reference)."""
    U, S, Vh = lapack(lambda A: torch.linalg.svd(A, full_matrices=False), Y, idx)
    zero = torch.zeros_like(c)
    return Part(idx, "exact", U, S, lambda K: Vh[..., :K, :], zero, need_count(S, c, min_rank), U)


def gram_part(Y: Tensor, c: Tensor, norm2: Tensor, min_rank: int, idx: list[int]) -> Part:
    """Eigendecomposition of ``Y Y^T`` in float64 with a deterministic certificate
    (``norm2 >= ||Y||_F^2`` in float64) plus the rounding of the returned factors."""
    m, n = Y.shape[-2:]
    Yd = Y.double()
    G = Yd @ Yd.mT
    lam, V = lapack(torch.linalg.eigh, G, idx)
    lam, V = lam.flip(-1), V.flip(-1)
    res = torch.linalg.vector_norm(G @ V - V * lam.unsqueeze(-2), dim=-2)  # (b, m)
    eps = torch.finfo(torch.float64).eps
    rounding_g = (n * eps / (1 - n * eps)) * norm2  # >= ||fl(G) - Y Y^T||_2
    S = lam.clamp_min(0).sqrt()
    Sy = S.to(Y.dtype)
    need = need_count(Sy, c, min_rank)
    level = certified_cutoff(Sy, c, min_rank).double()
    kept = torch.arange(m, device=Y.device) < need.unsqueeze(-1)
    col = (res + rounding_g.unsqueeze(-1)) / S.clamp_min(torch.finfo(torch.float64).tiny)
    e21 = torch.where(kept, col.square(), 0).sum(-1).sqrt()
    e22_sq = (
        gather_or_zero(lam, need).clamp_min(0)
        + torch.where(kept, 0, res.square()).sum(-1).sqrt()
        + rounding_g
    )
    certified = ((need >= m) | (e22_sq <= level.square())) & (level >= 0)
    total = e21 + rounding(norm2, Y.dtype, m, n)
    bound = torch.where(certified, total, math.inf).to(Y.dtype)
    U = V.to(Y.dtype)
    return Part(idx, "gram", U, Sy, lambda K: right_vectors(U, Y, Sy, K), bound, need, U)


def gram_eigenvalues(Y: Tensor, norm2: Tensor, idx: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``G = fl(Y Y^T)`` in float64 (``m <= n``), its eigenvalues ``lam`` (descending) and
    ``eta`` (``(b,)``) with ``|lam_i - lambda_i(Y Y^T)| <= eta``: the rounding of ``G`` (``n
    eps ||Y||_F^2``, deterministic) plus the backward error of the symmetric eigenvalue solver
    (``8 m eps ||G||_2``, a generous constant for LAPACK's ``syevd``). No eigenvectors: a
    fraction of the cost of an eigendecomposition. Returns ``(lam, eta, G)``."""
    m, n = Y.shape[-2:]
    Yd = Y.double()
    G = Yd @ Yd.mT
    lam = lapack(lambda A: (torch.linalg.eigvalsh(A),), G, idx)[0].flip(-1)
    eps = torch.finfo(torch.float64).eps
    return lam, (n + 8 * m) * eps / (1 - (n + 8 * m) * eps) * norm2, G


def spectral_bound(
    spectrum: tuple[Tensor, Tensor, Tensor], U: Tensor, S: Tensor, j: Tensor, level: Tensor
) -> Tensor:
    """An upper bound on ``||svt(E_22, level)||_F`` plus the distance of the returned
    triplets from exactly orthonormal ones (module docstring of :mod:`proxrank.backends`),
    from the spectrum ``(lam, eta, G)`` of :func:`gram_eigenvalues` instead of a tail bound;
    ``U`` (``(b, m, k)``) the Ritz vectors, ``S`` their values, ``j`` how many are kept.

    ``U_1`` (the first ``j`` columns, orthonormality defect ``omega = ||U_1^T U_1 - I||_F``) is
    within ``omega`` of an orthonormal ``V_1`` (its polar factor); the returned prox moves by at
    most ``3 omega ||Y||_F`` when ``U_1`` is replaced by ``V_1``. ``V_1`` is approximated by
    one Newton-Schulz step in float64 (defect ``omega' <= 0.75 omega^2 + 0.25 omega^3`` plus
    rounding) and ``R = G V_1 - V_1 diag(S_1^2)`` is computed in float64: ``||R||_F <= rho``.
    In the basis ``[V_1, V_1^perp]``, ``G`` differs from ``blockdiag(V_1^T G V_1, G_22)`` by
    at most ``rho`` and ``V_1^T G V_1`` has its eigenvalues above ``s_j^2 - rho``; so if
    ``s_j^2 - rho > lambda_{j+1} + rho``, Weyl's inequality puts the eigenvalues of ``G_22``
    (the squared singular values of ``E_22``) below ``mu_i = lambda_{j+i} + rho``, and
    ``||svt(E_22, level)||_F^2 <= sum_i max(sqrt(mu_i) - level, 0)^2``; else the bound is
    ``inf``."""
    lam, eta, G = spectrum
    m, k = U.shape[-2:]
    eps = torch.finfo(torch.float64).eps
    kept = (torch.arange(k, device=U.device) < j.unsqueeze(-1)).unsqueeze(-2)
    U1 = torch.where(kept, U.double(), 0)
    eye = torch.eye(k, dtype=torch.float64, device=U.device)
    inner = U1.mT @ U1
    diag_kept = kept.squeeze(-2).double()
    E = inner - eye * diag_kept.unsqueeze(-1)
    omega = torch.linalg.matrix_norm(E) + (m + 2) * eps * (1 + inner.diagonal(0, -2, -1).amax(-1))
    V1 = U1 - 0.5 * (U1 @ E)
    w2 = 0.75 * omega.square() + 0.25 * omega.pow(3) + 4 * (m + k) * eps * (1 + omega).square()
    hi = lam + eta.unsqueeze(-1)
    top = hi[..., 0].clamp_min(0)
    s2 = S.double().square() * diag_kept
    R = G @ V1 - V1 * s2.unsqueeze(-2)
    rho = (
        torch.linalg.matrix_norm(R)
        + 2 * top * w2
        + (m + 2) * eps * top * (1 + w2) * j.double().sqrt()
    )
    sj2 = gather_or_zero(s2, (j - 1).clamp_min(0))
    nxt = gather_or_zero(hi, j.clamp_max(m - 1))
    separated = (j == 0) | (sj2 - rho > nxt + rho)
    mu = hi + torch.where(j > 0, rho, 0).unsqueeze(-1)
    rest = torch.arange(m, device=U.device) >= j.unsqueeze(-1)
    over = (mu.clamp_min(0).sqrt() - level.unsqueeze(-1)).clamp_min(0)
    tail = torch.where(rest, over.square(), 0).sum(-1).sqrt()
    ortho = 3 * omega * G.diagonal(0, -2, -1).sum(-1).clamp_min(0).sqrt()
    return torch.where(separated & (omega < 0.5), tail + ortho, math.inf)


def _probe_scale(X: Tensor, log_scale: Tensor) -> tuple[Tensor, Tensor]:
    """``X`` rescaled to unit largest column norm, the scale added to ``log_scale``."""
    top = torch.linalg.vector_norm(X, dim=-2).amax(-1).clamp_min(torch.finfo(X.dtype).tiny)
    return X / top[:, None, None], log_scale + top.double().log()


def _tail_bound(Z: Tensor, X: Tensor, log_scale: Tensor, norm2: Tensor, m: int) -> Tensor:
    """Upper bound on ``||R||_2``, ``R = (I - Q Q^T) Y``, given ``X = B Omega / exp(log_scale)``
    for ``B = (R R^T)^q R`` and ``r`` Gaussian probes: the smaller of a Frobenius bound
    (``norm2 >= ||Y||_F^2`` in float64, with a margin for the rounding of ``||Z||_F``,
    ``Z = Q^T Y``) and ``(alpha sqrt(2/pi) max_j ||B w_j||)^(1/(2q+1))``, an upper bound except
    with probability ``alpha^-r = FAILURE`` (Halko, Martinsson & Tropp 2011, Lemma 4.1), where
    ``2q + 1 = m`` is the number of applications of ``R`` or ``R^T``."""
    eps = torch.finfo(Z.dtype).eps
    fro2 = norm2 - Z.square().sum((-2, -1)).double() + 2 * sum(Z.shape[-2:]) * eps * norm2
    r = X.shape[-1]
    top = torch.linalg.vector_norm(X, dim=-2).amax(-1).double().clamp_min(1e-300)
    log_alpha = -math.log(FAILURE) / r
    log_b = log_alpha + 0.5 * math.log(2 / math.pi) + log_scale + top.log()
    return torch.minimum(fro2.clamp_min(0).sqrt(), torch.exp(log_b / m))


def subspace_part(
    Y: Tensor,
    c: Tensor,
    min_rank: int,
    idx: list[int],
    Q: Tensor,
    YO: Tensor,
    norm2: Tensor,
    power: int,
) -> Part:
    """One Rayleigh-Ritz round from ``Q`` (``(b, m, k)``, finite, any spanning set, zero
    columns allowed): orthonormalise, take the Ritz triplets of
    ``Q^T Y``, certify. ``G U diag(1/lambda)`` (one block power step, columns rescaled to about unit
    norm) seeds the next round or the next step's basis.

    ``YO = Y Omega`` holds the ``r`` Gaussian probes of the tail bound. Their first power step
    rides along in the two products of the round: ``[Q, X]^T Y`` gives ``Z = Q^T Y`` and
    ``(Y^T X)^T``, and ``Y [Z^T W, Y^T X]`` gives ``G U`` and ``Y Y^T X``; each further power
    step (``power`` in all) costs two thin passes over ``Y``."""
    m, n = Y.shape[-2:]
    Q = torch.linalg.qr(Q).Q
    k = Q.shape[-1]

    def project(A: Tensor) -> Tensor:
        return A - Q @ (Q.mT @ A)

    zero = torch.zeros(Y.shape[0], dtype=torch.float64, device=Y.device)
    X, log_scale = _probe_scale(project(YO), zero)
    if power:
        ZT = torch.cat([Q, X], dim=-1).mT @ Y
        Z, T = ZT[..., :k, :], ZT[..., k:, :]
    else:
        Z = Q.mT @ Y  # (b, k, n)
    lam, W = lapack(torch.linalg.eigh, Z @ Z.mT, idx)
    lam, W = lam.flip(-1).clamp_min(0), W.flip(-1)
    U = Q @ W
    if power:
        P = Y @ torch.cat([Z.mT @ W, T.mT], dim=-1)
        GU = P[..., :k]
        X = project(P[..., k:])
    else:
        GU = Y @ (Z.mT @ W)  # = Y Y^T U
    for _ in range(power - 1):
        for side in (Y.mT, Y):
            X, log_scale = _probe_scale(X, log_scale)
            X = side @ X
        X = project(X)
    S = lam.sqrt()
    res = torch.linalg.vector_norm(GU - U * lam.unsqueeze(-2), dim=-2)  # (b, k)
    need = need_count(S, c, min_rank)
    level = certified_cutoff(S, c, min_rank).double()
    # certify with the first j >= need Ritz triplets, j the least with s_j^2 + tail^2 <= c^2:
    # the ones between need and j are below the cutoff (mapped to zero, not returned)
    tail = _tail_bound(Z, X, log_scale, norm2, 2 * power + 1)
    room = level.square() - tail.square()
    if min_rank:  # a block narrower than min_rank (level -inf) cannot certify
        room = torch.where(level >= 0, room, -math.inf)
    j = torch.maximum((S.double().square() > room.unsqueeze(-1)).sum(-1), need)
    kept = torch.arange(k, device=Y.device) < j.unsqueeze(-1)
    col = res / S.clamp_min(torch.finfo(Y.dtype).tiny)
    e21 = torch.where(kept, col.square(), 0).sum(-1).sqrt()
    total = e21.double() + rounding(norm2, Y.dtype, m, n)
    certified = gather_or_zero(S, j).double().square() <= room
    bound = torch.where(certified, total, math.inf).to(Y.dtype)
    floor = (lam[..., :1] * torch.finfo(Y.dtype).eps).clamp_min(torch.finfo(Y.dtype).tiny)
    scaled = GU / lam.clamp_min(floor).unsqueeze(-2)
    col2 = col.double().square()

    def spectral(rows: list[int], spectrum: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        lam_x, eta = spectrum[:2]
        Sr, nr = S[rows], norm2[rows]
        level = c[rows].double()
        shift = torch.zeros_like(level)
        if min_rank:  # the min_rank-th value from the spectrum, not a Ritz value
            if min_rank > k or min_rank > m:
                return torch.full_like(level, math.inf).to(Y.dtype), Sr
            t = lam_x[..., min_rank - 1]
            hi = (t + eta).sqrt()
            exact = t.clamp_min(0).sqrt()
            level = torch.minimum(level, exact)
            shift = hi - (t - eta).clamp_min(0).sqrt()  # >= |exact - s_min_rank|
            Sr = Sr.clone()
            Sr[..., min_rank - 1] = torch.where(exact < c[rows], exact, Sr[..., min_rank - 1])
        jr = torch.minimum((Sr.double() > level.unsqueeze(-1)).sum(-1), need[rows])
        keep = torch.arange(k, device=Y.device) < jr.unsqueeze(-1)
        e21_j = torch.where(keep, col2[rows], 0).sum(-1).sqrt()
        tail_j = spectral_bound(spectrum, U[rows], Sr, jr, level)
        total = e21_j + tail_j + jr.double().sqrt() * shift + rounding(nr, Y.dtype, m, n)
        return torch.where(torch.isfinite(total), total, math.inf).to(Y.dtype), Sr

    own = torch.arange(k, device=Y.device) < (need - (1 if min_rank else 0)).unsqueeze(-1)
    floor = torch.where(own, col2, 0).sum(-1).sqrt() + rounding(norm2, Y.dtype, m, n)
    vh = lambda K: right_vectors(W, Z, S, K)  # noqa: E731
    return Part(idx, "subspace", U, S, vh, bound, need, scaled, spectral, floor.to(Y.dtype))

"""Backends: how the singular triplets a prox step needs are computed.

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
``"auto"``
    per matrix and step: while the matrix is (nearly) full rank or has no basis yet,
    ``"gram"`` for oblong matrices (long side at least twice the short one) and ``"exact"`` for
    squarish ones (where the SVD is as cheap as the eigendecomposition); ``"subspace"`` once its
    block is at most ``max_ratio`` of the smaller side; ``"exact"`` for small matrices.

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

* ``"gram"`` bounds it deterministically from the eigen-residuals ``||G q_i - lambda_i q_i||``
  and the float64 rounding of ``G`` (``n eps ||Y||_F^2``);
* ``"subspace"`` takes the smaller of the Frobenius norm ``(||Y||_F^2 - ||Q^T Y||_F^2)^{1/2}``
  (with a rounding margin) and a randomized power bound (Halko, Martinsson & Tropp 2011,
  Lemma 4.1): with ``r`` Gaussian probes ``w_j``, ``B = (R R^T)^q R`` and any ``alpha > 1``,
  ``||B||_2 <= alpha sqrt(2/pi) max_j ||B w_j||`` except with probability ``alpha^-r``;
  ``alpha = 10^(10/r)`` (failure probability ``FAILURE = 1e-10``; ``r = 16``, ``q = 2``). The
  probes and the first power step ride along in the block products of the round.

A result whose bound exceeds ``tol * ||Y||_F`` is recomputed with the exact SVD (its state
records ``backend="exact"`` and ``fallback=True``). The hard threshold is not non-expansive:
there the bound is the Ritz residual, and the prox error can exceed it by the Wedin factor
``1 + 2 s_1 / gap``.

A call decides, for a whole batch, with one host synchronisation per round (a second one only
when some matrix needs another round or the exact fallback): no per-matrix ``.item()``.
Per matrix, ``state`` records ``"backend"`` (the method used), ``"error_bound"`` (a 0-dim
tensor), ``"triplets"`` (number of returned triplets), ``"fallback"``, ``"rounds"``, and for
``"subspace"``/``"auto"`` the basis ``"basis"`` and ``"shape"``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "AutoBackend",
    "Backend",
    "ExactBackend",
    "GramBackend",
    "SVDResult",
    "SubspaceBackend",
    "compute_dtype",
    "get_backend",
]

State = dict[str, Any] | Sequence[dict[str, Any]]


class SVDResult(NamedTuple):
    """Singular triplets of a (batch of) matrices: ``Y ~ U diag(S) Vh``.

    ``U``: ``(..., m, k)``, ``S``: ``(..., k)`` descending, ``Vh``: ``(..., k, n)``.
    ``error_bound``: ``(...)``, an upper bound on ``||prox(Y) - U diag(phi(S)) Vh||_F`` for a
    non-expansive thresholding ``phi`` (zero for the exact backend).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    error_bound: Tensor


class Backend(abc.ABC):
    """Computes the singular triplets above a cutoff for a batch of matrices.

    ``state`` is caller-owned memory that a backend may use between steps (for example a
    warm-start basis); it is saved in the optimizer's ``state_dict``. For a single matrix it is
    a dict; for a batch ``Y`` of ``B`` matrices it is a sequence of ``B`` dicts, one per matrix
    (a single dict is then used as a container for them).
    """

    name: str = ""

    @abc.abstractmethod
    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        """Triplets of ``Y`` (``(..., m, n)``, float32 or float64): every one with
        ``s > cutoff`` and at least the ``min_rank`` largest (a rank target needs them)."""

    def state_dict(self) -> dict[str, Any]:
        """The backend's own state (random generators), saved in the optimizer's checkpoint."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, validating it before changing anything."""
        if state_dict:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state_dict)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactBackend(Backend):
    """Full thin SVD by :func:`torch.linalg.svd`; exact up to floating-point rounding."""

    name = "exact"

    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        bound = torch.zeros(Y.shape[:-2], dtype=Y.dtype, device=Y.device)
        for i, st in enumerate(_state_list(state, bound.numel())):
            st["backend"], st["error_bound"] = "exact", bound.reshape(-1)[i]
        return SVDResult(U, S, Vh, bound)


# -- kernels: each works on a batch (b, m, n) with m <= n and cutoffs c (b,) ----------------


@dataclass
class _Part:
    """The result of one method on the matrices ``idx`` of the batch, before the host knows
    how many triplets each one needs."""

    idx: list[int]
    method: str
    U: Tensor  # (b, m, k), descending
    S: Tensor  # (b, k)
    vh: Callable[[int], Tensor]  # first K right vectors (b, K, n)
    bound: Tensor  # (b,)
    need: Tensor  # (b,) number of triplets to return
    next_src: Tensor  # (b, m, k): columns whose span is the next basis


def _need(S: Tensor, c: Tensor, min_rank: int) -> Tensor:
    """``max(#{s > c}, min_rank)`` per matrix."""
    return (S > c.unsqueeze(-1)).sum(-1).clamp_min(min(min_rank, S.shape[-1]))


def _right(W: Tensor, Z: Tensor, S: Tensor, K: int) -> Tensor:
    """``diag(1/s) W_K^T Z`` (rows for zero or negligible ``s`` are zero)."""
    s = S[..., :K]
    tiny = S[..., :1] * (torch.finfo(Z.dtype).eps * max(Z.shape[-2:]))
    ok = (s > tiny).unsqueeze(-1)
    rows = W[..., :K].mT @ Z
    return torch.where(ok, rows / torch.where(ok, s.unsqueeze(-1), 1), 0)


def _gather_or_zero(x: Tensor, pos: Tensor) -> Tensor:
    """``x[..., pos]`` per row, zero where ``pos`` is past the end."""
    k = x.shape[-1]
    got = x.gather(-1, pos.clamp_max(k - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(pos < k, got, 0)


def _exact_part(Y: Tensor, c: Tensor, min_rank: int, idx: list[int]) -> _Part:
    U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    zero = torch.zeros_like(c)
    return _Part(idx, "exact", U, S, lambda K: Vh[..., :K, :], zero, _need(S, c, min_rank), U)


def _gram_part(Y: Tensor, c: Tensor, norm2: Tensor, min_rank: int, idx: list[int]) -> _Part:
    """Eigendecomposition of ``Y Y^T`` in float64 with a deterministic certificate
    (``norm2 >= ||Y||_F^2`` in float64)."""
    m, n = Y.shape[-2:]
    Yd = Y.double()
    G = Yd @ Yd.mT
    lam, V = torch.linalg.eigh(G)
    lam, V = lam.flip(-1), V.flip(-1)
    res = torch.linalg.vector_norm(G @ V - V * lam.unsqueeze(-2), dim=-2)  # (b, m)
    eps = torch.finfo(torch.float64).eps
    rounding = (n * eps / (1 - n * eps)) * norm2  # >= ||fl(G) - Y Y^T||_2
    S = lam.clamp_min(0).sqrt()
    need = _need(S.to(Y.dtype), c, min_rank)
    kept = torch.arange(m, device=Y.device) < need.unsqueeze(-1)
    col = (res + rounding.unsqueeze(-1)) / S.clamp_min(torch.finfo(torch.float64).tiny)
    e21 = torch.where(kept, col.square(), 0).sum(-1).sqrt()
    e22_sq = (
        _gather_or_zero(lam, need).clamp_min(0)
        + torch.where(kept, 0, res.square()).sum(-1).sqrt()
        + rounding
    )
    certified = (need >= m) | (e22_sq <= c.double().square())
    bound = torch.where(certified, e21, math.inf).to(Y.dtype)
    U = V.to(Y.dtype)
    return _Part(
        idx,
        "gram",
        U,
        S.to(Y.dtype),
        lambda K: _right(U, Y, S.to(Y.dtype), K),
        bound,
        need,
        U,
    )


FAILURE = 1e-10
"""Probability that the randomized tail bound of ``"subspace"`` is not an upper bound."""


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


def _subspace_part(
    Y: Tensor,
    c: Tensor,
    min_rank: int,
    idx: list[int],
    Q: Tensor,
    YO: Tensor,
    norm2: Tensor,
    backend: SubspaceBackend,
) -> _Part:
    """One Rayleigh-Ritz round from the warm basis ``Q`` (``(b, m, k)``, any spanning set,
    zero columns allowed): orthonormalise, take the Ritz triplets of ``Q^T Y``, certify.
    ``G U diag(1/lambda)`` (one block power step, columns rescaled to about unit norm) seeds
    the next round or the next step's basis.

    ``YO = Y Omega`` holds the ``r`` Gaussian probes of the tail bound. Their first power step
    rides along in the two products of the round: ``[Q, X]^T Y`` gives ``Z = Q^T Y`` and
    ``(Y^T X)^T``, and ``Y [Z^T W, Y^T X]`` gives ``G U`` and ``Y Y^T X``; each further power
    step costs two thin passes over ``Y``."""
    Q = torch.linalg.qr(Q).Q
    k = Q.shape[-1]

    def project(A: Tensor) -> Tensor:
        return A - Q @ (Q.mT @ A)

    zero = torch.zeros(Y.shape[0], dtype=torch.float64, device=Y.device)
    X, log_scale = _probe_scale(project(YO), zero)
    power = backend.power
    if power:
        ZT = torch.cat([Q, X], dim=-1).mT @ Y
        Z, T = ZT[..., :k, :], ZT[..., k:, :]
    else:
        Z = Q.mT @ Y  # (b, k, n)
    lam, W = torch.linalg.eigh(Z @ Z.mT)
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
    need = _need(S, c, min_rank)
    # certify with the first j >= need Ritz triplets, j the least with s_j^2 + tail^2 <= c^2:
    # the ones between need and j are below the cutoff (mapped to zero, not returned)
    room = c.double().square() - _tail_bound(Z, X, log_scale, norm2, 2 * power + 1).square()
    j = torch.maximum((S.double().square() > room.unsqueeze(-1)).sum(-1), need)
    kept = torch.arange(k, device=Y.device) < j.unsqueeze(-1)
    col = res / S.clamp_min(torch.finfo(Y.dtype).tiny)
    e21 = torch.where(kept, col.square(), 0).sum(-1).sqrt()
    bound = torch.where(_gather_or_zero(S, j).double().square() <= room, e21, math.inf)
    scaled = GU / lam.clamp_min(lam[..., :1] * torch.finfo(Y.dtype).eps).unsqueeze(-2)
    return _Part(idx, "subspace", U, S, lambda K: _right(W, Z, S, K), bound, need, scaled)


# -- orchestration -------------------------------------------------------------------------


def _state_list(state: State, batch: int) -> list[dict[str, Any]]:
    if isinstance(state, dict):
        if batch == 1:
            return [state]
        nested = state.setdefault("batch", [])
        if len(nested) != batch:
            nested[:] = [{} for _ in range(batch)]
        return nested
    states = list(state)
    if len(states) != batch or not all(isinstance(s, dict) for s in states):
        raise ValueError(
            f"state must be a dict or a sequence of {batch} dicts (one per matrix of the "
            f"batch); got {type(state).__name__} of length {len(states)}"
        )
    return states


def _frobenius2(Y: Tensor) -> Tensor:
    """An upper bound on ``||Y||_F^2`` per matrix, in float64 and within ``(n + 1) eps``
    relative of it: rows summed in ``Y``'s own dtype (the worst-case rounding of ``n``
    squares and sums is added), rows added in float64. Casting ``Y`` to float64 instead
    costs more than the whole prox of a low-rank matrix."""
    k = (Y.shape[-1] + 1) * torch.finfo(Y.dtype).eps
    return Y.square().sum(-1).double().sum(-1) * (1 + k / (1 - k))


def _check_positive(value: Any, option: str, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{option} must be {what}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{option} must be finite, got {value!r}")


class _CertifiedBackend(Backend):
    """Shared orchestration of the fast backends: choose a method per matrix (:meth:`_plan`),
    run each method once on its sub-batch, certify, fall back to the exact SVD, keep bases."""

    keeps_basis = False
    iterations = 1

    def __init__(self, tol: float = 1e-4) -> None:
        _check_positive(tol, "tol")
        self.tol = float(tol)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tol={self.tol:g})"

    @abc.abstractmethod
    def _plan(self, state: dict[str, Any], m: int, n: int) -> str:
        """``"exact"``, ``"gram"`` or ``"subspace"`` for one matrix (its state and shape,
        ``m <= n``)."""

    def _run(
        self, method: str, Y: Tensor, c: Tensor, norm2: Tensor, min_rank: int, idx, states
    ) -> _Part:
        if method == "exact":
            return _exact_part(Y, c, min_rank, idx)
        if method == "gram":
            return _gram_part(Y, c, norm2, min_rank, idx)
        bases = [states[i]["basis"].to(device=Y.device, dtype=Y.dtype) for i in idx]
        k = max(b.shape[-1] for b in bases)
        Q = Y.new_zeros(len(idx), Y.shape[-2], k)
        for j, b in enumerate(bases):
            Q[j, :, : b.shape[-1]] = b
        # one block power step on this step's matrix first (the stored basis has not seen
        # the update since the last step, which alone puts the Ritz residual above tol);
        # the probes of the tail bound ride along
        P = Y @ torch.cat([(Q.mT @ Y).mT, self._probes(Y)], dim=-1)
        return _subspace_part(Y, c, min_rank, idx, P[..., :k], P[..., k:], norm2, self)  # type: ignore[arg-type]

    def _probes(self, Y: Tensor) -> Tensor:
        """Gaussian probes ``Omega`` (``(b, n, probes)``) for a batch ``Y``."""
        shape = (Y.shape[0], Y.shape[-1], self.probes)  # type: ignore[attr-defined]
        gen = self._generator(Y.device)
        return torch.randn(shape, generator=gen, dtype=Y.dtype, device=Y.device)

    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        batch_shape, (m0, n0) = Y.shape[:-2], Y.shape[-2:]
        transposed = m0 > n0
        Yb = Y.reshape(-1, m0, n0)
        Yb = Yb.mT if transposed else Yb
        m, n = Yb.shape[-2:]
        B = Yb.shape[0]
        c = torch.as_tensor(cutoff, dtype=Y.dtype, device=Y.device).expand(batch_shape)
        c = c.reshape(-1)
        states = _state_list(state, B)
        for st in states:
            if st.get("shape", (m, n)) != (m, n):
                raise ValueError(
                    f"backend state was built for a {st['shape']} matrix but the matrix is now "
                    f"{(m, n)} (oriented with the smaller side first): the parameter changed "
                    "shape; rebuild the ProxRank (or clear this matrix's state) after resizing"
                )
        plan = [self._plan(st, m, n) for st in states]
        norm2 = _frobenius2(Yb)
        pending = []
        for method in dict.fromkeys(plan):
            idx = [i for i, p in enumerate(plan) if p == method]
            whole = len(idx) == B
            sub_Y, sub_c, sub_n = (Yb, c, norm2) if whole else (Yb[idx], c[idx], norm2[idx])
            pending.append(self._run(method, sub_Y, sub_c, sub_n, min_rank, idx, states))
        limit = (self.tol * norm2.sqrt()).to(Y.dtype)
        parts: list[_Part] = []
        need: dict[int, int] = {}
        failed: set[int] = set()
        for rounds in range(1, self.iterations + 2):
            ok = torch.cat([(p.bound <= limit[p.idx]) | (p.method == "exact") for p in pending])
            flags = torch.cat([ok.long(), *(p.need for p in pending)]).tolist()  # one sync
            order = [i for p in pending for i in p.idx]
            need.update(zip(order, flags[len(order) :], strict=True))
            bad = {i for i, good in zip(order, flags, strict=False) if not good}
            retry, redo = [], []
            for p in pending:
                parts.append(_select(p, [i not in bad for i in p.idx]))
                for j, i in enumerate(p.idx):
                    states[i]["rounds"] = rounds
                    if i in bad:
                        (retry if rounds < self.iterations else redo).append((p, j, i))
            pending = []
            if retry:  # one more Rayleigh-Ritz round from the power-iterated basis
                idx = [i for _, _, i in retry]
                Q = torch.stack([p.next_src[j] for p, j, _ in retry])
                sub = Yb[idx]
                YO = sub @ self._probes(sub)
                part = _subspace_part(sub, c[idx], min_rank, idx, Q, YO, norm2[idx], self)  # type: ignore[arg-type]
                pending.append(part)
            if redo:
                idx = [i for _, _, i in redo]
                failed.update(idx)
                pending.append(_exact_part(Yb[idx], c[idx], min_rank, idx))
            if not pending:
                break
        parts = [p for p in parts if p.idx]
        K = max(need.values())
        U = Yb.new_zeros(B, m, K)
        S = Yb.new_zeros(B, K)
        Vh = Yb.new_zeros(B, K, n)
        bound = Yb.new_zeros(B)
        for p in parts:
            k = min(K, p.S.shape[-1])
            t = torch.tensor(p.idx, device=Y.device)
            keep = torch.arange(k, device=Y.device) < p.need.unsqueeze(-1)
            U[t, :, :k] = p.U[..., :k]
            S[t, :k] = torch.where(keep, p.S[..., :k], 0)
            Vh[t, :k] = p.vh(k)
            bound[t] = p.bound
            self._remember(p, states, need, m, n, set(failed))
        if transposed:
            U, Vh = Vh.mT, U.mT
        return SVDResult(
            U.reshape(*batch_shape, *U.shape[-2:]),
            S.reshape(*batch_shape, K),
            Vh.reshape(*batch_shape, *Vh.shape[-2:]),
            bound.reshape(batch_shape),
        )

    def _remember(self, p: _Part, states, need: dict[int, int], m: int, n: int, failed) -> None:
        """Per-matrix diagnostics and, for warm-started backends, the next step's basis."""
        sizes = []
        for j, i in enumerate(p.idx):
            st = states[i]
            st["backend"], st["error_bound"], st["triplets"] = p.method, p.bound[j].clone(), need[i]
            st["fallback"] = i in failed
            k_cur = st["basis"].shape[-1] if p.method == "subspace" else 0
            hard = i in failed or st.get("rounds", 1) > 1
            sizes.append(_next_size(need[i], k_cur, m, hard))
            st["since_refresh"] = st.get("since_refresh", 0) + 1 if p.method == "subspace" else 0
        if not self.keeps_basis:
            return
        K = max(sizes)
        Qn = p.next_src[..., :K]
        if Qn.shape[-1] < K:  # grow: new directions at random
            extra = torch.randn(
                (len(p.idx), m, K - Qn.shape[-1]),
                generator=self._generator(Qn.device),
                dtype=Qn.dtype,
                device=Qn.device,
            )
            Qn = torch.cat([Qn, extra / m**0.5], dim=-1)
        for j, i in enumerate(p.idx):
            states[i]["basis"] = Qn[j, :, : sizes[j]].clone()
            states[i]["shape"] = (m, n)

    def _generator(self, device: torch.device) -> torch.Generator:
        gens = self.__dict__.setdefault("_generators", {})
        key = str(device)
        if key not in gens:
            gens[key] = torch.Generator(device=device).manual_seed(0x5EED)
        return gens[key]


def _select(p: _Part, mask: list[bool]) -> _Part:
    """The part restricted to the matrices where ``mask`` is true."""
    keep = [j for j, good in enumerate(mask) if good]
    if len(keep) == len(p.idx):
        return p
    vh = p.vh
    return _Part(
        [p.idx[j] for j in keep],
        p.method,
        p.U[keep],
        p.S[keep],
        lambda K: vh(K)[keep],
        p.bound[keep],
        p.need[keep],
        p.next_src[keep],
    )


def _next_size(need: int, k_cur: int, m: int, hard: bool = False) -> int:
    """Block size for the next step: ``need`` plus an oversampling margin ``8 + need/8``,
    doubled after a step that needed more than one round or the exact fallback (a wider gap
    between the kept values and the block's edge speeds up the power steps and lowers the
    tail); a subspace block grows by half when all its Ritz values were kept and shrinks when
    more than two margins' worth fell below the cutoff."""
    extra = (8 + need // 8) * (2 if hard else 1)
    target = min(m, need + extra)
    if k_cur == 0:
        return target
    if need >= k_cur:
        return min(m, max(target, k_cur + max(extra, k_cur // 2)))
    if hard:
        return max(k_cur, target)
    if k_cur - need > 2 * extra:
        return target
    return k_cur


class GramBackend(_CertifiedBackend):
    """Eigendecomposition of the smaller Gram matrix in float64 (see the module docstring).

    Costs ``m^2 n`` (float64) plus an ``m x m`` eigendecomposition for ``m <= n``; about 3x
    cheaper than the SVD and rank independent, so it suits the full-rank phase. Small singular
    values lose relative accuracy in Gram form (``s^2`` is what is computed); the certificate
    accounts for it through the eigen-residuals.
    """

    name = "gram"

    def _plan(self, state: dict[str, Any], m: int, n: int) -> str:
        return "gram"


class SubspaceBackend(_CertifiedBackend):
    """Warm-started subspace iteration with Rayleigh-Ritz (see the module docstring).

    Args:
        tol: relative error bound; a result whose bound exceeds ``tol * ||Y||_F`` is redone
            with the exact SVD.
        iterations: most Rayleigh-Ritz rounds per step. The first starts from the basis the
            previous step left after one block power step on this step's matrix; a matrix
            whose certificate fails gets another round from its power-iterated basis, and after
            ``iterations`` rounds the exact SVD. A step costs about five ``m n k`` products
            (power step, Rayleigh-Ritz, reconstruction) and one host synchronisation per
            batch; another round about two more.
        refresh: steps between exact recomputations of the basis.
        probes, power: Gaussian probes and power steps of the randomized bound on the norm
            outside the basis (failure probability ``FAILURE = 1e-10``; the bound is loose by
            at most a factor ``(10^(10/probes) sqrt(2/pi))^(1/(2 power + 1))``, 1.3 for the
            defaults). The first power step rides along in the Rayleigh-Ritz products; each
            further one costs two thin passes over the matrix.
    """

    name = "subspace"
    keeps_basis = True
    _refresh_method = "exact"

    def __init__(
        self,
        tol: float = 1e-4,
        *,
        iterations: int = 2,
        refresh: int = 100,
        probes: int = 16,
        power: int = 2,
    ) -> None:
        super().__init__(tol)
        for value, option in ((iterations, "iterations"), (refresh, "refresh"), (probes, "probes")):
            _check_positive(value, option, integer=True)
        if isinstance(power, bool) or not isinstance(power, int) or power < 0:
            raise ValueError(f"power must be an int >= 0, got {power!r}")
        self.iterations, self.refresh, self.probes, self.power = iterations, refresh, probes, power

    def _plan(self, state: dict[str, Any], m: int, n: int) -> str:
        if state.get("basis") is None or state.get("since_refresh", 0) >= self.refresh:
            return self._refresh_method
        return "subspace"


class AutoBackend(SubspaceBackend):
    """Chooses per matrix and step: ``"exact"`` for matrices whose smaller side is below
    ``min_size`` (the SVD is then cheaper than any bookkeeping); while the matrix's block
    (rank plus margin) is more than ``max_ratio`` of its smaller side, at refresh time and
    for the first step, ``"gram"`` when the matrix is at least ``gram_aspect`` times as long
    as it is wide (the Gram matrix is then the cheap side) and ``"exact"`` otherwise;
    ``"subspace"`` in the remaining (low-rank) case. Other options as
    :class:`SubspaceBackend`. ``max_ratio = 0.7``: measured on 2 CPU threads, a batch of
    384 x 1536 matrices costs less by subspace than by gram up to a block of about 0.7 of the
    smaller side, a square 384 x 384 one less than by the SVD at any block up to 0.8."""

    name = "auto"
    _refresh_method = "gram"

    def __init__(
        self,
        tol: float = 1e-4,
        *,
        max_ratio: float = 0.7,
        min_size: int = 160,
        gram_aspect: float = 2.0,
        **options: Any,
    ) -> None:
        super().__init__(tol, **options)
        _check_positive(max_ratio, "max_ratio")
        _check_positive(min_size, "min_size", integer=True)
        _check_positive(gram_aspect, "gram_aspect")
        self.max_ratio, self.min_size, self.gram_aspect = float(max_ratio), min_size, gram_aspect

    def _plan(self, state: dict[str, Any], m: int, n: int) -> str:
        if m < self.min_size:
            return "exact"
        method = super()._plan(state, m, n)
        if method == "subspace" and state["basis"].shape[-1] > self.max_ratio * m:
            method = "gram"
        if method == "gram" and n < self.gram_aspect * m:
            return "exact"
        return method


_BACKENDS: dict[str, type[Backend]] = {
    "exact": ExactBackend,
    "gram": GramBackend,
    "subspace": SubspaceBackend,
    "auto": AutoBackend,
}


def get_backend(
    backend: str | Backend, *, option: str = "backend", tol: float | None = None
) -> Backend:
    """Resolve a backend name (``tol`` passed to the certified ones) or pass a
    :class:`Backend` instance through."""
    if tol is not None:
        _check_positive(tol, "tol")
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in _BACKENDS:
        cls = _BACKENDS[backend]
        if issubclass(cls, _CertifiedBackend) and tol is not None:
            return cls(tol=tol)
        return cls()
    raise ValueError(
        f"{option}={backend!r} is not a known backend; use one of {sorted(_BACKENDS)} "
        "or a proxrank.backends.Backend instance"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a prox is computed in: float32 for half precision (torch has no fp16/bf16
    SVD), the weight's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

"""Tensor-train (TT) format of weight matrices: TT-SVD rounding and reconstruction.

A matrix ``W`` of shape ``m x n`` with ``m = m_1 ... m_d`` and ``n = n_1 ... n_d`` is read as a
``d``-way tensor with mode ``k`` of size ``m_k n_k`` (the "TT-matrix" layout of Novikov et al.,
2015): ``T[(i_1, j_1), ..., (i_d, j_d)] = W[(i_1 ... i_d), (j_1 ... j_d)]``, row and column
multi-indices in row-major order. A TT decomposition writes

    T[a_1, ..., a_d] = G_1[:, a_1, :] G_2[:, a_2, :] ... G_d[:, a_d, :]

with cores ``G_k`` of shape ``(r_{k-1}, m_k n_k, r_k)``, ``r_0 = r_d = 1``; ``(r_1, ..., r_{d-1})``
are the TT ranks, and the cores hold ``sum_k r_{k-1} m_k n_k r_k`` numbers instead of ``m n``.

TT-SVD (Oseledets, 2011) computes the cores by ``d - 1`` truncated SVDs of successive
unfoldings. Truncating unfolding ``k`` to its ``r_k`` largest singular values gives a tensor of
TT rank at most ``r`` whose error is at most ``sqrt(sum_k e_k^2)`` where ``e_k`` is the error of
the best rank-``r_k`` approximation of unfolding ``k`` of ``T``, hence within ``sqrt(d - 1)`` of
the best TT-rank-``r`` approximation (quasi-optimal). A tensor whose TT ranks are already at
most ``r`` is reproduced exactly (up to rounding): :func:`tt_round` is idempotent.

Every function accepts leading batch dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prox import MatrixMap

__all__ = [
    "TTRound",
    "default_layout",
    "factor_shape",
    "from_tt_tensor",
    "to_tt_tensor",
    "tt_full",
    "tt_parameters",
    "tt_round",
    "tt_svd",
]


def factor_shape(size: int, d: int) -> tuple[int, ...]:
    """Split ``size`` into ``d`` integer factors as equal as possible (largest first), from its
    prime factors; a prime ``size`` gives ``(size, 1, ..., 1)``."""
    if size < 1 or d < 1:
        raise ValueError(f"factor_shape needs size >= 1 and d >= 1, got size={size}, d={d}")
    primes, rest, p = [], size, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    factors = [1] * d
    for q in sorted(primes, reverse=True):  # greedy: the largest prime onto the smallest factor
        factors[factors.index(min(factors))] *= q
    return tuple(sorted(factors, reverse=True))


def default_layout(m: int, n: int, d: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The TT-matrix layout used when none is given: ``m`` and ``n`` each split into ``d``
    near-equal factors (:func:`factor_shape`)."""
    return factor_shape(m, d), factor_shape(n, d)


def _check_shapes(m: int, n: int, row_shape: Sequence[int], col_shape: Sequence[int]) -> None:
    if len(row_shape) != len(col_shape) or not row_shape:
        raise ValueError(
            f"row_shape {tuple(row_shape)} and col_shape {tuple(col_shape)} must have the same "
            "length d >= 1"
        )
    if math.prod(row_shape) != m or math.prod(col_shape) != n:
        raise ValueError(
            f"a {m} x {n} matrix cannot be read with row_shape {tuple(row_shape)} (product "
            f"{math.prod(row_shape)}) and col_shape {tuple(col_shape)} (product "
            f"{math.prod(col_shape)}); the products must be {m} and {n}"
        )


def to_tt_tensor(W: Tensor, row_shape: Sequence[int], col_shape: Sequence[int]) -> Tensor:
    """``W`` (``..., m, n``) as the tensor ``(..., m_1 n_1, ..., m_d n_d)``."""
    d, batch = len(row_shape), W.shape[:-2]
    _check_shapes(W.shape[-2], W.shape[-1], row_shape, col_shape)
    b = len(batch)
    T = W.reshape(*batch, *row_shape, *col_shape)
    order = [*range(b)] + [b + i for k in range(d) for i in (k, d + k)]
    return T.permute(order).reshape(
        *batch, *(r * c for r, c in zip(row_shape, col_shape, strict=True))
    )


def from_tt_tensor(T: Tensor, row_shape: Sequence[int], col_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`to_tt_tensor`: the ``m x n`` matrix of a ``(..., m_1 n_1, ...)``
    tensor."""
    d = len(row_shape)
    batch = T.shape[: T.dim() - d]
    b = len(batch)
    pairs = [x for r, c in zip(row_shape, col_shape, strict=True) for x in (r, c)]
    T = T.reshape(*batch, *pairs)
    order = [*range(b)] + [b + 2 * k for k in range(d)] + [b + 2 * k + 1 for k in range(d)]
    return T.permute(order).reshape(*batch, math.prod(row_shape), math.prod(col_shape))


def _ranks(max_ranks: int | Sequence[int], d: int) -> list[int]:
    ranks = [max_ranks] * (d - 1) if isinstance(max_ranks, int) else list(max_ranks)
    if len(ranks) != d - 1 or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(
            f"TT ranks must be an int >= 1 or {d - 1} ints >= 1 (one per inner bond of a "
            f"{d}-way tensor), got {max_ranks!r}"
        )
    return ranks


def tt_svd(T: Tensor, max_ranks: int | Sequence[int], d: int | None = None) -> list[Tensor]:
    """TT-SVD of the last ``d`` modes of ``T`` (default: all), each bond truncated to at most
    ``max_ranks`` (one int for every bond, or one per bond). Returns the cores, shapes
    ``(..., r_{k-1}, T.shape[k], r_k)``; a bond's rank is also capped by its unfolding's size."""
    d = T.dim() if d is None else d
    batch, modes = T.shape[: T.dim() - d], T.shape[T.dim() - d :]
    ranks = _ranks(max_ranks, d)
    work_dtype = torch.float64 if T.dtype == torch.float64 else torch.float32
    C = T.to(work_dtype).reshape(*batch, 1, -1)
    cores, r_prev = [], 1
    for k in range(d - 1):
        C = C.reshape(*batch, r_prev * modes[k], -1)
        U, S, Vh = torch.linalg.svd(C, full_matrices=False)
        r = min(ranks[k], S.shape[-1])
        cores.append(U[..., :r].reshape(*batch, r_prev, modes[k], r).to(T.dtype))
        C = S[..., :r].unsqueeze(-1) * Vh[..., :r, :]
        r_prev = r
    cores.append(C.reshape(*batch, r_prev, modes[-1], 1).to(T.dtype))
    return cores


def tt_full(cores: Sequence[Tensor]) -> Tensor:
    """The tensor ``(..., n_1, ..., n_d)`` of TT cores ``(..., r_{k-1}, n_k, r_k)``."""
    batch = cores[0].shape[:-3]
    out = cores[0].reshape(*batch, -1, cores[0].shape[-1])  # (..., n_1, r_1)
    modes = [cores[0].shape[-2]]
    for G in cores[1:]:
        r, n, r_next = G.shape[-3:]
        out = (out @ G.reshape(*batch, r, n * r_next)).reshape(*batch, -1, r_next)
        modes.append(n)
    return out.reshape(*batch, *modes)


def tt_round(
    W: Tensor, row_shape: Sequence[int], col_shape: Sequence[int], max_ranks: int | Sequence[int]
) -> Tensor:
    """``W`` (``..., m, n``) rounded to TT rank at most ``max_ranks`` in the TT-matrix layout
    given by ``row_shape`` and ``col_shape``, by TT-SVD (quasi-optimal, idempotent)."""
    d = len(row_shape)
    cores = tt_svd(to_tt_tensor(W, row_shape, col_shape), max_ranks, d)
    return from_tt_tensor(tt_full(cores), row_shape, col_shape)


def tt_parameters(row_shape: Sequence[int], col_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers held by TT cores with these mode sizes and bond ranks ``(r_1, ..., r_{d-1})``."""
    r = [1, *ranks, 1]
    return sum(r[k] * row_shape[k] * col_shape[k] * r[k + 1] for k in range(len(row_shape)))


@dataclass(frozen=True)
class TTRound(MatrixMap):
    """``prox="tt"``: the projection of a weight, read as a TT-matrix tensor
    (:func:`to_tt_tensor`), onto TT rank at most ``r`` by TT-SVD rounding (:func:`tt_round`;
    quasi-optimal, idempotent).

    ``row_shape``/``col_shape``: the layout (default :func:`default_layout` of each matrix,
    ``d`` modes each); ``ranks``: an int for every bond or one per bond. A schedule's target is
    a fraction of the largest possible bond rank (at least 1), or a rank. Given shapes bind the
    map to matrices of that size.

    The level is a cap on every bond's rank: a schedule's level replaces the map's own
    ``ranks`` (as for every :class:`~proxrank.prox.MatrixMap`); without one, bond ``k`` keeps
    ``ranks_k``; either way at most what its unfolding allows.
    """

    row_shape: tuple[int, ...] | None = None
    col_shape: tuple[int, ...] | None = None
    ranks: int | tuple[int, ...] | None = None
    d: int = 3
    name = "tt"
    levels = True

    def __post_init__(self) -> None:
        if (self.row_shape is None) != (self.col_shape is None):
            raise ValueError("TTRound takes row_shape and col_shape together (or neither)")
        if isinstance(self.d, bool) or not isinstance(self.d, int) or self.d < 2:
            raise ValueError(f"TTRound d={self.d!r} must be an int >= 2 (modes of the tensor)")
        if self.row_shape is not None:
            for option in ("row_shape", "col_shape"):  # tuples: the map is hashable
                object.__setattr__(self, option, tuple(getattr(self, option)))
        if isinstance(self.ranks, list):
            object.__setattr__(self, "ranks", tuple(self.ranks))
        if self.ranks is not None:
            d = self.d if self.row_shape is None else len(self.row_shape)
            _ranks(self.ranks, d)

    def layout(self, shape: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ``(row_shape, col_shape)`` used for an ``m x n`` matrix."""
        if self.row_shape is None:
            return default_layout(*shape, d=self.d)
        return self.row_shape, self.col_shape  # type: ignore[return-value]

    def check(self, shape: tuple[int, int]) -> None:
        rows, cols = self.layout(shape)
        _check_shapes(*shape, rows, cols)

    def _bonds(self, shape: tuple[int, int]) -> list[int]:
        """The largest rank of each bond: ``min`` of its unfolding's two sides."""
        rows, cols = self.layout(shape)
        modes = [r * c for r, c in zip(rows, cols, strict=True)]
        return [
            min(math.prod(modes[: k + 1]), math.prod(modes[k + 1 :]))
            for k in range(len(modes) - 1)
        ]

    def tt_ranks(self, shape: tuple[int, int], level: int | None) -> tuple[int, ...]:
        bonds = self._bonds(shape)
        if level is not None:
            own = [level] * len(bonds)
        else:
            own = _ranks(self.ranks, len(bonds) + 1) if self.ranks is not None else bonds
        ranks, r_prev = [], 1
        modes = [r * c for r, c in zip(*self.layout(shape), strict=True)]
        for k in range(len(bonds)):  # as tt_svd truncates: also by r_{k-1} * mode_k
            r_prev = min(own[k], bonds[k], r_prev * modes[k])
            ranks.append(r_prev)
        return tuple(ranks)

    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        shape = (W.shape[-2], W.shape[-1])
        return tt_round(W, *self.layout(shape), list(self.tt_ranks(shape, level)))

    def full_level(self, shape: tuple[int, int]) -> int:
        return max(self._bonds(shape))

    def target_level(self, shape: tuple[int, int], target: float | int) -> int:
        return max(1, super().target_level(shape, target))  # a TT rank is at least 1

    def own_level(self, shape: tuple[int, int]) -> int | None:
        if self.ranks is None:
            return None
        return max(_ranks(self.ranks, len(self._bonds(shape)) + 1))

    def stored_size(self, X: Tensor, level: int | None) -> Tensor:
        shape = (X.shape[-2], X.shape[-1])
        size = tt_parameters(*self.layout(shape), self.tt_ranks(shape, level))
        return torch.tensor(size, device=X.device)


torch.serialization.add_safe_globals([TTRound])  # saved in param groups

"""Sparsity maps on the entries of a weight matrix (:class:`proxrank.prox.MatrixMap`).

For a matrix ``W`` (``m x n``: rows are the output units of a Linear or the output channels of
a Conv, whose matrix is ``out x (in kh kw)``) and a threshold ``tau = lam * lr``:

=============  ==============================================  =================================
name           map                                             regulariser / set
=============  ==============================================  =================================
``l1``         ``w -> sign(w) max(|w| - tau, 0)``               ``||W||_1 = sum |w_ij|`` (lasso)
``group``      ``w_g -> w_g max(1 - tau / ||w_g||_2, 0)``       ``sum_g ||w_g||_2`` (group lasso;
                                                                groups: rows or columns)
``magnitude``  keep the ``k`` entries of largest ``|w|``         ``{#nonzeros <= k}``
``nm``         in each run of ``M`` consecutive entries of a    ``N:M`` structured sparsity
               row, keep the ``N`` of largest ``|w|``
=============  ==============================================  =================================

The first two are proxes of norms: by Moreau's identity ``prox_{tau R}(W) + P_{tau B}(W) = W``
with ``B`` the dual norm's unit ball (``||.||_inf <= 1`` for l1; every group's norm ``<= 1``
for group lasso). The last two are (Euclidean) projections onto non-convex sets, hence
idempotent; their level (``k``, ``N``) comes from the map or from a schedule's target, read as
a fraction of the entries kept (:meth:`~proxrank.prox.MatrixMap.target_level`). Ties in
``|w|`` are broken by ``torch.topk``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .prox import MatrixMap

__all__ = ["L1", "NM", "SPARSITY_MAPS", "GroupLasso", "Magnitude", "keep_largest"]

#: Values of ``GroupLasso(axis=...)``: a group is a row (output unit) or a column (input feature).
AXES = ("rows", "columns")


def _tau(tau: Tensor | float, W: Tensor) -> Tensor:
    """``tau`` (a float or shape ``(b,)``) broadcast against ``W`` (``(b, m, n)``)."""
    t = torch.as_tensor(tau, dtype=W.dtype, device=W.device)
    return t.reshape(-1, 1, 1) if t.dim() > 0 else t


def keep_largest(W: Tensor, k: int) -> Tensor:
    """``W`` (``(..., g)``) with all but the ``k`` entries of largest ``|w|`` in each row of its
    last dimension set to zero: the projection onto ``{#nonzeros <= k}`` of that row."""
    if k >= W.shape[-1]:
        return W.clone()
    idx = W.abs().topk(k, dim=-1).indices
    mask = torch.zeros(W.shape, dtype=torch.bool, device=W.device).scatter_(-1, idx, True)
    return torch.where(mask, W, torch.zeros((), dtype=W.dtype, device=W.device))


@dataclass(frozen=True)
class L1(MatrixMap):
    """``w -> sign(w) max(|w| - tau, 0)``: the prox of ``tau ||W||_1`` (lasso)."""

    name = "l1"

    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        return W.sign() * (W.abs() - _tau(tau, W)).clamp_min(0)

    def regularizer(self, X: Tensor) -> Tensor:
        return X.abs().sum()


@dataclass(frozen=True)
class GroupLasso(MatrixMap):
    """``w_g -> w_g max(1 - tau / ||w_g||_2, 0)``: the prox of ``tau sum_g ||w_g||_2``, groups
    the rows (``axis="rows"``, default: whole output units go to zero) or the columns
    (``axis="columns"``: input features)."""

    axis: str = "rows"
    name = "group"

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"GroupLasso axis={self.axis!r}; use one of {AXES}")

    def _dim(self) -> int:
        return -1 if self.axis == "rows" else -2

    def _norms(self, W: Tensor, keepdim: bool) -> Tensor:
        """Each group's 2-norm, computed as ``a ||w / a||`` with ``a = max |w|``: the squares of
        tiny (huge) entries would underflow (overflow) in ``W``'s dtype."""
        a = W.abs().amax(dim=self._dim(), keepdim=True)
        a = torch.where(a > 0, a, 1)
        norm = a * torch.linalg.vector_norm(W / a, dim=self._dim(), keepdim=True)
        return norm if keepdim else norm.squeeze(self._dim())

    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        norm = self._norms(W, keepdim=True)
        t = _tau(tau, W)
        scale = torch.where(norm > t, 1 - t / torch.where(norm > 0, norm, 1), 0)
        return W * scale

    def regularizer(self, X: Tensor) -> Tensor:
        return self._norms(X, keepdim=False).sum()

    def stored_size(self, X: Tensor, level: int | None) -> Tensor:
        """Entries of the kept groups: the dense matrix without its zero rows (columns)."""
        kept = torch.count_nonzero(X.ne(0).any(dim=self._dim()))
        return kept * X.shape[self._dim()]


def _check_level(level: int | None, name: str) -> int:
    if level is None:
        raise ValueError(
            f"prox {name!r} has no level: give it one (see proxrank.sparsity) or a "
            "Schedule(target=...)"
        )
    return level


@dataclass(frozen=True)
class Magnitude(MatrixMap):
    """Keep the ``ceil(density m n)`` entries of largest ``|w|`` (unstructured magnitude
    pruning), the projection onto ``{#nonzeros <= k}``. Its level is the count ``k`` of entries
    kept; a schedule's level replaces it, and with ``density=None`` the map needs one
    (``Schedule(target=..., ramp="cubic")`` is gradual magnitude pruning;
    ``Schedule(budget=...)`` one global magnitude threshold across the selected matrices)."""

    density: float | None = None
    name = "magnitude"
    levels = True

    def __post_init__(self) -> None:
        d = self.density
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d <= 1
        ):
            raise ValueError(f"Magnitude density={d!r} is a fraction of entries kept, in (0, 1]")

    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        level = self.own_level(W.shape[-2:]) if level is None else level
        k = _check_level(level, self.name)
        return keep_largest(W.reshape(*W.shape[:-2], -1), k).reshape(W.shape)

    def full_level(self, shape: tuple[int, int]) -> int:
        return shape[0] * shape[1]

    def own_level(self, shape: tuple[int, int]) -> int | None:
        return None if self.density is None else math.ceil(self.density * shape[0] * shape[1])


@dataclass(frozen=True)
class NM(MatrixMap):
    """N:M structured sparsity: in each run of ``m`` consecutive entries of a row (input
    entries of one output unit) keep the ``n`` of largest ``|w|`` (default 2:4), the
    projection onto that pattern. Its level is ``n``; a schedule's target sets it as a fraction
    of ``m`` (so a ramp goes ``m:m -> ... -> n:m``). Needs the row length divisible by ``m``."""

    n: int = 2
    m: int = 4
    name = "nm"
    levels = True

    def __post_init__(self) -> None:
        for option, v in (("n", self.n), ("m", self.m)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NM {option}={v!r} must be an int >= 1")
        if self.n > self.m:
            raise ValueError(f"NM keeps n of every m entries: n={self.n} > m={self.m}")

    def check(self, shape: tuple[int, int]) -> None:
        if shape[1] % self.m:
            raise ValueError(
                f"N:M sparsity with m={self.m} needs rows whose length is a multiple of "
                f"{self.m}, got a {shape[0]} x {shape[1]} matrix; exclude it or pick another m"
            )

    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        k = self.n if level is None else level
        runs = W.reshape(*W.shape[:-1], W.shape[-1] // self.m, self.m)
        return keep_largest(runs, k).reshape(W.shape)

    def full_level(self, shape: tuple[int, int]) -> int:
        return self.m

    def own_level(self, shape: tuple[int, int]) -> int | None:
        return self.n


#: The sparsity maps by name, as :func:`proxrank.prox.get_prox` resolves them.
SPARSITY_MAPS: dict[str, type[MatrixMap]] = {m.name: m for m in (L1, GroupLasso, Magnitude, NM)}
torch.serialization.add_safe_globals(list(SPARSITY_MAPS.values()))  # saved in param groups

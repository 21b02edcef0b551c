"""Proximal maps: on singular values (:class:`ProxMap`) or on the matrix itself
(:class:`MatrixMap`).

For a matrix ``Y = U diag(s) V^T`` and a spectral function ``g`` (a function of the singular
values that is invariant under their permutation), the proximal map of ``tau * g`` is

    prox_{tau g}(Y) = U diag(phi_tau(s)) V^T,

where ``phi_tau`` is the scalar prox applied to each singular value. This module defines the
maps ``phi_tau`` used by the optimizer; each one is *thresholding*: every singular value at or
below :meth:`ProxMap.cutoff` maps to zero. That property is what lets fast backends compute
only the singular triplets above the cutoff (see :mod:`proxrank.backends`).

========  =========================  ================================
name      regularizer ``g``          ``phi_tau(s)``
========  =========================  ================================
``soft``  nuclear norm ``sum s_i``   ``max(s - tau, 0)``  (ISVT)
``hard``  ``rank(W)``                ``s * [s > sqrt(2 tau)]``
========  =========================  ================================

A :class:`MatrixMap` acts on the matrix ``W`` directly (its entries, its rows or columns, or a
tensor view of it), batched over same-shape matrices, with no singular value decomposition:
the sparsity maps of :mod:`proxrank.sparsity` (``"l1"``, ``"group"``, ``"magnitude"``,
``"nm"``) and the tensor-train rounding of :mod:`proxrank.tt` (``"tt"``). A *penalty* (l1,
group lasso) is the prox of ``tau R`` for a norm ``R``; a *projection* (magnitude, N:M, TT)
maps onto a set of matrices indexed by an integer *level* (entries kept, ``N`` of N:M, TT rank)
and ignores ``tau``; a schedule's target or budget sets that level (:mod:`proxrank.schedules`).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["HardThreshold", "MatrixMap", "ProxMap", "SoftThreshold", "get_prox"]


class ProxMap(abc.ABC):
    """A thresholding map on singular values, batched over leading dimensions.

    ``s`` has shape ``(..., k)`` (each row sorted in descending order) and ``tau`` has the
    batch shape ``(...)`` or is a Python float.

    Maps are values: subclasses are frozen dataclasses, so two maps with equal options compare
    (and hash) equal, and the optimizer batches the matrices they act on together.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def cutoff(self, tau: Tensor) -> Tensor:
        """Largest singular value that maps to zero, as a function of ``tau``."""

    @abc.abstractmethod
    def __call__(self, s: Tensor, tau: Tensor) -> Tensor:
        """The scalar prox ``phi_tau`` applied to every singular value."""


@dataclass(frozen=True)
class SoftThreshold(ProxMap):
    """``phi_tau(s) = max(s - tau, 0)``: the prox of ``tau * ||W||_*`` (nuclear norm)."""

    name = "soft"

    def cutoff(self, tau: Tensor) -> Tensor:
        return tau

    def __call__(self, s: Tensor, tau: Tensor) -> Tensor:
        return (s - _as_column(tau, s)).clamp_min(0)


@dataclass(frozen=True)
class HardThreshold(ProxMap):
    """``phi_tau(s) = s * [s > sqrt(2 tau)]``: the prox of ``tau * rank(W)``.

    ``0.5 (s - x)^2 + tau [x != 0]`` is minimised by ``x = s`` when ``s^2 / 2 > tau`` and by
    ``x = 0`` otherwise (at equality both are minimisers; zero is chosen).
    """

    name = "hard"

    def cutoff(self, tau: Tensor) -> Tensor:
        return torch.sqrt(2 * tau) if isinstance(tau, Tensor) else math.sqrt(2 * tau)

    def __call__(self, s: Tensor, tau: Tensor) -> Tensor:
        return torch.where(s > _as_column(self.cutoff(tau), s), s, torch.zeros_like(s))


class MatrixMap(abc.ABC):
    """A prox or projection acting on the matrix itself, batched: ``W`` has shape
    ``(b, m, n)`` (the matrix views of :mod:`proxrank.selection`: rows are a Linear's or
    Conv's output units), ``tau`` shape ``(b,)``. Maps are frozen dataclasses, like
    :class:`ProxMap`.

    A penalty (``levels`` is ``False``) is the prox of ``tau R`` for a regulariser ``R``
    (:meth:`regularizer`). A projection (``levels`` is ``True``) maps onto a set indexed by an
    integer level: ``level`` passed to :meth:`__call__` (from a schedule; it replaces the map's
    own) or, when ``None``, the map's own (:meth:`own_level`); it ignores ``tau``.
    """

    name: ClassVar[str] = ""
    #: Whether the map is a projection indexed by a level (see the class docstring).
    levels: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, W: Tensor, tau: Tensor, level: int | None = None) -> Tensor:
        """The map applied to each matrix of ``W`` (``(b, m, n)``, float32 or float64)."""

    def check(self, shape: tuple[int, int]) -> None:
        """Raise ``ValueError`` when the map cannot act on an ``m x n`` matrix (by default it
        acts on every shape)."""
        return None

    def regularizer(self, X: Tensor) -> Tensor:
        """``R(X)`` of one matrix (a 0-dim tensor); 0 for a projection (``X`` is feasible)."""
        return X.new_zeros(())

    def full_level(self, shape: tuple[int, int]) -> int:
        """A projection's level at which it is the identity on ``m x n`` matrices."""
        raise TypeError(f"prox {self.name!r} is a penalty: it has no level")

    def own_level(self, shape: tuple[int, int]) -> int | None:
        """The level the map's own options give (``None``: it needs one from a schedule)."""
        return None

    def target_level(self, shape: tuple[int, int], target: float | int) -> int:
        """The level a schedule's ``target`` stands for: a float in (0, 1] is a fraction of
        :meth:`full_level` (rounded up), an int the level itself (capped at the full one)."""
        full = self.full_level(shape)
        return min(target if isinstance(target, int) else math.ceil(target * full), full)

    def stored_size(self, X: Tensor, level: int | None) -> Tensor:
        """Numbers needed to store one matrix ``X`` in the map's structure (nonzero values,
        kept rows, TT cores), a 0-dim tensor."""
        return torch.count_nonzero(X)

    def tt_ranks(self, shape: tuple[int, int], level: int | None) -> tuple[int, ...] | None:
        """The TT ranks the map leaves (``None``: not a tensor-train map)."""
        return None


_SPECTRAL: dict[str, type[ProxMap]] = {"soft": SoftThreshold, "hard": HardThreshold}
# maps given as objects are saved in the param groups: torch.load(weights_only=True) takes them
torch.serialization.add_safe_globals([SoftThreshold, HardThreshold])


def _known_maps() -> dict[str, type[ProxMap] | type[MatrixMap]]:
    from .sparsity import SPARSITY_MAPS  # the modules of the maps import this one
    from .tt import TTRound

    return {**_SPECTRAL, **SPARSITY_MAPS, "tt": TTRound}


def get_prox(prox: str | ProxMap | MatrixMap, *, option: str = "prox") -> ProxMap | MatrixMap:
    """Resolve a prox name (``"soft"``, ``"hard"``, ``"l1"``, ``"group"``, ``"magnitude"``,
    ``"nm"``, ``"tt"``: each map with its default options) or pass a map through."""
    if isinstance(prox, ProxMap | MatrixMap):
        return prox
    known = _known_maps()
    if isinstance(prox, str) and prox in known:
        return known[prox]()
    raise ValueError(
        f"{option}={prox!r} is not a known prox map; use one of {sorted(known)} or a "
        "proxrank.prox.ProxMap / proxrank.prox.MatrixMap instance"
    )


def _as_column(tau: Tensor | float, s: Tensor) -> Tensor | float:
    """Broadcast a per-matrix ``tau`` of shape ``(...)`` against singular values ``(..., k)``."""
    if isinstance(tau, Tensor) and tau.dim() > 0:
        return tau.unsqueeze(-1)
    return tau

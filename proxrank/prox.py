"""Proximal maps that act on singular values.

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
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

__all__ = ["HardThreshold", "ProxMap", "SoftThreshold", "get_prox"]


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


_PROX_MAPS: dict[str, type[ProxMap]] = {"soft": SoftThreshold, "hard": HardThreshold}


def get_prox(prox: str | ProxMap, *, option: str = "prox") -> ProxMap:
    """Resolve a prox name (``"soft"``, ``"hard"``) or pass a :class:`ProxMap` through."""
    if isinstance(prox, ProxMap):
        return prox
    if isinstance(prox, str) and prox in _PROX_MAPS:
        return _PROX_MAPS[prox]()
    raise ValueError(
        f"{option}={prox!r} is not a known prox map; use one of {sorted(_PROX_MAPS)} "
        "or a proxrank.prox.ProxMap instance"
    )


def _as_column(tau: Tensor | float, s: Tensor) -> Tensor | float:
    """Broadcast a per-matrix ``tau`` of shape ``(...)`` against singular values ``(..., k)``."""
    if isinstance(tau, Tensor) and tau.dim() > 0:
        return tau.unsqueeze(-1)
    return tau

"""Backends: how the singular triplets a prox step needs are computed.

A thresholding prox (:mod:`proxrank.prox`) maps every singular value at or below a cutoff to
zero, so it needs only the triplets ``(u_i, s_i, v_i)`` with ``s_i > cutoff``. A backend
returns (at least) those, sorted in descending order, as an :class:`SVDResult` together with
a bound on how far the prox built from them can be from the exact prox.

The exact backend computes the full SVD with :func:`torch.linalg.svd`; its bound is zero.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Backend", "ExactBackend", "SVDResult", "compute_dtype", "get_backend"]


class SVDResult(NamedTuple):
    """Singular triplets of a (batch of) matrices: ``Y ~ U diag(S) Vh``.

    ``U``: ``(..., m, k)``, ``S``: ``(..., k)`` descending, ``Vh``: ``(..., k, n)``.
    ``error_bound``: ``(...)``, an upper bound on ``||prox(Y) - U diag(phi(S)) Vh||_F``
    (zero for the exact backend).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    error_bound: Tensor


class Backend(abc.ABC):
    """Computes the singular triplets above a cutoff for a batch of matrices.

    ``state`` is a per-matrix dictionary owned by the caller that a backend may use to keep
    information between steps (for example a warm-start basis); it is saved in the optimizer's
    ``state_dict``.
    """

    name: str = ""

    @abc.abstractmethod
    def svd(self, Y: Tensor, cutoff: Tensor, state: dict[str, Any], min_rank: int = 0) -> SVDResult:
        """Triplets of ``Y`` (``(..., m, n)``, float32 or float64): every one with
        ``s > cutoff`` and at least the ``min_rank`` largest (a rank target needs them)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ExactBackend(Backend):
    """Full thin SVD by :func:`torch.linalg.svd`; exact up to floating-point rounding."""

    name = "exact"

    def svd(self, Y: Tensor, cutoff: Tensor, state: dict[str, Any], min_rank: int = 0) -> SVDResult:
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return SVDResult(U, S, Vh, torch.zeros(Y.shape[:-2], dtype=Y.dtype, device=Y.device))


_BACKENDS: dict[str, type[Backend]] = {"exact": ExactBackend}


def get_backend(backend: str | Backend, *, option: str = "backend") -> Backend:
    """Resolve a backend name or pass a :class:`Backend` instance through."""
    if isinstance(backend, Backend):
        return backend
    if isinstance(backend, str) and backend in _BACKENDS:
        return _BACKENDS[backend]()
    raise ValueError(
        f"{option}={backend!r} is not a known backend; use one of {sorted(_BACKENDS)} "
        "or a proxrank.backends.Backend instance"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a prox is computed in: float32 for half precision (torch has no fp16/bf16
    SVD), the weight's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

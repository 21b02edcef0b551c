"""The exact backend: the full thin SVD, the reference every other backend is measured by."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Backend, State, SVDResult, state_list
from .kernels import lapack

__all__ = ["ExactBackend"]


class ExactBackend(Backend):
    """Full thin SVD by :func:`torch.linalg.svd` (retried in float64 when LAPACK does not
    converge); exact up to floating-point rounding, bound zero."""

    name = "exact"

    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        batch_shape = Y.shape[:-2]
        states = state_list(state, batch_shape.numel())
        idx = list(range(len(states)))
        U, S, Vh = lapack(lambda A: torch.linalg.svd(A, full_matrices=False), Y, idx)
        bound = torch.zeros(batch_shape, dtype=Y.dtype, device=Y.device)
        for st in states:
            st["backend"], st["error_bound"] = "exact", bound.new_zeros(())
        return SVDResult(U, S, Vh, bound)

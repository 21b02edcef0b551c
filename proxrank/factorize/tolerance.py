"""When a singular value counts as zero: the rank tolerance every :mod:`proxrank.factorize`
conversion uses (low-rank factors, TT ranks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["default_rtol", "numerical_rank"]


def default_rtol(m: int, n: int, dtype: torch.dtype) -> float:
    """The default relative rank tolerance for an ``m x n`` matrix stored in ``dtype``:
    ``min(eps(dtype) * sqrt(max(m, n)), 1e-2)``.

    A matrix that ProxRank left at rank ``r`` keeps, after the prox is computed and rounded to
    ``dtype``, trailing singular values of about ``eps * s_1`` (float32 / float64: the prox's
    own rounding) or ``0.1 eps * s_1`` (bfloat16: the rounding of the stored weight); the
    factor ``sqrt(max(m, n))`` leaves a margin as :func:`torch.linalg.matrix_rank` does, and the
    cap keeps half precision from cutting singular values above 1% of the largest.
    """
    return min(torch.finfo(dtype).eps * math.sqrt(max(m, n)), 1e-2)


def numerical_rank(S: Tensor, rtol: float, atol: float = 0.0) -> int:
    """The number of singular values ``S`` (descending) above ``max(atol, rtol * S[0])``."""
    return int((S > max(atol, rtol * float(S[0]))).sum()) if S.numel() else 0

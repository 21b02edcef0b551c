"""The backend interface: :class:`Backend`, its result :class:`SVDResult`, its errors."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["Backend", "BackendError", "SVDResult", "State", "compute_dtype"]

State = dict[str, Any] | Sequence[dict[str, Any]]


class SVDResult(NamedTuple):
    """Singular triplets of a (batch of) matrices: ``Y ~ U diag(S) Vh``.

    ``U``: ``(..., m, k)``, ``S``: ``(..., k)`` descending, ``Vh``: ``(..., k, n)``.
    ``error_bound``: ``(...)``, an upper bound on ``||prox(Y) - U diag(phi(S)) Vh||_F`` for a
    non-expansive thresholding ``phi`` (zero for the exact SVD, the reference; see
    :mod:`proxrank.backends` for what the certified backends include).
    """

    U: Tensor
    S: Tensor
    Vh: Tensor
    error_bound: Tensor


class BackendError(RuntimeError):
    """A decomposition failed (LAPACK did not converge in the input dtype nor in float64, or
    the matrix is not finite). ``index``: the position in the batch ``(b, m, n)`` of the
    offending matrix, or ``None`` when it is unknown."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class Backend(abc.ABC):
    """Computes the singular triplets above a cutoff for a batch of matrices.

    ``state`` is caller-owned memory that a backend may use between steps (for example a
    warm-start basis); it is saved in the optimizer's ``state_dict``. For a single matrix it is
    a dict; for a batch ``Y`` of ``B`` matrices it is a sequence of ``B`` dicts, one per matrix
    (a single dict is then used as a container for them).

    Atomicity contract: :meth:`svd` only *assigns* keys of these dicts (``state[key] = new``);
    it never mutates in place a tensor or container already stored there, and it assigns
    nothing when it raises. A caller may therefore hand in shallow copies of the per-matrix
    dicts and commit them only once every batch of a step succeeded.

    A backend's own memory (for example random generators) is saved by :meth:`state_dict` and
    restored by :meth:`load_state_dict`, so that a resumed run is bit-identical.
    """

    name: str = ""

    @abc.abstractmethod
    def svd(self, Y: Tensor, cutoff: Tensor, state: State, min_rank: int = 0) -> SVDResult:
        """Triplets of ``Y`` (``(..., m, n)``, float32 or float64): every one with
        ``s > cutoff`` and at least the ``min_rank`` largest (a rank target needs them)."""

    def state_dict(self) -> dict[str, Any]:
        """The backend's own memory (not the per-matrix state); ``{}`` when it has none."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raises ``ValueError`` (changing nothing)
        on anything else."""
        if not isinstance(state_dict, dict) or state_dict:
            raise ValueError(
                f"{type(self).__name__} keeps no state; load_state_dict expects {{}}, got "
                f"{state_dict!r:.80}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def state_list(state: State, batch: int) -> list[dict[str, Any]]:
    """The per-matrix state dicts of a batch of ``batch`` matrices (see :class:`Backend`)."""
    if isinstance(state, dict):
        if batch == 1:
            return [state]
        nested = state.get("batch")
        if not isinstance(nested, list) or len(nested) != batch:
            nested = [{} for _ in range(batch)]
            state["batch"] = nested
        return nested
    states = list(state)
    if len(states) != batch or not all(isinstance(s, dict) for s in states):
        raise ValueError(
            f"state must be a dict or a sequence of {batch} dicts (one per matrix of the "
            f"batch); got {type(state).__name__} of length {len(states)}"
        )
    return states


def check_positive(value: Any, option: str, integer: bool = False) -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is a finite number ``> 0``
    (an int ``>= 1`` with ``integer``)."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{option} must be {what}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{option} must be finite, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a prox is computed in: float32 for half precision (torch has no fp16/bf16
    SVD), the weight's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

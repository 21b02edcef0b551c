"""Planners: which kernel a certified backend runs on each matrix, and how wide a warm-start
basis it keeps for the next step."""

from __future__ import annotations

import abc
from typing import Any

from .base import check_positive

__all__ = ["AutoPlanner", "GramPlanner", "Planner", "SubspacePlanner", "refresh_due"]


def refresh_due(state: dict[str, Any], refresh: int) -> bool:
    """Whether a matrix has no basis yet or ran ``refresh`` subspace steps since its last
    exact (or Gram) recomputation."""
    return state.get("basis") is None or state.get("since_refresh", 0) >= refresh


class Planner(abc.ABC):
    """Chooses ``"exact"``, ``"gram"`` or ``"subspace"`` per matrix and step from its state
    (read only) and its shape ``m <= n``. ``keeps_basis``: whether the backend keeps a
    warm-start basis in the state (``"subspace"`` needs one)."""

    keeps_basis: bool = True

    @abc.abstractmethod
    def plan(self, state: dict[str, Any], m: int, n: int) -> str:
        """The method for one matrix this step."""

    def fallback(self, m: int, n: int) -> str:
        """The method for a matrix whose planned method and extra rounds did not certify
        (``"exact"``, or ``"gram"`` where that is cheaper; a failed Gram result then goes to
        ``"exact"``)."""
        return "exact"

    @staticmethod
    def block(need: int, k_cur: int, m: int, hard: bool = False) -> int:
        """Basis width for the next step: ``need`` plus an oversampling margin
        ``8 + need/8``, doubled after a step that needed more than one round or the exact
        fallback (a wider gap between the kept values and the block's edge speeds up the power
        steps and lowers the tail); a subspace block (``k_cur`` wide, else 0) grows by half
        when all its Ritz values were kept and shrinks when more than two margins' worth fell
        below the cutoff."""
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

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


class GramPlanner(Planner):
    """Always the Gram eigendecomposition; keeps no basis."""

    keeps_basis = False

    def plan(self, state: dict[str, Any], m: int, n: int) -> str:
        return "gram"


class SubspacePlanner(Planner):
    """``"subspace"`` from the kept basis; ``"exact"`` for the first step and every
    ``refresh`` steps (which rebuilds the basis)."""

    def __init__(self, refresh: int = 100) -> None:
        check_positive(refresh, "refresh", integer=True)
        self.refresh = refresh

    def plan(self, state: dict[str, Any], m: int, n: int) -> str:
        return "exact" if refresh_due(state, self.refresh) else "subspace"


class AutoPlanner(Planner):
    """``"exact"`` for matrices whose smaller side is below ``min_size`` (the SVD is then
    cheaper than any bookkeeping); while the matrix's block (rank plus margin) is more than
    ``max_ratio`` of its smaller side, at refresh time and for the first step, ``"gram"``
    when the matrix is at least ``gram_aspect`` times as long as it is wide (the Gram matrix
    is then the cheap side) and ``"exact"`` otherwise; ``"subspace"`` in the remaining
    (low-rank) case, except on the step after one whose subspace rounds needed the Gram
    route or the exact SVD (:meth:`fallback`), which goes there directly.
    ``max_ratio = 0.7``: measured on 2 CPU threads, a batch of 384 x 1536 matrices costs less
    by subspace than by gram up to a block of about 0.7 of the smaller side, a square 384 x
    384 one less than by the SVD at any block up to 0.8.
    ``gram_aspect = 2``: on the encoder workload of ``make bench`` (idle machine, 2 threads) the
    float32 SVD of its sixteen 384 x 384 matrices costs a little less than the float64 Gram
    route (full-rank prox 0.33-0.36 s against 0.35-0.38 s per step); under heavy contention
    from other processes the order reverses (1.6-1.8 s Gram against 4.0-4.1 s SVD)."""

    def __init__(
        self,
        refresh: int = 100,
        max_ratio: float = 0.7,
        min_size: int = 160,
        gram_aspect: float = 2.0,
    ) -> None:
        check_positive(refresh, "refresh", integer=True)
        check_positive(max_ratio, "max_ratio")
        check_positive(min_size, "min_size", integer=True)
        check_positive(gram_aspect, "gram_aspect")
        self.refresh, self.max_ratio = refresh, float(max_ratio)
        self.min_size, self.gram_aspect = min_size, gram_aspect

    def fallback(self, m: int, n: int) -> str:
        """``"gram"`` for the oblong matrices the full-rank plan sends there (a float64 Gram
        eigendecomposition resolves a dense tail at the cutoff: its certificate needs only
        float64 eigen-residuals below the gaps), else ``"exact"``."""
        return "gram" if m >= self.min_size and n >= self.gram_aspect * m else "exact"

    def plan(self, state: dict[str, Any], m: int, n: int) -> str:
        if m < self.min_size:
            return "exact"
        if state.get("backend") in ("gram", "exact") and state.get("rounds", 1) > 1:
            return self.fallback(m, n)  # the subspace rounds failed last step: skip them once
        if not refresh_due(state, self.refresh) and state["basis"].shape[-1] <= self.max_ratio * m:
            return "subspace"
        return "gram" if n >= self.gram_aspect * m else "exact"

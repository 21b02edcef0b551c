"""Global rank budgets: per-layer ranks chosen under one size limit (or one loss tolerance).

Layer ``l`` is an ``m x n`` matrix with singular values ``s_1 >= s_2 >= ...``. Kept at rank
``r`` (as the factors ``m x r`` and ``r x n``) it costs

    c_l(r) = w_l * min(r (m + n), m n)

(parameters, or FLOPs with ``w_l`` the FLOPs per parameter, e.g. the output positions of a
conv); a rank with ``r >= m n / (m + n)`` saves nothing, so the layer is counted at full size.
Truncating it to rank ``r`` is predicted to raise the loss by the second-order estimate

    d_l(r) = 0.5 * f_l * sum_{i > r} s_i^2,

with ``f_l`` a per-layer weight (a Fisher estimate of the loss curvature; 1 without one).

* ``mode="budget"``: minimise ``sum_l d_l(r_l)`` subject to ``sum_l c_l(r_l) <= budget``;
* ``mode="compact"``: minimise ``sum_l c_l(r_l)`` subject to ``sum_l d_l(r_l) <= tolerance``.

Two solvers: ``"exact"`` (dynamic programming over the Pareto frontier of (cost, loss) of
the layers seen so far; exact, for a handful of layers) and ``"greedy"`` (removes singular
values in the order of predicted loss increase per unit of cost saved, along each layer's
lower convex hull of (cost, loss); exact at the hull's breakpoints, scales to any model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Allocation", "allocate_ranks", "budget_size", "layer_cost"]

#: ``method="auto"`` solves exactly while the product of per-layer option counts stays below this.
EXACT_LIMIT = 2 * 10**6


@dataclass(frozen=True)
class Allocation:
    """Per-layer ranks with their total ``cost``, the ``full_cost`` of the unfactorized layers
    and the ``predicted_loss`` increase ``sum_l d_l(r_l)``."""

    ranks: tuple[int, ...]
    cost: float
    full_cost: float
    predicted_loss: float


def layer_cost(m: int, n: int, rank: int) -> int:
    """Parameters of an ``m x n`` layer kept at ``rank``: ``min(rank (m + n), m n)``."""
    return min(rank * (m + n), m * n)


def budget_size(
    budget: float | int,
    shapes: Sequence[tuple[int, int]],
    *,
    cost_weights: Sequence[float] | None = None,
    min_rank: int = 1,
) -> float:
    """The absolute size a ``budget`` stands for (a float in (0, 1] is a ratio of the full
    size ``sum_l w_l m_l n_l``); raises when it is below the smallest possible size, every
    layer at ``min_rank``."""
    w = [1.0] * len(shapes) if cost_weights is None else cost_weights
    full_cost = sum(wl * m * n for wl, (m, n) in zip(w, shapes, strict=True))
    min_cost = sum(
        wl * layer_cost(m, n, min(min_rank, m, n)) for wl, (m, n) in zip(w, shapes, strict=True)
    )
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a ratio in (0, 1] (float) or a size (int), got {budget!r}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(
                f"budget={budget!r} as a float is a ratio of the full size and must lie in "
                "(0, 1]; pass an int for an absolute parameter (or FLOP) count"
            )
        budget = budget * full_cost
    if budget < min_cost:
        raise ValueError(
            f"budget={budget:g} is below the smallest possible size {min_cost:g} (every layer "
            "at min_rank); raise the budget or lower min_rank"
        )
    return float(budget)


def _options(s: np.ndarray, m: int, n: int, w: float, f: float, min_rank: int):
    """Non-dominated ranks of one layer (those that save parameters, and full rank), with
    their costs and predicted losses."""
    k = min(m, n)
    saving = [r for r in range(min(min_rank, k), k) if r * (m + n) < m * n]
    ranks = np.array([*saving, k])
    tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])  # tail[r] = sum_{i>r} s_i^2
    loss = 0.5 * f * tail[ranks]
    cost = w * np.array([layer_cost(m, n, int(r)) for r in ranks], dtype=float)
    return ranks, cost, loss


def _pareto(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both cost and loss, by ascending cost."""
    order = np.lexsort((loss, cost))
    best = np.minimum.accumulate(loss[order])
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = loss[order][1:] < best[:-1]
    return order[keep]


def _exact(options, budget: float | None, tolerance: float | None) -> list[int]:
    cost, loss = np.zeros(1), np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []  # per layer: (parent index, option index)
    for _, c, d in options:
        parent = np.repeat(np.arange(len(cost)), len(c))
        pick = np.tile(np.arange(len(c)), len(cost))
        keep = _pareto(cost[parent] + c[pick], loss[parent] + d[pick])
        cost, loss = cost[parent][keep] + c[pick][keep], loss[parent][keep] + d[pick][keep]
        trail.append((parent[keep], pick[keep]))
    if budget is not None:
        i = int(np.nonzero(cost <= budget * (1 + 1e-12))[0][-1])  # the frontier's loss falls
    else:
        i = int(np.nonzero(loss <= tolerance)[0][0])  # the frontier's cost rises
    picks = []
    for parent, pick in reversed(trail):
        picks.append(int(pick[i]))
        i = int(parent[i])
    return [int(opt[0][j]) for opt, j in zip(options, reversed(picks), strict=True)]


def _hull_moves(layer: int, cost: np.ndarray, loss: np.ndarray):
    """Moves down one layer's lower convex hull, from full rank (last option) to the smallest:
    ``(loss per cost saved, layer, from option, to option)``."""
    moves, i = [], len(cost) - 1
    while i > 0:
        slopes = (loss[:i] - loss[i]) / (cost[i] - cost[:i])
        j = int(np.flatnonzero(slopes == slopes.min())[0])  # the farthest point on the hull
        moves.append((float(slopes[j]), layer, i, j))
        i = j
    return moves


def _greedy(options, budget: float | None, tolerance: float | None) -> list[int]:
    at = [len(c) - 1 for _, c, _ in options]
    moves = sorted(
        (m for li, (_, c, d) in enumerate(options) for m in _hull_moves(li, c, d)),
        key=lambda m: (m[0], m[1], -m[2]),
    )
    cost = sum(c[-1] for _, c, _ in options)
    loss = 0.0
    for _, li, i, j in moves:
        _, c, d = options[li]
        if budget is not None and cost <= budget:
            break
        if tolerance is not None and loss + d[j] - d[i] > tolerance:
            break
        if budget is not None and cost - (c[i] - c[j]) <= budget:
            # last move: stop at the largest rank along the segment that fits the budget
            j = int(np.flatnonzero(cost - (c[i] - c[j : i + 1]) <= budget)[-1]) + j
        cost, loss, at[li] = cost - (c[i] - c[j]), loss + d[j] - d[i], j
    return [int(opt[0][a]) for opt, a in zip(options, at, strict=True)]


def allocate_ranks(
    spectra: Sequence[Tensor],
    shapes: Sequence[tuple[int, int]],
    *,
    budget: float | int | None = None,
    tolerance: float | None = None,
    mode: str = "budget",
    weights: Sequence[float] | None = None,
    cost_weights: Sequence[float] | None = None,
    min_rank: int = 1,
    method: str = "auto",
) -> Allocation:
    """Choose one rank per layer (see the module docstring for the model).

    Args:
        spectra: each layer's singular values (any order; sorted here).
        shapes: each layer's matrix shape ``(m, n)``.
        budget: ``mode="budget"`` only: a ratio of the full size in (0, 1] (float) or an
            absolute size (int, in the units of ``cost_weights``: parameters by default).
        tolerance: ``mode="compact"`` only: the largest predicted loss increase (>= 0).
        mode: ``"budget"`` or ``"compact"``.
        weights: per-layer curvature weights ``f_l > 0`` (Fisher estimates), default 1.
        cost_weights: per-layer cost per parameter ``w_l > 0`` (FLOPs per parameter), default 1.
        min_rank: no layer goes below this rank (>= 0).
        method: ``"exact"``, ``"greedy"`` or ``"auto"`` (exact for small problems).
    """
    L = len(shapes)
    if len(spectra) != L or L == 0:
        raise ValueError(
            f"spectra and shapes must describe the same layers (at least one); got "
            f"{len(spectra)} spectra and {L} shapes"
        )
    weights = [1.0] * L if weights is None else [float(x) for x in weights]
    cost_weights = [1.0] * L if cost_weights is None else [float(x) for x in cost_weights]
    for name, values in (("weights", weights), ("cost_weights", cost_weights)):
        if len(values) != L or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"{name} must hold one finite value > 0 per layer ({L}), got {values}")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 0:
        raise ValueError(f"min_rank must be an int >= 0, got {min_rank!r}")
    if method not in ("auto", "exact", "greedy"):
        raise ValueError(f"method={method!r}; use 'auto', 'exact' or 'greedy'")
    options = []
    for s, (m, n), f, w in zip(spectra, shapes, weights, cost_weights, strict=True):
        s = np.sort(torch.as_tensor(s).detach().double().cpu().numpy().reshape(-1))[::-1]
        if s.size != min(m, n):
            raise ValueError(f"a {m}x{n} layer has {min(m, n)} singular values, got {s.size}")
        options.append(_options(s, m, n, w, f, min_rank))
    full_cost = float(sum(c[-1] for _, c, _ in options))
    if mode == "budget":
        if tolerance is not None or budget is None:
            raise ValueError('mode="budget" takes budget= (and no tolerance=)')
        budget = budget_size(budget, shapes, cost_weights=cost_weights, min_rank=min_rank)
    elif mode == "compact":
        if budget is not None or tolerance is None:
            raise ValueError('mode="compact" takes tolerance= (and no budget=)')
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
    else:
        raise ValueError(f"mode={mode!r}; use 'budget' or 'compact'")
    if method == "auto":
        method = "exact" if math.prod(len(o[0]) for o in options) <= EXACT_LIMIT else "greedy"
    solve = _exact if method == "exact" else _greedy
    ranks = solve(options, budget, tolerance)
    cost = loss = 0.0
    for (r_opts, c, d), r in zip(options, ranks, strict=True):
        i = int(np.flatnonzero(r_opts == r)[0])
        cost, loss = cost + float(c[i]), loss + float(d[i])
    return Allocation(tuple(ranks), cost, full_cost, loss)

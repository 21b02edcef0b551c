"""Schedules: how strong the prox is at each step, and which rank each matrix is brought to.

A :class:`Schedule` is passed as ``ProxRank(..., schedule=...)`` and read at every step from
the optimizer's own step count (the ``n``-th call of ``opt.step()`` is step ``n``; there is no
second ``.step()`` to call). It runs in three phases:

* **warm-up**, steps ``n <= warmup``: no prox (the base optimizer trains alone);
* **shrink**, ``warmup < n <= freeze_at``: either a strength ramp, ``tau = lam(n) * lr`` with
  ``lam(n) = group lam * factor(n)``, or a rank ramp: every matrix's threshold is set from its
  spectrum so that the kept rank follows ``r(n)`` (soft: ``tau = s_{r+1}``, the kept values are
  shrunk, not cut; hard: keep the ``r`` largest). With ``every=k`` the prox runs every ``k``-th
  step with the accumulated threshold ``sum of lam * lr`` over the steps since the last one
  (soft thresholding composes: ``svt(svt(Y, a), b) = svt(Y, a + b)``);
* **freeze**, ``n > freeze_at``: the ranks are fixed and each weight is projected onto its
  rank-``r`` set (keep the ``r`` largest singular values) at every step, so the model heals.

Rank ramps interpolate each matrix's rank from its full rank ``k = min(m, n)`` at ``warmup``
to its final rank at ``ramp_end``, with the shape ``g`` of :class:`Ramp` (1 -> 0)::

    r(n) = r_final + ceil((k - r_final) g(n)),  cubic: g = (1 - (n - n0) / (n1 - n0))^3

(the cubic is gradual magnitude pruning's schedule, Zhu & Gupta 2017). The final ranks come
from ``target`` (a ratio of ``k`` or one rank for every matrix) or from a global ``budget``:
allocated across layers by :func:`proxrank.budget.allocate_ranks` at the first shrink step
(``allocation="global"``), or the same share of every matrix (``allocation="uniform"``: the
largest ``r`` with ``r (m + n) <= budget m n``, as ``proxrank.compress(ratio=budget)``).

**Maps on the matrix itself** (:class:`proxrank.prox.MatrixMap`). The penalties ``"l1"`` and
``"group"`` take strength ramps and ``every=`` (their soft thresholds compose like the
spectral one); a target or budget is an error for them. The projections ``"magnitude"``,
``"nm"`` and ``"tt"`` take a *level* (entries kept, ``N`` of N:M, TT rank) in place of the
rank: ``target`` is a fraction of the map's full level (:meth:`~proxrank.prox.MatrixMap.
target_level`: for magnitude and N:M a fraction of the entries kept, for TT of the largest
bond rank) or a level, ramped from the full level as above (magnitude with ``ramp="cubic"`` is
gradual magnitude pruning) and frozen at ``freeze_at``. ``budget`` goes with ``"magnitude"``
only: a fraction (or count) of the entries of all its matrices kept, allocated by one global
magnitude threshold (the largest ``|w|`` across the matrices at the first shrink step; each
matrix's level is its count of entries above it). The schedule's state key ``final_rank``
holds the final level.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .budget import allocate_ranks, budget_size
from .prox import HardThreshold, MatrixMap, ProxMap, SoftThreshold
from .selection import Target
from .sparsity import Magnitude

#: A budget allocation that leaves a matrix below ``1 / TINY_RANK_FRACTION`` of its full rank
#: warns, naming it (the allocator itself is not sensitivity-aware).
TINY_RANK_FRACTION = 32

__all__ = ["RAMP_KINDS", "Plan", "Ramp", "Schedule", "global_magnitude_levels", "spectrum"]

#: Ramp shapes: fraction ``x = (n - n0) / (n1 - n0)`` in [0, 1] -> weight of ``end``.
RAMP_KINDS: dict[str, Callable[[float], float]] = {
    "constant": lambda x: 1.0,
    "linear": lambda x: x,
    "cosine": lambda x: 0.5 * (1 - math.cos(math.pi * x)),
    "cubic": lambda x: 1 - (1 - x) ** 3,
    "exponential": lambda x: x,  # interpolates log(value): see Ramp
}


def _check_step(value: Any, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{option} must be a step count (int >= 0), got {value!r}")
    return value


@dataclass(frozen=True)
class Ramp:
    """A value moving from ``start`` (at step ``n <= n0``) to ``end`` (at ``n >= n1``).

    Between them, with ``x = (n - n0) / (n1 - n0)``: ``"linear"`` ``start + (end - start) x``;
    ``"cosine"`` ``start + (end - start) (1 - cos(pi x)) / 2``; ``"cubic"``
    ``end + (start - end) (1 - x)^3``; ``"exponential"`` ``start (end / start)^x`` (geometric,
    both > 0); ``"constant"`` is ``end`` at every step. Every shape is monotone and equals
    ``start`` at ``n0`` and ``end`` at ``n1`` exactly (with ``n1 == n0``: a jump to ``end``).
    """

    start: float
    end: float
    n0: int = 0
    n1: int = 0
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in RAMP_KINDS:
            raise ValueError(f"Ramp kind={self.kind!r}; use one of {sorted(RAMP_KINDS)}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"Ramp {name} must be a finite number, got {v!r}")
        _check_step(self.n0, "Ramp n0")
        _check_step(self.n1, "Ramp n1")
        if self.n1 < self.n0:
            raise ValueError(
                f"Ramp ends (n1={self.n1}) before it starts (n0={self.n0}); use n1 >= n0"
            )
        if self.kind == "exponential" and not (self.start > 0 and self.end > 0):
            raise ValueError(
                "an exponential Ramp interpolates geometrically: start and end must be > 0 "
                f"(got {self.start}, {self.end}); e.g. start=1e-3 * end for a warm-up"
            )

    def fraction(self, n: int) -> float:
        """Weight of ``end`` at step ``n``: 0 up to ``n0``, 1 from ``n1``, the shape between."""
        if self.kind == "constant" or n >= self.n1:
            return 1.0
        if n <= self.n0:
            return 0.0
        return RAMP_KINDS[self.kind]((n - self.n0) / (self.n1 - self.n0))

    def __call__(self, n: int) -> float:
        x = self.fraction(n)
        if x == 1.0:
            return float(self.end)
        if self.kind == "exponential":
            return self.start * (self.end / self.start) ** x
        return self.start + (self.end - self.start) * x


class Plan(NamedTuple):
    """One matrix's prox at one step, as a schedule plans it: a threshold ``tau`` for ``prox``,
    or (``rank`` not ``None``) a rank target whose threshold comes from the spectrum."""

    tau: float
    prox: ProxMap | MatrixMap
    rank: int | None = None


def _full_level(prox: ProxMap | MatrixMap, shape2d: tuple[int, int]) -> int:
    """The rank (spectral maps) or level (projections) at which the map leaves a matrix as is."""
    return prox.full_level(shape2d) if isinstance(prox, MatrixMap) else min(shape2d)


class Schedule:
    """Warm-up, strength or rank ramp, periodic prox and freezing, driven by ``opt.step()``.

    Args:
        lam: the strength ramp, a factor on each group's ``lam`` (a number: constant; a
            :class:`Ramp`: e.g. ``Ramp(0, 1, 0, 1000, "cosine")`` for a warm-up). Not with a
            rank target, which sets the threshold itself.
        target: final rank of every matrix: a float in (0, 1] is a ratio of its full rank
            ``min(m, n)`` (rounded up), an int a rank (capped at the full rank). For a
            projection map (magnitude, N:M, TT) its final level instead (module docstring).
        budget: final size of all the selected matrices together, allocated across layers
            (see :mod:`proxrank.budget`): a float in (0, 1] is a ratio of their full size, an
            int a count of parameters (or FLOPs with ``cost_weights``). With
            ``prox="magnitude"``: the entries kept, by one global magnitude threshold.
        mode: ``"budget"`` (best predicted loss at ``budget``) or ``"compact"`` (smallest
            model whose predicted loss increase stays <= ``tolerance``; no ``budget``).
        tolerance: ``mode="compact"`` only.
        weights: per-layer curvature weights for the allocation (Fisher estimates), a mapping
            from the target's name to a number or a callable ``Target -> float`` (called at
            the allocation, so it may read optimizer statistics); default 1.
        cost_weights: per-layer cost per parameter (FLOPs per parameter), same forms.
        allocation: how a ``budget`` (a ratio) is shared: ``"global"`` (default: the
            predicted-loss allocation above, across layers) or ``"uniform"`` (every matrix keeps
            the largest rank ``r`` with ``r (m + n) <= budget m n``, at least ``min_rank``;
            the ranks ``proxrank.compress(ratio=budget)`` keeps). The global allocation weighs
            removed singular-value energy alike in every layer: on a model whose layers differ
            in scale (GPT-2's residual projections) it can cut a layer to rank 1; ``"uniform"``
            needs no curvature estimate.
        min_rank: lowest rank the allocation may give a layer.
        ramp: shape of the rank ramp (:data:`RAMP_KINDS`, default ``"cubic"``).
        warmup: steps without prox.
        ramp_end: step at which the final ranks are reached (required with a rank target).
        freeze_at: last shrink step; after it the ranks are frozen. Default ``ramp_end`` with a
            rank target, never without one.
        every: with a strength ramp, prox every ``every`` steps with the accumulated threshold;
            with a rank ramp, move the rank every ``every`` steps (and at ``ramp_end``).
        threshold: rank ramps only: ``"soft"`` (shrink the kept values by ``s_{r+1}``) or
            ``"hard"`` (keep the ``r`` largest).

    Example (30% of the parameters by step 5000 after 500 warm-up steps, then fine-tune)::

        opt = proxrank.ProxRank(base, model, schedule=proxrank.Schedule(
            budget=0.3, warmup=500, ramp_end=5000))
    """

    def __init__(
        self,
        *,
        lam: float | Ramp = 1.0,
        target: float | int | None = None,
        budget: float | int | None = None,
        mode: str = "budget",
        tolerance: float | None = None,
        weights: Mapping[str, float] | Callable[[Target], float] | None = None,
        cost_weights: Mapping[str, float] | Callable[[Target], float] | None = None,
        allocation: str = "global",
        min_rank: int = 1,
        ramp: str = "cubic",
        warmup: int = 0,
        ramp_end: int | None = None,
        freeze_at: int | None = None,
        every: int = 1,
        threshold: str = "soft",
    ) -> None:
        if not isinstance(lam, Ramp | int | float) or isinstance(lam, bool):
            raise TypeError(f"lam must be a number or a proxrank.Ramp, got {lam!r}")
        self.lam = lam if isinstance(lam, Ramp) else Ramp(lam, lam, kind="constant")
        if min(self.lam.start, self.lam.end) < 0:
            raise ValueError(f"lam is a factor on each group's lam and must be >= 0, got {lam!r}")
        _check_step(min_rank, "min_rank")
        self.warmup = _check_step(warmup, "warmup")
        self.every = _check_step(every, "every")
        if every < 1:
            raise ValueError(f"every must be >= 1 (prox every k-th step), got {every}")
        if threshold not in ("soft", "hard"):
            raise ValueError(f"threshold={threshold!r}; use 'soft' or 'hard'")
        self.threshold = threshold
        self.target, self.budget, self.mode, self.tolerance = target, budget, mode, tolerance
        self.weights, self.cost_weights, self.min_rank = weights, cost_weights, min_rank
        if allocation not in ("global", "uniform"):
            raise ValueError(f"allocation={allocation!r}; use 'global' or 'uniform'")
        if allocation == "uniform" and not isinstance(budget, float):
            raise ValueError(
                "allocation='uniform' keeps the same share of every matrix: it takes a ratio "
                f"budget= (a float in (0, 1]), got budget={budget!r}"
            )
        if allocation == "uniform" and (weights is not None or cost_weights is not None):
            raise ValueError(
                "weights=/cost_weights= steer the global allocation; allocation='uniform' "
                "gives every matrix the same share: drop them or use allocation='global'"
            )
        self.allocation = allocation
        self.has_rank = target is not None or budget is not None or mode == "compact"
        if mode not in ("budget", "compact"):
            raise ValueError(f"mode={mode!r}; use 'budget' or 'compact'")
        if target is not None and (budget is not None or mode == "compact"):
            raise ValueError("give either target= (per matrix) or budget=/mode='compact'")
        if target is not None:
            self._check_target(target)
        if (mode == "compact") != (tolerance is not None):
            raise ValueError('tolerance= goes with mode="compact" (and only there)')
        if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be finite and >= 0, got {tolerance!r}")
        if self.has_rank:
            if lam != 1.0:
                raise ValueError(
                    "lam= is a strength ramp; a rank target (target=/budget=) sets each "
                    "threshold from the spectrum: drop lam or the target"
                )
            if ramp_end is None:
                raise ValueError("a rank target needs ramp_end= (the step it is reached at)")
            if _check_step(ramp_end, "ramp_end") < self.warmup:
                raise ValueError(
                    f"ramp_end={ramp_end} is before the end of warmup={warmup}; use "
                    "ramp_end >= warmup"
                )
            if ramp in ("constant", "exponential"):
                raise ValueError(
                    f"ramp={ramp!r} cannot bring a rank from full to its target; use 'cubic' "
                    "(the default), 'linear' or 'cosine'"
                )
            self.shape = Ramp(1.0, 0.0, self.warmup, ramp_end, ramp)
            freeze_at = ramp_end if freeze_at is None else freeze_at
        elif ramp_end is not None:
            raise ValueError("ramp_end= is for rank targets; pass target= or budget=")
        self.ramp, self.ramp_end = ramp, ramp_end
        if freeze_at is not None and _check_step(freeze_at, "freeze_at") < self.warmup:
            raise ValueError(f"freeze_at={freeze_at} is before the end of warmup={warmup}")
        if freeze_at is not None and ramp_end is not None and freeze_at < ramp_end:
            raise ValueError(f"freeze_at={freeze_at} is before ramp_end={ramp_end}")
        self.freeze_at = freeze_at

    @staticmethod
    def _check_target(target: Any) -> None:
        if isinstance(target, bool) or not isinstance(target, int | float):
            raise TypeError(f"target must be a ratio (float) or a rank (int), got {target!r}")
        if isinstance(target, float) and not 0 < target <= 1:
            raise ValueError(
                f"target={target!r} as a float is a ratio of each matrix's full rank and must "
                "lie in (0, 1]; pass an int for a rank"
            )
        if isinstance(target, int) and target < 0:
            raise ValueError(f"target={target} as an int is a rank and must be >= 0")

    # -- what the optimizer calls ------------------------------------------------------------
    def phase(self, n: int) -> str:
        """``"warmup"``, ``"shrink"`` or ``"freeze"`` for step ``n`` (1-based)."""
        if n <= self.warmup:
            return "warmup"
        if self.freeze_at is not None and n > self.freeze_at:
            return "freeze"
        return "shrink"

    def rank_at(self, n: int, full_rank: int, final_rank: int) -> int:
        """Target rank of a matrix at step ``n``: ``r_f + ceil((k - r_f) g(n))``."""
        return final_rank + math.ceil((full_rank - final_rank) * self.shape(n) - 1e-9)

    def check_prox(self, prox: ProxMap | MatrixMap, option: str = "prox") -> None:
        """Raise ``ValueError`` when this schedule cannot drive ``prox`` (see the module
        docstring, "Maps on the matrix itself")."""
        if not isinstance(prox, MatrixMap):
            return
        if not prox.levels and self.has_rank:
            raise ValueError(
                f"{option}={prox.name!r} is a penalty: a schedule's target=/budget= sets the "
                "level of spectral maps and projections; drive it with lam= (a strength ramp, "
                "e.g. Schedule(lam=Ramp(0, 1, 0, 1000)))"
            )
        if not self.has_rank and self.freeze_at is not None:
            raise ValueError(
                f"freeze_at= without a target freezes ranks; {option}={prox.name!r} has none: "
                "give target= (the projection's level then freezes) or drop freeze_at"
            )
        if (self.budget is not None or self.mode == "compact") and not isinstance(prox, Magnitude):
            raise ValueError(
                f"budget=/mode='compact' with {option}={prox.name!r}: the budget of a map on "
                "the matrix itself is a share of entries kept, for prox='magnitude' only; "
                "give target= instead"
            )
        if self.mode == "compact":
            raise ValueError(
                f"mode='compact' with {option}={prox.name!r}: the loss model is spectral; use "
                "budget="
            )

    def check(
        self, targets: list[Target], proxes: list[ProxMap | MatrixMap] | None = None
    ) -> None:
        """Validate the settings that depend on the selected matrices (a budget below the
        smallest possible size, missing per-layer weights) before training starts; ``proxes``:
        each target's map (default: spectral)."""
        # a callable curvature weight reads training statistics: it is called at the allocation
        weights = None if callable(self.weights) else _per_layer(self.weights, targets, "weights")
        cost_weights = _per_layer(self.cost_weights, targets, "cost_weights")
        for name, values in (("weights", weights), ("cost_weights", cost_weights)):
            if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"{name} must be finite and > 0 for every matrix, got {values}")
        magnitude = [isinstance(p, Magnitude) for p in proxes or ()]
        if self.budget is not None and any(magnitude) and not all(magnitude):
            raise ValueError(
                "budget= over both prox='magnitude' and other maps: a budget is shared by "
                "matrices of one kind (entries kept, or ranks); set one prox for all of them"
            )
        if self.budget is not None and any(magnitude):
            _entries_kept(self.budget, [t.shape2d for t in targets])
        elif self.budget is not None:
            shapes = [t.shape2d for t in targets]
            budget_size(self.budget, shapes, cost_weights=cost_weights, min_rank=self.min_rank)

    def prepare(
        self,
        n: int,
        targets: list[Target],
        states: list[dict[str, Any]],
        proxes: list[ProxMap | MatrixMap] | None = None,
        spectra: Callable[[list[Target]], list[torch.Tensor]] | None = None,
        matrices: Callable[[list[Target]], list[torch.Tensor]] | None = None,
    ) -> list[dict[str, Any]]:
        """At the first step past warm-up, each matrix's final rank or level
        (``{"final_rank": r}``, saved in ``state_dict``): from ``target``, or by allocating
        ``budget`` across layers, from the spectra ``spectra(targets)`` (default:
        :func:`spectrum` of each parameter, in this process; the optimizer passes one that
        shares the work across ranks) or, for magnitude projections, by one global magnitude
        threshold over the matrices ``matrices(targets)`` (default: each read from its parameter
        in this process; the optimizer passes one that reads a sharded parameter whole on its
        owner). ``proxes``: each target's map (default: spectral). Returns the updates per
        matrix (empty when there is nothing to fix); reads ``states`` (the schedule's state of
        each target) only."""
        none: list[dict[str, Any]] = [{} for _ in targets]
        if not self.has_rank or n <= self.warmup:
            return none
        if all("final_rank" in st for st in states):
            return none
        proxes = proxes or [SoftThreshold()] * len(targets)
        if self.target is not None:
            out = []
            for t, st, prox in zip(targets, states, proxes, strict=True):
                if isinstance(prox, MatrixMap):
                    r = prox.target_level(t.shape2d, self.target)
                else:
                    k = min(t.shape2d)
                    r = self.target if isinstance(self.target, int) else math.ceil(self.target * k)
                    r = min(r, k)
                out.append({} if "final_rank" in st else {"final_rank": r})
            return out
        if all(isinstance(p, Magnitude) for p in proxes):
            weights = (
                [t.view.read(t.param.detach()) for t in targets]
                if matrices is None
                else matrices(targets)
            )
            return [{"final_rank": k} for k in global_magnitude_levels(weights, self.budget)]
        if self.allocation == "uniform":
            return [
                {"final_rank": _uniform_rank(*t.shape2d, self.budget, self.min_rank)}
                for t in targets
            ]
        values = [spectrum(t, t.param) for t in targets] if spectra is None else spectra(targets)
        alloc = allocate_ranks(
            values,
            [t.shape2d for t in targets],
            budget=self.budget,
            tolerance=self.tolerance,
            mode=self.mode,
            weights=_per_layer(self.weights, targets, "weights"),
            cost_weights=_per_layer(self.cost_weights, targets, "cost_weights"),
            min_rank=self.min_rank,
        )
        tiny = [
            f"{t.name} -> {r} of {min(t.shape2d)}"
            for t, r in zip(targets, alloc.ranks, strict=True)
            if r * TINY_RANK_FRACTION < min(t.shape2d)
        ]
        if tiny:
            warnings.warn(
                f"proxrank: the budget allocation cuts {len(tiny)} matrices below 1/"
                f"{TINY_RANK_FRACTION} of their rank ({', '.join(tiny)}); the allocator weighs "
                "every layer's removed energy alike, so small-scaled layers (e.g. GPT-2's "
                "residual projections) go first. Raise min_rank=, pass weights=, or use "
                "allocation='uniform'",
                stacklevel=4,
            )
        return [{"final_rank": r} for r in alloc.ranks]

    def plan(
        self, n: int, state: dict[str, Any], shape2d: tuple[int, int], tau: float, prox: ProxMap
    ) -> tuple[Plan | None, dict[str, Any]]:
        """This step's prox for one matrix (``None``: no prox) and the updates to its schedule
        state. ``tau`` is the group's ``lam * lr``; ``state`` is only read."""
        phase = self.phase(n)
        if phase == "warmup":
            return None, {}
        projection = isinstance(prox, MatrixMap)  # a projection: it keeps its own kind
        if phase == "freeze":
            k = _full_level(prox, shape2d)
            rank = state.get("final_rank", state.get("rank", k))
            if rank >= k:
                return None, {}
            return Plan(0.0, prox if projection else HardThreshold(), rank), {}
        due = (n - self.warmup) % self.every == 0 or n == self.ramp_end
        if self.has_rank:
            if not due:
                return None, {}
            k = _full_level(prox, shape2d)
            rank = self.rank_at(n, k, state["final_rank"])
            if rank >= k:
                return None, {}
            if projection:
                return Plan(0.0, prox, rank), {}
            soft = self.threshold == "soft"
            return Plan(0.0, SoftThreshold() if soft else HardThreshold(), rank), {}
        acc = state.get("tau_acc", 0.0) + tau * self.lam(n)
        own_level = projection and prox.levels  # a projection at its own level ignores tau
        planned = Plan(acc, prox) if due and (acc > 0 or own_level) else None
        return planned, {"tau_acc": 0.0 if due else acc}

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's settings (callable ``weights`` are not saved: the allocation they
        produced is, in each matrix's state)."""
        return {
            "lam": vars(self.lam).copy(),
            "target": self.target,
            "budget": self.budget,
            "mode": self.mode,
            "tolerance": self.tolerance,
            "min_rank": self.min_rank,
            "allocation": self.allocation,
            "ramp": self.ramp,
            "warmup": self.warmup,
            "ramp_end": self.ramp_end,
            "freeze_at": self.freeze_at,
            "every": self.every,
            "threshold": self.threshold,
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> Schedule:
        """Rebuild a schedule from :meth:`state_dict`."""
        sd = dict(sd)
        lam = Ramp(**sd.pop("lam"))
        return cls(lam=lam if lam.kind != "constant" else lam.end, **sd)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.state_dict().items() if v is not None)
        return f"Schedule({items})"


def spectrum(target: Target, param: torch.Tensor) -> torch.Tensor:
    """The singular values (float64, descending) of ``target``'s matrix read from ``param``: its
    parameter, or the whole of it gathered from shards."""
    return torch.linalg.svdvals(target.view.read(param.detach()).double())


def _uniform_rank(m: int, n: int, ratio: float, min_rank: int) -> int:
    """The largest ``r`` with ``r (m + n) <= ratio m n``, at least ``min_rank``, at most
    ``min(m, n)``."""
    return min(max(min_rank, math.floor(ratio * m * n / (m + n))), m, n)


def _per_layer(
    spec: Mapping[str, float] | Callable[[Target], float] | None, targets: list[Target], option: str
) -> list[float] | None:
    if spec is None:
        return None
    if callable(spec):
        return [float(spec(t)) for t in targets]
    missing = [t.name for t in targets if t.name not in spec]
    if missing:
        raise ValueError(f"{option} has no value for {missing}; give one per selected matrix")
    return [float(spec[t.name]) for t in targets]


def _entries_kept(budget: Any, shapes: list[tuple[int, int]]) -> int:
    """The count of entries a magnitude ``budget`` keeps (a float in (0, 1]: a fraction of all
    the entries, rounded up; an int: a count, at least 1 and at most all of them)."""
    total = sum(m * n for m, n in shapes)
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise TypeError(f"budget must be a fraction in (0, 1] or a count (int), got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(
            f"budget={budget!r} as a float is the fraction of entries kept, in (0, 1]; pass "
            "an int for a count"
        )
    if isinstance(budget, int) and not 1 <= budget <= total:
        raise ValueError(
            f"budget={budget} entries kept must lie in [1, {total}] (the selected matrices' "
            "entries)"
        )
    return budget if isinstance(budget, int) else math.ceil(budget * total)


def global_magnitude_levels(weights: list[torch.Tensor], budget: float | int) -> list[int]:
    """Per-matrix counts of entries kept by one global magnitude threshold: the ``K`` entries
    of largest ``|w|`` across all ``weights`` (ties broken by ``torch.topk``), counted per
    matrix; ``K`` is ``ceil(budget * total)`` for a fraction ``budget`` in (0, 1], ``budget``
    for a count."""
    k = _entries_kept(budget, [tuple(w.shape) for w in weights])
    flat = torch.cat([w.detach().reshape(-1).abs().to(torch.float64).cpu() for w in weights])
    owner = torch.repeat_interleave(
        torch.arange(len(weights)), torch.tensor([w.numel() for w in weights])
    )
    kept = owner[flat.topk(k).indices]
    return torch.bincount(kept, minlength=len(weights)).tolist()

r"""Convergence diagnostics: where each weight matrix stands, updated by every prox step.

Every figure comes from what the prox already computed (:class:`proxrank.records.ProxStep`:
the input's singular values ``s = svd.S``, the mapped ones ``s' = S_new`` and the output ``X``),
plus two ``O(mn)`` norms. With ``W`` the weight entering the prox (after the base step),
``X = prox(W)`` the weight written back and ``X_prev`` the weight the previous prox wrote:

=========================  =====================================================================
figure                     definition
=========================  =====================================================================
``rank``                   ``#{i : s'_i > rtol s'_1}``, the rank after the prox counted with
                           :func:`proxrank.factorize.convert.default_rtol` ``(m, n, dtype)``,
                           the tolerance :func:`proxrank.factorize` uses: values a decayed
                           threshold left at rounding-noise level are not rank
``effective_rank``         ``exp(H(p))``, ``p_i = s'_i / sum_j s'_j``, ``H(p) = -sum p_i log p_i``
                           (Roy & Vetterli 2007; 0 for a zero matrix)
``nuclear_norm``           ``||X||_* = sum s'_i``
``tau``                    the threshold the prox used (``lam * lr``)
``cutoff``                 the largest singular value the prox maps to zero, ``prox.cutoff(tau)``
                           (``tau`` soft, ``sqrt(2 tau)`` hard; NaN while a rank target sets it)
``energy_removed``         ``(||W||_F^2 - ||X||_F^2) / ||W||_F^2`` (``||X||_F^2 = sum s'_i^2``)
``prox_residual``          ``||X - W||_F``: how far the prox moved the weight. At a fixed point
                           of proximal SGD it tends to ``lr ||grad f(W*)||_F``, not to zero.
``grad_mapping_norm``      ``||X - X_prev||_F / lr``: the realised step over the learning rate.
                           With a plain SGD base this is the gradient mapping
                           ``G(X_prev) = (X_prev - prox(X_prev - lr grad f)) / lr``, the
                           stationarity measure of proximal gradient methods (0 at a stationary
                           point); with other bases, the same quantity for their step.
``relative_step``          ``||X - X_prev||_F / max(||X||_F, ||X_prev||_F)`` (0 when both are 0)
``steps_since_rank_change``  prox steps since ``rank`` last differed from the step before
``steps_below_tol``        consecutive prox steps (up to now) with ``relative_step <= tol``
``factorized_params``      ``rank (m + n)`` against ``dense_params = m n``
``backend``, ``error_bound``  read from the matrix's state when a backend writes them
                           (``state["backend"]``, ``state["error_bound"]``); otherwise the
                           optimizer's backend name and the bound the backend returned
=========================  =====================================================================

**Maps on the matrix itself** (:class:`proxrank.prox.MatrixMap`: l1, group, magnitude, N:M,
TT) compute no singular values: ``rank``, ``effective_rank`` and ``nuclear_norm`` are ``None``
/ NaN; instead ``sparsity`` (fraction of zero entries of ``X``), ``zero_rows`` and ``zero_cols``
(reported for every map), ``tt_ranks`` (the TT map's bond ranks), ``factorized_params`` the
numbers needed to store ``X`` in the map's structure (:meth:`~proxrank.prox.MatrixMap.
stored_size`: nonzero values, kept rows or columns, TT cores), ``steps_since_rank_change``
counts the steps since that size changed, ``energy_removed`` is ``1 - ||X||_F^2 / ||W||_F^2``,
``cutoff`` is ``tau`` for the penalties (the threshold on ``|w|`` or a group's norm) and NaN for
the projections, ``backend`` is ``"direct"`` and the bound 0.

Model level (:class:`ModelDiagnostics`): parameters the optimizer trains, the count if every
selected matrix with ``rank (m + n) < m n`` were factorized now, their ratio, and the
regularised objective ``F(W_t) = f(W_t) + sum_l lam_l R_l(W_t)`` when the closure returned the
loss ``f(W_t)`` (``R = ||.||_*`` for the soft prox, ``rank`` for the hard one; ``W_t`` is the
weight the closure saw, i.e. the previous prox's output, so the first step has no objective).

**Convergence rule** (:class:`ConvergenceRule`, configurable): a matrix has converged when its
rank has not changed for ``patience`` prox steps *and* its ``relative_step`` has stayed at or
below ``tol`` for the last ``patience`` prox steps; the model has converged when every matrix
recorded at the last step has. :meth:`ModelDiagnostics.reasons` names, for a model that has not,
each matrix that fails and which condition, by how much.

**Loss without a closure.** Under training loops that call ``step()`` without a closure (the HF
``Trainer``), hand the loss to :meth:`Diagnostics.observe_loss` before the step (the mean of the
values observed since the last step is used); :class:`proxrank.hf.ProxRankCallback` does it.

**Cost.** Per matrix and step: a handful of reductions over the ``k`` singular values, two
Frobenius norms (``O(mn)``), no device synchronisation (everything stays a tensor until
:meth:`Diagnostics.snapshot` or a logger converts it). The realised step needs ``X_prev``: the
tracker keeps a reference to the prox output it would otherwise free, i.e. **one extra copy of
every selected weight** (in the weight's dtype) while diagnostics are on;
``track_step=False`` drops it (``grad_mapping_norm`` and ``relative_step`` are then NaN and the
rule can never be met). ``X_prev`` is not saved in checkpoints: the first step after
``load_state_dict`` has no realised step (and restarts the ``tol`` count of the rule).

**History** (:class:`History`): the per-step statistics of every matrix, kept at a stride that
doubles whenever ``history`` entries are held, so memory stays bounded however long the run
(about ``history x matrices`` small tensors) while the trajectory still spans the whole run.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .factorize.convert import default_rtol
from .prox import HardThreshold, MatrixMap, SoftThreshold

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import ProxRank
    from .records import ProxStep

__all__ = [
    "CSVLogger",
    "ConvergenceRule",
    "Diagnostics",
    "DiagnosticsLogger",
    "History",
    "JSONLinesLogger",
    "LayerDiagnostics",
    "Measured",
    "ModelDiagnostics",
    "TensorBoardLogger",
    "json_safe",
]

#: Per-step statistics kept as one small tensor per matrix (and in the history), in this order.
STAT_FIELDS = (
    "rank",
    "effective_rank",
    "nuclear_norm",
    "energy_removed",
    "prox_residual",
    "grad_mapping_norm",
    "relative_step",
    "error_bound",
    "sparsity",
    "zero_rows",
    "zero_cols",
    "stored_size",
)


class Measured(NamedTuple):
    """The figures of one prox step that read its matrices (:meth:`Diagnostics.measure`),
    small enough to send to every rank: ``norms`` holds ``||Y||_F^2``, ``||X - W||_F``,
    ``||X||_F``, ``||X - X_prev||_F`` (NaN without ``X_prev``), the share of zero entries of
    ``X``, its zero rows and zero columns and, for a :class:`~proxrank.prox.MatrixMap` (NaN
    otherwise), the size of ``X`` in the map's structure and its regulariser (without
    ``lam``); ``spectrum`` the input's singular values as kept for :meth:`Diagnostics.plot`
    (empty for a :class:`~proxrank.prox.MatrixMap`)."""

    norms: Tensor
    spectrum: Tensor


@dataclass(frozen=True)
class ConvergenceRule:
    """A matrix has converged when its rank has been unchanged for ``patience`` prox steps and
    ``||X_t+1 - X_t||_F / max(||X_t+1||_F, ||X_t||_F) <= tol`` held at each of the last
    ``patience`` prox steps. The model has converged when all matrices have."""

    patience: int = 100
    tol: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise TypeError(f"ConvergenceRule patience must be an int >= 1, got {self.patience!r}")
        if self.patience < 1:
            raise ValueError(f"ConvergenceRule patience must be >= 1, got {self.patience}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, int | float):
            raise TypeError(f"ConvergenceRule tol must be a real number >= 0, got {self.tol!r}")
        if not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"ConvergenceRule tol must be finite and >= 0, got {self.tol!r}")

    def __str__(self) -> str:
        return (
            f"rank unchanged for {self.patience} steps and relative step <= {self.tol:g} "
            f"for {self.patience} steps"
        )


@dataclass
class LayerDiagnostics:
    """Plain-data view of one matrix after its last prox (see the module docstring).

    Under a non-Euclidean metric the spectral figures (rank, effective rank, nuclear norm,
    energy removed) are those of the regularised matrix ``A^{1/2} W B^{1/2}``; the residual
    and step figures are in the weight's own coordinates. ``tau`` is NaN while a rank target
    sets the threshold from the spectrum; with ``Schedule(every=k)`` it is the accumulated
    threshold and the realised step spans the ``k`` base steps since the last prox. A map on
    the matrix itself has no ``rank`` (``None``; see the module docstring).
    """

    name: str
    shape: tuple[int, int]
    step: int
    rank: int | None
    effective_rank: float
    nuclear_norm: float
    tau: float
    cutoff: float
    energy_removed: float
    prox_residual: float
    grad_mapping_norm: float
    relative_step: float
    steps_since_rank_change: int
    steps_below_tol: int
    factorized_params: int
    dense_params: int
    backend: str
    error_bound: float
    converged: bool
    prox: str = ""
    sparsity: float = math.nan
    zero_rows: int = 0
    zero_cols: int = 0
    tt_ranks: tuple[int, ...] | None = None


@dataclass
class ModelDiagnostics:
    """Plain-data view of the whole model after the last step.

    ``dense_params``: all parameters the optimizer trains; ``factorized_params``: the same with
    every selected matrix whose ``rank (m + n) < m n`` counted as ``rank (m + n)``;
    ``compression_ratio = dense_params / factorized_params``. ``loss`` is the closure's value
    ``f(W_t)`` and ``objective = f(W_t) + sum lam R(W_t)`` (``None`` when unavailable).
    """

    step: int
    layers: list[LayerDiagnostics]
    dense_params: int
    factorized_params: int
    compression_ratio: float
    loss: float | None
    objective: float | None
    converged: bool
    rule: ConvergenceRule = field(default_factory=ConvergenceRule)

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts and lists of numbers and strings (JSON-serialisable)."""
        return asdict(self)

    def reasons(self) -> list[str]:
        """Why the model has not converged: one line per matrix that fails the rule, naming
        each unmet condition and by how much (empty when converged)."""
        if not self.layers:
            return ["no prox step was recorded"]
        patience, tol = self.rule.patience, self.rule.tol
        out = []
        for lay in self.layers:
            if lay.converged:
                continue
            why = []
            if lay.steps_since_rank_change < patience:
                held = f"rank {lay.rank}" if lay.rank is not None else "stored size"
                why.append(f"{held} held {lay.steps_since_rank_change} of {patience} steps")
            if lay.steps_below_tol < patience:
                now = lay.relative_step
                if math.isnan(now):
                    why.append(
                        "relative step unknown (no previous output: track_step=False or "
                        "just resumed)"
                    )
                elif now > tol:
                    why.append(f"relative step {now:.3g} > tol {tol:g} ({now / tol:.3g}x)")
                else:
                    why.append(
                        f"relative step <= tol {tol:g} for {lay.steps_below_tol} of "
                        f"{patience} steps"
                    )
            out.append(f"{lay.name}: " + "; ".join(why))
        return out


class History:
    """A bounded record of per-step values that spans the whole run.

    Items offered one per step are kept at a stride: every item while fewer than ``capacity``
    are held; when the buffer fills up, every other item is dropped and the stride doubles. The
    buffer therefore never holds more than ``capacity`` items, and they are evenly spaced over
    the run (stride ``2^j``), so trajectories stay plottable from the first step to the last.
    """

    def __init__(self, capacity: int = 1024) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"history capacity must be an int >= 2, got {capacity!r}")
        self.capacity = capacity
        self.stride = 1
        self.offered = 0
        self._items: list[tuple[int, Any]] = []

    def wants(self) -> bool:
        """Whether the next offered item will be kept (compute it only then)."""
        return self.offered % self.stride == 0

    def offer(self, step: int, item: Any = None) -> None:
        """Offer the item of ``step``; ``item`` is only stored when :meth:`wants` was true."""
        if self.wants():
            self._items.append((step, item))
            if len(self._items) >= self.capacity:
                self._items = self._items[::2]
                self.stride *= 2
        self.offered += 1

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[int, Any]]:
        """The kept ``(step, item)`` pairs, oldest first."""
        return list(self._items)

    def state_dict(self) -> dict[str, Any]:
        return {"stride": self.stride, "offered": self.offered, "items": list(self._items)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.stride, self.offered = int(sd["stride"]), int(sd["offered"])
        self._items = [(int(s), item) for s, item in sd["items"]][-self.capacity + 1 :]


class _Layer:
    """Running state of one matrix: the latest statistics (tensors) and the counters."""

    def __init__(self, name: str, shape: tuple[int, int]) -> None:
        self.name, self.shape = name, shape
        self.step = -1
        self.tau = math.nan
        self.cutoff = math.nan  # the largest singular value the prox maps to zero
        self.backend = ""
        self.stats: Tensor | None = None
        self.rank: Tensor | None = None
        self.norm: Tensor | None = None  # ||X||_F of the last output
        self.since_rank: Tensor | None = None
        self.below_tol: Tensor | None = None
        self.reg: Tensor | None = None  # lam R(X) of the last output
        self.reg_in: Tensor | None = None  # lam R(W_t): the value at the previous step
        self.prev: Tensor | None = None  # the last output, for the realised step
        self.pending: tuple[int, Tensor] | None = None  # (step, output) measured, not recorded
        self.spectra: tuple[Tensor, Tensor] | None = None  # (before, after)
        self.prox = ""  # the map's name
        self.tt_ranks: tuple[int, ...] | None = None

    _SAVED = (
        *("step", "tau", "cutoff", "backend", "stats"),
        *("rank", "norm", "since_rank", "below_tol", "reg", "prox", "tt_ranks"),
    )
    #: Entries older checkpoints lack, with the value they stand for.
    _DEFAULTS: ClassVar[dict[str, Any]] = {"cutoff": math.nan, "prox": "", "tt_ranks": None}

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for k in self._SAVED:
            setattr(self, k, sd.get(k, self._DEFAULTS[k]) if k in self._DEFAULTS else sd[k])
        self.reg_in, self.prev, self.pending, self.spectra = None, None, None, None


class Diagnostics:
    """Tracks convergence diagnostics of a :class:`proxrank.ProxRank` (pass it, or ``True``, as
    its ``diagnostics`` argument).

    Args:
        rule: the :class:`ConvergenceRule` behind ``converged``.
        history: capacity of the :class:`History` of per-step statistics.
        track_step: keep the last prox output of every matrix (one copy of each selected weight)
            to measure the realised step ``||X_t+1 - X_t||_F / lr``.
        full_spectrum_every: every this many steps, when the backend returned only part of the
            input's spectrum, compute all of it (``torch.linalg.svdvals``) for :meth:`plot`;
            0 (default) never does.
        loggers: :class:`DiagnosticsLogger` objects called with a :meth:`snapshot`.
        log_every: call the loggers every this many steps (each call converts the tensors to
            Python numbers: one device synchronisation).
    """

    def __init__(
        self,
        *,
        rule: ConvergenceRule | None = None,
        history: int = 1024,
        track_step: bool = True,
        full_spectrum_every: int = 0,
        loggers: Sequence[DiagnosticsLogger] = (),
        log_every: int = 1,
    ) -> None:
        self.rule = ConvergenceRule() if rule is None else rule
        if not isinstance(self.rule, ConvergenceRule):
            raise TypeError(f"rule must be a ConvergenceRule, got {type(rule).__name__}")
        for option, value, low in (
            ("full_spectrum_every", full_spectrum_every, 0),
            ("log_every", log_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{option} must be an int >= {low}, got {value!r}")
        for logger in loggers:
            if not isinstance(logger, DiagnosticsLogger):
                raise TypeError(
                    f"loggers entries must be DiagnosticsLogger instances, got {logger!r}"
                )
        self.history = History(history)
        self.track_step = bool(track_step)
        self.full_spectrum_every = full_spectrum_every
        self.loggers = list(loggers)
        self.log_every = log_every
        self._layers: dict[str, _Layer] = {}
        self._recorded: list[_Layer] = []  # matrices recorded during the current step
        self._owner: weakref.ReferenceType[ProxRank] | None = None
        self._step = 0
        self._loss: Tensor | float | None = None
        self._observed: list[Tensor | float] = []  # losses handed over since the last step
        self._objective: Tensor | float | None = None

    # -- binding -------------------------------------------------------------------------
    def bind(self, optimizer: ProxRank) -> None:
        """Attach to the optimizer whose steps are recorded (done by ``ProxRank``)."""
        owner = None if self._owner is None else self._owner()
        if owner is not None and owner is not optimizer:
            raise ValueError(
                "this Diagnostics object already tracks another ProxRank; create one per optimizer"
            )
        self._owner = weakref.ref(optimizer)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_owner"] = None  # a weak reference; the copied ProxRank binds its copy again
        return state

    @property
    def optimizer(self) -> ProxRank:
        owner = None if self._owner is None else self._owner()
        if owner is None:
            raise RuntimeError(
                "Diagnostics is not attached to a ProxRank; pass it as ProxRank(..., "
                "diagnostics=...)"
            )
        return owner

    def _layer(self, step: ProxStep) -> _Layer:
        if step.name not in self._layers:
            self._layers[step.name] = _Layer(step.name, step.shape)
        return self._layers[step.name]

    # -- recording (hot path: tensors only, no synchronisation) ---------------------------
    @torch.no_grad()
    def measure(self, step: ProxStep) -> Measured:
        """The figures of ``step`` that read its matrices ``W``, ``Y`` and ``X`` (which it must
        hold), for :meth:`record`; keeps ``X`` as the next ``X_prev`` (with ``track_step``).
        Under :mod:`proxrank.distributed` a matrix's owner measures it and every rank records
        the (small) result, so no rank needs the matrices it does not own."""
        layer = self._layer(step)
        X, W, Y = step.X, step.W, step.Y
        nan = torch.full((), math.nan, dtype=X.dtype, device=X.device)
        stored, reg_value, spectrum = nan, nan, X.new_zeros(0)
        if isinstance(step.prox, MatrixMap):  # no spectrum: the size in its structure instead
            stored = step.prox.stored_size(X, step.rank_target).to(X.dtype)
            reg_value = step.prox.regularizer(X).to(X.dtype)
        else:
            spectrum = self._spectrum_before(layer, Y, step.S)
        nonzero = X.ne(0)
        norms = torch.stack(
            [
                torch.linalg.vector_norm(Y).square(),
                torch.dist(X, W),  # prox residual
                torch.linalg.vector_norm(X),
                self._realised_step(layer, step),
                1 - nonzero.sum() / max(X.numel(), 1),  # sparsity
                (~nonzero.any(dim=1)).sum().to(X.dtype),  # zero rows
                (~nonzero.any(dim=0)).sum().to(X.dtype),  # zero columns
                stored,
                reg_value,
            ]
        )
        return Measured(norms, spectrum)

    @torch.no_grad()
    def record(self, step: ProxStep, measured: Measured | None = None) -> None:
        """Update one matrix from the :class:`proxrank.records.ProxStep` its prox emitted and
        its :meth:`measure` (taken here from ``step``'s matrices when not given; the optimizer
        calls it before ``X`` is written into the parameter: ``W`` may share its storage)."""
        measured = self.measure(step) if measured is None else measured
        layer = self._layer(step)
        S_new = step.S_new
        in_sq, residual, out_norm, step_norm, sparsity, zero_rows, zero_cols, stored, reg_value = (
            measured.norms.unbind()
        )
        ref = measured.norms
        nan = torch.full((), math.nan, dtype=ref.dtype, device=ref.device)
        lam = step.tau / step.lr if step.lr > 0 and step.rank_target is None else math.nan
        reg = nan  # also while a rank target sets the threshold from the spectrum (lam is NaN)
        if S_new is None:  # a MatrixMap: no spectrum
            prox: MatrixMap = step.prox  # type: ignore[assignment]
            rank = effective_rank = nuclear = nan
            structure = stored
            out_sq = out_norm.square()
            reg = reg_value * (0.0 if prox.levels else lam)  # a projection: 0
        else:
            # the rank factorize would find: rounding noise a decayed threshold kept is not rank
            rtol = default_rtol(*step.shape, step.weight_dtype)
            rank = (
                torch.count_nonzero(S_new > rtol * S_new.amax()) if S_new.numel() else _zero(ref)
            )
            structure = rank
            # spectral figures are those of the regularised matrix Y (A^{1/2} W B^{1/2})
            nuclear = S_new.sum()
            out_sq = S_new.square().sum()
            p = S_new / torch.where(nuclear > 0, nuclear, 1)
            effective_rank = torch.where(nuclear > 0, torch.exp(-torch.xlogy(p, p).sum()), 0)
            if isinstance(step.prox, SoftThreshold):
                reg = lam * nuclear
            elif isinstance(step.prox, HardThreshold):
                reg = lam * rank.to(ref.dtype)
        energy_removed = torch.where(in_sq > 0, 1 - out_sq / in_sq, 0).clamp(0, 1)
        # steps are measured in the weight's own coordinates
        relative_step = nan
        if layer.norm is not None:  # NaN without X_prev (then step_norm is NaN)
            scale = torch.maximum(out_norm, layer.norm.to(out_norm))
            relative_step = torch.where(scale > 0, step_norm / torch.where(scale > 0, scale, 1), 0)
            relative_step = torch.where(step_norm.isnan(), nan, relative_step)
        layer.norm = out_norm
        pending, layer.pending = layer.pending, None  # measured here at this step, or not here
        layer.prev = pending[1] if pending is not None and pending[0] == self._step else None

        zero = _zero(ref)
        if layer.rank is None or layer.rank.dtype != structure.dtype:  # first step, or new map
            layer.since_rank = layer.below_tol = zero - 1  # both become 0 below
            layer.rank = structure
        layer.since_rank = torch.where(structure == layer.rank, layer.since_rank + 1, zero)
        small_step = relative_step <= self.rule.tol  # False while NaN
        layer.below_tol = torch.where(small_step, layer.below_tol + 1, zero)

        layer.reg_in, layer.reg = (nan if layer.reg is None else layer.reg), reg
        layer.rank = structure
        layer.stats = torch.stack(
            [
                rank.to(ref.dtype),
                effective_rank.to(ref.dtype),
                nuclear.to(ref.dtype),
                energy_removed.to(ref.dtype),
                residual,
                step_norm / step.lr if step.lr > 0 else nan,  # gradient mapping
                relative_step,
                step.error_bound.to(dtype=ref.dtype, device=ref.device).reshape(()),
                sparsity,
                zero_rows,
                zero_cols,
                stored,
            ]
        )
        layer.tau = float(step.tau)
        layer.cutoff = math.nan
        if math.isfinite(step.tau) and S_new is not None:
            layer.cutoff = float(step.prox.cutoff(step.tau))
        elif math.isfinite(step.tau):  # a penalty: the threshold on |w| or a group's norm
            layer.cutoff = float(step.tau)
        layer.backend = step.method
        layer.step = self._step
        layer.prox = step.prox.name
        layer.tt_ranks = None
        layer.spectra = None
        if isinstance(step.prox, MatrixMap):
            layer.tt_ranks = step.prox.tt_ranks(step.shape, step.rank_target)
        else:
            layer.spectra = (measured.spectrum, S_new.detach())
        self._recorded.append(layer)

    def _realised_step(self, layer: _Layer, step: ProxStep) -> Tensor:
        """``||X - X_prev||_F``, NaN without ``X_prev`` (``track_step=False``, just resumed,
        or, across ranks, this rank did not measure the matrix's last record: its owner
        changed). ``X`` becomes the next ``X_prev`` when this step is recorded (with
        ``track_step``: the prox's fresh output, never a view of the weight, cast to the
        weight's dtype: what is written back)."""
        X = step.X
        written = X.to(step.weight_dtype)
        step_norm = torch.full((), math.nan, dtype=X.dtype, device=X.device)
        if layer.prev is not None and layer.prev.shape == written.shape:
            step_norm = torch.dist(written.to(X.dtype), layer.prev.to(X.dtype))
        layer.pending = (self._step, written.detach()) if self.track_step else None
        return step_norm

    def _spectrum_before(self, layer: _Layer, Y: Tensor, S: Tensor) -> Tensor:
        """The input's singular values as the backend returned them; all of them every
        ``full_spectrum_every`` steps when the backend returned only the largest."""
        m, n = layer.shape
        every = self.full_spectrum_every
        if every and self._step % every == 0 and S.shape[-1] < min(m, n):
            return torch.linalg.svdvals(Y)
        return S.detach()

    def observe_loss(self, loss: Tensor | float) -> None:
        """Hand over the training loss ``f(W_t)`` of the coming step when ``step()`` gets no
        closure (several calls, e.g. one per accumulated micro-batch, are averaged). Kept as a
        tensor: no synchronisation."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss needs a scalar loss, got shape {tuple(loss.shape)}")
            loss = loss.detach().reshape(())
        elif isinstance(loss, bool) or not isinstance(loss, int | float):
            raise TypeError(f"observe_loss needs a number or a scalar tensor, got {loss!r}")
        self._observed.append(loss)

    def end_step(self, loss: Any = None) -> None:
        """Close the step: objective, history, loggers. ``loss`` is what the closure returned
        (without one, the mean of the losses :meth:`observe_loss` received since the last
        step)."""
        observed, self._observed = self._observed, []
        if loss is None and observed:
            loss = sum(observed) / len(observed)
        if isinstance(loss, Tensor):
            loss = loss.detach()
            loss = loss.reshape(()) if loss.numel() == 1 else None
        elif not isinstance(loss, int | float) or isinstance(loss, bool):
            loss = None
        engine = self.optimizer.distributed
        if engine is not None:  # each rank's loss of its own batch: their mean, on every rank
            loss = engine.mean(loss)
        self._loss = loss
        self._objective = None
        if loss is not None and self._recorded:
            self._objective = loss + sum(layer.reg_in for layer in self._recorded)
        if self.history.wants():
            item = {layer.name: layer.stats for layer in self._recorded}
            item["loss"], item["objective"] = self._loss, self._objective
            self.history.offer(self._step, item)
        else:
            self.history.offer(self._step)
        self._recorded = []
        self._step += 1
        if self.loggers and self._step % self.log_every == 0:
            snap = self.snapshot()
            for logger in self.loggers:
                logger.log(snap)

    # -- reading -------------------------------------------------------------------------
    def _layer_view(self, layer: _Layer) -> LayerDiagnostics:
        values = dict(zip(STAT_FIELDS, layer.stats.tolist(), strict=True))
        since, below = int(layer.since_rank), max(int(layer.below_tol), 0)
        m, n = layer.shape
        rank, stored = values.pop("rank"), values.pop("stored_size")
        rank = None if math.isnan(rank) else int(rank)  # a MatrixMap has no rank
        zero_rows, zero_cols = int(values.pop("zero_rows")), int(values.pop("zero_cols"))
        return LayerDiagnostics(
            name=layer.name,
            shape=layer.shape,
            step=layer.step,
            rank=rank,
            tau=layer.tau,
            cutoff=layer.cutoff,
            steps_since_rank_change=since,
            steps_below_tol=below,
            factorized_params=int(stored) if rank is None else rank * (m + n),
            dense_params=m * n,
            backend=layer.backend,
            converged=since >= self.rule.patience and below >= self.rule.patience,
            prox=layer.prox,
            zero_rows=zero_rows,
            zero_cols=zero_cols,
            tt_ranks=layer.tt_ranks,
            **values,
        )

    def snapshot(self) -> ModelDiagnostics:
        """The current diagnostics as plain data (synchronises the device once per matrix)."""
        opt = self.optimizer
        layers = [
            self._layer_view(self._layers[t.name])
            for t in opt.targets
            if t.name in self._layers and self._layers[t.name].stats is not None
        ]
        params = {id(p): p for g in opt.param_groups for p in g["params"]}
        dense = sum(p.numel() for p in params.values())
        saved = sum(max(0, lay.dense_params - lay.factorized_params) for lay in layers)
        factorized = dense - saved
        return ModelDiagnostics(
            step=self._step,
            layers=layers,
            dense_params=dense,
            factorized_params=factorized,
            compression_ratio=dense / factorized if factorized else math.inf,
            loss=_to_float(self._loss),
            objective=_to_float(self._objective),
            converged=bool(layers) and all(lay.converged for lay in layers),
            rule=self.rule,
        )

    def report(self) -> str:
        """A per-matrix table of :meth:`snapshot` (see the module docstring for the columns)."""
        return format_report(self.snapshot())

    def trajectories(self) -> dict[str, dict[str, list[float]]]:
        """From the history: ``{name: {"step": [...], field: [...] for field in STAT_FIELDS}}``
        plus ``"model"`` with ``step``, ``loss`` and ``objective``."""
        out: dict[str, dict[str, list[float]]] = {}
        model: dict[str, list[float]] = {"step": [], "loss": [], "objective": []}
        for step, item in self.history.items():
            for key, value in item.items():
                if key in ("loss", "objective"):
                    continue
                row = out.setdefault(key, {"step": [], **{f: [] for f in STAT_FIELDS}})
                row["step"].append(step)
                for f, v in zip(STAT_FIELDS, value.tolist(), strict=True):
                    row[f].append(v)
            model["step"].append(step)
            for key in ("loss", "objective"):
                v = _to_float(item[key])
                model[key].append(math.nan if v is None else v)
        out["model"] = model
        return out

    def spectra(self) -> dict[str, tuple[list[float], list[float]]]:
        """The latest singular values of every matrix: ``{name: (before, after)}`` (``before``
        holds only the triplets the backend computed unless ``full_spectrum_every`` is set)."""
        return {
            name: (layer.spectra[0].tolist(), layer.spectra[1].tolist())
            for name, layer in self._layers.items()
            if layer.spectra is not None
        }

    def plot(self, path: str | Path, *, layers: Iterable[str] | None = None) -> Path:
        """Save :meth:`figure` to ``path`` (format from its suffix)."""
        fig = self.figure(layers=layers)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        return path

    def figure(self, *, layers: Iterable[str] | None = None) -> Any:
        """A ``matplotlib.figure.Figure``: rank trajectories per matrix
        (left) and each matrix's latest singular values (right, log scale): before the prox
        (dashed), the kept ones after it (solid: as many as ``rank``) and the threshold the prox
        cut at (dotted horizontal line, ``prox.cutoff(tau)``; absent while a rank target sets
        it). One colour per matrix (a colour map beyond 10 matrices), the matrix legend outside
        the axes in columns of at most 16 names. Needs matplotlib
        (``pip install proxrank[demo]``)."""
        agg = _optional("matplotlib.backends.backend_agg", "Diagnostics.plot", "demo")
        mpl_figure = _optional("matplotlib.figure", "Diagnostics.plot", "demo")
        lines = _optional("matplotlib.lines", "Diagnostics.plot", "demo")
        colormaps = _optional("matplotlib", "Diagnostics.plot", "demo").colormaps
        traj = self.trajectories()
        spectra = self.spectra()
        names = [n for n in traj if n != "model"] if layers is None else list(layers)
        unknown = [n for n in names if n not in traj]
        if unknown:
            raise ValueError(
                f"layers {unknown} have no recorded diagnostics; choose from "
                f"{[n for n in traj if n != 'model']}"
            )
        columns = max(1, math.ceil(len(names) / 16))
        fig = mpl_figure.Figure(figsize=(12 + 2.5 * columns, 4.5 + 0.05 * min(len(names), 16)))
        agg.FigureCanvasAgg(fig)
        ax_rank, ax_spec = fig.subplots(1, 2)
        cmap = colormaps["viridis"]
        for i, name in enumerate(names):
            color = f"C{i}" if len(names) <= 10 else cmap(i / max(len(names) - 1, 1))
            ax_rank.plot(traj[name]["step"], traj[name]["rank"], color=color, label=name)
            if name in spectra:
                before, after = spectra[name]
                layer = self._layers[name]
                kept = after[: int(layer.rank)]  # as many as the reported rank
                ax_spec.semilogy(range(1, len(before) + 1), before, "--", color=color, lw=0.8)
                ax_spec.semilogy(range(1, len(kept) + 1), kept, "-", color=color, lw=1.2)
                if math.isfinite(layer.cutoff) and layer.cutoff > 0:
                    ax_spec.axhline(layer.cutoff, ls=":", color=color, lw=0.8)
        ax_rank.set(xlabel="step", ylabel="rank after prox", title="rank trajectories")
        ax_spec.set(xlabel="index i", ylabel="singular value s_i", title="latest spectra")
        style = [
            lines.Line2D([], [], ls="--", color="gray", label="before prox"),
            lines.Line2D([], [], ls="-", color="gray", label="after prox (kept)"),
            lines.Line2D([], [], ls=":", color="gray", label="threshold"),
        ]
        ax_spec.legend(handles=style, fontsize="small", loc="upper right")
        if names:
            fig.legend(
                *ax_rank.get_legend_handles_labels(),
                loc="center right",
                ncols=columns,
                fontsize="small" if len(names) <= 16 else "x-small",
                title="matrix",
            )
        fig.tight_layout(rect=(0, 0, 1 - 0.17 * columns * 12 / (12 + 2.5 * columns), 1))
        return fig

    def close(self) -> None:
        """Close every logger."""
        for logger in self.loggers:
            logger.close()

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, latest statistics and the history (not the kept weights)."""
        return {
            "step": self._step,
            "layers": {name: layer.state_dict() for name, layer in self._layers.items()},
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (validated first: nothing changes when it is bad)."""
        self.prepare_load(sd)()

    def prepare_load(self, sd: dict[str, Any]) -> Callable[[], None]:
        """Validate ``sd`` without changing anything; returns the function that loads it (so
        that ``ProxRank.load_state_dict`` can check everything before it changes anything)."""
        try:
            layers = {}
            for name, entry in sd["layers"].items():
                layers[name] = _Layer(name, self._shape_of(name))
                layers[name].load_state_dict(entry)
            history = History(self.history.capacity)
            history.load_state_dict(sd["history"])
            step = int(sd["step"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"diagnostics state is malformed ({type(exc).__name__}: {exc}); load a "
                "state_dict saved by a ProxRank with diagnostics on"
            ) from exc

        def commit() -> None:
            self._layers, self.history, self._step = layers, history, step
            self._recorded = []

        return commit

    def _shape_of(self, name: str) -> tuple[int, int]:
        for t in self.optimizer.targets:
            if t.name == name:
                return t.shape2d
        raise ValueError(
            f"diagnostics state has a matrix {name!r} that this optimizer does not select; "
            "build the ProxRank with the same model and include/exclude"
        )


def _optional(module: str, feature: str, extra: str) -> Any:
    """Import an optional dependency, naming the extra that provides it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{feature} needs {module!r}, which is not installed; pip install 'proxrank[{extra}]'"
        ) from exc


def _zero(like: Tensor) -> Tensor:
    """An int64 zero on ``like``'s device."""
    return torch.zeros((), dtype=torch.int64, device=like.device)


def _to_float(x: Any) -> float | None:
    if x is None:
        return None
    value = float(x)
    return None if math.isnan(value) else value


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


#: How many not-converged matrices :func:`format_report` names (the rest are counted).
_MAX_REASONS = 8


def format_report(snap: ModelDiagnostics) -> str:
    """Render a :class:`ModelDiagnostics` as a fixed-width table."""
    head = (
        "layer",
        "shape",
        "prox",
        "rank",
        "eff.rank",
        "nuclear",
        "tau",
        "energy-",
        "prox res",
        "||G||",
        "rel.step",
        "rank held",
        "step held",
        "factorized",
        "zeros",
        "0 rows/cols",
        "backend",
        "err.bound",
        "conv",
    )
    rows = [head]
    for lay in snap.layers:
        m, n = lay.shape
        rank = "-" if lay.rank is None else str(lay.rank)
        if lay.tt_ranks is not None:
            rank = "tt " + "/".join(map(str, lay.tt_ranks))
        rows.append(
            (
                lay.name,
                f"{m}x{n}",
                lay.prox,
                rank,
                _fmt(lay.effective_rank),
                _fmt(lay.nuclear_norm),
                _fmt(lay.tau),
                f"{100 * lay.energy_removed:.1f}%",
                _fmt(lay.prox_residual),
                _fmt(lay.grad_mapping_norm),
                _fmt(lay.relative_step),
                str(lay.steps_since_rank_change),
                str(lay.steps_below_tol),
                f"{lay.factorized_params}/{lay.dense_params}",
                f"{100 * lay.sparsity:.1f}%",
                f"{lay.zero_rows}/{lay.zero_cols}",
                lay.backend,
                _fmt(lay.error_bound),
                "yes" if lay.converged else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "yes" if snap.converged else "no"
    lines.insert(0, f"step {snap.step}  converged: {verdict}  (rule: {snap.rule})")
    reasons = snap.reasons()
    for i, reason in enumerate(reasons[:_MAX_REASONS]):
        lines.insert(1 + i, f"  not converged: {reason}")
    if len(reasons) > _MAX_REASONS:
        lines.insert(1 + _MAX_REASONS, f"  ... and {len(reasons) - _MAX_REASONS} more matrices")
    lines.append(
        f"params: {snap.dense_params} dense, {snap.factorized_params} if factorized now "
        f"(compression {snap.compression_ratio:.3g}x)  loss {_fmt(snap.loss)}  "
        f"objective {_fmt(snap.objective)}"
    )
    lines.append(
        "energy-: share of ||W||_F^2 the prox removed; prox res: ||X - W||_F; ||G||: "
        "||X_t+1 - X_t||_F / lr; rel.step: ||X_t+1 - X_t||_F / ||X||_F; rank held: steps since "
        "the rank changed; step held: steps with rel.step <= tol; factorized: r(m+n) / mn (rank "
        "counted with factorize's tolerance; maps on the entries: the size in their structure); "
        "zeros: share of zero entries; 0 rows/cols: zero rows and columns"
    )
    return "\n".join(lines)


# -- loggers ---------------------------------------------------------------------------------
class DiagnosticsLogger:
    """Receives a :class:`ModelDiagnostics` every ``log_every`` steps."""

    def log(self, snap: ModelDiagnostics) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release resources."""


class _FileLogger(DiagnosticsLogger):
    """A logger writing to the file ``path`` (created, or truncated, with its header). A copy
    (``copy.deepcopy``, ``pickle``: of a ``ProxRank`` with diagnostics) appends to the same
    file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open("w")

    def _open(self, mode: str) -> None:
        self._file = self.path.open(mode, newline="")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._open("a")

    def close(self) -> None:
        self._file.close()


def _layer_scalars(lay: LayerDiagnostics) -> dict[str, float]:
    skip = ("name", "shape", "step", "backend", "prox", "tt_ranks")
    return {
        f.name: math.nan if getattr(lay, f.name) is None else float(getattr(lay, f.name))
        for f in fields(lay)
        if f.name not in skip
    }


def _model_scalars(snap: ModelDiagnostics) -> dict[str, float]:
    return {
        "dense_params": float(snap.dense_params),
        "factorized_params": float(snap.factorized_params),
        "compression_ratio": snap.compression_ratio,
        "loss": math.nan if snap.loss is None else snap.loss,
        "objective": math.nan if snap.objective is None else snap.objective,
        "converged": float(snap.converged),
    }


class CSVLogger(_FileLogger):
    """One CSV row per matrix and logged step: ``step, layer``, the per-matrix figures, then the
    model-level ones, prefixed ``model_`` (repeated on every row of the step). Every column name
    is unique, so ``csv.DictReader`` reads each figure back under its own name."""

    LAYER_COLUMNS = tuple(
        f.name for f in fields(LayerDiagnostics) if f.name not in ("name", "shape", "step")
    )
    MODEL_COLUMNS = (
        "model_dense_params",
        "model_factorized_params",
        "model_compression_ratio",
        "model_loss",
        "model_objective",
        "model_converged",
    )

    def _open(self, mode: str) -> None:
        super()._open(mode)
        self._writer = csv.writer(self._file)
        if mode == "w":
            self._writer.writerow(("step", "layer", *self.LAYER_COLUMNS, *self.MODEL_COLUMNS))

    def log(self, snap: ModelDiagnostics) -> None:
        tail = [
            snap.dense_params,
            snap.factorized_params,
            snap.compression_ratio,
            "" if snap.loss is None else snap.loss,
            "" if snap.objective is None else snap.objective,
            snap.converged,
        ]
        for lay in snap.layers:
            self._writer.writerow(
                [snap.step, lay.name, *(getattr(lay, c) for c in self.LAYER_COLUMNS), *tail]
            )
        self._file.flush()


class JSONLinesLogger(_FileLogger):
    """One JSON object per logged step: :meth:`ModelDiagnostics.to_dict` (NaN written as
    ``null``)."""

    def log(self, snap: ModelDiagnostics) -> None:
        self._file.write(json.dumps(json_safe(snap.to_dict())) + "\n")
        self._file.flush()


def json_safe(obj: Any) -> Any:
    """``obj`` (dicts, lists, numbers) with every non-finite float replaced by ``None``
    (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


class TensorBoardLogger(DiagnosticsLogger):
    """Scalars ``proxrank/<matrix>/<figure>`` and ``proxrank/model/<figure>`` through
    :class:`torch.utils.tensorboard.SummaryWriter` (needs the ``tensorboard`` package).

    ``log_dir_or_writer``: a directory, or a ``SummaryWriter`` you already use (not closed by
    :meth:`close`)."""

    def __init__(self, log_dir_or_writer: Any) -> None:
        if isinstance(log_dir_or_writer, str | Path):
            tb = _optional("torch.utils.tensorboard", "TensorBoardLogger", "tensorboard")
            self.writer = tb.SummaryWriter(str(log_dir_or_writer))
            self._owns = True
        elif hasattr(log_dir_or_writer, "add_scalar"):
            self.writer, self._owns = log_dir_or_writer, False
        else:
            raise TypeError(
                "TensorBoardLogger needs a log directory or a SummaryWriter, got "
                f"{type(log_dir_or_writer).__name__}"
            )

    def log(self, snap: ModelDiagnostics) -> None:
        for lay in snap.layers:
            for key, value in _layer_scalars(lay).items():
                self.writer.add_scalar(f"proxrank/{lay.name}/{key}", value, snap.step)
        for key, value in _model_scalars(snap).items():
            self.writer.add_scalar(f"proxrank/model/{key}", value, snap.step)
        self.writer.flush()

    def close(self) -> None:
        if self._owns:
            self.writer.close()

"""The engine's per-matrix records: what the optimizer keeps for each selected matrix
(:class:`MatrixRecord`, read through :class:`MatrixInfo`) and what one step did to it
(:class:`ProxStep`, read by diagnostics and loggers).

Each selected matrix owns one :class:`MatrixRecord`. Its state is split into namespaces, one
per owner, so that no two components can collide on a key:

* ``backend``: written only by the :class:`~proxrank.backends.Backend` (warm-start basis,
  certificate, method used);
* ``metric``: written only by the :class:`~proxrank.metrics.Metric` (gradient and input
  statistics);
* ``schedule``: written only by the :class:`~proxrank.schedules.Schedule` (final rank,
  accumulated threshold, rank reached);
* ``dual``: written only by the optimizer under ``tau_lr="cumulative"`` (dual averaging): the
  sum of the learning rates so far and the latent, un-thresholded matrix ``Z`` whose prox the
  weight holds (``None``: the weight is its own latent).

A step never mutates a namespace in place: it computes the new entries and the optimizer
commits them once every matrix has succeeded (see ``ARCHITECTURE.md``).
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .prox import MatrixMap, ProxMap
from .selection import Target

__all__ = ["NAMESPACES", "MatrixInfo", "MatrixRecord", "ProxStep"]

#: The owners of a matrix's state, in the order they are saved.
NAMESPACES = ("backend", "metric", "schedule", "dual")


@dataclass(eq=False)
class MatrixRecord:
    """The optimizer's memory of one selected matrix.

    ``shape`` is the matrix shape the state was built for: a parameter resized since then gets
    fresh state (:meth:`matches`). ``input_error`` holds a non-finite input statistic seen by a
    forward hook (not stored); the next step raises it before anything changes.
    """

    target: Target
    shape: tuple[int, int]
    backend: dict[str, Any] = field(default_factory=dict)
    metric: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    dual: dict[str, Any] = field(default_factory=dict)
    input_error: str | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def matches(self) -> bool:
        """Whether the parameter still has the shape the state was built for."""
        return self.target.shape2d == self.shape

    def namespaces(self) -> dict[str, dict[str, Any]]:
        return {ns: getattr(self, ns) for ns in NAMESPACES}


def _frozen(state: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(state))


@dataclass(frozen=True)
class MatrixInfo:
    """A read-only view of one selected matrix (:meth:`proxrank.ProxRank.matrices`): its name,
    layer kind, matrix shape, param group index, the options in force and each namespace of
    its state (read-only mappings)."""

    name: str
    kind: str
    shape: tuple[int, int]
    group: int
    lam: float
    prox: str
    metric: str
    backend_state: Mapping[str, Any]
    metric_state: Mapping[str, Any]
    schedule_state: Mapping[str, Any]

    @classmethod
    def of(cls, record: MatrixRecord, group: int, options: Mapping[str, Any]) -> MatrixInfo:
        return cls(
            record.name,
            record.target.kind,
            record.target.shape2d,
            group,
            float(options["lam"]),
            str(getattr(options["prox"], "name", options["prox"])),
            str(getattr(options["metric"], "name", options["metric"])),
            _frozen(record.backend),
            _frozen(record.metric),
            _frozen(record.schedule),
        )


@dataclass(frozen=True)
class ProxStep:
    """What one step's prox did to one matrix (tensors in the compute dtype, on the weight's
    device; nothing here has been synchronised to the host).

    ``W`` is the matrix after the base step, ``Y`` the matrix the prox thresholded (``W`` itself,
    or ``A^{1/2} W B^{1/2}`` under a metric), ``X`` the matrix written back (weight
    coordinates). ``S`` are the singular values of ``Y`` the backend returned (the largest
    ones, descending), ``S_new = phi(S)`` the thresholded ones, so ``Y``'s prox is
    ``U diag(S_new) V^T``. ``tau`` is the threshold (``lam * lr``; NaN when a rank target set it
    from the spectrum, and for a projection), ``rank_target`` that target, ``method`` the
    backend's method and ``error_bound`` its certified bound on the distance to the exact
    prox, ``weight_dtype`` the dtype ``X`` is written back in. Across ranks
    (:mod:`proxrank.distributed`) only a matrix's owner has ``W``, ``Y`` and ``X``: the other
    ranks' steps hold ``None`` there and are recorded with what the owner measured
    (:meth:`proxrank.Diagnostics.measure`).

    A :class:`~proxrank.prox.MatrixMap` computes no singular values: ``S`` and ``S_new`` are
    ``None``, ``Y`` is ``W``, ``rank_target`` is the projection's level set by a schedule
    (``None``: the map's own), ``method`` is ``"direct"`` and the bound 0 (the map is
    exact)."""

    name: str
    shape: tuple[int, int]
    prox: ProxMap | MatrixMap
    tau: float
    rank_target: int | None
    lam: float
    lr: float
    W: Tensor | None
    Y: Tensor | None
    X: Tensor | None
    S: Tensor | None
    S_new: Tensor | None
    error_bound: Tensor
    method: str
    weight_dtype: torch.dtype

    @property
    def rank(self) -> Tensor | None:
        """The rank after the prox, ``#{S_new > 0}`` (a 0-dim tensor; ``None`` for a
        :class:`~proxrank.prox.MatrixMap`, which computes no spectrum)."""
        return None if self.S_new is None else torch.count_nonzero(self.S_new)

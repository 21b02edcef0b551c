r"""One-shot (post-hoc) low-rank compression of a trained model in a chosen metric.

Each selected weight ``W`` (``m x n``; conv kernels as ``out x (in kh kw)``) is replaced by its
best rank-``r`` approximation in the metric ``(A, B)`` of :mod:`proxrank.metrics`:

    X = A^{-1/2} [A^{1/2} W B^{1/2}]_r B^{-1/2}
      = argmin_{rank X <= r} ||A^{1/2} (W - X) B^{1/2}||_F.

``"euclidean"`` is the plain truncated SVD; ``"fisher"`` is FWSVD (``A`` from squared
gradients of ``loss_fn`` on ``data``); ``"activation"`` is SVD-LLM-style whitening (``B`` from
the layer inputs on ``data``); ``"two_sided"`` uses both. The statistics are plain means over
the batches of ``data``, gathered by the same metric code the optimizer uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import compute_dtype
from .functional import project_rank
from .metrics import AdamMetric, Metric, Weighting, get_metric
from .selection import Selector, Target, select_targets
from .statistics import InputHooks, gradient_matrix

__all__ = ["LayerCompression", "compress"]


@dataclass(frozen=True)
class LayerCompression:
    """What :func:`compress` did to one weight.

    ``error``: ``||A^{1/2} (W - X) B^{1/2}||_F / ||A^{1/2} W B^{1/2}||_F`` in the chosen metric;
    ``frobenius_error``: ``||W - X||_F / ||W||_F``; ``params``: ``m n`` before; after,
    ``r (m + n)`` as two factors, or ``m n`` when that would not save anything.
    """

    name: str
    shape: tuple[int, int]
    rank: int
    error: float
    frobenius_error: float
    params_before: int
    params_after: int


class _Statistics:
    """Per-matrix metric state while gathering (the owner of the input hooks)."""

    def __init__(self, metric: Metric, targets: list[Target]) -> None:
        self.metric = metric
        self.states: list[dict[str, Any]] = [{} for _ in targets]

    def observe_input(self, key: int, x: Tensor) -> None:
        self.states[key].update(self.metric.observe_input(self.states[key], x))


def _check_rank_ratio(rank: Any, ratio: Any) -> None:
    if (rank is None) == (ratio is None):
        raise ValueError("pass exactly one of rank=... (an int >= 1) or ratio=... (in (0, 1])")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if ratio is not None and (
        isinstance(ratio, bool)
        or not isinstance(ratio, int | float)
        or not math.isfinite(ratio)
        or not 0 < ratio <= 1
    ):
        raise ValueError(
            f"ratio must be in (0, 1] (the kept fraction of each layer's parameters), got {ratio!r}"
        )


def _layer_rank(m: int, n: int, rank: int | None, ratio: float | None) -> int:
    """``rank``, or the largest ``r >= 1`` with ``r (m + n) <= ratio m n``; at most
    ``min(m, n)``."""
    r = rank if rank is not None else max(1, math.floor(ratio * m * n / (m + n)))
    return min(r, m, n)


def _resolve_metric(metric: str | Metric) -> Metric:
    if isinstance(metric, str) and metric in ("fisher", "activation", "two_sided"):
        resolved = get_metric(metric, beta=None)  # plain means over the calibration batches
    else:
        resolved = get_metric(metric)
    if isinstance(resolved, AdamMetric):
        raise ValueError(
            "metric='adam' reads a base optimizer's state and has no meaning for one-shot "
            "compression; use metric='fisher' (squared gradients on data)"
        )
    return resolved


def _split_batch(batch: Any, need_target: bool) -> tuple[Any, Any]:
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, tuple | list) and len(batch) >= 1:
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    else:
        raise TypeError(
            f"data must yield tensors or (inputs, targets) pairs, got {type(batch).__name__}"
        )
    if need_target and y is None:
        raise ValueError(
            "metric needs gradients of loss_fn(model(inputs), targets): data must yield "
            "(inputs, targets) pairs"
        )
    return x, y


def _gather(
    model: nn.Module,
    targets: list[Target],
    metric: Metric,
    data: Iterable[Any],
    loss_fn: Callable[[Tensor, Any], Tensor],
) -> list[dict[str, Any]]:
    """Run ``data`` through ``model`` (eval mode, weights and ``.grad`` untouched) and feed the
    metric its gradient and input statistics; one state per target."""
    stats = _Statistics(metric, targets)
    hooks = InputHooks(stats, _Statistics.observe_input)
    was_training = model.training
    params = list({id(t.param): t.param for t in targets}.values())
    batches = 0
    try:
        if metric.needs_inputs:
            for i, t in enumerate(targets):
                owner = model.get_submodule(t.param_name.rpartition(".")[0])
                hooks.add(i, owner, compute_dtype(t.param.dtype))
        model.eval()
        for batch in data:
            x, y = _split_batch(batch, metric.needs_grads)
            batches += 1
            if not metric.needs_grads:
                with torch.no_grad():
                    model(x)
                continue
            with torch.enable_grad():
                loss = loss_fn(model(x), y)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            grad_of = {id(p): g for p, g in zip(params, grads, strict=True)}
            for t, state in zip(targets, stats.states, strict=True):
                g = grad_of[id(t.param)]
                if g is not None:
                    state.update(metric.observe_grad(state, gradient_matrix(t, g)))
    finally:
        hooks.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError("data yielded no batch; pass a few calibration batches")
    return stats.states


def compress(
    model: nn.Module,
    *,
    rank: int | None = None,
    ratio: float | None = None,
    metric: str | Metric = "euclidean",
    data: Iterable[Any] | None = None,
    loss_fn: Callable[[Tensor, Any], Tensor] = F.cross_entropy,
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
) -> list[LayerCompression]:
    """Truncate every selected weight of ``model`` in place to low rank in ``metric``.

    Args:
        model: the trained model (weights are overwritten by their rank-``r`` approximations).
        rank: the rank kept in every layer (capped at ``min(m, n)``); or
        ratio: per layer, the largest ``r`` whose two factors keep at most this fraction of the
            layer's parameters, ``r (m + n) <= ratio m n`` (at least 1).
        metric: ``"euclidean"``, ``"fisher"``, ``"activation"``, ``"two_sided"`` or a
            :class:`proxrank.metrics.Metric` (``"activation"``/``"two_sided"``: ``nn.Linear``
            weights only).
        data: calibration batches, ``(inputs, targets)`` pairs (inputs alone suffice for
            ``"activation"``); required by every metric but ``"euclidean"``. Run in eval mode.
        loss_fn: ``loss_fn(model(inputs), targets)``, the loss whose gradients give the Fisher.
        include, exclude: selection as in :func:`proxrank.select_targets`.

    Returns one :class:`LayerCompression` per weight, in model order. Nothing is written
    unless every layer succeeds.
    """
    _check_rank_ratio(rank, ratio)
    resolved = _resolve_metric(metric)
    targets = select_targets(model, include, exclude)
    if not targets:
        raise ValueError("no weight matrix selected; check include/exclude")
    for t in targets:
        if resolved.needs_inputs:
            resolved.check_target(t)
    states: list[dict[str, Any]] = [{} for _ in targets]
    if resolved.needs_grads or resolved.needs_inputs:
        if data is None:
            raise ValueError(
                f"metric={resolved.name!r} gathers statistics from data: pass data=[(inputs, "
                "targets), ...] (a few calibration batches)"
            )
        states = _gather(model, targets, resolved, data, loss_fn)

    new_weights, reports = [], []
    with torch.no_grad():
        for t, state in zip(targets, states, strict=True):
            m, n = t.shape2d
            r = _layer_rank(m, n, rank, ratio)
            W = t.view.read(t.param.detach()).to(compute_dtype(t.param.dtype))
            weighting = resolved.weighting(state, {}, (m, n))
            weighting = Weighting() if weighting is None else weighting.to(W.dtype)
            X = weighting.apply(lambda Z, r=r: project_rank(Z, r), W)
            err = torch.linalg.norm(weighting.to_metric(W - X)) / torch.linalg.norm(
                weighting.to_metric(W)
            ).clamp_min(torch.finfo(W.dtype).tiny)
            fro = torch.linalg.norm(W - X) / torch.linalg.norm(W).clamp_min(
                torch.finfo(W.dtype).tiny
            )
            new_weights.append((t, X))
            reports.append(
                LayerCompression(
                    t.name, (m, n), r, float(err), float(fro), m * n, min(m * n, r * (m + n))
                )
            )
        for t, X in new_weights:
            t.view.write(t.param, X)
    return reports

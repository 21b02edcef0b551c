"""Gathering a metric's statistics: layer inputs through forward pre-hooks, gradients per matrix.

The optimizer (during training) and :func:`proxrank.compress` (one-shot) both feed a
:class:`proxrank.metrics.Metric` through these two functions, so a statistic means the same in
both:

* :class:`InputHooks` calls ``sink(owner, key, x)`` with each hooked layer's first input,
  detached and converted **outside autocast** to the statistic's dtype (float32 for half
  precision weights, so that ``x x^T`` neither loses precision in bfloat16 nor overflows in
  float16);
* :func:`gradient_matrix` reads the gradient of a selected matrix through its
  :class:`~proxrank.selection.MatrixView` (a block, a transposed ``Conv1D`` weight) in that dtype.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .backends import compute_dtype
from .selection import Target

__all__ = ["InputHooks", "gradient_matrix"]


def gradient_matrix(target: Target, grad: Tensor) -> Tensor:
    """The gradient of ``target``'s matrix, in the weight's compute dtype
    (:func:`proxrank.backends.compute_dtype`: float32 for half precision)."""
    return target.view.read(grad).to(compute_dtype(target.param.dtype))


class InputHooks:
    """Forward pre-hooks feeding layer inputs to ``sink(owner, key, x)``.

    ``x`` is the layer's first positional input, detached, in ``dtype[key]`` and computed
    outside autocast. The hooks hold ``owner`` only through a weak reference (so they never keep
    it alive) and are all removed by :meth:`remove` or when ``owner`` is garbage-collected.
    """

    def __init__(self, owner: Any, sink: Callable[[Any, Any, Tensor], None]) -> None:
        self._handles: dict[Any, Any] = {}
        self._owner = weakref.ref(owner)
        self._sink = sink
        self._finalizer = weakref.finalize(owner, _remove_handles, self._handles)

    def keys(self) -> set[Any]:
        return set(self._handles)

    def add(self, key: Any, module: nn.Module, dtype: torch.dtype) -> None:
        """Hook ``module``; its inputs reach the sink under ``key`` in ``dtype``."""
        if key in self._handles:
            return
        owner_ref, sink = self._owner, self._sink

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            owner = owner_ref()
            if owner is None or not args or not isinstance(args[0], Tensor):
                return
            x = args[0].detach()
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                sink(owner, key, x.to(dtype))

        self._handles[key] = module.register_forward_pre_hook(hook)

    def discard(self, key: Any) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        self._finalizer()


def _remove_handles(handles: dict[Any, Any]) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()

"""ProxRank's diagnostics inside the Hugging Face ``Trainer``: :class:`ProxRankCallback`.

The ``Trainer`` calls ``optimizer.step()`` without a closure, so the diagnostics never see the
loss ``f(W_t)`` nor the objective ``F(W_t) = f(W_t) + sum_l lam_l R_l(W_t)``. The callback
registers a forward hook on the model that hands every training forward's ``loss`` to
:meth:`proxrank.Diagnostics.observe_loss` (micro-batches of one optimizer step are averaged),
and at every Trainer log event it adds the diagnostics' figures to the Trainer's own logs
(``trainer.state.log_history`` and the callbacks after it, e.g. the reporting integrations).

Example::

    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=1e-3), model, lam=1.0,
                            diagnostics=True)
    trainer = Trainer(model, args, train_dataset=ds, optimizers=(opt, scheduler),
                      callbacks=[ProxRankCallback(opt)])

Needs ``transformers`` (``pip install 'proxrank[integrations]'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .diagnostics import ModelDiagnostics
from .optimizer import ProxRank

__all__ = ["ProxRankCallback", "log_figures"]


def log_figures(snap: ModelDiagnostics, *, layers: bool = True) -> dict[str, float]:
    """The figures the callback logs, under ``proxrank/...``: ``compression_ratio``,
    ``factorized_params``, ``loss`` and ``objective`` (when known), ``converged`` (0/1),
    ``not_converged`` (how many matrices fail the rule) and, with ``layers``, each matrix's
    ``rank/<name>`` (counted with factorize's tolerance) or, for a map on the entries (no
    rank), its ``sparsity/<name>`` (share of zero entries)."""
    out: dict[str, float] = {
        "proxrank/compression_ratio": snap.compression_ratio,
        "proxrank/factorized_params": float(snap.factorized_params),
        "proxrank/converged": float(snap.converged),
        "proxrank/not_converged": float(sum(not lay.converged for lay in snap.layers)),
    }
    for key in ("loss", "objective"):
        value = getattr(snap, key)
        if value is not None:
            out[f"proxrank/{key}"] = value
    if layers:
        for lay in snap.layers:  # maps on the entries have no rank: their sparsity
            if lay.rank is not None:
                out[f"proxrank/rank/{lay.name}"] = float(lay.rank)
            else:
                out[f"proxrank/sparsity/{lay.name}"] = lay.sparsity
    return out


class ProxRankCallback(TrainerCallback):
    """Feeds the training loss to ``optimizer``'s diagnostics and logs :func:`log_figures`
    into the Trainer's logs at every log event (``logging_steps``).

    Args:
        optimizer: the :class:`proxrank.ProxRank` given to the Trainer, built with
            ``diagnostics=True`` (or a :class:`proxrank.Diagnostics`).
        layers: also log each matrix's rank.
    """

    def __init__(self, optimizer: ProxRank, *, layers: bool = True) -> None:
        if not isinstance(optimizer, ProxRank):
            raise TypeError(
                f"ProxRankCallback needs the ProxRank optimizer, got {type(optimizer).__name__}"
            )
        if optimizer.tracker is None:
            raise ValueError(
                "ProxRankCallback needs diagnostics; build the optimizer with "
                "ProxRank(..., diagnostics=True)"
            )
        self.optimizer = optimizer
        self.layers = bool(layers)
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def _observe(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation forwards are not the training loss
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.optimizer.tracker.observe_loss(loss)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if model is None:
            raise ValueError("ProxRankCallback: the Trainer passed no model to on_train_begin")
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._observe)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        if self.optimizer.step_count == 0:
            return
        figures = log_figures(self.optimizer.diagnostics(), layers=self.layers)
        if logs is not None:
            logs.update(figures)  # the callbacks after this one (reporting integrations)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)  # the Trainer copied logs before this call

"""The :class:`ProxRank` optimizer wrapper: a base optimizer step followed by a proximal step."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import Backend, compute_dtype, get_backend
from .functional import prox_step
from .prox import ProxMap, get_prox
from .selection import Selector, Target, select_targets

__all__ = ["ProxRank"]

#: Options a param group may override; anything not set in a group takes the wrapper's value.
GROUP_OPTIONS = ("lam", "prox")


@dataclass
class _Job:
    """One matrix's prox at this step: the parameter, its proxrank state and its settings."""

    param: nn.Parameter
    state: dict[str, Any]
    tau: float
    prox: ProxMap


def _check_lam(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where} must be a real number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} must be finite and >= 0, got {value!r}")
    return float(value)


class ProxRank(Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that every step is followed by a rank-reducing prox.

    After each base step, every selected weight matrix ``W`` (a Linear weight, or a conv kernel
    reshaped to ``out x (in kh kw)``) is replaced by

        W <- prox_{tau R}(W) = U diag(phi_tau(s)) V^T,    tau = lam * lr,

    with ``lr`` the learning rate of the parameter's group read at that step (so LR schedulers
    move ``tau``). ``prox="soft"`` gives ``phi(s) = max(s - tau, 0)``: the prox of the nuclear
    norm ``lam ||W||_*`` (iterative singular value thresholding, ISVT); with plain SGD as the base
    this is exactly proximal gradient descent on ``f(W) + lam ||W||_*``. ``prox="hard"`` keeps
    ``s > sqrt(2 tau)``: the prox of ``lam rank(W)``.

    The wrapper *is* an optimizer: it shares ``param_groups`` and ``state`` with the base, passes
    ``closure`` through and returns its loss, works with LR schedulers, ``GradScaler`` (a skipped
    base step skips the prox) and optimizer hooks, and checkpoints with ``state_dict``.

    Args:
        optimizer: the base optimizer, already constructed over the model's parameters.
        model_or_named_params: the model (selection by module type) or an iterable of
            ``(name, parameter)`` pairs such as ``model.named_parameters()``. Only parameters
            that ``optimizer`` trains get the prox.
        lam: regularisation strength ``lam >= 0``; a param group's ``"lam"`` key overrides it.
        prox: ``"soft"`` (nuclear norm, default) or ``"hard"`` (rank penalty), or a
            :class:`proxrank.prox.ProxMap`; a param group's ``"prox"`` key overrides it.
        include: name patterns or module types that replace the default selection (weights of
            ``nn.Linear`` and ``nn.Conv1d/2d/3d``).
        exclude: name patterns or module types removed from the selection.
        backend: how singular triplets are computed: ``"auto"`` (default; per matrix
            ``"gram"`` or ``"subspace"`` from its rank ratio), ``"exact"`` (full
            ``torch.linalg.svd``), ``"gram"``, ``"subspace"``, or a
            :class:`proxrank.backends.Backend`; see :mod:`proxrank.backends`.
        tol: relative error bound of the fast backends (default ``1e-4``): a matrix whose
            certified bound exceeds ``tol * ||W||_F`` is recomputed with the exact SVD. Applies
            to backends given by name.
        check_finite: raise before anything changes when a selected weight or its gradient is
            not finite (one device synchronisation per step).

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        opt = proxrank.ProxRank(opt, model, lam=1e-3)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
        *,
        lam: float,
        prox: str | ProxMap = "soft",
        include: Selector | Sequence[Selector] | None = None,
        exclude: Selector | Sequence[Selector] | None = None,
        backend: str | Backend = "auto",
        tol: float | None = None,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ProxRank):
            raise TypeError("optimizer is already a ProxRank; wrap the base optimizer once")
        torch._C._log_api_usage_once("python.optimizer.proxrank")
        self.optimizer = optimizer
        prox_map = get_prox(prox)
        self.defaults = {
            **optimizer.defaults,
            "lam": _check_lam(lam, "lam"),
            "prox": prox if isinstance(prox, ProxMap) else prox_map.name,
        }
        self.backend = get_backend(backend, tol=tol)
        self.check_finite = bool(check_finite)
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()

        self._candidates = select_targets(model_or_named_params, include, exclude)
        for i, group in enumerate(self.param_groups):
            self._init_group(group, where=f"param_groups[{i}]")
        self._refresh_targets()
        #: Number of completed steps (base step + prox).
        self.step_count = 0

    # -- shared state: always the base optimizer's own objects (load_state_dict rebinds them) --
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> dict[Tensor, Any]:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: dict[Tensor, Any]) -> None:
        self.optimizer.state = value

    @property
    def targets(self) -> list[Target]:
        """The weight matrices that get the prox, in the base optimizer's parameter order."""
        return list(self._targets)

    # -- set-up --------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], where: str) -> None:
        for key in GROUP_OPTIONS:
            group.setdefault(key, self.defaults[key])
        self._group_options(group, where)

    def _group_options(self, group: dict[str, Any], where: str = "param group") -> tuple:
        lam = _check_lam(group["lam"], f"{where}['lam']")
        prox = get_prox(group["prox"], option=f"{where}['prox']")
        return lam, prox

    def _refresh_targets(self) -> None:
        """Order the selected matrices as the base optimizer orders its parameters."""
        position = {}
        for p in (p for g in self.param_groups for p in g["params"]):
            position.setdefault(id(p), len(position))
        chosen = [t for t in self._candidates if id(t.param) in position]
        if not chosen:
            raise ValueError(
                "no weight matrix to apply the prox to: none of the selected parameters "
                f"({len(self._candidates)} found in model_or_named_params) is trained by the "
                "optimizer; check include/exclude and that the optimizer holds the model's "
                "parameters"
            )
        chosen.sort(key=lambda t: position[id(t.param)])
        old = getattr(self, "_target_state", {})
        self._targets = chosen
        self._position = {id(t.param): position[id(t.param)] for t in chosen}
        self._target_state: dict[int, dict[str, Any]] = {
            id(t.param): old.get(id(t.param), {}) for t in chosen
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer; selected matrices in it get the prox."""
        self._init_group(param_group, where="param_group")
        self.optimizer.add_param_group(param_group)
        self._refresh_targets()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- the step ------------------------------------------------------------------------
    def _raise_if_nonfinite(self, when: str, grads: bool) -> None:
        tensors, labels = [], []
        for t in self._targets:
            tensors.append(t.param)
            labels.append(f"weight {t.name!r}")
            g = t.param.grad
            if grads and g is not None and not g.is_sparse:
                tensors.append(g)
                labels.append(f"gradient of {t.name!r}")
        finite = torch.stack([torch.isfinite(x).all() for x in tensors])
        if bool(finite.all()):
            return
        bad = labels[int((~finite).nonzero()[0])]
        raise FloatingPointError(
            f"the {bad} is not finite {when}; no prox was applied. Lower the learning rate, "
            "clip gradients, or use torch.amp.GradScaler (which skips steps with inf/NaN "
            "gradients); pass check_finite=False to skip this check"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Base optimizer step (``closure`` passed through), then the prox on every selected
        matrix. Returns what the base step returns (the closure's loss)."""
        groups = [
            (g, self._group_options(g, f"param_groups[{i}]"))
            for i, g in enumerate(self.param_groups)
        ]
        if self.check_finite and closure is None:
            self._raise_if_nonfinite("before the step (nothing was changed)", grads=True)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if self.check_finite:
            self._raise_if_nonfinite("after the base optimizer's step", grads=False)
        self._apply_prox(groups)
        self.step_count += 1
        return loss

    @torch.no_grad()
    def _apply_prox(self, groups: list[tuple[dict[str, Any], tuple]]) -> None:
        for batch in self._batches(self._collect_jobs(groups)):
            self._run_batch(batch)

    def _collect_jobs(self, groups: list[tuple[dict[str, Any], tuple]]) -> list[_Job]:
        """One job per selected matrix whose group has ``lam > 0``: ``tau = lam * lr``."""
        jobs = []
        for group, (lam, prox) in groups:
            if lam == 0:
                continue
            tau = lam * float(group["lr"])
            for p in group["params"]:
                state = self._target_state.get(id(p))
                if state is not None:
                    jobs.append(_Job(p, state, tau, prox))
        return jobs

    def _batches(self, jobs: list[_Job]) -> Iterable[list[_Job]]:
        """Jobs computed together in one batched backend call: same prox map (so same param
        group), same matrix shape up to transposition, dtype and device."""
        batches: dict[tuple, list[_Job]] = {}
        for job in jobs:
            p = job.param
            m, n = p.shape[0], p.numel() // p.shape[0]
            key = (id(job.prox), min(m, n), max(m, n), p.dtype, p.device)
            batches.setdefault(key, []).append(job)
        return batches.values()

    def _run_batch(self, batch: list[_Job]) -> None:
        """Prox every matrix of ``batch`` in one backend call (in float32 for half-precision
        weights; tall matrices transposed so that the batch shares one shape) and write each
        back in its weight's dtype, whole, once."""
        mats = []
        for job in batch:
            p = job.param
            W = p.reshape(p.shape[0], -1).to(compute_dtype(p.dtype))
            mats.append(W.mT if W.shape[0] > W.shape[1] else W)
        Y = torch.stack(mats)
        tau = torch.tensor([job.tau for job in batch], dtype=Y.dtype, device=Y.device)
        X = prox_step(Y, tau, batch[0].prox, self.backend, [job.state for job in batch]).X
        for job, W, Xi in zip(batch, mats, X, strict=True):
            p = job.param
            p.copy_((Xi.mT if W.shape[0] != p.shape[0] else Xi).reshape(p.shape))

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its ``state`` and ``param_groups`` keys, so that
        tools reading them keep working) with proxrank's own state nested under ``"proxrank"``,
        keyed by parameter position as torch keys optimizer state."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["proxrank"] = {
            "step_count": self.step_count,
            "targets": {
                self._position[id(t.param)]: {
                    "name": t.name,
                    "shape": tuple(t.param.shape),
                    "state": self._target_state[id(t.param)],
                }
                for t in self._targets
            },
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. A plain base-optimizer state dict (no ``"proxrank"`` key)
        is accepted too: it restores the base and leaves proxrank's state as it is."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        ours = state_dict.pop("proxrank", None)
        if ours is not None:
            loaded = self._check_loaded_targets(ours)
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self.step_count = int(ours["step_count"])
            self._target_state = loaded
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_loaded_targets(self, ours: dict[str, Any]) -> dict[int, dict[str, Any]]:
        saved = {int(k): v for k, v in ours["targets"].items()}
        mine = {self._position[id(t.param)]: t for t in self._targets}
        if set(saved) != set(mine):
            raise ValueError(
                "state_dict was saved with prox targets at parameter positions "
                f"{sorted(saved)}, but this optimizer has them at {sorted(mine)}; build the "
                "ProxRank with the same model, include/exclude and param groups"
            )
        loaded = {}
        for pos, t in mine.items():
            entry = saved[pos]
            if tuple(entry["shape"]) != tuple(t.param.shape):
                raise ValueError(
                    f"state_dict entry for {entry['name']!r} has shape {tuple(entry['shape'])}, "
                    f"but parameter {t.name!r} at that position has shape {tuple(t.param.shape)}"
                )
            loaded[id(t.param)] = {
                k: v.to(t.param.device) if isinstance(v, Tensor) else v
                for k, v in entry["state"].items()
            }
        return loaded

    def __repr__(self) -> str:
        return (
            f"ProxRank({self.optimizer!r},\n  lam={self.defaults['lam']}, "
            f"prox={self.defaults['prox']!r}, backend={self.backend.name!r}, "
            f"targets={len(self._targets)})"
        )

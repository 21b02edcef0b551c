"""The :class:`ProxRank` optimizer wrapper: a base optimizer step followed by a proximal step."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import Backend, SVDResult, compute_dtype, get_backend
from .diagnostics import Diagnostics, ModelDiagnostics
from .functional import ProxResult, prox_step
from .metrics import InputHooks, Metric, Weighting, get_metric
from .prox import ProxMap, get_prox
from .schedules import Schedule, rank_prox_step
from .selection import Selector, Target, select_targets

__all__ = ["ProxRank"]

#: Options a param group may override; anything not set in a group takes the wrapper's value.
GROUP_OPTIONS = ("lam", "prox", "metric")


@dataclass
class _Job:
    """One matrix's prox at this step: the parameter, its proxrank state and its settings."""

    param: nn.Parameter
    state: dict[str, Any]
    tau: float
    prox: ProxMap
    #: A rank target (set by a schedule): the threshold comes from the spectrum instead of tau.
    rank: int | None = None
    #: The metric's weights: the prox acts on ``A^{1/2} W B^{1/2}`` (``None``: Euclidean).
    weighting: Weighting | None = None
    #: The group's learning rate at this step (diagnostics: the gradient mapping).
    lr: float = math.nan


def _unbatch(result: ProxResult, i: int, transposed: bool) -> ProxResult:
    """Matrix ``i`` of a batched :class:`ProxResult`, transposed back when it was transposed."""
    svd = result.svd
    U, S, Vh, bound = svd.U[i], svd.S[i], svd.Vh[i], svd.error_bound[i]
    X = result.X[i]
    if transposed:
        X, U, Vh = X.mT, Vh.mT, U.mT
    return ProxResult(X, SVDResult(U, S, Vh, bound), result.S_new[i])


@contextlib.contextmanager
def _naming_errors(name: str) -> Iterator[None]:
    """Prefix a metric's error with the name of the weight it concerns."""
    try:
        yield
    except (FloatingPointError, ValueError) as err:
        raise type(err)(f"weight {name!r}: {err}") from None


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
            Optional (0) with a schedule that has a rank target.
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
        metric: the metric the prox is taken in (:mod:`proxrank.metrics`): ``"euclidean"``
            (default), ``"fisher"``, ``"adam"``, ``"activation"``, ``"two_sided"`` or a
            :class:`proxrank.metrics.Metric`; a param group's ``"metric"`` key overrides it.
            With ``A``, ``B`` the metric's row and column weights the step is
            ``W <- A^{-1/2} prox(A^{1/2} W B^{1/2}) B^{-1/2}``. Statistics live in each matrix's
            proxrank state (so in ``state_dict``). Gradient statistics are read in
            :meth:`step` before the base step, or, with a ``closure``, after it (the gradients
            of the closure's last evaluation). Input statistics come from forward pre-hooks on
            the layers (training mode only), registered only while a group uses such a metric
            and removed by :meth:`close` or when the optimizer is garbage-collected.
        schedule: a :class:`proxrank.Schedule` (warm-up, strength or rank ramps, a global
            parameter budget, periodic prox, frozen ranks), read from the step count.
        diagnostics: ``True`` or a :class:`proxrank.Diagnostics` to track convergence
            diagnostics (:meth:`diagnostics`, :meth:`report`); off by default, as tracking the
            realised step keeps one copy of every selected weight.

    Example::

        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        opt = proxrank.ProxRank(opt, model, lam=1e-3)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model_or_named_params: nn.Module | Iterable[tuple[str, nn.Parameter]],
        *,
        lam: float | None = None,
        prox: str | ProxMap = "soft",
        include: Selector | Sequence[Selector] | None = None,
        exclude: Selector | Sequence[Selector] | None = None,
        backend: str | Backend = "auto",
        tol: float | None = None,
        check_finite: bool = True,
        metric: str | Metric = "euclidean",
        schedule: Schedule | None = None,
        diagnostics: bool | Diagnostics = False,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ProxRank):
            raise TypeError("optimizer is already a ProxRank; wrap the base optimizer once")
        torch._C._log_api_usage_once("python.optimizer.proxrank")
        self.optimizer = optimizer
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a proxrank.Schedule, got {type(schedule).__name__}")
        if lam is None and not (schedule is not None and schedule.has_rank):
            raise TypeError(
                "lam= is required, unless schedule= has a rank target (target= or budget=)"
            )
        self.schedule = schedule
        lam = 1.0 if lam is None else lam  # a rank target sets the threshold; lam=0 opts out
        prox_map = get_prox(prox)
        self.defaults = {
            **optimizer.defaults,
            "lam": _check_lam(lam, "lam"),
            "prox": prox if isinstance(prox, ProxMap) else prox_map.name,
            "metric": metric if isinstance(metric, Metric) else get_metric(metric).name,
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
        self._modules = {}
        if isinstance(model_or_named_params, nn.Module):
            for t in self._candidates:
                owner = t.name.rpartition(".")[0]
                self._modules[id(t.param)] = model_or_named_params.get_submodule(owner)
        self._input_hooks = InputHooks(self, ProxRank._observe_input)
        self._hooked_metric: dict[int, Metric] = {}
        self._closed = False
        for i, group in enumerate(self.param_groups):
            self._init_group(group, where=f"param_groups[{i}]")
        self._refresh_targets()
        self._sync_input_hooks(self._target_metrics(self._resolved_groups()))
        if schedule is not None:
            schedule.check(self._targets)
        #: Number of completed steps (base step + prox).
        self.step_count = 0
        if not isinstance(diagnostics, bool | Diagnostics):
            raise TypeError(
                f"diagnostics must be True, False or a proxrank.Diagnostics, got {diagnostics!r}"
            )
        self.tracker = Diagnostics() if diagnostics is True else diagnostics or None
        if self.tracker is not None:
            self.tracker.bind(self)

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
        metric = get_metric(group["metric"], option=f"{where}['metric']")
        metric.check_optimizer(self.optimizer)
        return lam, prox, metric

    def _resolved_groups(self) -> list[tuple[dict[str, Any], tuple]]:
        return [
            (g, self._group_options(g, f"param_groups[{i}]"))
            for i, g in enumerate(self.param_groups)
        ]

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
        if self.schedule is not None and self.schedule.budget is not None:
            raise ValueError(
                "add_param_group with a budget schedule: the budget is allocated across the "
                "layers known when the ProxRank was built; build it with every param group"
            )
        self.optimizer.add_param_group(param_group)
        self._refresh_targets()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- metric statistics ---------------------------------------------------------------
    def _target_metrics(
        self, groups: list[tuple[dict[str, Any], tuple]]
    ) -> list[tuple[Target, Metric]]:
        """Each selected matrix with its group's metric."""
        metric_of = {id(p): metric for group, (_, _, metric) in groups for p in group["params"]}
        return [(t, metric_of[id(t.param)]) for t in self._targets if id(t.param) in metric_of]

    def _sync_input_hooks(self, metrics: list[tuple[Target, Metric]]) -> None:
        """Forward pre-hooks exactly on the layers whose metric needs inputs (none after
        :meth:`close`)."""
        wanted = {}
        for t, metric in metrics:
            if metric.needs_inputs:
                metric.check_module(t.name, self._modules.get(id(t.param)))
                wanted[id(t.param)] = metric
        self._hooked_metric = wanted
        if self._closed:
            return
        for key in self._input_hooks.keys() - set(wanted):
            self._input_hooks.discard(key)
        for key in wanted:
            self._input_hooks.add(key, self._modules[key])

    def _observe_input(self, key: int, x: Tensor) -> None:
        metric = self._hooked_metric.get(key)
        module = self._modules[key]
        if metric is not None and module.training:
            dtype = compute_dtype(module.weight.dtype)
            name = next(t.name for t in self._targets if id(t.param) == key)
            with _naming_errors(name):
                metric.observe_input(self._target_state[key], x.to(dtype))

    @torch.no_grad()
    def _observe_grads(self, metrics: list[tuple[Target, Metric]]) -> None:
        for t, metric in metrics:
            p = t.param
            if metric.needs_grads and p.grad is not None and not p.grad.is_sparse:
                g = p.grad.reshape(p.shape[0], -1).to(compute_dtype(p.dtype))
                with _naming_errors(t.name):
                    metric.observe_grad(self._target_state[id(p)], g)

    def _naming_errors(self, key: int) -> Iterator[None]:
        """Prefix a metric's error with the name of the weight it concerns."""
        try:
            yield
        except (FloatingPointError, ValueError) as err:
            name = next(t.name for t in self._targets if id(t.param) == key)
            raise type(err)(f"weight {name!r}: {err}") from None

    def close(self) -> None:
        """Remove the forward hooks the ``"activation"``/``"two_sided"`` metrics use (also
        done when the optimizer is garbage-collected). Afterwards their input statistics stay
        as they are; the optimizer keeps working."""
        self._closed = True
        self._input_hooks.remove()

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
        groups = self._resolved_groups()
        if self.check_finite and closure is None:
            self._raise_if_nonfinite("before the step (nothing was changed)", grads=True)
        metrics = self._target_metrics(groups)
        self._sync_input_hooks(metrics)
        if closure is None:
            self._observe_grads(metrics)
        # every option, metric weighting and schedule decision is settled (and can raise)
        # before the base step changes anything
        jobs = self._collect_jobs(groups)
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if closure is not None:
            self._observe_grads(metrics)
        if self.check_finite:
            self._raise_if_nonfinite("after the base optimizer's step", grads=False)
        self._apply_prox(jobs)
        self.step_count += 1
        if self.tracker is not None:
            self.tracker.end_step(loss)
        return loss

    @torch.no_grad()
    def _apply_prox(self, jobs: list[_Job]) -> None:
        for batch in self._batches(jobs):
            self._run_batch(batch)

    def _collect_jobs(self, groups: list[tuple[dict[str, Any], tuple]]) -> list[_Job]:
        """One job per selected matrix whose group has ``lam > 0``: ``tau = lam * lr`` and its
        group metric's weighting; with a schedule, the job (threshold or rank target, or none)
        the schedule plans. Runs before the base step: the metric's weights are those of the
        statistics gathered so far (a base optimizer's second moment as of the previous step)."""
        jobs = []
        n = self.step_count + 1
        if self.schedule is not None:
            self.schedule.prepare(n, self._targets, self._target_state)
        for group, (lam, prox, metric) in groups:
            if lam == 0:
                continue
            tau = lam * float(group["lr"])
            for p in group["params"]:
                state = self._target_state.get(id(p))
                if state is None:
                    continue
                shape = (p.shape[0], p.numel() // p.shape[0])
                planned = (tau, prox, None)
                if self.schedule is not None:
                    planned = self.schedule.plan(n, state, shape, tau, prox)
                    if planned is None:
                        continue
                weighting = metric.weighting(state, self.optimizer.state.get(p, {}), shape)
                if weighting is not None:
                    weighting = weighting.to(compute_dtype(p.dtype))
                jobs.append(_Job(p, state, *planned, weighting=weighting, lr=float(group["lr"])))
        return jobs

    def _batches(self, jobs: list[_Job]) -> Iterable[list[_Job]]:
        """Jobs computed together in one batched backend call: same prox map (so same param
        group), same rank target (or none), same matrix shape up to transposition, dtype and
        device."""
        batches: dict[tuple, list[_Job]] = {}
        for job in jobs:
            p = job.param
            m, n = p.shape[0], p.numel() // p.shape[0]
            key = (id(job.prox), job.rank, min(m, n), max(m, n), p.dtype, p.device)
            batches.setdefault(key, []).append(job)
        return batches.values()

    def _run_batch(self, batch: list[_Job]) -> None:
        """Prox every matrix of ``batch`` in one backend call and write each back in its
        weight's dtype, whole, once.

        Each weight ``W`` (in float32 for half precision) is mapped into its metric,
        ``Y = A^{1/2} W B^{1/2}``, tall matrices are transposed so that the batch shares one
        shape, and the result is mapped back. The threshold is ``tau`` per matrix, or the
        spectrum's own for a rank target."""
        Ws, Ys = [], []
        for job in batch:
            p = job.param
            W = p.reshape(p.shape[0], -1).to(compute_dtype(p.dtype))
            Ws.append(W)
            Ys.append(W if job.weighting is None else job.weighting.to_metric(W))
        Y = torch.stack([Yi.mT if Yi.shape[0] > Yi.shape[1] else Yi for Yi in Ys])
        states = [job.state for job in batch]
        first = batch[0]
        if first.rank is None:
            tau = torch.tensor([job.tau for job in batch], dtype=Y.dtype, device=Y.device)
            result = prox_step(Y, tau, first.prox, self.backend, states)
        else:
            result = rank_prox_step(Y, first.rank, first.prox, self.backend, states)
        for i, (job, W, Yi) in enumerate(zip(batch, Ws, Ys, strict=True)):
            mine = _unbatch(result, i, transposed=W.shape[0] > W.shape[1])
            if job.weighting is not None:
                mine = mine._replace(X=job.weighting.from_metric(mine.X))
            if self.tracker is not None:  # before the write-back: W may share p's storage
                self.tracker.record(job, W, Yi, mine)
            job.param.copy_(mine.X.reshape(job.param.shape))
            if self.schedule is not None:  # the rank a schedule freezes at
                job.state["rank"] = int((mine.S_new > 0).sum())

    # -- diagnostics ---------------------------------------------------------------------
    def _require_tracker(self) -> Diagnostics:
        if self.tracker is None:
            raise ValueError(
                "diagnostics are off; build the optimizer with ProxRank(..., diagnostics=True)"
            )
        return self.tracker

    def diagnostics(self) -> ModelDiagnostics:
        """Convergence diagnostics after the last step, as plain data (see
        :mod:`proxrank.diagnostics`); the history, loggers and plot are on :attr:`tracker`."""
        return self._require_tracker().snapshot()

    def report(self) -> str:
        """A readable per-matrix table of :meth:`diagnostics`."""
        return self._require_tracker().report()

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
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "targets": {
                self._position[id(t.param)]: {
                    "name": t.name,
                    "shape": tuple(t.param.shape),
                    "state": dict(self._target_state[id(t.param)]),
                }
                for t in self._targets
            },
        }
        if self.tracker is not None:
            sd["proxrank"]["diagnostics"] = self.tracker.state_dict()
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
        state_dict["param_groups"] = self._complete_groups(state_dict["param_groups"])
        load_diagnostics = None
        if ours is not None:
            loaded = self._check_loaded_targets(ours)
            schedule = self._check_loaded_schedule(ours.get("schedule"))
            if self.tracker is not None and "diagnostics" in ours:
                load_diagnostics = self.tracker.prepare_load(ours["diagnostics"])
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self.step_count = int(ours["step_count"])
            self.schedule = schedule
            self._target_state = loaded
            if load_diagnostics is not None:
                load_diagnostics()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _complete_groups(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Saved param groups with proxrank's options filled in (a plain base-optimizer state
        dict has none) and validated, before anything is loaded."""
        groups = []
        for i, group in enumerate(saved):
            group = dict(group)
            for key in GROUP_OPTIONS:
                group.setdefault(key, self.defaults[key])
            self._group_options(group, f"state_dict['param_groups'][{i}]")
            groups.append(group)
        return groups

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

    def _check_loaded_schedule(self, saved: dict[str, Any] | None) -> Schedule | None:
        """The saved schedule; a different one on this optimizer is an error."""
        if saved is None or self.schedule is None:
            return self.schedule if saved is None else Schedule.from_state_dict(saved)
        if saved != self.schedule.state_dict():
            raise ValueError(
                f"state_dict was saved with {Schedule.from_state_dict(saved)!r}, but this "
                f"optimizer has {self.schedule!r}; build the ProxRank with the same schedule "
                "(or with schedule=None to take the saved one)"
            )
        return self.schedule

    def __repr__(self) -> str:
        return (
            f"ProxRank({self.optimizer!r},\n  lam={self.defaults['lam']}, "
            f"prox={self.defaults['prox']!r}, backend={self.backend.name!r}, "
            f"targets={len(self._targets)})"
        )

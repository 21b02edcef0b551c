"""The :class:`ProxRank` optimizer wrapper: a base optimizer step followed by a proximal step.

One step is a short pipeline (``ARCHITECTURE.md`` follows it in prose):

1. :meth:`ProxRank._prepare` settles everything that can fail: options, finite checks, metric
   statistics and weights, schedule decisions. It returns the step's :class:`_Work` and
   changes nothing.
2. the base optimizer's step;
3. :meth:`ProxRank._compute`: the batched prox of every matrix with a job, through the backend,
   on copies of the backend's state. Nothing is written.
4. :meth:`ProxRank._commit`: the weights and every namespace of state are written, once.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .backends import Backend, compute_dtype, get_backend
from .diagnostics import Diagnostics, Measured, ModelDiagnostics
from .distributed import Checkpointed, Engine, finite_operand, is_sharded
from .functional import ProxResult, prox_step, rank_prox_step
from .metrics import EuclideanMetric, Metric, Weighting, get_metric
from .prox import MatrixMap, ProxMap, get_prox
from .records import NAMESPACES, MatrixInfo, MatrixRecord, ProxStep
from .schedules import Plan, Schedule, spectrum
from .selection import Selector, Target, select_targets
from .statistics import InputHooks, gradient_matrix

__all__ = ["ProxRank"]

#: Options a param group may override; anything not set in a group takes the wrapper's value.
GROUP_OPTIONS = ("lam", "prox", "metric")


#: Values of ``ProxRank(tau_lr=...)``: the learning rate that scales ``tau = lam * lr``.
TAU_LRS = ("current", "initial", "cumulative")


class _Options(NamedTuple):
    """A param group's options, resolved."""

    lam: float
    prox: ProxMap | MatrixMap
    metric: Metric


@dataclass
class _Job:
    """One matrix's prox at this step, settled before anything changes."""

    index: int  # into ProxRank._records
    plan: Plan
    lam: float
    lr: float
    weighting: Weighting | None
    backend_state: dict[str, Any]  # a copy the backend may write into (empty after a resize)


@dataclass
class _Work:
    """Everything one step will do: the jobs, and the state updates of every matrix (per
    namespace), including matrices without a job (a schedule's accumulated threshold) and
    matrices whose parameter was resized (``fresh``: their state starts over)."""

    step: int
    jobs: list[_Job] = field(default_factory=list)
    updates: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    fresh: set[int] = field(default_factory=set)
    latent: list[int] = field(default_factory=list)  # tau_lr="cumulative": the base steps Z

    def update(self, index: int, namespace: str, values: dict[str, Any]) -> None:
        if values:
            self.updates.setdefault(index, {}).setdefault(namespace, {}).update(values)


class _Outcome(NamedTuple):
    """A job's computed prox: ``X`` in weight coordinates (compute dtype), the matrix ``Y`` the
    prox thresholded, the result in metric coordinates (``None`` for a
    :class:`~proxrank.prox.MatrixMap`: no decomposition), the backend's new state and, across
    ranks with diagnostics, the owner's :meth:`proxrank.Diagnostics.measure` of it."""

    X: Tensor | None
    Y: Tensor | None
    result: ProxResult | None
    backend_state: dict[str, Any]
    measured: Measured | None = None

    def shared(self, weights: bool) -> _Outcome:
        """What the other ranks need of it (:mod:`proxrank.distributed`): ``S``, ``S_new``,
        the bound, the backend state and the diagnostics' measures; ``X`` with ``weights``
        (``None``: the engine writes the weight). ``Y``, ``U``, ``V^T`` and the result in
        metric coordinates are left empty: nothing after the compute reads them."""
        X = self.X if weights else None
        if self.result is None:
            return _Outcome(X, None, None, self.backend_state, self.measured)
        svd = self.result.svd
        empty = svd.S[..., :0]
        result = ProxResult(empty, svd._replace(U=empty, Vh=empty), self.result.S_new)
        return _Outcome(X, None, result, self.backend_state, self.measured)


def _check_lam(value: Any, where: str) -> float:
    if isinstance(value, Tensor) or isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{where} must be a real number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where} must be finite and >= 0, got {value!r}")
    return float(value)


def _finite(tensors: list[Tensor], engine: Engine | None = None) -> list[bool]:
    """Whether each tensor (a sparse one: its values) is free of inf/NaN; one synchronisation
    (with a sharded ``engine``: on every rank, each having checked its shards)."""
    if not tensors:
        return []
    values = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    device = values[0].device
    # a tensor whose sum is finite is finite (one read, no mask: 15x faster than an entrywise
    # test on CPU); a sum that is not (inf/NaN, or huge finite entries overflowing the sum)
    # sends its tensor to the entrywise test
    sums = torch.stack([v.sum(dtype=_sum_dtype(v)).to(device) for v in values])
    local = torch.isfinite(sums).tolist()
    for i, ok in enumerate(local):
        if not ok:
            local[i] = bool(torch.isfinite(values[i]).all())
    if engine is None:
        return local
    return engine.all_ranks(torch.tensor(local, device=device)).tolist()


def _sum_dtype(t: Tensor) -> torch.dtype:
    """The dtype :func:`_finite` sums ``t`` in: float64 for float64, float32 for any other
    floating dtype (a half-precision sum would overflow on finite entries), complex alike."""
    if t.is_complex():
        return torch.complex128 if t.dtype == torch.complex128 else torch.complex64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_map(prox: ProxMap | MatrixMap, target: Target, schedule: Schedule | None) -> None:
    """Raise ``ValueError`` when a :class:`~proxrank.prox.MatrixMap` cannot act on the matrix
    of ``target`` (its shape, or a projection with no level: neither its own nor a
    schedule's)."""
    if not isinstance(prox, MatrixMap):
        return
    with _naming(f"weight {target.name!r}"):
        prox.check(target.shape2d)
    has_level = schedule is not None and schedule.has_rank
    if prox.levels and not has_level and prox.own_level(target.shape2d) is None:
        raise ValueError(
            f"weight {target.name!r}: prox {prox.name!r} is a projection with no level; give "
            "the map one (proxrank.sparsity.Magnitude(density=...), proxrank.tt.TTRound("
            "ranks=...)) or a proxrank.Schedule(target=..., ramp_end=...)"
        )


class ProxRank(Optimizer):
    r"""Wrap any ``torch.optim.Optimizer`` so that every step is followed by a rank-reducing prox.

    After each base step, every selected weight matrix ``W`` (a Linear weight, a conv kernel
    reshaped to ``out x (in kh kw)``, a block of an attention or recurrent weight: see
    :mod:`proxrank.selection`) is replaced by

        W <- prox_{tau R}(W) = U diag(phi_tau(s)) V^T,    tau = lam * lr,

    with ``lr`` the learning rate of the parameter's group read at that step (so LR schedulers
    move ``tau``). ``prox="soft"`` gives ``phi(s) = max(s - tau, 0)``: the prox of the nuclear
    norm ``lam ||W||_*`` (iterative singular value thresholding, ISVT); with plain SGD as the base
    this is exactly proximal gradient descent on ``f(W) + lam ||W||_*``. ``prox="hard"`` keeps
    ``s > sqrt(2 tau)``: the prox of ``lam rank(W)``.

    The wrapper *is* an optimizer: it shares ``param_groups``, ``state`` and step hooks with the
    base, passes ``closure`` through and returns its loss, works with LR schedulers,
    ``GradScaler`` (a skipped step skips the prox; the fused optimizers' ``grad_scale`` /
    ``found_inf`` are forwarded), deepcopy and pickle, and checkpoints with ``state_dict``.
    Like torch's optimizers it leaves alone a weight whose ``.grad`` is ``None`` at this step
    (frozen or unused); with ``tau = 0`` (``lr = 0``) a weight is left bit for bit as the base
    step left it.

    Every step is atomic: each error it can raise (bad options, non-finite weights, gradients or
    statistics, a failed decomposition) is raised before any weight or state changes and names
    the weight. Errors that only the base step can reveal (a failed decomposition; with a
    ``closure``, non-finite gradients) are raised after the base step, before the prox changes
    anything; a weight the base step left inf/NaN gets no prox and a warning.

    Args:
        optimizer: the base optimizer, already constructed over the model's parameters.
        model_or_named_params: the model (selection by layer kind) or an iterable of
            ``(name, parameter)`` pairs such as ``model.named_parameters()``. Only parameters
            that ``optimizer`` trains get the prox.
        lam: regularisation strength ``lam >= 0``; a param group's ``"lam"`` key overrides it.
            Optional (1) with a schedule that has a rank target, and for a projection.
        prox: ``"soft"`` (nuclear norm, default) or ``"hard"`` (rank penalty), or a
            :class:`proxrank.prox.ProxMap`; or a map on the entries
            (:class:`proxrank.prox.MatrixMap`, euclidean metric only): ``"l1"`` (lasso),
            ``"group"`` (group lasso on rows), the projections ``"magnitude"``, ``"nm"``
            (2:4) and ``"tt"`` (TT rank), or an instance of :mod:`proxrank.sparsity` /
            :class:`proxrank.tt.TTRound`; a param group's ``"prox"`` key overrides it.
        include: name patterns or module types that replace the default selection.
        exclude: name patterns or module types removed from the selection.
        backend: how singular triplets are computed: ``"auto"`` (default), ``"exact"``,
            ``"gram"``, ``"subspace"``, or a :class:`proxrank.Backend`.
        tol: relative error bound of the fast backends (default ``1e-4``): a matrix whose
            certified bound exceeds ``tol * ||W||_F`` is recomputed with the exact SVD.
        check_finite: raise before anything changes when a weight or gradient that gets the
            prox at this step is not finite (one device synchronisation per step).
        metric: the metric the prox is taken in (:mod:`proxrank.metrics`): ``"euclidean"``
            (default), ``"fisher"``, ``"adam"``, ``"activation"``, ``"two_sided"`` or a
            :class:`proxrank.metrics.Metric`; a param group's ``"metric"`` key overrides it.
            With ``A``, ``B`` the metric's row and column weights the step is
            ``W <- A^{-1/2} prox(A^{1/2} W B^{1/2}) B^{-1/2}``.
        schedule: a :class:`proxrank.Schedule` (warm-up, strength or rank ramps, a global
            parameter budget, periodic prox, frozen ranks), read from the step count.
        diagnostics: ``True`` or a :class:`proxrank.Diagnostics` to track convergence
            diagnostics (:meth:`diagnostics`, :meth:`report`).
        distributed: share the prox across the ranks of ``torch.distributed``
            (:mod:`proxrank.distributed`): ``None`` (default) detects it: sharded (FSDP2)
            parameters, or an initialised process group of more than one rank; ``False``: every
            process proxes every matrix itself (replicated parameters only); ``True``: require it.
        tau_lr: which learning rate scales the threshold ``tau = lam * lr``: ``"current"``
            (default) the group's current ``lr``, the proximal gradient step of
            ``f + lam R``; ``"initial"`` the group's ``initial_lr`` (the peak rate torch's LR
            schedulers record; ``lr`` when none did), so ``tau`` does not decay with the
            schedule: under a decaying rate this is the step of ``f + (tau / lr_t) R``, a
            regularisation that strengthens as the rate decays and keeps ranks from climbing
            back; ``"cumulative"`` the sum of the group's rates over every step so far
            (dual averaging, as torchao's PAT): each selected matrix keeps a latent,
            un-thresholded copy ``Z`` (one more copy of it, in the optimizer's state), the
            base step updates ``Z`` (the gradient is taken at the weight, the prox of ``Z``) and
            the weight becomes ``prox(Z, lam * sum_s lr_s)``. Nothing the prox removes is lost:
            a singular value whose gradients keep pushing it grows back in ``Z``, and the
            threshold keeps growing while the rate decays, so ranks do not climb back. A
            schedule's strength ramp multiplies this ``tau``; a rank target projects ``Z``.
            Not with ``Schedule(every=k > 1)``, a ``closure`` or sharded parameters.

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
        distributed: bool | None = None,
        tau_lr: str = "current",
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(optimizer, ProxRank):
            raise TypeError("optimizer is already a ProxRank; wrap the base optimizer once")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a proxrank.Schedule, got {type(schedule).__name__}")
        resolved = get_prox(prox)
        projection = isinstance(resolved, MatrixMap) and resolved.levels
        if lam is None and not (schedule is not None and schedule.has_rank) and not projection:
            raise TypeError(
                "lam= is required, unless schedule= has a rank target (target= or budget=) or "
                "prox= is a projection"
            )
        if not isinstance(diagnostics, bool | Diagnostics):
            raise TypeError(
                f"diagnostics must be True, False or a proxrank.Diagnostics, got {diagnostics!r}"
            )
        if tau_lr not in TAU_LRS:
            raise ValueError(
                f"tau_lr must be one of {TAU_LRS} (tau = lam * lr or lam * initial_lr), "
                f"got {tau_lr!r}"
            )
        if tau_lr == "cumulative" and schedule is not None and schedule.every > 1:
            raise ValueError(
                "tau_lr='cumulative' already proxes the latent weights with the accumulated "
                f"threshold; Schedule(every={schedule.every}) would accumulate it twice: use "
                "every=1"
            )
        self.tau_lr = tau_lr
        torch._C._log_api_usage_once("python.optimizer.proxrank")
        self.optimizer = optimizer
        self.schedule = schedule
        lam = 1.0 if lam is None else lam  # a rank target or a projection; lam=0 opts out
        self.defaults = {
            **optimizer.defaults,
            "lam": _check_lam(lam, "lam"),
            "prox": prox,
            "metric": metric if isinstance(metric, Metric) else get_metric(metric).name,
        }
        self.backend = get_backend(backend, tol=tol)
        self.check_finite = bool(check_finite)
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()

        self._candidates = select_targets(model_or_named_params, include, exclude, warn=True)
        self._modules: dict[str, nn.Module] = {}
        if isinstance(model_or_named_params, nn.Module):
            for t in self._candidates:
                owner = t.param_name.rpartition(".")[0]
                self._modules[t.param_name] = model_or_named_params.get_submodule(owner)
        for i, group in enumerate(self.param_groups):
            self._init_group(group, where=f"param_groups[{i}]")
        self._records: list[MatrixRecord] = []
        self._refresh_targets()
        self._input_hooks = InputHooks(self, ProxRank._observe_input)
        self._closed = False
        options = self._options()
        self._sync_input_hooks(options)
        self._check_maps(options)
        if schedule is not None:
            schedule.check(self.targets, [options[g].prox for g in self._group_index])
        #: Number of completed steps (base step + prox).
        self.step_count = 0
        self.tracker = Diagnostics() if diagnostics is True else diagnostics or None
        if self.tracker is not None:
            self.tracker.bind(self)
        #: The :class:`proxrank.distributed.Engine` sharing the prox across ranks, or ``None``.
        self.distributed = Engine.detect(self.targets, distributed)
        if tau_lr == "cumulative" and any(is_sharded(t.param) for t in self.targets):
            raise NotImplementedError(
                "tau_lr='cumulative' keeps a latent copy of each whole matrix, which sharded "
                "(FSDP2) parameters do not have; use tau_lr='current' or 'initial'"
            )

    # -- what is shared with the base optimizer --------------------------------------------
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

    # step hooks live on the base: registered on either, they run once per step, around the
    # whole step (base step and prox)
    @property
    def _optimizer_step_pre_hooks(self) -> dict:  # type: ignore[override]
        return self.optimizer._optimizer_step_pre_hooks

    @_optimizer_step_pre_hooks.setter
    def _optimizer_step_pre_hooks(self, value: dict) -> None:
        self.optimizer._optimizer_step_pre_hooks = value

    @property
    def _optimizer_step_post_hooks(self) -> dict:  # type: ignore[override]
        return self.optimizer._optimizer_step_post_hooks

    @_optimizer_step_post_hooks.setter
    def _optimizer_step_post_hooks(self, value: dict) -> None:
        self.optimizer._optimizer_step_post_hooks = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """As the base optimizer (fused optimizers take ``grad_scale``/``found_inf``)."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    @property
    def targets(self) -> list[Target]:
        """The weight matrices that get the prox, in the base optimizer's parameter order."""
        return [r.target for r in self._records]

    def matrices(self) -> list[MatrixInfo]:
        """A read-only view of every selected matrix: name, layer kind, shape, param group,
        options and each namespace of its state."""
        options = self._options()
        return [
            MatrixInfo.of(r, g, self.param_groups[g] | options[g]._asdict())
            for r, g in zip(self._records, self._group_index, strict=True)
        ]

    def matrix(self, name: str) -> MatrixInfo:
        """The :meth:`matrices` entry of the matrix called ``name`` (see :meth:`describe`)."""
        for info in self.matrices():
            if info.name == name:
                return info
        raise KeyError(f"no selected matrix is called {name!r}; selected:\n{self.describe()}")

    def describe(self) -> str:
        """A table of the selected matrices: name, layer kind, matrix shape, param group."""
        rows = [("name", "kind", "shape", "group")]
        rows += [
            (t.name, t.kind, f"{t.shape2d[0]}x{t.shape2d[1]}", str(g))
            for t, g in zip(self.targets, self._group_index, strict=True)
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(line.rstrip() for line in lines)

    # -- set-up ------------------------------------------------------------------------------
    def _init_group(self, group: dict[str, Any], where: str) -> None:
        for key in GROUP_OPTIONS:
            group.setdefault(key, self.defaults[key])
        self._group_options(group, where)

    def _group_options(self, group: dict[str, Any], where: str = "param group") -> _Options:
        lam = _check_lam(group["lam"], f"{where}['lam']")
        prox = get_prox(group["prox"], option=f"{where}['prox']")
        metric = get_metric(group["metric"], option=f"{where}['metric']")
        metric.check_optimizer(self.optimizer)
        if isinstance(prox, MatrixMap) and metric.name != "euclidean":
            raise ValueError(
                f"{where}: prox {prox.name!r} acts on the weight's entries, in the euclidean "
                f"metric only; metric={metric.name!r} weighs singular values: set "
                f"{where}['metric'] (or metric=) to 'euclidean', or use prox='soft'/'hard'"
            )
        if self.schedule is not None:
            self.schedule.check_prox(prox, f"{where}['prox']")
        return _Options(lam, prox, metric)

    def _options(self) -> list[_Options]:
        return [
            self._group_options(g, f"param_groups[{i}]") for i, g in enumerate(self.param_groups)
        ]

    def _check_maps(self, options: list[_Options]) -> None:
        """Raise ``ValueError`` when a group's map cannot act on one of its matrices."""
        for rec, g in zip(self._records, self._group_index, strict=True):
            _check_map(options[g].prox, rec.target, self.schedule)

    def _refresh_targets(self) -> None:
        """One record per selected matrix the base optimizer trains, in its parameter order
        (records of matrices already known are kept)."""
        position, group_of = {}, {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                position.setdefault(id(p), len(position))
                group_of.setdefault(id(p), gi)
        chosen = [t for t in self._candidates if id(t.param) in position]
        if not chosen and not self._records:
            warnings.warn(
                "proxrank: no weight matrix to apply the prox to: none of the selected "
                f"parameters ({len(self._candidates)} found in model_or_named_params) is trained "
                "by the optimizer, so this ProxRank steps as its base optimizer alone; check "
                "include/exclude and that the optimizer holds the model's parameters",
                stacklevel=3,
            )
        chosen.sort(key=lambda t: position[id(t.param)])  # stable: blocks keep their order
        old = {r.name: r for r in self._records}
        self._records = [old.get(t.name) or MatrixRecord(t, t.shape2d) for t in chosen]
        self._group_index = [group_of[id(t.param)] for t in chosen]
        self._position = [position[id(t.param)] for t in chosen]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer; selected matrices in it get the prox."""
        if self.schedule is not None and self.schedule.budget is not None:
            raise ValueError(
                "add_param_group with a budget schedule: the budget is allocated across the "
                "layers known when the ProxRank was built; build it with every param group"
            )
        self._init_group(param_group, where="param_group")
        params = param_group["params"]
        if not isinstance(params, Tensor | set):  # a generator is read once: keep its items
            param_group["params"] = params = list(params)
        ids = {id(p) for p in ([params] if isinstance(params, Tensor) else params)}
        options = self._group_options(param_group, "param_group")
        for t in self._candidates:  # before anything changes: the map fits every new matrix
            if id(t.param) in ids:
                _check_map(options.prox, t, self.schedule)
        self.optimizer.add_param_group(param_group)
        self._refresh_targets()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- input statistics (forward pre-hooks) ------------------------------------------------
    def _sync_input_hooks(self, options: list[_Options]) -> None:
        """Forward pre-hooks exactly on the layers whose metric needs inputs (none after
        :meth:`close`); raises before any change when a metric cannot weight its matrix."""
        wanted = {}
        for i, (rec, g) in enumerate(zip(self._records, self._group_index, strict=True)):
            metric = options[g].metric
            if metric.needs_inputs:
                metric.check_target(rec.target)
                wanted[i] = rec.target
        if self._closed:
            return
        for key in self._input_hooks.keys() - set(wanted):
            self._input_hooks.discard(key)
        for key, t in wanted.items():
            module = self._modules[t.param_name]
            self._input_hooks.add(key, module, compute_dtype(t.param.dtype))

    def _observe_input(self, key: int, x: Tensor) -> None:
        """A hooked layer's input: update its metric statistics (a non-finite statistic is not
        stored; the next step raises it)."""
        if key >= len(self._records):
            return
        rec = self._records[key]
        if not self._modules[rec.target.param_name].training:
            return
        metric = get_metric(self.param_groups[self._group_index[key]]["metric"])
        try:
            updates = metric.observe_input(rec.metric, x)
        except (FloatingPointError, ValueError) as err:
            rec.input_error = str(err)
            return
        rec.metric = {**rec.metric, **updates}

    def close(self) -> None:
        """Remove the forward hooks the ``"activation"``/``"two_sided"`` metrics use (also
        done when the optimizer is garbage-collected). Afterwards their input statistics stay
        as they are; the optimizer keeps working."""
        self._closed = True
        self._input_hooks.remove()

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Base optimizer step (``closure`` and a fused optimizer's ``grad_scale``/``found_inf``
        passed through), then the prox on every selected matrix. Returns what the base step
        returns (the closure's loss)."""
        # a fused base under torch.amp.GradScaler: the scaler set grad_scale / found_inf on
        # this optimizer; the base reads them, and a step with found_inf skips everything
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf.sum() > 0):
            return self._base_step(closure, kwargs)
        if closure is not None and self.tau_lr == "cumulative":
            raise ValueError(
                "tau_lr='cumulative' takes the gradient at the thresholded weights and lets the "
                "base step update the latent ones; a closure evaluated inside the base step "
                "cannot tell them apart (nothing was changed). Call loss.backward() and then "
                "step() without a closure, or use tau_lr='current'"
            )
        if closure is not None:  # the prox is prepared after the base step: check it first
            self._check_maps(self._options())
        work = self._prepare(False, grad_scale) if closure is None else None
        restore = self._swap_in_latents(work) if work is not None else []
        try:
            loss = self._base_step(closure, kwargs)
        except BaseException:
            with torch.no_grad():
                for t, X in restore:
                    t.view.write(t.param, X)
            raise
        if work is None:  # with a closure the gradients exist only now
            work = self._prepare(True, grad_scale)
        if self.check_finite:
            bad = self._skip_nonfinite([j.index for j in work.jobs], grads=False)
            work.jobs = [j for j in work.jobs if j.index not in bad]
        outcomes = self._compute(work.jobs)
        self._commit(work, outcomes)
        if self.tracker is not None:
            self.tracker.end_step(loss)
        return loss

    def _base_step(self, closure: Callable[[], Any] | None, kwargs: dict[str, Any]) -> Any:
        """The base optimizer's own step, without its hook wrapper (the step hooks, shared, run
        once around this whole step), recorded by the profiler under the base's name; the
        ``grad_scale`` / ``found_inf`` a GradScaler set on this optimizer reach the base."""
        base = self.optimizer
        amp = {k: getattr(self, k) for k in ("grad_scale", "found_inf") if hasattr(self, k)}
        args = () if closure is None else (closure,)
        step = getattr(type(base).step, "__wrapped__", None)
        for k, v in amp.items():
            setattr(base, k, v)
        try:
            if step is None:
                return base.step(*args, **kwargs)
            base._opt_called = True  # what an LR scheduler attached to the base looks for
            with torch.autograd.profiler.record_function(
                f"Optimizer.step#{type(base).__name__}.step"
            ):
                return step(base, *args, **kwargs)
        finally:
            for k in amp:
                delattr(base, k)

    def _prepare(self, after_base: bool, grad_scale: Tensor | None = None) -> _Work:
        """Settle this step without changing anything: every option, check, statistic update,
        metric weighting and schedule decision, each error naming its weight. ``grad_scale``:
        the AMP scale of the gradients (a fused base unscales them itself)."""
        options = self._options()
        self._raise_input_errors(options)
        self._sync_input_hooks(options)
        work = _Work(self.step_count + 1)
        seen = []  # matrices with a gradient at this step: statistics, and the prox if lam > 0
        for i, rec in enumerate(self._records):
            p = rec.target.param
            if p.grad is not None and p.device.type != "meta":
                seen.append(i)
                if not rec.matches():
                    work.fresh.add(i)
        active = [i for i in seen if options[self._group_index[i]].lam > 0]
        if self.check_finite and not after_base:
            self._raise_if_nonfinite(active)
        elif self.check_finite:  # the base step has used them: as a bare optimizer, go on
            bad = self._skip_nonfinite(active, grads=True)
            seen = [i for i in seen if i not in bad]
            active = [i for i in active if i not in bad]
        if self.distributed is not None:  # input statistics averaged across ranks
            metrics = [options[g].metric for g in self._group_index]
            for i, upd in self.distributed.prepare(self._records, metrics).items():
                work.update(i, "metric", upd)
        states = [self._current(i, "metric", work) for i in range(len(self._records))]
        observed = [
            i
            for i in seen
            if options[self._group_index[i]].metric.needs_grads
            and not self._records[i].target.param.grad.is_sparse
        ]

        def observe(i: int, grad: Tensor) -> dict[str, Any]:
            t = self._records[i].target
            with _naming(f"weight {t.name!r}"):
                g = gradient_matrix(t, grad)
                g = g if grad_scale is None else g / grad_scale.to(g)
                return options[self._group_index[i]].metric.observe_grad(states[i], g)

        targets = [self._records[i].target for i in observed]
        grads = [t.param.grad for t in targets]
        if self.distributed is not None and self.distributed.sharded:  # whole on the owner
            engine = self.distributed
            updates = engine.on_owners(targets, grads, lambda j, g: observe(observed[j], g))
        else:
            updates = [observe(i, g) for i, g in zip(observed, grads, strict=True)]
        for i, upd in zip(observed, updates, strict=True):
            work.update(i, "metric", upd)
        if self.schedule is not None:
            sched_states = [self._current(i, "schedule", work) for i in range(len(self._records))]
            proxes = [options[g].prox for g in self._group_index]
            with _naming("the schedule's allocation"):
                for i, upd in enumerate(
                    self.schedule.prepare(
                        work.step, self.targets, sched_states, proxes, self._spectra, self._matrices
                    )
                ):
                    work.update(i, "schedule", upd)
        if self.tau_lr == "cumulative":
            work.latent = active
        self._add_jobs(work, active, options)
        return work

    def _spectra(self, targets: list[Target]) -> list[Tensor]:
        """The singular values of each target's matrix (a budget's allocation), across ranks
        each computed by its owner and shared."""
        if self.distributed is None:
            return [spectrum(t, t.param) for t in targets]
        params = [t.param for t in targets]
        return self.distributed.on_owners(targets, params, lambda j, p: spectrum(targets[j], p))

    def _matrices(self, targets: list[Target]) -> list[Tensor]:
        """Each target's matrix (a magnitude budget's allocation), across ranks read whole on
        its owner and shared."""
        if self.distributed is None:
            return [t.view.read(t.param.detach()) for t in targets]
        params = [t.param for t in targets]
        return self.distributed.on_owners(
            targets, params, lambda j, p: targets[j].view.read(p.detach())
        )

    def _add_jobs(self, work: _Work, active: list[int], options: list[_Options]) -> None:
        """The jobs of the ``active`` matrices. Across ranks a matrix's metric weighting is
        computed by its owner only (from the base optimizer's state that the metric reads,
        gathered whole there when sharded), and an error any rank met is raised on all."""
        engine = self.distributed
        whole: dict[int, Tensor] = {}
        if engine is not None and engine.sharded:
            pairs = [
                (self._records[i].target, v)
                for i in active
                for v in self._base_tensors(
                    self._records[i].target, options[self._group_index[i]].metric
                )
            ]
            whole = engine.gather([t for t, _ in pairs], [v for _, v in pairs])
        error = None
        try:
            for i in active:
                job = self._job(i, options[self._group_index[i]], work, whole)
                if job is not None:
                    work.jobs.append(job)
        except Exception as err:
            if engine is None:
                raise
            error = err
        weighted = any(
            not isinstance(options[self._group_index[i]].metric, EuclideanMetric) for i in active
        )
        if engine is not None and weighted:  # only the owners computed their weightings
            engine.raise_first(error)
        elif error is not None:
            raise error

    def _base_tensors(self, t: Target, metric: Metric) -> list[Tensor]:
        """The base optimizer's tensors of ``t``'s parameter that ``metric`` reads
        (:attr:`proxrank.metrics.Metric.base_state_keys`), shaped like the parameter."""
        state = self.optimizer.state.get(t.param, {})
        return [
            v
            for k, v in state.items()
            if k in metric.base_state_keys and isinstance(v, Tensor) and v.shape == t.param.shape
        ]

    def _current(self, index: int, namespace: str, work: _Work) -> dict[str, Any]:
        """A matrix's state in ``namespace`` as this step sees it: the stored state (none after
        a resize) with this step's updates so far."""
        stored = {} if index in work.fresh else getattr(self._records[index], namespace)
        return {**stored, **work.updates.get(index, {}).get(namespace, {})}

    def _job(
        self, index: int, options: _Options, work: _Work, whole: dict[int, Tensor]
    ) -> _Job | None:
        """Matrix ``index``'s job at this step (``None``: no prox). ``whole``: the base
        optimizer's sharded tensors gathered whole on this rank (by ``id``)."""
        rec = self._records[index]
        t = rec.target
        group = self.param_groups[self._group_index[index]]
        lr = float(group["lr"])
        tau_lr = float(group.get("initial_lr", lr)) if self.tau_lr == "initial" else lr
        if self.tau_lr == "cumulative":
            tau_lr = self._current(index, "dual", work).get("lr_sum", 0.0) + lr
            work.update(index, "dual", {"lr_sum": tau_lr})
        tau = options.lam * tau_lr
        _check_map(options.prox, t, self.schedule)
        plan: Plan | None = Plan(tau, options.prox)
        if self.schedule is not None:
            state = self._current(index, "schedule", work)
            plan, upd = self.schedule.plan(work.step, state, t.shape2d, tau, options.prox)
            work.update(index, "schedule", upd)
        projection = isinstance(options.prox, MatrixMap) and options.prox.levels  # ignores tau
        if plan is None or (plan.rank is None and plan.tau == 0 and not projection):
            return None  # no prox, or tau = 0: the identity, left bit for bit
        weighting = None
        if self.distributed is None or self.distributed.owner(t) == self.distributed.rank:
            base_state = {
                k: t.view.read(whole.get(id(v), v))
                for k, v in self.optimizer.state.get(t.param, {}).items()
                if isinstance(v, Tensor)
                and v.shape == t.param.shape
                and (id(v) in whole or not is_sharded(v))
            }
            with _naming(f"weight {t.name!r}"):
                weighting = options.metric.weighting(
                    self._current(index, "metric", work), base_state, t.shape2d
                )
            if weighting is not None:
                weighting = weighting.to(compute_dtype(t.param.dtype))
        return _Job(index, plan, options.lam, lr, weighting, self._current(index, "backend", work))

    def _raise_input_errors(self, options: list[_Options]) -> None:
        """Raise the first input statistic a hook could not store (on every rank: inputs
        differ per rank)."""
        message = None
        for rec in self._records:
            if rec.input_error is not None:
                message, rec.input_error = f"weight {rec.name!r}: {rec.input_error}", None
                break
        if self.distributed is not None and any(o.metric.needs_inputs for o in options):
            message = self.distributed.first_error(message)
        if message is not None:
            raise FloatingPointError(f"{message} (seen in a forward pass; nothing was changed)")

    def _nonfinite(self, indices: list[int], grads: bool) -> list[int]:
        """The matrices among ``indices`` whose weight (or, with ``grads``, gradient) holds
        inf/NaN (one synchronisation)."""
        tensors, owner = [], []
        for i in indices:
            t = self._records[i].target
            tensors.append(finite_operand(t, t.param.detach()))
            owner.append(i)
            g = t.param.grad
            if grads and g is not None:
                tensors.append(g if g.is_sparse else finite_operand(t, g))
                owner.append(i)
        finite = _finite(tensors, self.distributed)
        return list(dict.fromkeys(i for i, ok in zip(owner, finite, strict=True) if not ok))

    def _raise_if_nonfinite(self, indices: list[int]) -> None:
        """Before the step: raise when a weight or gradient that gets the prox is not finite."""
        for i in self._nonfinite(indices, grads=True):
            t = self._records[i].target
            weight = _finite([finite_operand(t, t.param.detach())], self.distributed)
            what = "weight" if weight == [False] else "gradient of"
            raise FloatingPointError(
                f"the {what} {t.name!r} is not finite before the step (nothing was changed); no "
                "prox was applied. Lower the learning rate, clip gradients, or use "
                "torch.amp.GradScaler (which skips steps with inf/NaN gradients); pass "
                "check_finite=False to skip this check"
            )

    def _skip_nonfinite(self, indices: list[int], grads: bool) -> set[int]:
        """After the base step: the matrices among ``indices`` whose weight (or, with
        ``grads``, gradient) is not finite. The prox leaves them as the base step left them, as
        a bare optimizer would (the base step cannot be undone), and a warning names them."""
        bad = set(self._nonfinite(indices, grads=grads))
        if bad:
            names = ", ".join(repr(self._records[i].name) for i in sorted(bad))
            warnings.warn(
                f"proxrank: the base optimizer's step left {names} not finite; no prox was applied "
                "to it (lower the learning rate or clip gradients)",
                RuntimeWarning,
                stacklevel=4,
            )
        return bad

    @torch.no_grad()
    def _compute(self, jobs: list[_Job]) -> list[_Outcome]:
        """Every job's prox, batched by (prox map, rank target, shape up to transposition,
        dtype, device), on copies of the backend state; nothing is written (but by a sharded
        :attr:`distributed` engine, see :meth:`_commit`). Across ranks each rank runs the jobs
        it owns and receives the others'. A failure restores the backend's own state (its
        random generators) and names the weight."""
        batches: dict[tuple, list[int]] = {}
        for j, job in enumerate(jobs):
            t = self._records[job.index].target
            m, n = t.shape2d
            # spectral maps: shapes up to transposition; a MatrixMap: the shape itself
            shape = (m, n) if isinstance(job.plan.prox, MatrixMap) else (min(m, n), max(m, n))
            key = (job.plan.prox, job.plan.rank, *shape, t.param.dtype, t.param.device)
            batches.setdefault(key, []).append(j)
        outcomes: list[_Outcome | None] = [None] * len(jobs)
        saved = self.backend.state_dict()
        try:
            if self.distributed is not None:
                return self.distributed.compute(
                    [self._records[job.index].target for job in jobs],
                    list(batches.values()),
                    lambda members, full: self._owned_batch([jobs[j] for j in members], full),
                    self.backend,
                )
            for members in batches.values():
                batch = [jobs[j] for j in members]
                for j, out in zip(members, self._run_batch(batch), strict=True):
                    outcomes[j] = out
        except BaseException:
            self.backend.load_state_dict(saved)
            raise
        return outcomes  # type: ignore[return-value]

    def _run_batch(
        self, batch: list[_Job], full: dict[int, Tensor] | None = None
    ) -> list[_Outcome]:
        """The prox of same-shape matrices in one call: each weight ``W`` (float32 for half
        precision; read from ``full[id(param)]`` when given, a gathered sharded parameter).
        A spectral map: ``W`` mapped into its metric, ``Y = A^{1/2} W B^{1/2}``, tall ones
        transposed so the batch shares one shape, one backend call, the results mapped back. A
        :class:`~proxrank.prox.MatrixMap`: the map on the stacked weights (no backend)."""
        records = [self._records[job.index] for job in batch]
        Ys = []
        for job, rec in zip(batch, records, strict=True):
            t = rec.target
            param = (full or {}).get(id(t.param), t.param)
            W = t.view.read(param.detach()).to(compute_dtype(t.param.dtype))
            Ys.append(W if job.weighting is None else job.weighting.to_metric(W))
        first = batch[0].plan
        states = [job.backend_state for job in batch]
        try:
            if isinstance(first.prox, MatrixMap):
                Y = torch.stack(Ys)
                tau = torch.tensor([job.plan.tau for job in batch], dtype=Y.dtype, device=Y.device)
                X = first.prox(Y, tau, first.rank)
                return [
                    _Outcome(X[i], Yi, None, state)
                    for i, (Yi, state) in enumerate(zip(Ys, states, strict=True))
                ]
            Y = torch.stack([Yi.mT if Yi.shape[0] > Yi.shape[1] else Yi for Yi in Ys])
            if first.rank is None:
                tau = torch.tensor([job.plan.tau for job in batch], dtype=Y.dtype, device=Y.device)
                result = prox_step(Y, tau, first.prox, self.backend, states)
            else:
                result = rank_prox_step(Y, first.rank, first.prox, self.backend, states)
        except (RuntimeError, ValueError) as err:
            index = getattr(err, "index", None)
            names = [r.name for r in records] if index is None else [records[index].name]
            hint = (
                f"Check the weights and the options of prox {first.prox.name!r}"
                if isinstance(first.prox, MatrixMap)
                else "Try backend='exact', or check the weights"
            )
            raise type(err)(
                f"the prox of {', '.join(map(repr, names))} failed after the base step (no prox "
                f"was applied, nothing else changed): {err}. {hint}"
            ) from err
        out = []
        for i, (job, Yi, state) in enumerate(zip(batch, Ys, states, strict=True)):
            mine = _unbatch(result, i, transposed=Yi.shape[0] > Yi.shape[1])
            X = mine.X if job.weighting is None else job.weighting.from_metric(mine.X)
            out.append(_Outcome(X, Yi, mine, state))
        return out

    def _owned_batch(self, batch: list[_Job], full: dict[int, Tensor]) -> list[_Outcome]:
        """:meth:`_run_batch` on the owner of the batch's matrices across ranks, each outcome
        measured for the diagnostics there (the other ranks record the measures)."""
        outs = self._run_batch(batch, full)
        if self.tracker is None:
            return outs
        outcomes = []
        for job, out in zip(batch, outs, strict=True):
            p = self._records[job.index].target.param
            step = self._prox_step(job, out, full.get(id(p), p))
            outcomes.append(out._replace(measured=self.tracker.measure(step)))
        return outcomes

    @torch.no_grad()
    def _swap_in_latents(self, work: _Work) -> list[tuple[Target, Tensor]]:
        """``tau_lr="cumulative"``: write each latent ``Z`` into its weight, for the base step
        to update; returns the weights it replaced (restored if the base step fails)."""
        replaced = []
        for i in work.latent:
            Z = self._current(i, "dual", work).get("latent")
            if Z is not None:
                t = self._records[i].target
                replaced.append((t, t.view.read(t.param.detach()).clone()))
                t.view.write(t.param, Z)
        return replaced

    @torch.no_grad()
    def _commit(self, work: _Work, outcomes: list[_Outcome]) -> None:
        """Write every weight (through its view; a sharded engine writes the shards its owners
        computed) and every namespace of state. Under ``tau_lr="cumulative"`` the weight the
        base step left is the new latent ``Z`` of a matrix with a prox; one without keeps it
        as its own latent."""
        proxed = {job.index for job in work.jobs}
        for i in work.latent:
            t = self._records[i].target
            Z = t.view.read(t.param.detach()).clone() if i in proxed else None
            work.update(i, "dual", {"latent": Z})
        for job, out in zip(work.jobs, outcomes, strict=True):
            rec = self._records[job.index]
            if self.tracker is not None and out.measured is not None:  # measured by its owner
                self.tracker.record(self._prox_step(job, out, None), out.measured)
            elif self.tracker is not None:  # before the write-back: W may share p's storage
                self.tracker.record(self._prox_step(job, out, rec.target.param))
            if out.X is not None:
                rec.target.view.write(rec.target.param, out.X)
        if self.distributed is not None:
            self.distributed.commit()
        for i in work.fresh:
            rec = self._records[i]
            rec.shape, rec.backend, rec.metric, rec.schedule = rec.target.shape2d, {}, {}, {}
            rec.dual = {}
        for i, namespaces in work.updates.items():
            rec = self._records[i]
            for ns, values in namespaces.items():
                setattr(rec, ns, {**getattr(rec, ns), **values})
        for job, out in zip(work.jobs, outcomes, strict=True):
            self._records[job.index].backend = out.backend_state
        jobs_outcomes = zip(work.jobs, outcomes, strict=True)
        spectral = [(j, o) for j, o in jobs_outcomes if o.result is not None]
        if self.schedule is not None and spectral:  # the rank a schedule freezes at
            ranks = torch.stack([torch.count_nonzero(o.result.S_new).cpu() for _, o in spectral])
            for (job, _), r in zip(spectral, ranks.tolist(), strict=True):
                rec = self._records[job.index]
                rec.schedule = {**rec.schedule, "rank": r}
        self.step_count = work.step

    def _prox_step(self, job: _Job, out: _Outcome, param: Tensor | None) -> ProxStep:
        """What ``job`` did, for the diagnostics; its matrices read from ``param`` (the
        parameter, or its whole gathered from shards), none without it."""
        t = self._records[job.index].target
        W = None if param is None else t.view.read(param.detach()).to(out.X.dtype)
        prox = job.plan.prox
        level = isinstance(prox, MatrixMap) and prox.levels  # a projection ignores tau
        common = dict(
            name=t.name,
            shape=t.shape2d,
            prox=prox,
            tau=job.plan.tau if job.plan.rank is None and not level else math.nan,
            rank_target=job.plan.rank,
            lam=job.lam,
            lr=job.lr,
            W=W,
            Y=None if param is None else out.Y,
            X=None if param is None else out.X,
            weight_dtype=t.param.dtype,
        )
        if out.result is None:  # a MatrixMap: exact, no singular values
            bound = torch.zeros(())
            return ProxStep(**common, S=None, S_new=None, error_bound=bound, method="direct")
        svd = out.result.svd
        return ProxStep(
            **common,
            S=svd.S,
            S_new=out.result.S_new,
            error_bound=torch.as_tensor(out.backend_state.get("error_bound", svd.error_bound)),
            method=str(out.backend_state.get("backend", self.backend.name)),
        )

    # -- diagnostics -------------------------------------------------------------------------
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

    # -- copies --------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        del state["_input_hooks"]  # weak references and hook handles: rebuilt on the copy
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._input_hooks = InputHooks(self, ProxRank._observe_input)
        if self.tracker is not None:
            self.tracker.bind(self)
        self._patch_step_function()

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its ``state`` and ``param_groups`` keys, so that
        tools reading them keep working) with proxrank's own state nested under ``"proxrank"``:
        the step count, the schedule, the backend's random generators and each selected
        matrix's namespaces, listed in the order of :attr:`targets`. The last param group
        carries the same state as a :class:`proxrank.distributed.Checkpointed` under
        ``"proxrank"``: ``torch.distributed.checkpoint``'s ``get_state_dict`` keeps only the
        ``state`` and ``param_groups`` keys."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["proxrank"] = {
            "step_count": self.step_count,
            "schedule": None if self.schedule is None else self.schedule.state_dict(),
            "backend": self.backend.state_dict(),
            "matrices": [
                {
                    "name": r.name,
                    "position": pos,
                    "shape": r.shape,
                    **{ns: dict(state) for ns, state in r.namespaces().items()},
                }
                for r, pos in zip(self._records, self._position, strict=True)
            ],
        }
        if self.tracker is not None:
            sd["proxrank"]["diagnostics"] = self.tracker.state_dict()
        if sd["param_groups"]:  # what torch.distributed.checkpoint keeps (the same object)
            sd["param_groups"][-1]["proxrank"] = Checkpointed(sd["proxrank"])
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            sd = sd if out is None else out
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`, validating all of it before loading any of it. A plain
        base-optimizer state dict (no ``"proxrank"`` key) is accepted too: it restores the base
        and leaves proxrank's state as it is."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            state_dict = state_dict if out is None else out
        ours = state_dict.pop("proxrank", None)
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group in groups:  # where torch.distributed.checkpoint keeps proxrank's state
            carried = group.pop("proxrank", None)
            if ours is None and isinstance(carried, Checkpointed):
                ours = carried.state
        state_dict["param_groups"] = self._complete_groups(groups)
        load_diagnostics = None
        if ours is not None:
            step_count = _checkpoint_step(ours.get("step_count"))
            loaded = self._check_loaded_matrices(ours)
            schedule = self._check_loaded_schedule(ours.get("schedule"))
            if self.tracker is not None and "diagnostics" in ours:
                load_diagnostics = self.tracker.prepare_load(ours["diagnostics"])
            saved_backend = self.backend.state_dict()
            self.backend.load_state_dict(ours.get("backend", {}))
        try:
            self.optimizer.load_state_dict(state_dict)
        except BaseException:
            if ours is not None:
                self.backend.load_state_dict(saved_backend)
            raise
        if ours is not None:
            self.step_count = step_count
            self.schedule = schedule
            self._records = loaded
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

    def _check_loaded_matrices(self, ours: dict[str, Any]) -> list[MatrixRecord]:
        """New records from a checkpoint's matrices, every entry validated."""
        saved = ours.get("matrices")
        mine = [(r.name, pos) for r, pos in zip(self._records, self._position, strict=True)]
        theirs = [(e.get("name"), e.get("position")) for e in saved or [] if isinstance(e, dict)]
        if not isinstance(saved, list) or theirs != mine:
            raise ValueError(
                f"state_dict was saved with prox matrices {theirs}, but this optimizer has "
                f"{mine} (name, parameter position); build the ProxRank with the same model, "
                "include/exclude and param groups"
            )
        records = []
        for rec, entry in zip(self._records, saved, strict=True):
            t = rec.target
            shape = tuple(entry.get("shape", ()))
            if shape != t.shape2d:
                raise ValueError(
                    f"state_dict entry for {t.name!r} has matrix shape {shape}, but the "
                    f"parameter's matrix is {t.shape2d} now"
                )
            spaces = {}
            for ns in NAMESPACES:
                state = entry.get(ns, {})
                if not isinstance(state, dict):
                    raise ValueError(f"state_dict entry for {t.name!r}: {ns!r} is not a dict")
                for key, value in state.items():
                    if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                        raise ValueError(
                            f"state_dict entry for {t.name!r}: {ns}[{key!r}] is not finite; the "
                            "checkpoint is corrupted"
                        )
                spaces[ns] = {
                    k: v.to(t.param.device) if isinstance(v, Tensor) else v
                    for k, v in state.items()
                }
            latent = spaces["dual"].get("latent")
            if latent is not None and (
                not isinstance(latent, Tensor) or tuple(latent.shape) != shape
            ):
                raise ValueError(
                    f"state_dict entry for {t.name!r}: the latent matrix (tau_lr='cumulative') "
                    f"is not a {shape} tensor; the checkpoint is corrupted"
                )
            basis = spaces["backend"].get("basis")
            if isinstance(basis, Tensor) and (basis.dim() != 2 or basis.shape[0] != min(shape)):
                raise ValueError(
                    f"state_dict entry for {t.name!r}: backend basis of shape "
                    f"{tuple(basis.shape)} does not fit a {shape} matrix; the checkpoint is "
                    "corrupted"
                )
            records.append(MatrixRecord(t, shape, **spaces))
        return records

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
            f"matrices={len(self._records)})"
        )


def _checkpoint_step(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"state_dict['proxrank']['step_count'] must be an int >= 0, got {value!r}; the "
            "checkpoint is corrupted"
        )
    return value


def _unbatch(result: ProxResult, i: int, transposed: bool) -> ProxResult:
    """Matrix ``i`` of a batched :class:`ProxResult`, transposed back when it was transposed."""
    svd = result.svd
    U, S, Vh, bound = svd.U[i], svd.S[i], svd.Vh[i], svd.error_bound[i]
    X = result.X[i]
    if transposed:
        X, U, Vh = X.mT, Vh.mT, U.mT
    return ProxResult(X, type(svd)(U, S, Vh, bound), result.S_new[i])


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    """Prefix an error raised inside with the weight (or component) it concerns."""
    try:
        yield
    except (FloatingPointError, ValueError) as err:
        raise type(err)(f"{what}: {err}") from None

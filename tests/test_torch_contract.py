"""torch.optim's contract for ProxRank, driven by torch's own optimizer database.

Every optimizer of ``torch.testing._internal.common_optimizers.optim_db`` (the ``OptimizerInfo``
entries PyTorch's own ``test_optim.py`` runs on) is wrapped as ``ProxRank(base, model, lam=...)``
with ``lam=0`` and with a small ``lam``, over a small model (two ``nn.Linear`` layers, biases),
and must keep what torch promises for the bare optimizer where it applies: deepcopy and pickle
give working copies, step hooks fire once per step in torch's order, ``state_dict`` round trips
are bit-exact, closures, foreach/fused, tensor learning rates, param groups, LR schedulers, the
profiler, ``zero_grad``, meta tensors. On top of that, the prox keeps torch's conventions for
parameters: ``lam=0`` and ``tau = lam * lr = 0`` are the bare optimizer bit for bit, a matrix with
no gradient this step (``grad is None``, frozen) is not touched, zero-size and complex weights are
skipped, the fused optimizers' AMP path (``GradScaler``) works, and errors (non-finite gradient,
corrupted checkpoint) are raised before anything changes.

The prox reference is a float64 SVD: ``W <- U diag(max(s - tau, 0)) V^T`` after each base step.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import proxrank

# Importing torch.testing._internal loads torch's own hypothesis profile (and calls
# torch.backends.disable_global_flags()); keep this suite's hypothesis profile.
settings.register_profile("_before_torch_internal", settings.default)
from torch.testing._internal.common_optimizers import OptimizerInfo, optim_db  # noqa: E402

settings.load_profile("_before_torch_internal")

#: The small strength of the ``lam > 0`` runs of the contract checks.
LAM = 1e-3
LAMS = pytest.mark.parametrize("lam", [0.0, LAM], ids=["lam0", "lam"])
#: The threshold of the runs compared with the float64 reference (``lam = TAU / lr``).
TAU = 0.02


def name(info: OptimizerInfo) -> str:
    return info.optim_cls.__name__


def by_name(names: str) -> OptimizerInfo:
    return next(info for info in optim_db if name(info) == names)


INFOS = pytest.mark.parametrize("info", optim_db, ids=name)
WITHOUT_CLOSURE = [info for info in optim_db if not info.step_requires_closure]
FUSED_ON_CPU = [info for info in optim_db if "cpu" in info.supports_fused_on]
IMPLS = [
    (info, impl)
    for info in optim_db
    for impl in ("foreach", "fused")
    if impl in info.supported_impls and (impl == "foreach" or "cpu" in info.supports_fused_on)
]


def optim_inputs(info: OptimizerInfo) -> list[Any]:
    """The entry's CPU inputs without ``capturable`` (CUDA only), first one its defaults."""
    return [i for i in info.optim_inputs_func(device="cpu") if not i.kwargs.get("capturable")]


ALL_INPUTS = [(info, i) for info in optim_db for i in optim_inputs(info)]


def defaults(info: OptimizerInfo) -> dict[str, Any]:
    return copy.deepcopy(optim_inputs(info)[0].kwargs)


# -- model, data, steps ----------------------------------------------------------------------
def make_model(info: OptimizerInfo, seed: int = 0) -> nn.Sequential:
    """Two selected 5x6 and 4x5 weight matrices and their biases (Muon trains matrices only)."""
    torch.manual_seed(seed)
    bias = name(info) != "Muon"
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 4, bias=bias))


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)


def make_closure(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    info: OptimizerInfo,
    t: int,
    edit_grads: Callable[[nn.Module], None] | None = None,
) -> Callable[[], torch.Tensor]:
    x, y = batch(t)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if edit_grads is not None:
            edit_grads(model)
        if info.only_supports_sparse_grads:  # SparseAdam: torch's tests sparsify dense grads
            for p in model.parameters():
                if p.grad is not None:
                    p.grad = p.grad.to_sparse()
        return loss

    return closure


def step(opt, model, info, t, edit_grads=None):
    """One training step as torch's tests take it: with a closure where the optimizer needs
    one, else gradients first and a plain ``opt.step()``."""
    closure = make_closure(opt, model, info, t, edit_grads)
    if info.step_requires_closure:
        return opt.step(closure)
    loss = closure()
    opt.step()
    return loss


def train(opt, model, info, steps, start=0):
    return [step(opt, model, info, t) for t in range(start, start + steps)]


def wrap(base, model, lam):
    return proxrank.ProxRank(base, model, lam=lam)


def build(info, model, lam=None, **kwargs):
    """``info``'s optimizer over ``model``, wrapped unless ``lam`` is None."""
    base = info.optim_cls(model.parameters(), **kwargs)
    return base if lam is None else wrap(base, model, lam)


def strong_lam(kwargs: dict[str, Any], info: OptimizerInfo) -> float:
    """The ``lam`` that makes ``tau = TAU`` at the optimizer's learning rate."""
    lr = kwargs.get("lr", info.optim_cls([nn.Parameter(torch.zeros(2, 2))]).defaults["lr"])
    return TAU / float(lr)


def svt64(W: torch.Tensor, tau: float) -> torch.Tensor:
    """Float64 reference: ``U diag(max(s - tau, 0)) V^T`` of ``W`` as a matrix."""
    M = W.detach().double().reshape(W.shape[0], -1)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return ((U * (S - tau).clamp_min(0)) @ Vh).reshape(W.shape).to(W.dtype)


def reference_prox(model: nn.Module, lam: float, lrs: list[float]) -> None:
    """What ProxRank adds after the base step: the SVT of each Linear weight (tau = lam * lr)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for m, lr in zip(linears, lrs, strict=True):
            m.weight.copy_(svt64(m.weight, lam * lr))


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), f"parameter {n} differs"


def assert_same(a: Any, b: Any, where: str = "state_dict") -> None:
    """Recursive equality: tensors bit for bit (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_param_names(sd: dict[str, Any]) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    for group in sd["param_groups"]:
        group.pop("param_names", None)
    return sd


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_unchanged(model, opt, before) -> None:
    params, sd = before
    for (n, p), q in zip(model.named_parameters(), params, strict=True):
        assert torch.equal(p, q), f"parameter {n} was changed"
    assert_same(opt.state_dict(), sd, "optimizer state_dict")


def bare_or_skip(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except (ValueError, RuntimeError, TypeError, AttributeError, ZeroDivisionError) as err:
        pytest.skip(f"the bare optimizer does not support {what}: {err}")


# -- lam = 0 and tau = 0 are the bare optimizer ----------------------------------------------
@pytest.mark.parametrize(
    ("info", "optim_input"),
    ALL_INPUTS,
    ids=[f"{name(info)}-{i.desc.replace(' ', '_')}" for info, i in ALL_INPUTS],
)
def test_lam0_is_the_bare_optimizer(info, optim_input):
    model, twin = make_model(info), make_model(info)
    opt = build(info, model, 0.0, **copy.deepcopy(optim_input.kwargs))
    bare = build(info, twin, None, **copy.deepcopy(optim_input.kwargs))
    for t in range(3):
        loss = step(opt, model, info, t)
        loss_bare = step(bare, twin, info, t)
        assert torch.equal(loss, loss_bare)
        assert_same_params(model, twin)
    assert_same(opt.state_dict()["state"], bare.state_dict()["state"], "state")


@INFOS
def test_lr0_is_the_identity(info):
    """tau = lam * lr = 0: the prox is the identity, bit for bit."""
    kwargs = {**defaults(info), "lr": 0.0}
    model, twin = make_model(info), make_model(info)
    bare = bare_or_skip(lambda: build(info, twin, None, **kwargs), "lr=0")
    opt = build(info, model, LAM, **kwargs)
    for t in range(3):
        step(opt, model, info, t)
        step(bare, twin, info, t)
        assert_same_params(model, twin)


@INFOS
def test_lam0_never_raises_where_the_bare_optimizer_does_not(info):
    """With lam = 0 no matrix gets a prox, so none is checked: a NaN gradient goes to the base
    optimizer exactly as without the wrapper."""

    def poison(m):
        m[0].weight.grad[0, 0] = float("nan")

    model, twin = make_model(info), make_model(info)
    opt, bare = build(info, model, 0.0, **defaults(info)), build(info, twin, None, **defaults(info))
    train(opt, model, info, 1)
    train(bare, twin, info, 1)
    step(bare, twin, info, 1, edit_grads=poison)
    step(opt, model, info, 1, edit_grads=poison)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)


@INFOS
def test_each_step_is_the_base_step_then_svt(info):
    kwargs = defaults(info)
    lam = strong_lam(kwargs, info)
    model, twin = make_model(info), make_model(info)
    opt, bare = build(info, model, lam, **kwargs), build(info, twin, None, **kwargs)
    lr = float(bare.param_groups[0]["lr"])
    for t in range(1 if info.step_requires_closure else 2):
        step(opt, model, info, t)
        step(bare, twin, info, t)
        reference_prox(twin, lam, [lr, lr])
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# -- copies ---------------------------------------------------------------------------------
def public_attrs(obj: Any) -> set[str]:
    return {k for k in vars(obj) if not k.startswith("_")}


def copy_of(obj: Any, how: str) -> Any:
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@INFOS
@LAMS
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_are_working_optimizers(info, lam, how):
    """A copy of (model, optimizer), taken together as torch's tests do, steps exactly as the
    original from then on, over the copied parameters."""
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    train(opt, model, info, 2)
    if how == "deepcopy":  # torch's test_deepcopy_copies_all_public_attrs
        assert public_attrs(copy.deepcopy(opt)) == public_attrs(opt)
    twin = make_model(info)
    bare = build(info, twin, None, **defaults(info))
    train(bare, twin, info, 1)
    twin2, bare2 = copy_of((twin, bare), how)
    bare_or_skip(lambda: step(bare2, twin2, info, 1), f"a step after {how}")  # LBFGS: no
    model2, opt2 = copy_of((model, opt), how)
    ids = {id(p) for p in model2.parameters()}
    assert {id(p) for g in opt2.param_groups for p in g["params"]} == ids
    for t in range(2, 5):
        loss, loss2 = step(opt, model, info, t), step(opt2, model2, info, t)
        assert torch.equal(loss, loss2)
        assert_same_params(model, model2)
    assert_same(without_param_names(opt.state_dict()), without_param_names(opt2.state_dict()))


# -- hooks ----------------------------------------------------------------------------------
@INFOS
@LAMS
def test_step_hooks_fire_once_per_step_in_order(info, lam):
    """torch's order: global pre, local pre, the step, local post, global post; once each."""
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    data, seen = [], []

    def hook(tag):
        def fn(o, args, kwargs):
            data.append(tag)
            seen.append(o)

        return fn

    handles = [
        register_optimizer_step_pre_hook(hook(0)),
        register_optimizer_step_post_hook(hook(5)),
    ]
    try:
        handles += [opt.register_step_pre_hook(hook(1)), opt.register_step_post_hook(hook(2))]
        step(opt, model, info, 0)
        assert data == [0, 1, 2, 5]
        assert all(o is opt for o in seen)
        other.step()
        step(opt, model, info, 1)
        assert data == [0, 1, 2, 5, 0, 5, 0, 1, 2, 5]
    finally:
        for h in handles:
            h.remove()
    step(opt, model, info, 2)
    assert data == [0, 1, 2, 5, 0, 5, 0, 1, 2, 5]


@INFOS
@LAMS
def test_base_optimizer_step_hooks_fire_once_per_step(info, lam):
    model = make_model(info)
    base = info.optim_cls(model.parameters(), **defaults(info))
    calls = []
    base.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    base.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt = wrap(base, model, lam)
    train(opt, model, info, 2)
    assert calls == ["pre", "post"] * 2


@INFOS
@LAMS
def test_state_dict_hooks(info, lam):
    """As torch's test_state_dict_pre/post_hook and test_load_state_dict_* on the wrapper:
    each hook runs once per call, with the wrapper, and what it returns is used."""
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    train(opt, model, info, 1)
    calls = []

    def pre(o):
        calls.append(("pre", o))
        o.state["test"] = 1

    def post(o, sd):
        calls.append(("post", o))
        sd["ran_pre_hook"] = sd["state"].pop("test", None) == 1
        return sd

    opt.register_state_dict_pre_hook(pre)
    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["ran_pre_hook"] and "test" not in sd["state"]
    assert calls == [("pre", opt), ("post", opt)]
    del opt.state["test"], sd["ran_pre_hook"]

    calls.clear()

    def load_pre1(o, sd):
        calls.append(("load_pre1", o))
        sd["param_groups"][0]["lr"] = 0.002

    def load_pre2(o, sd):
        calls.append(("load_pre2", o))
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["lr"] = 0.003
        return sd

    def load_post(o):
        calls.append(("load_post", o))

    opt.register_load_state_dict_pre_hook(load_pre2)
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["lr"] == 0.003
    assert calls == [("load_pre2", opt), ("load_post", opt)]
    opt.register_load_state_dict_pre_hook(load_pre1, prepend=False)
    opt.load_state_dict(copy.deepcopy(sd))
    assert opt.param_groups[0]["lr"] == 0.002  # load_pre1 edits what load_pre2 returned
    train(opt, model, info, 1, start=1)


# -- checkpoints ----------------------------------------------------------------------------
@INFOS
@LAMS
def test_state_dict_round_trip_is_bit_exact(info, lam):
    """Resume in a fresh wrapped optimizer over a fresh copy of the model: the continued run is
    the uninterrupted one, bit for bit, and loading leaves the given state dict as it was."""
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    train(opt, model, info, 3)
    resumed = make_model(info, seed=1)
    resumed.load_state_dict(model.state_dict())
    opt2 = build(info, resumed, lam, **defaults(info))
    sd = copy.deepcopy(opt.state_dict())
    given = copy.deepcopy(sd)
    opt2.load_state_dict(given)
    assert_same(given, sd, "the state dict given to load_state_dict")
    for t in range(3, 6):
        step(opt, model, info, t)
        step(opt2, resumed, info, t)
        assert_same_params(model, resumed)
    assert_same(without_param_names(opt.state_dict()), without_param_names(opt2.state_dict()))


@INFOS
@LAMS
def test_state_dict_saves_and_loads_with_weights_only(info, lam):
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    train(opt, model, info, 3)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    assert_same(torch.load(buf, weights_only=True), sd)


@pytest.mark.parametrize(
    "corrupt",
    ["step_count=-1", "step_count=1.5", "step_count='3'", "nan_in_state_tensor"],
)
def test_corrupted_checkpoint_is_rejected_before_anything_loads(corrupt):
    info = by_name("Adam")
    model = make_model(info)
    opt = build(info, model, 5.0, lr=1e-2)
    train(opt, model, info, 3)
    sd = copy.deepcopy(opt.state_dict())
    ours = sd["proxrank"]
    if corrupt.startswith("step_count"):
        value = {"step_count=-1": -1, "step_count=1.5": 1.5, "step_count='3'": "3"}[corrupt]
        assert_replace_key(ours, "step_count", value)
    else:
        tensors = floating_tensors(ours)
        assert tensors, "state_dict()['proxrank'] holds no floating tensor to corrupt"
        tensors[0].view(-1)[0] = float("nan")
    target = make_model(info, seed=1)
    opt2 = build(info, target, 5.0, lr=2e-2)
    train(opt2, target, info, 1)
    before = snapshot(target, opt2)
    with pytest.raises((ValueError, TypeError)):
        opt2.load_state_dict(sd)
    assert_unchanged(target, opt2, before)


def assert_replace_key(tree: Any, key: str, value: Any) -> None:
    def walk(node):
        if isinstance(node, dict):
            found = key in node
            if found:
                node[key] = value
            return sum([walk(v) for v in node.values()], found)
        return 0

    assert walk(tree), f"no {key!r} in state_dict()['proxrank']"


def floating_tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree] if tree.is_floating_point() and tree.numel() else []
    items = tree.values() if isinstance(tree, dict) else tree
    if isinstance(tree, dict | list | tuple):
        return [t for item in items for t in floating_tensors(item)]
    return []


# -- param groups, closures, implementations, learning rates ----------------------------------
@INFOS
@LAMS
def test_add_param_group(info, lam):
    """A group added after wrapping is trained by the base and its matrices get the prox, with
    the group's own learning rate."""
    if not info.supports_param_groups:
        pytest.skip(f"{name(info)} does not support param groups")
    kwargs = defaults(info)
    lam = lam and strong_lam(kwargs, info)
    model, twin = make_model(info), make_model(info)
    bare = info.optim_cls(twin[0].parameters(), **kwargs)
    opt = wrap(info.optim_cls(model[0].parameters(), **kwargs), model, lam)
    lr = float(bare.param_groups[0]["lr"])
    bare.add_param_group({"params": list(twin[2].parameters()), "lr": lr / 2})
    opt.add_param_group({"params": list(model[2].parameters()), "lr": lr / 2})
    for t in range(2):
        step(opt, model, info, t)
        step(bare, twin, info, t)
        if lam:
            reference_prox(twin, lam, [lr, lr / 2])
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        else:
            assert_same_params(model, twin)


@INFOS
@LAMS
def test_closure_is_passed_through(info, lam):
    """``step(closure)`` evaluates the closure as the base does and returns its loss."""
    model, twin = make_model(info), make_model(info)
    opt, bare = build(info, model, lam, **defaults(info)), build(info, twin, None, **defaults(info))
    counts = {"wrapped": 0, "bare": 0}

    def counting(key, closure):
        def fn():
            counts[key] += 1
            return closure()

        return fn

    loss = opt.step(counting("wrapped", make_closure(opt, model, info, 0)))
    loss_bare = bare.step(counting("bare", make_closure(bare, twin, info, 0)))
    assert isinstance(loss, torch.Tensor) and torch.equal(loss, loss_bare)
    assert counts["wrapped"] == counts["bare"] >= 1


@pytest.mark.parametrize(("info", "impl"), IMPLS, ids=[f"{name(i)}-{impl}" for i, impl in IMPLS])
@LAMS
def test_foreach_and_fused(info, impl, lam):
    """The base's foreach/fused implementation under the wrapper: with lam = 0 the bare one bit
    for bit, and with lam > 0 the for-loop run (within torch's tolerance), a layer frozen for two
    steps on the way as torch's own comparison does."""
    runs = []
    for flag in (True, False):
        model = make_model(info)
        opt = build(info, model, lam, **defaults(info), **{impl: flag})
        runs.append((model, opt))
    twin = make_model(info)
    bare = build(info, twin, None, **defaults(info), **{impl: True})
    for t in range(6):
        for m in (runs[0][0], runs[1][0], twin):
            m[2].requires_grad_(t not in (3, 4))
        for model, opt in runs:
            step(opt, model, info, t)
        step(bare, twin, info, t)
        if lam == 0:
            assert_same_params(runs[0][0], twin)
        for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
            torch.testing.assert_close(p, q)


@INFOS
@LAMS
def test_tensor_lr(info, lam):
    """``lr=torch.tensor(...)`` runs as the same float lr does (torch's test_tensor_lr)."""
    lr = 1.0 if info.step_requires_closure else 1e-3
    kwargs = {k: v for k, v in defaults(info).items() if k != "lr"}
    runs = []
    for value in (lr, torch.tensor(lr)):
        model = make_model(info)
        base = bare_or_skip(
            lambda m=model, v=value: info.optim_cls(m.parameters(), lr=v, **kwargs), "tensor lr"
        )
        runs.append((model, wrap(base, model, lam)))
    for t in range(3):
        for model, opt in runs:
            step(opt, model, info, t)
        for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters(), strict=True):
            torch.testing.assert_close(p, q)


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, factor=0.5, patience=0
    ),
}


def scheduler_step(scheduler, loss) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(float(loss.detach()))
    else:
        scheduler.step()


@INFOS
@LAMS
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_schedulers(info, lam, sched):
    """A scheduler on the wrapper moves the base's learning rate and, with it, tau = lam * lr:
    the run is the bare run with the scheduler, then the SVT at the step's learning rate."""
    kwargs = defaults(info)
    lam = lam and strong_lam(kwargs, info)
    model, twin = make_model(info), make_model(info)
    opt, bare = build(info, model, lam, **kwargs), build(info, twin, None, **kwargs)
    scheds = [SCHEDULERS[sched](opt), SCHEDULERS[sched](bare)]
    for t in range(1 if info.step_requires_closure and lam else 4):
        lr = float(bare.param_groups[0]["lr"])
        loss = step(opt, model, info, t)
        loss_bare = step(bare, twin, info, t)
        if lam:
            reference_prox(twin, lam, [lr, lr])
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
        else:
            assert_same_params(model, twin)
        scheduler_step(scheds[0], loss)
        scheduler_step(scheds[1], loss_bare)
        assert opt.param_groups[0]["lr"] == bare.param_groups[0]["lr"]


# -- profiler, zero_grad --------------------------------------------------------------------
@INFOS
@LAMS
def test_profiler_records_each_step_once(info, lam):
    """As torch records ``Optimizer.step#Adam.step`` for a bare Adam: one
    ``Optimizer.step#ProxRank.step`` per step (the base's own record inside it, if any, once)."""
    model = make_model(info)
    kwargs = {**defaults(info), **({"max_iter": 2} if info.step_requires_closure else {})}
    opt = build(info, model, lam, **kwargs)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(opt, model, info, 2)
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.step#ProxRank.step") == 2
    assert names.count(f"Optimizer.step#{name(info)}.step") in (0, 2)


@INFOS
@LAMS
def test_zero_grad(info, lam):
    model = make_model(info)
    opt = build(info, model, lam, **defaults(info))
    make_closure(opt, model, info, 0)()
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    nn.functional.mse_loss(model(batch(0)[0]), batch(0)[1]).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# -- torch's conventions for parameters --------------------------------------------------------
@INFOS
@pytest.mark.parametrize("how", ["grad_none", "frozen"])
def test_matrix_without_gradient_is_not_touched(info, how):
    """A weight with no gradient this step (``.grad is None``: unused branch, or a frozen layer
    kept in the optimizer) gets no prox, as torch's optimizers skip such parameters."""
    kwargs = defaults(info)
    lam = strong_lam(kwargs, info)
    model = make_model(info)
    opt = build(info, model, lam, **kwargs)

    def drop(m):
        for p in m[2].parameters():
            p.grad = None

    if info.step_requires_closure:  # LBFGS moves every parameter: compare with the bare run
        twin = make_model(info)
        bare = build(info, twin, None, **kwargs)
        if how == "frozen":
            model[2].requires_grad_(False)
            twin[2].requires_grad_(False)
        step(opt, model, info, 0, edit_grads=drop if how == "grad_none" else None)
        step(bare, twin, info, 0, edit_grads=drop if how == "grad_none" else None)
        assert torch.equal(model[2].weight, twin[2].weight)
        return
    train(opt, model, info, 2)
    before = model[2].weight.detach().clone()
    if how == "frozen":
        model[2].requires_grad_(False)
    step(opt, model, info, 2, edit_grads=drop if how == "grad_none" else None)
    assert torch.equal(model[2].weight, before)
    model[2].requires_grad_(True)
    step(opt, model, info, 3)
    assert not torch.equal(model[2].weight, before)


class TwoBranches(nn.Module):
    """A selectable 5x6 weight and a second layer whose weight is ``extra`` (zero-size or
    complex), each with its own input."""

    def __init__(self, info: OptimizerInfo, extra: nn.Linear) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5, bias=name(info) != "Muon")
        self.extra = extra

    def loss(self, t: int) -> torch.Tensor:
        x, y = batch(t)
        g = torch.Generator().manual_seed(t)
        w = self.extra.weight
        z = torch.randn(16, w.shape[1], generator=g, dtype=torch.float32).to(w.dtype)
        out = self.extra(z)
        return nn.functional.mse_loss(self.a(x), y[:, :1].expand(-1, 5)) + out.abs().pow(2).sum()


def branch_step(opt, model, info, t):
    def closure():
        opt.zero_grad()
        loss = model.loss(t)
        loss.backward()
        if info.only_supports_sparse_grads:
            for p in model.parameters():
                p.grad = p.grad.to_sparse()
        return loss

    if info.step_requires_closure:
        return opt.step(closure)
    closure()
    opt.step()
    return None


@INFOS
@LAMS
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
def test_zero_size_weight_is_skipped(info, lam):
    """``nn.Linear(8, 0)`` (a 0x8 weight) is not selected: construction and steps work."""

    def make():
        torch.manual_seed(0)
        return TwoBranches(info, nn.Linear(8, 0, bias=name(info) != "Muon"))

    model, twin = make(), make()
    bare = info.optim_cls(twin.parameters(), **defaults(info))
    bare_or_skip(lambda: branch_step(bare, twin, info, 0), "a zero-size parameter")
    opt = wrap(info.optim_cls(model.parameters(), **defaults(info)), model, lam)
    branch_step(opt, model, info, 0)
    assert model.extra.weight.shape == (0, 8)
    if lam == 0:
        assert_same_params(model, twin)


@pytest.mark.parametrize("info", [i for i in optim_db if i.supports_complex], ids=name)
def test_complex_weight_is_left_alone(info):
    """Complex weights are not in the default selection (no complex SVT): construction works,
    the complex weight steps exactly as with the bare optimizer, the real one gets the prox."""
    kwargs = defaults(info)
    lam = strong_lam(kwargs, info)

    def make():
        torch.manual_seed(0)
        return TwoBranches(info, nn.Linear(4, 3, dtype=torch.complex64))

    model, twin = make(), make()
    opt = wrap(info.optim_cls(model.parameters(), **kwargs), model, lam)
    bare = info.optim_cls(twin.parameters(), **kwargs)
    branch_step(opt, model, info, 0)
    branch_step(bare, twin, info, 0)
    assert torch.equal(model.extra.weight, twin.extra.weight)
    assert torch.equal(model.extra.bias, twin.extra.bias)
    assert not torch.equal(model.a.weight, twin.a.weight)


@INFOS
@LAMS
def test_meta_parameters(info, lam):
    """Optimizers are built on meta parameters (torch's tests, deferred initialisation): the
    wrapper is too, and with lam = 0 it steps on them as the bare optimizer does."""
    with torch.device("meta"):
        model, twin = make_model(info), make_model(info)
    opt = build(info, model, lam, **defaults(info))
    if lam:
        return
    bare = build(info, twin, None, **defaults(info))

    def meta_step(o, m):
        with torch.device("meta"):
            for p in m.parameters():
                p.grad = torch.rand_like(p)
                if info.only_supports_sparse_grads:
                    p.grad = p.grad.to_sparse()
        o.step((lambda: torch.ones((), device="meta")) if info.step_requires_closure else None)

    bare_or_skip(lambda: meta_step(bare, twin), "a step on meta parameters")
    meta_step(opt, model)


@pytest.mark.parametrize("info", FUSED_ON_CPU, ids=name)
@LAMS
def test_fused_on_meta_then_materialized(info, lam):
    """torch's test_fused_error_on_params_on_meta through the wrapper: the base's own error on
    meta, then ``to_empty`` and a working step."""
    with torch.device("meta"):
        model = make_model(info)
    opt = build(info, model, lam, fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()


# -- the fused optimizers' AMP path ----------------------------------------------------------
@pytest.mark.parametrize("info", FUSED_ON_CPU, ids=name)
@pytest.mark.parametrize("fused", [True, False])
def test_amp_scaling_is_advertised_as_the_base_does(info, fused):
    model = make_model(info)
    base = info.optim_cls(model.parameters(), fused=fused)
    opt = wrap(base, model, LAM)
    expected = getattr(base, "_step_supports_amp_scaling", False)
    assert getattr(opt, "_step_supports_amp_scaling", False) == expected


def scaled_step(opt, model, scaler, t, poison=False):
    x, y = batch(t)
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    if poison:
        model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize("info", FUSED_ON_CPU, ids=name)
@LAMS
def test_grad_scaler_with_fused_base(info, lam):
    """``GradScaler`` with a fused base: with lam = 0 the bare run bit for bit; an inf gradient
    skips the whole step (base step and prox)."""
    model, twin = make_model(info), make_model(info)
    opt = build(info, model, lam, fused=True)
    bare = build(info, twin, None, fused=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)]
    for t in range(3):
        scaled_step(opt, model, scalers[0], t)
        scaled_step(bare, twin, scalers[1], t)
        if lam == 0:
            assert_same_params(model, twin)
    before = [p.detach().clone() for p in model.parameters()]
    scaled_step(opt, model, scalers[0], 3, poison=True)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", FUSED_ON_CPU, ids=name)
@LAMS
@pytest.mark.parametrize("found_inf", [0.0, 1.0])
def test_grad_scale_and_found_inf_reach_the_fused_base(info, lam, found_inf):
    """``GradScaler`` hands a fused optimizer ``grad_scale`` and ``found_inf`` as attributes of
    the optimizer it steps (the wrapper): the base must see them. found_inf = 1 changes
    nothing; found_inf = 0 unscales the gradients as the bare fused step does."""
    model, twin = make_model(info), make_model(info)
    opt = build(info, model, lam, fused=True)
    bare = build(info, twin, None, fused=True)
    lr = float(bare.param_groups[0]["lr"])
    train(opt, model, info, 1)
    train(bare, twin, info, 1)
    reference_prox(twin, lam, [lr, lr])
    before = snapshot(model, opt)
    for o, m in ((opt, model), (bare, twin)):
        make_closure(o, m, info, 1)()
        for p in m.parameters():
            p.grad.mul_(4.0)
        o.grad_scale = torch.tensor(4.0)
        o.found_inf = torch.tensor(found_inf)
        o.step()
        del o.grad_scale, o.found_inf
    if found_inf:
        assert_unchanged(model, opt, before)
    elif lam == 0:
        assert_same_params(model, twin)
    else:
        reference_prox(twin, lam, [lr, lr])
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# -- atomic errors --------------------------------------------------------------------------
@pytest.mark.parametrize("info", WITHOUT_CLOSURE, ids=name)
def test_nonfinite_gradient_raises_before_anything_changes(info):
    """A NaN in a selected weight's gradient (dense, or sparse for SparseAdam) is an error that
    names the weight, raised before the weights, the base's state or proxrank's state change;
    the next finite step works."""
    model = make_model(info)
    opt = build(info, model, LAM, **defaults(info))
    train(opt, model, info, 2)
    before = snapshot(model, opt)

    def poison(m):
        m[0].weight.grad[0, 0] = float("nan")

    make_closure(opt, model, info, 2, edit_grads=poison)()
    with pytest.raises(Exception, match=r"0\.weight"):
        opt.step()
    assert_unchanged(model, opt, before)
    train(opt, model, info, 1, start=2)


def test_parameter_resized_between_steps():
    """A weight replaced by one of another shape: a correct prox with fresh state, or an error
    naming it before anything changes."""
    info = by_name("SGD")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False))
    lr, lam = 0.1, 0.2
    opt = build(info, model, lam, lr=lr)
    train(opt, model, info, 2)
    with torch.no_grad():
        model[2].weight.data = torch.randn(3, 5)
    x, _ = batch(2)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    expected = svt64(model[2].weight - lr * model[2].weight.grad, lam * lr)
    before = snapshot(model, opt)
    try:
        opt.step()
    except Exception as err:  # the other allowed outcome: an error before anything changes
        assert "2.weight" in str(err)
        assert_unchanged(model, opt, before)
    else:
        torch.testing.assert_close(model[2].weight, expected, rtol=1e-4, atol=1e-5)

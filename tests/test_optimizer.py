"""The ProxRank wrapper contract: a real torch.optim.Optimizer around any base optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch_optimizer
from torch import nn

import proxrank
from proxrank import functional as F


def make_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 10),
        nn.Tanh(),
        nn.Unflatten(1, (2, 5)),
        nn.Conv1d(2, 4, 3),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).to(dtype)


def batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g, dtype=dtype), torch.randn(
        16, 3, generator=g, dtype=dtype
    )


def loss_fn(model, seed=0):
    x, y = batch(seed, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps, scheduler=None, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def prox_reference(model, lam, lrs):
    """Apply svt with tau = lam * lr to the selected matrices of ``model`` (the twin run)."""
    with torch.no_grad():
        for t, lr in zip(proxrank.selection.select_targets(model), lrs, strict=True):
            p = t.param
            p.copy_(F.svt(p.reshape(p.shape[0], -1), lam * lr).reshape(p.shape))


BASES = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.AdamW, {"lr": 1e-2}),
    (torch.optim.Adamax, {"lr": 1e-2}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
    (torch.optim.Adadelta, {"lr": 1.0}),
    (torch.optim.RMSprop, {"lr": 1e-3}),
    (torch.optim.Rprop, {"lr": 1e-3}),
    (torch.optim.NAdam, {"lr": 1e-2}),
    (torch.optim.RAdam, {"lr": 1e-2}),
    (torch.optim.ASGD, {"lr": 1e-2}),
    (torch_optimizer.Lamb, {"lr": 1e-2}),
    (torch_optimizer.Yogi, {"lr": 1e-2}),
    (torch_optimizer.AdaBound, {"lr": 1e-2}),
]


@pytest.mark.parametrize(("cls", "kw"), BASES, ids=[c.__name__ for c, _ in BASES])
def test_every_base_optimizer_is_base_step_then_prox(cls, kw):
    lam = 0.5
    model, twin = make_model(), make_model()
    opt = proxrank.ProxRank(cls(model.parameters(), **kw), model, lam=lam)
    base = cls(twin.parameters(), **kw)
    assert isinstance(opt, torch.optim.Optimizer)
    for t in range(4):
        train(model, opt, 1, start=t)
        train(twin, base, 1, start=t)
        prox_reference(twin, lam, [kw["lr"]] * 3)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert opt.step_count == 4


def test_lbfgs_closure_passes_through_and_returns_loss():
    model, twin = make_model(), make_model()
    opt = proxrank.ProxRank(
        torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3), model, lam=0.1
    )
    base = torch.optim.LBFGS(twin.parameters(), lr=0.5, max_iter=3)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = loss_fn(m)
            loss.backward()
            return loss

        return closure

    loss = opt.step(closure_for(model, opt))
    expected = base.step(closure_for(twin, base))
    prox_reference(twin, 0.1, [0.5] * 3)
    assert torch.is_tensor(loss) and float(loss.detach()) == pytest.approx(float(expected.detach()))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_shares_param_groups_and_state_with_base():
    model = make_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = proxrank.ProxRank(base, model, lam=0.1)
    train(model, opt, 2)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert len(opt.state) == len(list(model.parameters()))
    base.load_state_dict(base.state_dict())  # rebinds the base's containers
    assert opt.param_groups is base.param_groups and opt.state is base.state
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "make_sched",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=8),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t)),
    ],
    ids=["StepLR", "OneCycleLR", "LambdaLR"],
)
def test_lr_schedulers_move_tau(make_sched):
    lam = 0.3
    model, twin = make_model(), make_model()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=lam)
    base = torch.optim.SGD(twin.parameters(), lr=0.1)
    sched, sched_twin = make_sched(opt), make_sched(base)
    lrs = set()
    for t in range(6):
        lr = opt.param_groups[0]["lr"]
        lrs.add(round(lr, 12))
        train(model, opt, 1, sched, start=t)
        train(twin, base, 1, sched_twin, start=t)
        prox_reference(twin, lam, [lr] * 3)
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert len(lrs) > 1


def test_step_hooks_fire():
    model = make_model()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o.step_count)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.step_count)))
    train(model, opt, 2)
    assert calls == [("pre", 0), ("post", 1), ("pre", 1), ("post", 2)]


def test_checkpoint_resume_equals_uninterrupted_run():
    def build(model):
        opt = proxrank.ProxRank(
            torch.optim.AdamW(model.parameters(), lr=1e-2), model, lam=0.2, prox="hard"
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return opt, sched

    full = make_model()
    opt, sched = build(full)
    train(full, opt, 10, sched)

    part = make_model()
    opt1, sched1 = build(part)
    train(part, opt1, 4, sched1)
    buf = io.BytesIO()
    torch.save(
        {"model": part.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed = make_model(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.step_count == 4
    train(resumed, opt2, 6, sched2, start=4)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_dict_nests_base_and_lists_matrices_with_their_positions():
    model = make_model()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = proxrank.ProxRank(base, model, lam=0.1)
    train(model, opt, 1)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "proxrank"}
    assert sd["param_groups"][0]["lam"] == 0.1 and sd["param_groups"][0]["prox"] == "soft"
    positions = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    assert [(e["position"], e["name"]) for e in sd["proxrank"]["matrices"]] == [
        (positions[n], n) for n in ("0.weight", "3.weight", "5.weight")
    ]
    assert set(sd["proxrank"]["matrices"][0]) == {
        "name",
        "position",
        "shape",
        "backend",
        "metric",
        "schedule",
        "dual",
    }
    base_only = copy.deepcopy(base.state_dict())  # a plain base checkpoint also loads
    opt.load_state_dict(base_only)
    assert opt.step_count == 1


def test_load_state_dict_mismatch_raises_before_changing_anything():
    model = make_model()
    opt = proxrank.ProxRank(torch.optim.Adam(model.parameters(), lr=1e-2), model, lam=0.1)
    train(model, opt, 1)
    other = make_model()
    opt_other = proxrank.ProxRank(
        torch.optim.Adam(other.parameters(), lr=1e-2), other, lam=0.1, exclude=["5"]
    )
    with pytest.raises(ValueError, match="state_dict was saved with prox matrices"):
        opt_other.load_state_dict(opt.state_dict())
    assert opt_other.step_count == 0 and len(opt_other.state) == 0
    sd = opt.state_dict()
    sd["proxrank"]["matrices"][0]["shape"] = (99, 12)
    with pytest.raises(ValueError, match=r"'0.weight' has matrix shape \(99, 12\)"):
        opt.load_state_dict(sd)


def test_grad_scaler_skip_skips_prox():
    model = make_model(torch.float32)
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=8.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(loss_fn(model) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    opt.zero_grad()
    scaler.scale(loss_fn(model)).backward()
    scaler.step(opt)
    scaler.update()
    assert opt.step_count == 1
    assert int(torch.linalg.matrix_rank(model[0].weight.detach())) < 10


def test_per_group_options_and_add_param_group():
    model = make_model()
    groups = [
        {"params": model[0].parameters(), "lam": 0.0},
        {"params": model[3].parameters(), "prox": "hard", "lam": 0.5},
    ]
    opt = proxrank.ProxRank(torch.optim.SGD(groups, lr=0.1), model, lam=0.3)
    assert [t.name for t in opt.targets] == ["0.weight", "3.weight"]
    w0 = model[0].weight.detach().clone()
    opt.zero_grad()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    W3 = model[3].weight.detach().reshape(4, -1).clone()
    opt.step()
    torch.testing.assert_close(model[0].weight, w0)  # lam = 0: untouched
    torch.testing.assert_close(model[3].weight.reshape(4, -1), F.hard_threshold(W3, 0.05))
    opt.add_param_group({"params": model[5].parameters()})
    assert [t.name for t in opt.targets] == ["0.weight", "3.weight", "5.weight"]
    assert opt.param_groups[2]["lam"] == 0.3 and opt.param_groups[2]["prox"] == "soft"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_stay_in_their_dtype(dtype):
    lin = nn.Linear(16, 8).to(dtype)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=2.0)
    W = lin.weight.detach().float().clone()
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert lin.weight.dtype == dtype
    ref = F.svt(W, 0.2).to(dtype)
    torch.testing.assert_close(lin.weight.detach(), ref, rtol=0, atol=0)


def test_tied_weights_get_one_prox():
    a, b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=1.0), model, lam=0.25)
    W = a.weight.detach().clone()
    a.weight.grad = torch.zeros_like(W)
    opt.step()
    torch.testing.assert_close(a.weight.detach(), F.svt(W, 0.25))


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    for a, b in zip(params, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0, equal_nan=True)
    now = opt.state_dict()
    assert now["proxrank"]["step_count"] == sd["proxrank"]["step_count"]
    for k, v in sd["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(now["state"][k][name]))


@pytest.mark.parametrize("where", ["weight", "grad"])
def test_nonfinite_input_raises_before_any_change(where):
    model = make_model()
    opt = proxrank.ProxRank(torch.optim.Adam(model.parameters(), lr=1e-2), model, lam=0.1)
    train(model, opt, 1)
    opt.zero_grad()
    loss_fn(model).backward()
    target = model[3].weight if where == "weight" else model[3].weight.grad
    with torch.no_grad():
        target.view(-1)[0] = float("nan")
    snap = _snapshot(model, opt)
    label = "weight '3.weight'" if where == "weight" else "gradient of '3.weight'"
    with pytest.raises(FloatingPointError, match=f"the {label} is not finite before the step"):
        opt.step()
    _assert_unchanged(model, opt, snap)


def test_nonfinite_after_base_step_gets_no_prox_and_a_warning():
    """As with a bare optimizer, a step that overflows leaves inf/NaN weights; the prox leaves
    those matrices alone (nothing NaN reaches proxrank's state) and says so."""
    model, twin = make_model(), make_model()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=1e300), model, lam=0.1)
    bare = torch.optim.SGD(twin.parameters(), lr=1e300)
    for o, m in ((opt, model), (bare, twin)):
        o.zero_grad()
        (loss_fn(m) * 1e10).backward()
    with pytest.warns(RuntimeWarning, match="left '0.weight'.* not finite; no prox was applied"):
        opt.step()
    bare.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)  # NaN in the same places: equal_nan is not needed for inf
    assert opt.step_count == 1
    assert all("basis" not in info.backend_state for info in opt.matrices())


def test_invalid_group_option_set_later_raises_before_any_change():
    model = make_model()
    opt = proxrank.ProxRank(torch.optim.Adam(model.parameters(), lr=1e-2), model, lam=0.1)
    train(model, opt, 1)
    opt.param_groups[0]["prox"] = "medium"
    opt.zero_grad()
    loss_fn(model).backward()
    snap = _snapshot(model, opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['prox'\]='medium'"):
        opt.step()
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lam": -1.0}, ValueError, "lam must be finite and >= 0, got -1.0"),
        ({"lam": float("inf")}, ValueError, "lam must be finite"),
        ({"lam": True}, TypeError, "lam must be a real number"),
        ({"lam": "1e-3"}, TypeError, "lam must be a real number"),
        ({"lam": 0.1, "prox": "nuclear"}, ValueError, "prox='nuclear' is not a known prox map"),
        ({"lam": 0.1, "backend": "magic"}, ValueError, "backend='magic' is not a known backend"),
    ],
)
def test_invalid_options(kwargs, exc, match):
    model = make_model()
    with pytest.raises(exc, match=match):
        proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_nothing_selected_warns_and_steps_as_the_base():
    model, twin = make_model(), make_model()
    with pytest.warns(UserWarning, match="no weight matrix to apply the prox to"):
        opt = proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1), model, lam=5.0, include=["nothing*"]
        )
    bare = torch.optim.SGD(twin.parameters(), lr=0.1)
    for o, m in ((opt, model), (bare, twin)):
        m(torch.ones(3, 12, dtype=torch.float64)).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_invalid_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        proxrank.ProxRank(object(), model, lam=0.1)
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1)
    with pytest.raises(TypeError, match="already a ProxRank"):
        proxrank.ProxRank(opt, model, lam=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lam'\] must be finite"):
        proxrank.ProxRank(
            torch.optim.SGD([{"params": model.parameters(), "lam": -2}], lr=0.1), model, lam=0.1
        )
    only_bias = torch.optim.SGD([model[0].bias], lr=0.1)
    with pytest.warns(UserWarning, match="none of the selected parameters"):
        proxrank.ProxRank(only_bias, model, lam=0.1)


def test_plain_base_checkpoint_loads_and_training_goes_on():
    """A checkpoint of the bare base optimizer has no proxrank options in its groups: they take
    the wrapper's values, and the next step works."""
    model, other = make_model(), make_model(seed=1)
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=1e-2), model, lam=0.2)
    train(model, opt, 1)
    plain = torch.optim.AdamW(other.parameters(), lr=1e-2)
    train(other, plain, 1)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lam"] == 0.2 and opt.param_groups[0]["prox"] == "soft"
    train(model, opt, 1, start=1)
    assert opt.step_count == 2
    bad = plain.state_dict()
    bad["param_groups"][0]["lam"] = -1.0
    with pytest.raises(ValueError, match=r"state_dict\['param_groups'\]\[0\]\['lam'\]"):
        opt.load_state_dict(bad)


def test_state_dict_is_a_snapshot():
    model = make_model()
    sched = proxrank.Schedule(lam=1.0, every=3)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, schedule=sched
    )
    train(model, opt, 1)
    sd = opt.state_dict()
    saved = copy.deepcopy(sd["proxrank"]["matrices"])
    train(model, opt, 1, start=1)
    assert sd["proxrank"]["matrices"] == saved

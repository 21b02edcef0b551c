"""``ProxRank(tau_lr=...)``: which learning rate scales ``tau = lam * lr``; ``"cumulative"``:
dual averaging on a latent copy of each matrix."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxrank


def svt64(W: torch.Tensor, tau: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    return U @ torch.diag((S - tau).clamp_min(0)) @ Vh


def run(threshold, lam, lr0, decay, steps=3, seed=0):
    """SGD with an exponentially decaying rate; returns (taus seen, lrs, weights before and
    after each prox as float64)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(7, 5, bias=False)
    base = torch.optim.SGD(model.parameters(), lr=lr0)
    opt = proxrank.ProxRank(base, model, lam=lam, tau_lr=threshold, diagnostics=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    x = torch.randn(16, 7)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        lr = opt.param_groups[0]["lr"]
        after_base = (model.weight.detach() - lr * model.weight.grad).double()
        opt.step()
        sched.step()
        out.append(
            (opt.diagnostics().layers[0].tau, lr, after_base, model.weight.detach().double())
        )
    return out


@settings(max_examples=15, deadline=None)
@given(
    lam=st.floats(0.05, 2.0),
    lr0=st.floats(1e-3, 0.3),
    decay=st.floats(0.1, 0.9),
    threshold=st.sampled_from(["current", "initial"]),
)
def test_tau_follows_the_chosen_rate_and_the_step_is_the_exact_prox(lam, lr0, decay, threshold):
    for tau, lr, W, X in run(threshold, lam, lr0, decay):
        expected = lam * (lr if threshold == "current" else lr0)
        assert tau == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(X, svt64(W, expected), atol=1e-5, rtol=1e-5)


def test_initial_keeps_tau_while_lr_decays_and_equals_current_without_a_scheduler():
    fixed = run("initial", 0.5, 0.1, 0.2, steps=4)
    follow = run("current", 0.5, 0.1, 0.2, steps=4)
    assert [t for t, *_ in fixed] == pytest.approx([0.05] * 4)
    assert [t for t, *_ in follow] == pytest.approx([0.05 * 0.2**k for k in range(4)])
    # no scheduler (no initial_lr): "initial" is the current lr, bit for bit
    results = []
    for threshold in ("current", "initial"):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 6)
        opt = proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.3, tau_lr=threshold
        )
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(2, 6)).square().sum().backward()
            opt.step()
        results.append(model.weight.detach().clone())
    assert torch.equal(*results)


def test_unknown_threshold_is_refused_before_anything_changes():
    model = torch.nn.Linear(3, 3)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"tau_lr must be one of \('current', 'initial', 'cumul"):
        proxrank.ProxRank(base, model, lam=0.1, tau_lr="summed")
    assert "initial_lr" not in base.param_groups[0]


# -- tau_lr="cumulative": dual averaging ---------------------------------------------------


def dual_averaging_reference(W0, x, lam, lrs):
    """Plain float64 dual averaging with SGD on f(W) = mean((x W^T)^2): the gradient at the
    thresholded X, the step on the latent Z, X = svt(Z, lam * sum of the rates so far)."""
    Z, X, total, out = W0.double(), W0.double(), 0.0, []
    for lr in lrs:
        Xg = X.clone().requires_grad_(True)
        (x.double() @ Xg.T).square().mean().backward()
        Z = Z - lr * Xg.grad
        total += lr
        X = svt64(Z, lam * total)
        out.append((Z, X))
    return out


@settings(max_examples=10, deadline=None)
@given(lam=st.floats(0.05, 3.0), lr0=st.floats(1e-2, 0.5), decay=st.floats(0.2, 0.95))
def test_cumulative_is_dual_averaging_on_a_latent_copy(lam, lr0, decay):
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5, bias=False)
    W0 = model.weight.detach().clone()
    x = torch.randn(16, 7)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=lr0), model, lam=lam, tau_lr="cumulative"
    )
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=decay)
    lrs = [lr0 * decay**k for k in range(4)]
    for Z_ref, X_ref in dual_averaging_reference(W0, x, lam, lrs):
        opt.zero_grad()
        (x @ model.weight.T).square().mean().backward()
        opt.step()
        sched.step()
        dual = opt.state_dict()["proxrank"]["matrices"][0]["dual"]
        torch.testing.assert_close(model.weight.detach().double(), X_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(dual["latent"].double(), Z_ref, atol=2e-5, rtol=1e-4)
    assert dual["lr_sum"] == pytest.approx(sum(lrs), rel=1e-12)


def test_cumulative_first_step_is_the_proximal_step_and_tau_keeps_growing():
    runs = {}
    for mode in ("current", "cumulative"):
        runs[mode] = run(mode, 0.5, 0.1, 0.5, steps=3)
    tau_c, _, _, X_c = runs["current"][0]
    tau_d, _, _, X_d = runs["cumulative"][0]
    assert tau_c == tau_d and torch.equal(X_c, X_d)  # no latent yet: the same step
    taus = [t for t, *_ in runs["cumulative"]]
    assert taus == pytest.approx([0.05, 0.075, 0.0875])  # lam * (0.1 + 0.05 + 0.025)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(10, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _cumulative(model, **kw):
    base = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    return proxrank.ProxRank(base, model, lam=0.5, tau_lr="cumulative", **kw)


def test_cumulative_resumes_bit_for_bit_from_a_checkpoint():
    model = _mlp()
    opt = _cumulative(model)
    _train(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 3, seed=2)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = _mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = _cumulative(resumed)
    opt2.load_state_dict(saved["opt"])
    latent = saved["opt"]["proxrank"]["matrices"][0]["dual"]["latent"]
    assert not torch.equal(latent, resumed[0].weight.detach())  # the latent is its own state
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    mine, theirs = (o.state_dict()["proxrank"]["matrices"] for o in (opt, opt2))
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a["dual"]["latent"], b["dual"]["latent"])
        assert a["dual"]["lr_sum"] == b["dual"]["lr_sum"]


def test_cumulative_refuses_a_corrupted_latent_before_loading_anything():
    model = _mlp()
    opt = _cumulative(model)
    _train(model, opt, 2, seed=1)
    sd = opt.state_dict()
    before = opt.state_dict()["proxrank"]
    sd["proxrank"]["matrices"][1]["dual"] = {"lr_sum": 0.1, "latent": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"'2.weight'.*latent matrix.*not a \(4, 8\) tensor"):
        opt.load_state_dict(sd)
    after = opt.state_dict()["proxrank"]["matrices"]
    assert torch.equal(after[1]["dual"]["latent"], before["matrices"][1]["dual"]["latent"])


class _FailingSGD(torch.optim.SGD):
    fail = False

    def step(self, closure=None):
        if self.fail:
            for group in self.param_groups:  # a step that breaks half-way
                for p in group["params"]:
                    p.data.add_(1.0)
            raise RuntimeError("base step failed")
        return super().step(closure)


def test_cumulative_errors_change_nothing():
    model = _mlp()
    base = _FailingSGD(model.parameters(), lr=0.1)
    opt = proxrank.ProxRank(base, model, lam=0.5, tau_lr="cumulative")
    _train(model, opt, 2, seed=1)
    weights = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()["proxrank"]["matrices"]
    # a closure cannot be told the thresholded weights from the latent ones: refused first
    with pytest.raises(ValueError, match="tau_lr='cumulative'.*closure.*nothing was changed"):
        opt.step(lambda: model(torch.ones(1, 6)).sum())
    # a base step that fails: the thresholded weights are put back where the latent was
    base.fail = True
    model(torch.ones(2, 6)).sum().backward()
    with pytest.raises(RuntimeError, match="base step failed"):
        opt.step()
    assert torch.equal(model[0].weight, weights[0]) and torch.equal(model[2].weight, weights[2])
    for a, b in zip(opt.state_dict()["proxrank"]["matrices"], state, strict=True):
        assert torch.equal(a["dual"]["latent"], b["dual"]["latent"]), a["name"]
        assert a["dual"]["lr_sum"] == b["dual"]["lr_sum"]
    with pytest.raises(ValueError, match=r"Schedule\(every=3\).*every=1"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.5, tau_lr="cumulative",
            schedule=proxrank.Schedule(every=3),
        )  # fmt: skip


def test_cumulative_with_a_rank_schedule_projects_the_latent():
    model = _mlp()
    sch = proxrank.Schedule(budget=0.6, allocation="uniform", threshold="hard", ramp_end=3)
    opt = _cumulative(model, schedule=sch)
    _train(model, opt, 6, seed=3)
    for entry in opt.state_dict()["proxrank"]["matrices"]:
        Z = entry["dual"]["latent"]
        W = dict(model.named_parameters())[entry["name"]].detach()
        r = entry["schedule"]["final_rank"]
        U, S, Vh = torch.linalg.svd(Z.double(), full_matrices=False)
        torch.testing.assert_close(W.double(), (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=0)
        assert int(torch.linalg.matrix_rank(Z)) > r  # what the projection cut is kept in Z

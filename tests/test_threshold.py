"""``ProxRank(tau_lr=...)``: which learning rate scales ``tau = lam * lr``."""

from __future__ import annotations

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
    with pytest.raises(ValueError, match=r"tau_lr must be one of \('current', 'initial'\)"):
        proxrank.ProxRank(base, model, lam=0.1, tau_lr="cumulative")
    assert "initial_lr" not in base.param_groups[0]

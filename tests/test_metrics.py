"""Weighted (Fisher / data-aware) proximal steps: proxrank.metrics and ProxRank(metric=...)."""

import copy
import gc
import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import proxrank
from proxrank.functional import svt
from proxrank.metrics import FisherMetric, Metric, damped, get_metric

SETTINGS = settings(max_examples=25, deadline=None)


# -- float64 numpy references -------------------------------------------------------------------
def random_spd(rng: np.random.Generator, k: int, diagonal: bool) -> np.ndarray:
    if diagonal:
        return np.diag(rng.uniform(0.05, 5.0, size=k))
    G = rng.standard_normal((k, k))
    return G @ G.T + 0.1 * np.eye(k)


def sym_sqrt(M: np.ndarray, power: float) -> np.ndarray:
    lam, V = np.linalg.eigh(M)
    return (V * lam**power) @ V.T


def as_arg(M: np.ndarray, diagonal: bool) -> torch.Tensor:
    """How the test passes A or B: its diagonal as a vector, or the full matrix."""
    return torch.from_numpy(np.diag(M).copy() if diagonal else M)


def metric_objective(X, Y, A, B, tau):
    """0.5 tr((X - Y)^T A (X - Y) B) + tau ||L_A^T X L_B||_*  (Cholesky factors: any factor
    of A and B gives the same nuclear norm)."""
    LA, LB = np.linalg.cholesky(A), np.linalg.cholesky(B)
    D = X - Y
    return (
        0.5 * np.trace(D.T @ A @ D @ B) + tau * np.linalg.svd(LA.T @ X @ LB, compute_uv=False).sum()
    )


shapes = st.tuples(st.integers(2, 6), st.integers(2, 6))


# -- the weighted prox --------------------------------------------------------------------------
@SETTINGS
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    tau=st.floats(0.01, 3.0),
    diag_a=st.booleans(),
    diag_b=st.booleans(),
)
def test_weighted_prox_optimality_conditions(shape, seed, tau, diag_a, diag_b):
    """In the metric's coordinates Yt - Xt = tau (U_r V_r^T + Z), U_r^T Z = 0, Z V_r = 0,
    ||Z||_2 <= 1; and X beats perturbations on the weighted objective."""
    m, n = shape
    rng = np.random.default_rng(seed)
    A, B = random_spd(rng, m, diag_a), random_spd(rng, n, diag_b)
    Y = rng.standard_normal((m, n)) * 2
    X = proxrank.metrics.weighted_prox(
        torch.from_numpy(Y), tau, as_arg(A, diag_a), as_arg(B, diag_b)
    ).numpy()
    Ah, Bh = sym_sqrt(A, 0.5), sym_sqrt(B, 0.5)
    Xt, Yt = Ah @ X @ Bh, Ah @ Y @ Bh
    U, s, Vt = np.linalg.svd(Xt)
    r = int((s > 1e-9).sum())
    Ur, Vr = U[:, :r], Vt[:r].T
    Z = (Yt - Xt) / tau - Ur @ Vr.T
    np.testing.assert_allclose(Ur.T @ Z, 0, atol=1e-8)
    np.testing.assert_allclose(Z @ Vr, 0, atol=1e-8)
    assert np.linalg.norm(Z, 2) <= 1 + 1e-8
    best = metric_objective(X, Y, A, B, tau)
    for _ in range(5):
        P = rng.standard_normal((m, n)) * 10.0 ** rng.uniform(-4, 0)
        assert best <= metric_objective(X + P, Y, A, B, tau) + 1e-10


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), tau=st.floats(0.0, 3.0))
def test_identity_weights_give_exactly_the_euclidean_prox(shape, seed, tau):
    Y = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ones_m, ones_n = torch.ones(shape[0], dtype=Y.dtype), torch.ones(shape[1], dtype=Y.dtype)
    assert torch.equal(proxrank.metrics.weighted_prox(Y, tau, ones_m, ones_n), svt(Y, tau))
    assert torch.equal(proxrank.metrics.weighted_prox(Y, tau), svt(Y, tau))
    assert torch.equal(damped(ones_m, 0.3), ones_m)  # normalised + damped identity stays I
    full = proxrank.metrics.weighted_prox(Y, tau, torch.eye(shape[0], dtype=Y.dtype))
    torch.testing.assert_close(full, svt(Y, tau), rtol=0, atol=1e-12)


def test_hard_prox_in_a_metric_keeps_rank_of_the_weighted_map():
    rng = np.random.default_rng(1)
    A, B = random_spd(rng, 5, False), random_spd(rng, 4, True)
    Y = torch.from_numpy(rng.standard_normal((5, 4)))
    X = proxrank.metrics.weighted_prox(Y, 0.5, torch.from_numpy(A), as_arg(B, True), prox="hard")
    Yt = torch.from_numpy(sym_sqrt(A, 0.5)) @ Y @ torch.from_numpy(sym_sqrt(B, 0.5))
    expected_rank = int((torch.linalg.svdvals(Yt) > 1.0).sum())  # sqrt(2 * 0.5)
    assert torch.linalg.matrix_rank(X) == expected_rank


def test_weighted_prox_rejects_non_spd_weights():
    Y = torch.randn(3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="A must have finite entries > 0"):
        proxrank.metrics.weighted_prox(Y, 0.1, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="B must be symmetric positive definite"):
        proxrank.metrics.weighted_prox(Y, 0.1, None, -torch.eye(3, dtype=torch.float64))


# -- statistics ---------------------------------------------------------------------------------
def test_damped_normalises_and_damps():
    s = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    d = damped(s, 0.5)
    torch.testing.assert_close(d, (s / 4 * 3 + 0.5) / 1.5)
    assert float(d.mean()) == pytest.approx(1.0)
    assert damped(torch.zeros(3), 0.1) is None  # no information yet: identity
    C = torch.tensor([[2.0, 1.0], [1.0, 0.5]], dtype=torch.float64)  # PSD, singular
    Cd = damped(C, 0.1)
    torch.testing.assert_close(Cd, (C / 1.25 + 0.1 * torch.eye(2, dtype=C.dtype)) / 1.1)
    assert float(torch.linalg.eigvalsh(Cd).min()) >= 0.1 / 1.1 - 1e-12


@pytest.mark.parametrize("beta", [0.9, None])
@pytest.mark.parametrize("side", ["out", "in"])
def test_fisher_statistics_are_the_ema_of_summed_squared_gradients(beta, side):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    metric = FisherMetric(side=side, beta=beta)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.0), lin, lam=0.0, metric=metric)
    grads = [torch.randn(3, 4) for _ in range(4)]
    for g in grads:
        lin.weight.grad = g.clone()
        opt.step()
    dim = 1 if side == "out" else 0
    sums = [(g**2).sum(dim) for g in grads]
    if beta is None:
        expected = sum(sums) / len(sums)
    else:
        expected = sum((1 - beta) * beta ** (len(sums) - 1 - t) * v for t, v in enumerate(sums))
    state = opt.matrix("weight").metric_state
    torch.testing.assert_close(state["fisher"], expected)
    assert state["fisher_count"] == 4


def test_fisher_prox_step_is_the_weighted_prox_with_hand_computed_weights():
    """One ProxRank step with metric='fisher' equals A^{-1/2} svt(A^{1/2} W' B^{1/2}) B^{-1/2}
    with W' the SGD step and A = damped EMA of squared-gradient row sums."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False).double()
    lr, lam, beta, damping = 0.1, 2.0, 0.8, 0.05
    metric = FisherMetric(beta=beta, damping=damping)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=lr), lin, lam=lam, metric=metric)
    g = torch.randn(5, 6, dtype=torch.float64)
    W_after_sgd = lin.weight.detach() - lr * g
    lin.weight.grad = g.clone()
    opt.step()
    a = (1 - beta) * (g**2).sum(1)
    a = (a / a.mean() + damping) / (1 + damping)
    expected = proxrank.metrics.weighted_prox(W_after_sgd, lam * lr, a, None)
    torch.testing.assert_close(lin.weight.detach(), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(expected, svt(W_after_sgd, lam * lr))  # the metric matters


def test_fisher_with_closure_uses_the_closures_gradients():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(8, 4)
    opt = proxrank.ProxRank(
        torch.optim.SGD(lin.parameters(), lr=0.01, momentum=0.9), lin, lam=0.1, metric="fisher"
    )
    seen = []

    def closure():
        opt.zero_grad()
        loss = lin(x).pow(2).mean()
        loss.backward()
        seen.append(lin.weight.grad.clone())
        return loss

    opt.step(closure)
    assert len(seen) == 1
    torch.testing.assert_close(
        opt.matrix("weight").metric_state["fisher"], 0.01 * (seen[0] ** 2).sum(1)
    )


def test_adam_metric_reads_exp_avg_sq():
    """The weights are the second moment as of the previous step (read before the base step,
    so that a missing state raises before anything changes); the first step is Euclidean."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4, bias=False).double()
    base = torch.optim.Adam(lin.parameters(), lr=0.01)
    opt = proxrank.ProxRank(base, lin, lam=1.0, metric=proxrank.metrics.AdamMetric(side="in"))
    lin2 = nn.Linear(5, 4, bias=False).double()  # the same run by hand
    lin2.weight.data.copy_(lin.weight.detach())
    adam2 = torch.optim.Adam(lin2.parameters(), lr=0.01)
    for step in range(3):
        x = torch.randn(7, 5, dtype=torch.float64)
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        opt.step()
        adam2.zero_grad()
        lin2(x).pow(2).sum().backward()
        b = None if step == 0 else damped(adam2.state[lin2.weight]["exp_avg_sq"].sum(0), 1e-2)
        adam2.step()
        with torch.no_grad():
            lin2.weight.copy_(proxrank.metrics.weighted_prox(lin2.weight.detach(), 0.01, None, b))
        torch.testing.assert_close(lin.weight.detach(), lin2.weight.detach(), rtol=0, atol=1e-12)


def test_activation_statistics_are_input_second_moments_in_training_mode_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    metric = proxrank.ActivationMetric(beta=0.5, max_full=3)  # layer 0 full, layer 1 diagonal
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.0), model, lam=0.0, metric=metric
    )
    xs = [torch.randn(4, 3) for _ in range(2)]
    hidden = []
    for x in xs:
        hidden.append(model[0](x).detach())  # also a forward of layer 0: counted
        model(x)
    model.eval()
    model(torch.randn(4, 3))  # eval forward: not counted
    full = [x.T @ x / 4 for x in xs]
    calls0 = [full[0], full[0], full[1], full[1]]
    exp0 = sum(0.5 * 0.5 ** (3 - t) * c for t, c in enumerate(calls0))
    s0 = opt.matrix("0.weight").metric_state
    torch.testing.assert_close(s0["activation"], exp0)
    assert s0["activation_count"] == 4
    diag = [(h**2).mean(0) for h in hidden]
    exp1 = 0.5 * 0.5 * diag[0] + 0.5 * diag[1]
    torch.testing.assert_close(opt.matrix("1.weight").metric_state["activation"], exp1)


def test_two_sided_uses_fisher_rows_and_activation_columns():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3, bias=False).double()
    opt = proxrank.ProxRank(
        torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.5, metric="two_sided"
    )
    x = torch.randn(6, 4, dtype=torch.float64)
    lin(x).pow(2).sum().backward()
    W_sgd = lin.weight.detach() - 0.1 * lin.weight.grad
    g = lin.weight.grad.clone()
    opt.step()
    a = damped(0.01 * (g**2).sum(1), 1e-2)
    b = damped(0.01 * x.T @ x / 6, 1e-2)
    expected = proxrank.metrics.weighted_prox(W_sgd, 0.05, a, b)
    torch.testing.assert_close(lin.weight.detach(), expected, rtol=0, atol=1e-12)


# -- hooks --------------------------------------------------------------------------------------
def n_hooks(model):
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("metric", ["euclidean", "fisher", "adam"])
def test_no_hooks_when_metric_needs_no_inputs(metric):
    model = mlp()
    proxrank.ProxRank(torch.optim.Adam(model.parameters()), model, lam=0.1, metric=metric)
    assert n_hooks(model) == 0


def test_hooks_removed_by_close_and_by_garbage_collection():
    model = mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="activation"
    )
    assert n_hooks(model) == 2
    opt.close()
    assert n_hooks(model) == 0
    model(torch.randn(2, 4)).sum().backward()
    opt.step()  # still works after close, and re-registers nothing
    assert n_hooks(model) == 0

    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="two_sided"
    )
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert n_hooks(model) == 2
    del opt
    gc.collect()
    assert n_hooks(model) == 0
    model(torch.randn(2, 4))  # no dangling hook fires


def test_hooks_follow_the_group_metric():
    model = mlp()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1)
    assert n_hooks(model) == 0
    opt.param_groups[0]["metric"] = "activation"
    opt.step()
    assert n_hooks(model) == 2
    opt.param_groups[0]["metric"] = "euclidean"
    opt.step()
    assert n_hooks(model) == 0


def test_per_group_metric():
    model = mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(
            [
                {"params": model[0].parameters(), "metric": "activation"},
                {"params": model[2].parameters()},
            ],
            lr=0.1,
        ),
        model,
        lam=0.1,
        metric="fisher",
    )
    assert len(model[0]._forward_pre_hooks) == 1 and len(model[2]._forward_pre_hooks) == 0
    model(torch.randn(5, 4)).pow(2).sum().backward()
    opt.step()

    assert set(opt.matrix("0.weight").metric_state) == {"activation", "activation_count"}
    assert set(opt.matrix("2.weight").metric_state) == {"fisher", "fisher_count"}


# -- training and resume ------------------------------------------------------------------------
def digits_like(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 16, generator=g)
    y = (X[:, :4].argmax(1)).long()
    return X, y


def train(model, opt, steps, X, y, start=0):
    losses = []
    for i in range(start, start + steps):
        idx = slice((i * 32) % len(X), (i * 32) % len(X) + 32)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def make(metric, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = proxrank.ProxRank(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model, lam=2.0, metric=metric
    )
    return model, opt


def test_training_with_fisher_metric_lowers_loss_and_rank():
    X, y = digits_like()
    model, opt = make("fisher")
    losses = train(model, opt, 60, X, y)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
    assert torch.linalg.matrix_rank(model[0].weight) < 16
    assert opt.matrix("0.weight").metric_state["fisher_count"] == 60


@pytest.mark.parametrize("metric", ["fisher", "two_sided"])
def test_resume_is_exact(metric):
    X, y = digits_like()
    model, opt = make(metric)
    train(model, opt, 10, X, y)

    model_a, opt_a = make(metric)
    train(model_a, opt_a, 5, X, y)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_b, opt_b = make(metric, seed=123)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    train(model_b, opt_b, 5, X, y, start=5)
    for p, q in zip(model.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(p, q)
    for info, info_b in zip(opt.matrices(), opt_b.matrices(), strict=True):
        for s, s_b in (
            (info.metric_state, info_b.metric_state),
            (info.backend_state, info_b.backend_state),
        ):
            assert s.keys() == s_b.keys()
            for k in s:
                if isinstance(s[k], torch.Tensor):
                    assert torch.equal(s[k], s_b[k])
                else:
                    assert s[k] == s_b[k]


def test_state_dict_holds_the_fisher_statistics():
    X, y = digits_like()
    model, opt = make("fisher")
    train(model, opt, 3, X, y)
    saved = opt.state_dict()["proxrank"]["matrices"]
    for entry, info in zip(saved, opt.matrices(), strict=True):
        assert entry["name"] == info.name and entry["metric"]["fisher_count"] == 3
        assert torch.equal(entry["metric"]["fisher"], info.metric_state["fisher"])


# -- errors -------------------------------------------------------------------------------------
def test_adam_metric_with_sgd_is_refused():
    model = mlp()
    with pytest.raises(ValueError, match=r"metric='adam'.*SGD.*metric='fisher'"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="adam"
        )


class Momentum(torch.optim.Optimizer):
    """A base optimizer with state but no second moment."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad)
                    p.data.add_(buf, alpha=-group["lr"])


def test_adam_metric_without_second_moment_state_raises_before_anything_changes():
    """An unknown optimizer's state is only seen once it exists: the first step (no state yet)
    is Euclidean; the next raises before the base step, leaving weights and state alone."""
    model = mlp()
    opt = proxrank.ProxRank(Momentum(model.parameters()), model, lam=0.01, metric="adam")
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    weights = [p.detach().clone() for p in model.parameters()]
    moments = [opt.state[p]["momentum"].clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"metric='adam'.*\['momentum'\]"):
        opt.step()
    assert opt.step_count == 1
    for p, w, mom in zip(model.parameters(), weights, moments, strict=True):
        assert torch.equal(p.detach(), w) and torch.equal(opt.state[p]["momentum"], mom)


def test_unknown_metric():
    model = mlp()
    with pytest.raises(ValueError, match="metric='kfac' is not a known metric"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="kfac"
        )
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1)
    opt.param_groups[0]["metric"] = "nope"
    model(torch.randn(3, 4)).sum().backward()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['metric'\]='nope'"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("damping", [0, -1.0, math.nan, math.inf])
def test_bad_damping(damping):
    with pytest.raises(ValueError, match="damping must be finite and > 0"):
        FisherMetric(damping=damping)


def test_bad_metric_settings():
    with pytest.raises(TypeError, match="damping must be a real number"):
        proxrank.ActivationMetric(damping="1e-2")
    with pytest.raises(ValueError, match="side must be 'out'"):
        FisherMetric(side="rows")
    with pytest.raises(ValueError, match="beta must be in"):
        FisherMetric(beta=1.0)
    with pytest.raises(ValueError, match="max_full must be an int"):
        proxrank.ActivationMetric(max_full=-1)
    with pytest.raises(TypeError):
        get_metric("fisher", alpha=0.5)


def test_activation_metric_refuses_conv_and_named_parameters():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(
        ValueError,
        match=r"nn.Linear and transformers' Conv1D weights only; '0.weight' belongs to a Conv2d",
    ):
        proxrank.ProxRank(
            torch.optim.SGD(conv.parameters(), lr=0.1), conv, lam=0.1, metric="activation"
        )
    assert n_hooks(conv) == 0
    model = mlp()
    with pytest.raises(ValueError, match="needs the model"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model.named_parameters(),
            lam=0.1,
            metric="activation",
        )


def test_fisher_metric_on_conv_trains():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 6, 3), nn.Flatten(), nn.Linear(6 * 16, 3))
    opt = proxrank.ProxRank(
        torch.optim.SGD(conv.parameters(), lr=0.1), conv, lam=0.5, metric="fisher"
    )
    conv(torch.randn(4, 2, 6, 6)).pow(2).mean().backward()
    opt.step()
    assert opt.matrix("0.weight").metric_state["fisher"].shape == (6,)
    assert torch.isfinite(conv[0].weight).all()


def test_custom_metric_with_constant_statistics_equals_euclidean_exactly():
    class Constant(Metric):
        name = "constant"

        def statistics(self, state, base_state, shape):
            return torch.ones(shape[0]), torch.ones(shape[1])

    runs = []
    for metric in ("euclidean", Constant()):
        X, y = digits_like()
        model, opt = make(metric)
        train(model, opt, 3, X, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs, strict=True):
        assert torch.equal(p, q)


def test_overflowing_activation_statistics_are_not_stored_and_the_step_raises_naming_the_weight():
    model = mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="activation"
    )
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    before = [info.metric_state for info in opt.matrices()]
    x = torch.randn(3, 4)
    x[0, 0] = 1e30  # finite, but x x^T overflows float32
    opt.zero_grad()
    model(x).sum().backward()  # the forward itself does not fail
    after = [info.metric_state for info in opt.matrices()]
    for b, a in zip(before, after, strict=True):
        assert b.keys() == a.keys() and all(b[k] is a[k] for k in b)  # nothing stored
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="weight '0.weight': the activation statistic"):
        opt.step()
    assert opt.step_count == 1
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)


def test_activation_statistics_are_float32_outside_autocast():
    model = mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, metric="activation"
    )
    x = torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[1](model[0](x))  # the second layer's input, in bfloat16
        model(x)
    assert h.dtype == torch.bfloat16
    stat = opt.matrix("2.weight").metric_state["activation"]
    assert stat.dtype == torch.float32
    h = h.float()
    torch.testing.assert_close(stat, 0.01 * (h.T @ h) / 6)  # (1 - beta) E[h h^T] in float32

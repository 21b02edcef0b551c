"""ProxRank with SGD is proximal gradient descent: equality with a hand-written loop, the known
minimiser of a separable problem, monotone decrease and the O(1/k) rate (BACKGROUND.md 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ref_svt
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import proxrank


def nuclear(W: np.ndarray) -> float:
    return float(np.linalg.svd(W, compute_uv=False).sum())


class LeastSquares:
    """f(W) = 0.5 ||X W^T - T||_F^2 for a bias-free Linear layer W (out x in), in float64."""

    def __init__(self, seed: int, n: int = 30, d_in: int = 8, d_out: int = 6):
        rng = np.random.default_rng(seed)
        self.X = rng.standard_normal((n, d_in))
        W_true = rng.standard_normal((d_out, 2)) @ rng.standard_normal((2, d_in))
        self.T = self.X @ W_true.T + 0.1 * rng.standard_normal((n, d_out))
        self.L = float(np.linalg.norm(self.X, 2) ** 2)  # Lipschitz constant of grad f
        self.W0 = rng.standard_normal((d_out, d_in))

    def f(self, W):
        return 0.5 * float(((self.X @ W.T - self.T) ** 2).sum())

    def grad(self, W):
        return (self.X @ W.T - self.T).T @ self.X

    def layer(self) -> nn.Linear:
        lin = nn.Linear(self.W0.shape[1], self.W0.shape[0], bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(self.W0))
        return lin

    def torch_loss(self, lin):
        X, T = torch.from_numpy(self.X), torch.from_numpy(self.T)
        return 0.5 * ((lin(X) - T) ** 2).sum()

    def run_proxrank(self, lam, eta, steps, prox="soft"):
        lin = self.layer()
        opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=eta), lin, lam=lam, prox=prox)
        path = []
        for _ in range(steps):
            opt.zero_grad()
            self.torch_loss(lin).backward()
            opt.step()
            path.append(lin.weight.detach().numpy().copy())
        return path

    def solve(self, lam, iters=4000):
        """High-precision reference minimiser of f + lam ||W||_*, by FISTA in float64."""
        eta = 1.0 / self.L
        W = Z = self.W0.copy()
        t = 1.0
        for _ in range(iters):
            W_next = ref_svt(Z - eta * self.grad(Z), lam * eta)
            t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
            Z = W_next + (t - 1) / t_next * (W_next - W)
            W, t = W_next, t_next
        return W


@given(st.integers(0, 10_000), st.floats(0.1, 5.0), st.floats(0.2, 1.0))
@settings(max_examples=10)
def test_sgd_wrapper_is_proximal_gradient_descent(seed, lam, step_frac):
    prob = LeastSquares(seed)
    eta = step_frac / prob.L
    path = prob.run_proxrank(lam, eta, 15)
    W = prob.W0
    for W_torch in path:
        W = ref_svt(W - eta * prob.grad(W), lam * eta)
        np.testing.assert_allclose(W_torch, W, rtol=1e-9, atol=1e-11)


@given(st.integers(0, 10_000), st.floats(0.05, 2.0), st.floats(0.3, 1.0))
@settings(max_examples=10)
def test_separable_problem_reaches_svt_of_target(seed, lam, lr):
    """f(W) = 0.5 ||W - Y||^2 has the minimiser svt(Y, lam); PGD with lr <= 1 converges to it."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2
    lin = nn.Linear(5, 7, bias=False).double()
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=lr), lin, lam=lam)
    for _ in range(80):
        opt.zero_grad()
        (0.5 * ((lin.weight - Y) ** 2).sum()).backward()
        opt.step()
    np.testing.assert_allclose(lin.weight.detach().numpy(), ref_svt(Y.numpy(), lam), atol=1e-9)


@given(st.integers(0, 10_000), st.floats(0.5, 20.0))
@settings(max_examples=6)
def test_monotone_decrease_and_one_over_k_rate(seed, lam):
    """With eta = 1/L: F(W_k) decreases and F(W_k) - F* <= ||W_0 - W*||^2 / (2 eta k)."""
    prob = LeastSquares(seed)
    eta = 1.0 / prob.L
    path = prob.run_proxrank(lam, eta, 60)
    F_path = [prob.f(W) + lam * nuclear(W) for W in path]
    W_star = prob.solve(lam)
    F_star = prob.f(W_star) + lam * nuclear(W_star)
    F0 = prob.f(prob.W0) + lam * nuclear(prob.W0)
    scale = max(1.0, abs(F_star))
    assert all(b <= a + 1e-10 * scale for a, b in zip([F0, *F_path], F_path, strict=False))
    dist2 = float(((prob.W0 - W_star) ** 2).sum())
    for k, Fk in enumerate(F_path, start=1):
        assert Fk - F_star <= dist2 / (2 * eta * k) + 1e-9 * scale
    assert F_path[-1] - F_star < 1e-2 * (F0 - F_star)  # and it actually gets close


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0), torch.tensor(y)


def _train_mlp(lam, steps=60, reference=False):
    """A 64-48-32-10 MLP in float64 trained with AdamW, full batch, on scikit-learn digits.
    lam=None: no prox. reference=True: plain AdamW followed by a NumPy float64 SVT, by hand."""
    X, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)
    ).double()
    lr = 1e-2
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if lam is not None and not reference:
        opt = proxrank.ProxRank(opt, model, lam=lam)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        if reference:
            with torch.no_grad():
                for lin in model[::2]:
                    lin.weight.copy_(torch.from_numpy(ref_svt(lin.weight.numpy(), lam * lr)))
    acc = float((model(X).argmax(1) == y).double().mean())
    return [lin.weight.detach() for lin in model[::2]], acc


@pytest.mark.slow
def test_small_model_ends_low_rank_and_matches_float64_reference():
    lam = 3.0
    plain, acc_plain = _train_mlp(None)
    ours, acc_ours = _train_mlp(lam)
    ref, _ = _train_mlp(lam, reference=True)
    for W, R in zip(ours, ref, strict=True):
        np.testing.assert_allclose(W.numpy(), R.numpy(), rtol=1e-7, atol=1e-9)

    def rank(W):
        return int(torch.linalg.matrix_rank(W, rtol=1e-6))

    ranks_plain = [rank(W) for W in plain]
    ranks_ours = [rank(W) for W in ours]
    assert ranks_plain == [min(W.shape) for W in plain]
    assert all(r <= 0.5 * rp for r, rp in zip(ranks_ours, ranks_plain, strict=True)), ranks_ours
    assert acc_ours > 0.85 and acc_plain > 0.85

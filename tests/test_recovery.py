"""proxrank.recovery: problems, surrogates, deep linear networks and their spectral init."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ref_svt
from hypothesis import given
from hypothesis import strategies as st

import proxrank
from proxrank.recovery import Completion, DeepLinear, Factorization, Sensing, relative_error

ROOT = Path(__file__).resolve().parents[1]


def train(net: DeepLinear, problem, lr: float, iters: int, tol: float = 0.0) -> list[float]:
    """Plain gradient descent on ``problem.loss(net.matrix())``: the error before each step,
    stopping once it is at most ``tol``."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    errors = []
    for _ in range(iters):
        X = net.matrix()
        errors.append(problem.error(X))
        if errors[-1] <= tol:
            break
        opt.zero_grad()
        problem.loss(X).backward()
        opt.step()
    return errors


@st.composite
def gapped(draw, min_side=2, max_side=9):
    """A float64 matrix with well-separated singular values (so its singular subspaces are
    well defined) and a rank ``r`` with ``2r <= min(m, n)``."""
    m, n = draw(st.integers(min_side, max_side)), draw(st.integers(min_side, max_side))
    k = min(m, n)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    P = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    s = torch.arange(k, 0, -1, dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 30.0]))
    return (P * s) @ Q.T, draw(st.integers(1, k // 2))


# -- DeepLinear -------------------------------------------------------------------------------


@given(
    st.integers(1, 7), st.integers(1, 7), st.integers(2, 4), st.integers(1, 7),
    st.sampled_from([1e-2, 0.3, 1.0]),
)  # fmt: skip
def test_deep_linear_matrix_forward_and_orthogonal_init(m, n, depth, width, scale):
    net = DeepLinear(m, n, depth, width, scale, dtype=torch.float64)
    Ws = [layer.weight.detach().numpy() for layer in net.layers]
    assert [W.shape for W in Ws] == [(width, n)] + [(width, width)] * (depth - 2) + [(m, width)]
    ref = Ws[0]
    for W in Ws[1:]:
        ref = W @ ref
    np.testing.assert_allclose(net.matrix().detach().numpy(), ref, rtol=1e-12, atol=1e-300)
    x = torch.randn(5, n, dtype=torch.float64)
    np.testing.assert_allclose(net(x).detach().numpy(), x.numpy() @ ref.T, rtol=1e-10, atol=1e-14)
    for W in Ws:  # scale times a (semi-)orthogonal matrix
        G = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        np.testing.assert_allclose(G, scale**2 * np.eye(len(G)), atol=1e-12 * scale**2)


def test_deep_linear_generator_reproducible_and_selected_by_proxrank():
    a = DeepLinear(6, 5, 3, 4, generator=torch.Generator().manual_seed(3))
    b = DeepLinear(6, 5, 3, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.matrix(), b.matrix(), rtol=0, atol=0)
    opt = proxrank.ProxRank(torch.optim.SGD(a.parameters(), lr=0.1), a, lam=1.0)
    assert [t.name for t in opt.targets] == [f"layers.{i}.weight" for i in range(3)]


def test_proxrank_on_deep_linear_is_sgd_then_svt():
    """One ProxRank step on the layers equals an SGD step followed by the float64 SVT."""
    problem = Factorization.random(8, 6, 2, seed=1)
    net = DeepLinear(8, 6, 3, 5, 0.5, dtype=torch.float64, generator=torch.Generator())
    lr, lam = 0.1, 0.3
    opt = proxrank.ProxRank(torch.optim.SGD(net.parameters(), lr=lr), net, lam=lam, backend="exact")
    problem.loss(net.matrix()).backward()
    expected = [ref_svt((p - lr * p.grad).detach().numpy(), lr * lam) for p in net.parameters()]
    opt.step()
    for p, ref in zip(net.parameters(), expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), ref, atol=1e-12)


# -- spectral init and compress ---------------------------------------------------------------


def polar_of_truncation(S: np.ndarray, k: int) -> np.ndarray:
    """Reference: T (T^T T)^{+1/2} with T the best rank-k approximation of S (eigh, not an SVD
    of T)."""
    U, s, Vt = np.linalg.svd(S)
    T = (U[:, :k] * s[:k]) @ Vt[:k]
    w, E = np.linalg.eigh(T.T @ T)
    inv_sqrt = np.where(w > 1e-9 * w.max(), 1 / np.sqrt(np.maximum(w, 1e-300)), 0.0)
    return T @ (E * inv_sqrt) @ E.T


@given(gapped(), st.integers(2, 4), st.sampled_from([1e-2, 0.5, 1.0]))
def test_spectral_init_is_scaled_polar_factor_of_top_2r_part(sr, depth, scale):
    S, r = sr
    net = DeepLinear.spectral(S, r, depth, scale)
    assert net.width == 2 * r and net.depth == depth and net.matrix().dtype == torch.float64
    X0 = net.matrix().detach().numpy()
    np.testing.assert_allclose(X0, scale**depth * polar_of_truncation(S.numpy(), 2 * r),
                               atol=1e-9 * scale**depth)  # fmt: skip
    # Ky Fan: <X0, S> is scale^depth times the sum of the top 2r singular values of S
    s = np.linalg.svd(S.numpy(), compute_uv=False)
    assert np.sum(X0 * S.numpy()) == pytest.approx(scale**depth * s[: 2 * r].sum(), rel=1e-10)
    W1, WL = net.layers[0].weight.detach(), net.layers[-1].weight.detach()
    torch.testing.assert_close(W1 @ W1.T, scale**2 * torch.eye(2 * r, dtype=torch.float64))
    torch.testing.assert_close(WL.T @ WL, scale**2 * torch.eye(2 * r, dtype=torch.float64))
    for layer in net.layers[1:-1]:
        torch.testing.assert_close(layer.weight.detach(), scale * torch.eye(2 * r).double())


@given(gapped(min_side=4), st.integers(2, 3))
def test_compress_uses_the_surrogate_or_the_network_itself(sr, depth):
    S, r = sr
    m, n = S.shape
    fresh = DeepLinear(m, n, depth, 7, 0.1, dtype=torch.float64)
    expected = DeepLinear.spectral(S, r, depth, 0.1).matrix()
    torch.testing.assert_close(fresh.compress(r, S).matrix(), expected)
    trained = DeepLinear(m, n, 2, n, dtype=torch.float64)  # its end-to-end matrix: S
    with torch.no_grad():
        trained.layers[0].weight.copy_(torch.eye(n))
        trained.layers[1].weight.copy_(S)
    own = trained.compress(r)
    assert own.width == 2 * r and own.init_scale == trained.init_scale
    torch.testing.assert_close(own.matrix(), DeepLinear.spectral(S, r, 2, 1e-2).matrix())


def test_fresh_compress_keeps_its_own_subspaces():
    """Without a surrogate a fresh network's top-2r subspaces become the compressed init."""
    net = DeepLinear(10, 8, 3, 8, 0.1, dtype=torch.float64, generator=torch.Generator())
    small = net.compress(2)
    X, Xc = net.matrix().detach(), small.matrix().detach()
    # X is 0.1^3 times a matrix with orthonormal columns: Xc is X on a 4-dim row subspace
    P = Xc.T @ Xc / 1e-3**2  # projector onto Xc's row space (its singular values are 1e-3)
    torch.testing.assert_close(P @ P, P)
    torch.testing.assert_close(X @ P, Xc)


# -- recovery ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spectral", [True, False])
def test_factorization_recovers_a_low_rank_target(spectral, one_thread):
    """Gradient descent recovers X* up to the O(init_scale^depth) residue of the initialisation
    (directions the target does not pull on keep their init size)."""
    problem = Factorization.random(12, 10, 2, seed=0)
    eps, depth = 1e-2, 3
    if spectral:
        net = DeepLinear.spectral(problem.surrogate(), 2, depth, eps)
    else:
        net = DeepLinear(12, 10, depth, 10, eps, dtype=torch.float64, generator=torch.Generator())
    errors = train(net, problem, lr=0.2, iters=1500)
    residue = eps**depth * math.sqrt(10) / float(torch.linalg.matrix_norm(problem.target))
    assert errors[-1] <= 2 * residue < 1e-5
    s = torch.linalg.svdvals(net.matrix().detach())
    torch.testing.assert_close(s[:2], torch.linalg.svdvals(problem.target)[:2], rtol=1e-5, atol=0)


def test_spectral_beats_original_and_random_on_completion(one_thread):
    """The issue's check: d = 100, rank 5, 30% observed, depth 3, init 1e-2, float64, the same
    step: spectral reaches 1e-3 in fewer iterations than width 100 and than random width 2r."""
    problem = Completion.random(100, 100, 5, 0.3, seed=0)
    gen = torch.Generator().manual_seed(0)
    original = DeepLinear(100, 100, 3, 100, dtype=torch.float64, generator=gen)
    spectral = DeepLinear.spectral(problem.surrogate(), 5, 3)
    random = DeepLinear(100, 100, 3, 10, dtype=torch.float64, generator=gen)
    n_spectral = len(train(spectral, problem, 0.2, 1300, tol=1e-3))
    n_original = len(train(original, problem, 0.2, 1300, tol=1e-3))
    assert n_spectral < n_original < 1300
    # the random compressed network has not reached 1e-3 when the spectral one has
    assert min(train(random, problem, 0.2, n_spectral)) > 1e-3


# -- problems and surrogates ------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem",
    [
        Factorization.random(5, 4, 2, seed=0),
        Completion.random(5, 4, 2, 0.5, seed=0),
        Sensing.random(5, 4, 2, 30, seed=0),
    ],
    ids=["factorization", "completion", "sensing"],
)
def test_surrogate_is_minus_gradient_at_zero(problem):
    X = torch.zeros(problem.shape, dtype=torch.float64, requires_grad=True)
    problem.loss(X).backward()
    torch.testing.assert_close(problem.surrogate(), -X.grad)
    assert relative_error(problem.target, problem.target) == 0.0
    assert problem.error(torch.zeros(problem.shape, dtype=torch.float64)) == pytest.approx(1.0)


def test_random_instances():
    comp = Completion.random(20, 10, 3, 0.3, seed=4)
    assert int(comp.mask.sum()) == 60 and comp.fraction == 0.3
    s = torch.linalg.svdvals(comp.target)
    torch.testing.assert_close(s[:3], torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64))
    assert s[3] < 1e-12
    torch.testing.assert_close(Completion.random(20, 10, 3, 0.3, seed=4).mask, comp.mask)
    assert not torch.equal(Completion.random(20, 10, 3, 0.3, seed=5).mask, comp.mask)
    sens = Sensing.random(6, 5, 2, 40, seed=1, dtype=torch.float32)
    assert sens.A.shape == (40, 6, 5) and sens.A.dtype == sens.y.dtype == torch.float32
    torch.testing.assert_close(sens.measure(sens.target), sens.y)
    fac = Factorization.random(3, 7, 1, seed=0)
    surrogate = fac.surrogate()
    surrogate.zero_()  # a copy: the target is untouched
    assert fac.target.abs().sum() > 0


@given(st.integers(1, 3), st.integers(1, 3), st.data())
def test_completion_surrogate_and_loss_are_unbiased_over_masks(m, n, data):
    """Exact expectation: the average over every mask with the same number of observed entries
    of the surrogate is X*, and of the loss is 1/2 ||X - X*||_F^2."""
    count = data.draw(st.integers(1, m * n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**20)))
    target = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    surrogates, losses = [], []
    for chosen in itertools.combinations(range(m * n), count):
        mask = torch.zeros(m * n, dtype=torch.bool)
        mask[list(chosen)] = True
        problem = Completion(target, mask.view(m, n))
        surrogates.append(problem.surrogate())
        losses.append(problem.loss(X))
    torch.testing.assert_close(torch.stack(surrogates).mean(0), target)
    torch.testing.assert_close(torch.stack(losses).mean(), 0.5 * (X - target).square().sum())


@given(st.integers(1, 2), st.integers(1, 2), st.integers(0, 2**20))
def test_sensing_surrogate_and_loss_exact_on_the_full_sign_ensemble(m, n, seed):
    """With every sign matrix as a measurement (E[A_ab A_cd] = delta exactly), the surrogate is
    X* and the loss is 1/2 ||X - X*||_F^2."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(m, n, generator=g, dtype=torch.float64)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=m * n)), dtype=torch.float64)
    A = signs.view(-1, m, n)
    problem = Sensing(A, (A * target).sum((1, 2)), target=target)
    torch.testing.assert_close(problem.surrogate(), target)
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(problem.loss(X), 0.5 * (X - target).square().sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_sensing_surrogate_concentrates_at_the_unbiased_rate(seed):
    """E ||S - X*||_F^2 = (m n + 1) ||X*||_F^2 / k for Gaussian A (a wrong scale of S would be off
    by a constant factor at this k)."""
    k, m, n = 4000, 6, 5
    problem = Sensing.random(m, n, 2, k, seed=seed)
    err = float((problem.surrogate() - problem.target).square().sum())
    expected = (m * n + 1) * float(problem.target.square().sum()) / k
    assert expected / 3 < err < 3 * expected


# -- errors -----------------------------------------------------------------------------------


def test_relative_error_reference_and_errors():
    X, T = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ref = np.linalg.norm(X.numpy() - T.numpy()) / np.linalg.norm(T.numpy())
    assert relative_error(X, T) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="target is zero"):
        relative_error(X, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        relative_error(X, torch.ones(4, 3))
    with pytest.raises(TypeError, match="target must be a 2-D"):
        relative_error(X, torch.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"depth": 1}, ValueError, "depth must be an integer >= 2"),
        ({"width": 0}, ValueError, "width must be an integer >= 1"),
        ({"m": 0}, ValueError, "m must be"),
        ({"n": 2.0}, ValueError, "n must be"),
        ({"init_scale": 0.0}, ValueError, "init_scale must be finite and > 0"),
        ({"init_scale": float("nan")}, ValueError, "init_scale"),
        ({"init_scale": True}, TypeError, "init_scale must be a real number"),
    ],
)
def test_deep_linear_errors(kwargs, err, match):
    args = {"m": 4, "n": 3, "depth": 3, "width": 2} | kwargs
    with pytest.raises(err, match=match):
        DeepLinear(**args)


def test_spectral_and_compress_errors():
    S = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"2 \* rank = 6 exceeds min\(m, n\) = 5"):
        DeepLinear.spectral(S, 3, 3)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        DeepLinear.spectral(S, 0, 3)
    with pytest.raises(TypeError, match="surrogate must be a 2-D floating-point"):
        DeepLinear.spectral(torch.ones(6, 5, dtype=torch.int64), 1, 3)
    with pytest.raises(ValueError, match="surrogate has non-finite"):
        DeepLinear.spectral(torch.full((6, 5), float("inf")), 1, 3)
    with pytest.raises(ValueError, match="depth"):
        DeepLinear.spectral(S, 1, 1)
    with pytest.raises(ValueError, match=r"surrogate has shape \(5, 6\)"):
        DeepLinear(6, 5, 3, 4).compress(1, S.T)


def test_problem_errors():
    T = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="target must be a 2-D"):
        Factorization(T[0])
    with pytest.raises(ValueError, match="target has non-finite"):
        Factorization(T * float("nan"))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        Completion(T, torch.ones(4, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        Completion(T, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="observes no entry"):
        Completion(T, torch.zeros(4, 3, dtype=torch.bool))
    A = torch.randn(5, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="A must be a 3-D"):
        Sensing(A[0], torch.ones(4))
    with pytest.raises(ValueError, match=r"y must have shape \(5,\)"):
        Sensing(A, torch.ones(4))
    with pytest.raises(ValueError, match="k must be >= 1"):
        Sensing(A[:0], torch.ones(0))
    with pytest.raises(ValueError, match="A and y must be finite"):
        Sensing(A, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match=r"target has shape \(3, 4\)"):
        Sensing(A, torch.ones(5), target=T.T)
    with pytest.raises(ValueError, match="has no target"):
        Sensing(A, torch.ones(5)).error(T)
    with pytest.raises(ValueError, match=r"X has shape \(3, 4\); this problem's matrices"):
        Factorization(T).loss(T.T)
    with pytest.raises(ValueError, match=r"rank 4 exceeds min\(m, n\) = 3"):
        Factorization.random(4, 3, 4)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        Completion.random(4, 3, 1, 0.0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        Completion.random(4, 3, 1, 1.5)
    with pytest.raises(ValueError, match="measurements must be an integer >= 1"):
        Sensing.random(4, 3, 1, 0)


# -- the benchmark ----------------------------------------------------------------------------


@pytest.mark.slow
def test_benchmark_quick_mode(tmp_path):
    out = tmp_path / "recovery.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "matrix_recovery.py"), "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["machine"]["threads"] == 1
    assert set(result["problems"]) == {"factorization", "completion", "sensing"}
    for name, problem in result["problems"].items():
        assert (tmp_path / f"recovery_{name}.png").exists()
        assert set(problem["summary"]) == {
            "original", "spectral", "compressed random", "ProxRank matrix", "ProxRank layers",
        }  # fmt: skip
        # the ProxRank matrix method ends at machine precision (debiased)
        assert problem["summary"]["ProxRank matrix"]["final_error"]["median"] < 1e-10
    assert (tmp_path / "recovery_subspace.png").exists()
    assert "spectral / original" in proc.stdout


@pytest.mark.slow
def test_readme_recovery_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if b.startswith("import proxrank\nimport torch\n")]  # fmt: skip
    assert len(blocks) == 1
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, check=True,
        timeout=300, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    errors = [float(e) for e in re.findall(r"error ([0-9.e+-]+)", out.stdout)]
    assert len(errors) == 2 and errors[0] < 1e-3 and errors[1] < 1e-3

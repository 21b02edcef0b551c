"""One-shot compression in a metric: proxrank.metrics.weighted_truncate and proxrank.compress."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import proxrank
from proxrank.functional import project_rank
from proxrank.metrics import damped, weighted_truncate

SETTINGS = settings(max_examples=25, deadline=None)


def random_spd(rng, k, diagonal):
    if diagonal:
        return np.diag(rng.uniform(0.05, 5.0, size=k))
    G = rng.standard_normal((k, k))
    return G @ G.T + 0.1 * np.eye(k)


def weighted_error(X, W, A, B):
    """||A^{1/2} (W - X) B^{1/2}||_F^2 = tr((W - X)^T A (W - X) B)."""
    D = W - X
    return float(np.trace(D.T @ A @ D @ B))


def reference_truncate(W, r, A, B):
    """Float64 numpy closed form with Cholesky factors A = La La^T, B = Lb Lb^T:
    X = La^{-T} [La^T W Lb]_r Lb^{-1}."""
    La, Lb = np.linalg.cholesky(A), np.linalg.cholesky(B)
    U, s, Vt = np.linalg.svd(La.T @ W @ Lb)
    Z = (U[:, :r] * s[:r]) @ Vt[:r]
    return np.linalg.solve(La.T, Z) @ np.linalg.inv(Lb)


@SETTINGS
@given(
    shape=st.tuples(st.integers(2, 6), st.integers(2, 6)),
    seed=st.integers(0, 2**31 - 1),
    diag_a=st.booleans(),
    diag_b=st.booleans(),
    data=st.data(),
)
def test_weighted_truncation_is_optimal(shape, seed, diag_a, diag_b, data):
    m, n = shape
    r = data.draw(st.integers(1, min(m, n)))
    rng = np.random.default_rng(seed)
    A, B = random_spd(rng, m, diag_a), random_spd(rng, n, diag_b)
    W = rng.standard_normal((m, n))
    arg = {True: lambda M: torch.from_numpy(np.diag(M).copy()), False: torch.from_numpy}
    X = weighted_truncate(torch.from_numpy(W), r, arg[diag_a](A), arg[diag_b](B)).numpy()
    assert np.linalg.matrix_rank(X, tol=1e-8) <= r
    np.testing.assert_allclose(X, reference_truncate(W, r, A, B), atol=1e-8)
    best = weighted_error(X, W, A, B)
    for _ in range(20):  # random rank-r candidates, and rank-r perturbations of X
        C = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
        assert best <= weighted_error(C, W, A, B) + 1e-10
        U, s, Vt = np.linalg.svd(X)
        eps = 10.0 ** rng.uniform(-5, -1)
        Up = U[:, :r] + eps * rng.standard_normal((m, r))
        Vp = Vt[:r] + eps * rng.standard_normal((r, n))
        assert best <= weighted_error((Up * s[:r]) @ Vp, W, A, B) + 1e-10


# -- compress -----------------------------------------------------------------------------------
def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)).to(dtype)


def batches(k=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 4, (16,), generator=g))
        for _ in range(k)
    ]


def test_euclidean_compress_is_the_truncated_svd():
    model = mlp()
    W = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    report = proxrank.compress(model, rank=3)
    for layer, w, rep in zip((model[0], model[2]), W, report, strict=True):
        torch.testing.assert_close(layer.weight.detach(), project_rank(w, 3), rtol=0, atol=1e-12)
        fro = float(torch.linalg.norm(w - layer.weight.detach()) / torch.linalg.norm(w))
        assert (
            rep.rank == 3
            and rep.error == pytest.approx(fro)
            and rep.frobenius_error == pytest.approx(fro)
        )
        assert rep.params_before == w.numel()
        assert rep.params_after == min(3 * sum(rep.shape), w.numel())  # never more than dense
    assert [r.name for r in report] == ["0.weight", "2.weight"]


def test_ratio_gives_the_largest_rank_within_the_parameter_budget():
    model = mlp()
    report = proxrank.compress(model, ratio=0.5)
    for rep in report:
        m, n = rep.shape
        assert rep.rank * (m + n) <= 0.5 * m * n < (rep.rank + 1) * (m + n)
    tiny = proxrank.compress(mlp(), ratio=0.01)
    assert [r.rank for r in tiny] == [1, 1]
    capped = proxrank.compress(mlp(), rank=50)
    assert [r.rank for r in capped] == [6, 4]


def test_activation_compress_whitens_with_the_mean_input_second_moment():
    model, ref = mlp(), mlp()
    data = batches()
    report = proxrank.compress(model, rank=2, metric="activation", data=data)
    X0 = torch.cat([x for x, _ in data])
    H = torch.relu(ref[0](X0)).detach()
    for layer, inputs, rep in ((ref[0], X0, report[0]), (ref[2], H, report[1])):
        B = damped(inputs.T @ inputs / len(inputs), 1e-2)  # equal batch sizes: mean of means
        expected = weighted_truncate(layer.weight.detach(), 2, None, B)
        got = dict(model.named_parameters())[rep.name].detach()
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        assert rep.error < rep.frobenius_error or rep.error == pytest.approx(rep.frobenius_error)


def test_fisher_compress_uses_mean_squared_gradients_and_leaves_grads_and_mode_alone():
    model, ref = mlp(), mlp()
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    data = batches()
    proxrank.compress(model, rank=2, metric="fisher", data=data)
    assert model.training
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[2].weight.grad is None
    ref.eval()
    sums = [torch.zeros(10, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)]
    for x, y in data:
        gs = torch.autograd.grad(
            nn.functional.cross_entropy(ref(x), y), [ref[0].weight, ref[2].weight]
        )
        for s, g in zip(sums, gs, strict=True):
            s += (g**2).sum(1) / len(data)
    for layer, got, s in ((ref[0], model[0], sums[0]), (ref[2], model[2], sums[1])):
        expected = weighted_truncate(layer.weight.detach(), 2, damped(s, 1e-2), None)
        torch.testing.assert_close(got.weight.detach(), expected, rtol=0, atol=1e-10)


def test_compress_conv_with_fisher_and_half_precision():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Linear(5 * 16, 3))
    data = [(torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,)))]
    report = proxrank.compress(conv, rank=2, metric="fisher", data=data)
    assert report[0].shape == (5, 18) and torch.linalg.matrix_rank(conv[0].weight.flatten(1)) <= 2
    half = mlp(torch.bfloat16)
    proxrank.compress(half, rank=2, metric="activation", data=batches(dtype=torch.bfloat16))
    assert half[0].weight.dtype == torch.bfloat16 and torch.isfinite(half[0].weight).all()


def test_compress_removes_its_hooks_even_on_error():
    model = mlp()

    def bad_data():
        yield batches()[0]
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        proxrank.compress(model, rank=2, metric="activation", data=bad_data())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0
    proxrank.compress(model, rank=2, metric="two_sided", data=batches())
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of rank"),
        ({"rank": 2, "ratio": 0.5}, "exactly one of rank"),
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"rank": 2.0}, "rank must be an int >= 1"),
        ({"ratio": 0.0}, r"ratio must be in \(0, 1\]"),
        ({"ratio": 1.5}, r"ratio must be in \(0, 1\]"),
        ({"ratio": float("nan")}, r"ratio must be in \(0, 1\]"),
        ({"rank": 2, "metric": "adam"}, "metric='adam'.*one-shot"),
        ({"rank": 2, "metric": "kfac"}, "not a known metric"),
        ({"rank": 2, "metric": "fisher"}, "pass data="),
        ({"rank": 2, "metric": "fisher", "data": [torch.randn(3, 6)]}, r"\(inputs, targets\)"),
        ({"rank": 2, "metric": "activation", "data": []}, "data yielded no batch"),
        ({"rank": 2, "include": "nothing*"}, "no weight matrix selected"),
    ],
)
def test_compress_errors_leave_the_model_unchanged(kwargs, match):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        proxrank.compress(model, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_compress_activation_refuses_conv():
    conv = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.Linear(5 * 16, 3))
    with pytest.raises(ValueError, match=r"nn\.Linear and transformers' Conv1D weights only"):
        proxrank.compress(conv, rank=2, metric="activation", data=[torch.randn(2, 2, 6, 6)])

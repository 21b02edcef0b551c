"""Properties of the spectral maps in proxrank.functional (BACKGROUND.md section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import matrices, ref_hard, ref_svt
from hypothesis import given
from hypothesis import strategies as st

from proxrank import functional as F
from proxrank.backends import ExactBackend
from proxrank.prox import HardThreshold, SoftThreshold, get_prox

taus = st.floats(0.0, 5.0)


@given(matrices(), taus)
def test_moreau_identity(Y, tau):
    torch.testing.assert_close(
        F.svt(Y, tau) + F.project_spectral_ball(Y, tau), Y, rtol=1e-10, atol=1e-10
    )


@given(matrices(), st.floats(1e-3, 5.0))
def test_svt_optimality_conditions(Y, tau):
    """X = svt(Y, tau) iff Y - X = tau (U_r V_r^T + Z), U_r^T Z = 0, Z V_r = 0, ||Z||_2 <= 1."""
    X = F.svt(Y, tau)
    U, s, Vh = torch.linalg.svd(X, full_matrices=False)
    r = int((s > 1e-9 * max(1.0, float(Y.abs().max()))).sum())
    Ur, Vr = U[:, :r], Vh[:r].T
    Z = (Y - X) / tau - Ur @ Vr.T
    atol = 1e-8 * max(1.0, float(Y.abs().max()) / tau)
    torch.testing.assert_close(
        Ur.T @ Z, torch.zeros(r, Y.shape[1], dtype=Y.dtype), atol=atol, rtol=0
    )
    torch.testing.assert_close(Z @ Vr, torch.zeros(Y.shape[0], r, dtype=Y.dtype), atol=atol, rtol=0)
    assert float(torch.linalg.matrix_norm(Z, ord=2)) <= 1 + atol


@given(matrices(min_side=2, max_side=6), st.integers(0, 2**31 - 1), taus)
def test_svt_firmly_nonexpansive(Y1, seed, tau):
    """<P(Y1) - P(Y2), Y1 - Y2> >= ||P(Y1) - P(Y2)||^2 (implies ||P(Y1)-P(Y2)|| <= ||Y1-Y2||)."""
    g = torch.Generator().manual_seed(seed)
    Y2 = Y1 + torch.randn(Y1.shape, generator=g, dtype=Y1.dtype) * float(Y1.abs().max() + 1)
    d = F.svt(Y1, tau) - F.svt(Y2, tau)
    inner = float((d * (Y1 - Y2)).sum())
    assert inner >= float((d * d).sum()) - 1e-9 * max(1.0, inner)
    assert float(d.norm()) <= float((Y1 - Y2).norm()) * (1 + 1e-12) + 1e-12


@given(matrices(), st.integers(0, 2**31 - 1), taus)
def test_orthogonal_equivariance(Y, seed, tau):
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(Y.shape[0], Y.shape[0], generator=g, dtype=Y.dtype))[0]
    Q = torch.linalg.qr(torch.randn(Y.shape[1], Y.shape[1], generator=g, dtype=Y.dtype))[0]
    for fn in (F.svt, F.hard_threshold):
        torch.testing.assert_close(fn(P @ Y @ Q, tau), P @ fn(Y, tau) @ Q, rtol=1e-9, atol=1e-9)


@given(matrices(), taus)
def test_agrees_with_float64_numpy_reference(Y, tau):
    np.testing.assert_allclose(F.svt(Y, tau).numpy(), ref_svt(Y.numpy(), tau), atol=1e-10)
    # hard thresholding is discontinuous at s = sqrt(2 tau): compare away from the jump
    s = np.linalg.svd(Y.numpy(), compute_uv=False)
    if np.all(np.abs(s - np.sqrt(2 * tau)) > 1e-6):
        np.testing.assert_allclose(
            F.hard_threshold(Y, tau).numpy(), ref_hard(Y.numpy(), tau), atol=1e-10
        )


@given(matrices(), st.floats(1e-3, 5.0))
def test_hard_threshold_is_the_rank_penalty_prox(Y, tau):
    """0.5||X - Y||^2 + tau rank(X) at X = hard_threshold(Y) equals the minimum over all ranks k
    of the best rank-k objective 0.5 sum_{i>k} s_i^2 + tau k (Eckart-Young)."""
    X = F.hard_threshold(Y, tau)
    s = torch.linalg.svdvals(Y)
    rank_x = int((torch.linalg.svdvals(X) > 1e-9 * max(1.0, float(s.max()))).sum())
    ours = 0.5 * float(((X - Y) ** 2).sum()) + tau * rank_x
    best = min(0.5 * float((s[k:] ** 2).sum()) + tau * k for k in range(len(s) + 1))
    assert ours == pytest.approx(best, rel=1e-9, abs=1e-9)


@given(matrices(), st.integers(0, 8))
def test_project_rank_is_eckart_young(Y, r):
    X = F.project_rank(Y, r)
    s = torch.linalg.svdvals(Y)
    assert int(torch.linalg.matrix_rank(X)) <= r
    assert float(((X - Y) ** 2).sum()) == pytest.approx(float((s[r:] ** 2).sum()), abs=1e-9)


@given(matrices(batch=True), st.integers(0, 2**31 - 1))
def test_batch_equals_loop(Y, seed):
    g = torch.Generator().manual_seed(seed)
    tau = torch.rand(Y.shape[0], generator=g, dtype=Y.dtype) * 2
    for fn in (F.svt, F.hard_threshold, F.project_spectral_ball):
        batched = fn(Y, tau)
        for i in range(Y.shape[0]):
            torch.testing.assert_close(batched[i], fn(Y[i], float(tau[i])), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_computed_in_float32(dtype):
    torch.manual_seed(0)
    Y = torch.randn(12, 7).to(dtype)
    out = F.svt(Y, 0.5)
    assert out.dtype == dtype
    ref = torch.from_numpy(ref_svt(Y.double().numpy(), 0.5))
    # error is that of rounding the float32 result to the dtype, not of a half-precision SVD
    eps = torch.finfo(dtype).eps
    assert float((out.double() - ref).abs().max()) <= 4 * eps * float(ref.abs().max()) + 1e-6


def test_prox_step_matches_svt_and_returns_triplets():
    torch.manual_seed(1)
    Y = torch.randn(9, 5, dtype=torch.float64)
    res = F.prox_step(Y, 0.7, SoftThreshold(), ExactBackend())
    torch.testing.assert_close(res.X, F.svt(Y, 0.7))
    torch.testing.assert_close(res.S_new, (torch.linalg.svdvals(Y) - 0.7).clamp_min(0))
    torch.testing.assert_close((res.svd.U * res.svd.S) @ res.svd.Vh, Y)
    assert float(res.svd.error_bound) == 0.0
    res_h = F.prox_step(Y, 0.7, HardThreshold(), ExactBackend())
    torch.testing.assert_close(res_h.X, F.hard_threshold(Y, 0.7))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: F.svt(torch.randn(3, 3), -1.0), "tau must be finite and >= 0"),
        (lambda: F.svt(torch.randn(3, 3), float("nan")), "tau must be finite"),
        (lambda: F.svt(torch.randn(3), 1.0), r"shape \(\.\.\., m, n\)"),
        (lambda: F.svt(torch.ones(3, 3, dtype=torch.int64), 1.0), "dtype torch.int64"),
        (lambda: F.svt([[1.0]], 1.0), "must be a torch.Tensor"),
        (lambda: F.project_rank(torch.randn(3, 3), -1), "rank must be an int >= 0"),
        (lambda: F.project_rank(torch.randn(3, 3), 1.5), "rank must be an int >= 0"),
        (lambda: F.project_spectral_ball(torch.randn(3, 3), -2), "radius must be finite"),
        (lambda: get_prox("softest"), "prox='softest' is not a known prox map"),
    ],
)
def test_error_paths(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()

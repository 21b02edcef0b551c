"""NN-BCD (``proxrank.bcd``): every closed-form block update is the minimiser of its block
(checked against numerical minimisers in float64), and a fit has the paper's convergence
properties: non-increasing objective, sufficient decrease, summable steps, O(1/k) best step."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from proxrank.bcd import (
    NNBCD,
    activation_update,
    compressed_update,
    last_preactivation_update,
    output_update,
    relu_prox,
    weight_update,
)
from proxrank.sparsity import keep_largest
from proxrank.tt import tt_round

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def prune(w, k):
    """The projection onto at most ``k`` nonzeros of the whole matrix."""
    return keep_largest(w.reshape(-1), k).reshape(w.shape)


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=D)


def lbfgs_min(f, starts, iters=200):
    """The smallest value LBFGS (strong Wolfe) reaches on ``f`` over its blocks, from each start."""
    best = math.inf
    for start in starts:
        xs = [s.clone().requires_grad_(True) for s in start]
        opt = torch.optim.LBFGS(
            xs,
            max_iter=iters,
            tolerance_grad=1e-14,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def closure(xs=xs, opt=opt):
            opt.zero_grad()
            loss = f(*xs)
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, float(f(*xs).detach()))
    return best


def sq(t):
    return torch.sum(t**2)


# -- each block update minimises its block ------------------------------------------------

HYPER = {"gamma": 1.7, "rho": 0.6, "alpha": 0.3, "tau": 2.5}


def assert_minimises(f, closed, starts):
    value = float(f(*closed))
    assert value <= lbfgs_min(f, starts) + 1e-9 * (1 + abs(value))


@pytest.mark.parametrize("seed", range(3))
def test_output_and_last_preactivation_updates_are_block_minimisers(seed):
    g = torch.Generator().manual_seed(seed)
    gm, r, a = HYPER["gamma"], HYPER["rho"], HYPER["alpha"]
    y, u, v_prev, A, u_prev = (randn(5, 3, g=g) for _ in range(5))

    def f_out(v):
        return 0.5 * sq(v - y) + gm / 2 * sq(v - u) + a / 2 * sq(v - v_prev)

    assert_minimises(f_out, [output_update(y, u, v_prev, gm, a)], [[v_prev], [randn(5, 3, g=g)]])

    def f_pre(uu):
        return gm / 2 * sq(v_prev - uu) + r / 2 * sq(uu - A) + a / 2 * sq(uu - u_prev)

    closed = last_preactivation_update(v_prev, A, u_prev, gm, r, a)
    assert_minimises(f_pre, [closed], [[u_prev], [randn(5, 3, g=g)]])


@pytest.mark.parametrize("bias", [True, False])
def test_activation_update_is_the_block_minimiser(bias):
    g = torch.Generator().manual_seed(1)
    gm, r, a = HYPER["gamma"], HYPER["rho"], HYPER["alpha"]
    u, v_prev = randn(6, 4, g=g), randn(6, 4, g=g)
    u_next, w_next = randn(6, 3, g=g), randn(3, 4, g=g)
    b_next = randn(3, g=g) if bias else None

    def f(v):
        pre = v @ w_next.T + (0 if b_next is None else b_next)
        return gm / 2 * sq(v - u.clamp(min=0)) + r / 2 * sq(u_next - pre) + a / 2 * sq(v - v_prev)

    closed = activation_update(u, u_next, w_next, b_next, v_prev, gm, r, a)
    assert_minimises(f, [closed], [[v_prev], [randn(6, 4, g=g)]])


@pytest.mark.parametrize(("bias", "coupled"), list(itertools.product([True, False], repeat=2)))
def test_weight_update_is_the_joint_block_minimiser(bias, coupled):
    g = torch.Generator().manual_seed(2)
    r, t, a = HYPER["rho"], HYPER["tau"], HYPER["alpha"]
    u, v_in = randn(7, 3, g=g), randn(7, 4, g=g)
    w_prev, gg = randn(3, 4, g=g), (randn(3, 4, g=g) if coupled else None)
    b_prev = randn(3, g=g) if bias else None

    def f(w, b=None):
        pre = v_in @ w.T + (0 if b is None else b)
        out = r / 2 * sq(u - pre) + a / 2 * sq(w - w_prev)
        out = out + (0 if gg is None else t / 2 * sq(w - gg))
        return out + (0 if b is None else a / 2 * sq(b - b_prev))

    w, b = weight_update(u, v_in, w_prev, b_prev, gg, r, t, a)
    assert (b is None) == (not bias)
    closed = [w] if b is None else [w, b]
    starts = [[w_prev] + ([b_prev] if bias else []), [randn(3, 4, g=g)] + ([randn(3, g=g)] * bias)]
    assert_minimises(f, closed, starts)


@given(
    v=st.floats(-3, 3),
    a=st.floats(-3, 3),
    u_prev=st.floats(-3, 3),
    gamma=st.floats(0.05, 20),
    rho=st.floats(0.05, 20),
    alpha=st.floats(0.01, 5),
)
@settings(max_examples=100, deadline=None)
def test_relu_prox_is_the_global_minimiser_of_the_scalar_problem(v, a, u_prev, gamma, rho, alpha):
    def f(u):
        return (
            gamma / 2 * (v - u.clamp(min=0)) ** 2
            + rho / 2 * (u - a) ** 2
            + alpha / 2 * (u - u_prev) ** 2
        )

    t = lambda z: torch.tensor([z], dtype=D)  # noqa: E731
    closed = relu_prox(t(v), t(a), t(u_prev), gamma, rho, alpha)
    grid = torch.linspace(-3.5, 3.5, 20_001, dtype=D)  # the minimiser lies in [-3, 3]
    assert float(f(closed)) <= float(f(grid).min()) + 1e-12


def test_relu_prox_is_entrywise():
    g = torch.Generator().manual_seed(3)
    v, a, u_prev = randn(4, 5, g=g), randn(4, 5, g=g), randn(4, 5, g=g)
    whole = relu_prox(v, a, u_prev, 1.3, 0.7, 0.2)
    for i, j in itertools.product(range(4), range(5)):
        one = relu_prox(v[i, j : j + 1], a[i, j : j + 1], u_prev[i, j : j + 1], 1.3, 0.7, 0.2)
        assert whole[i, j] == one[0]


def block_g(w, g_prev, tau, alpha):
    return lambda gg: tau / 2 * sq(w - gg) + alpha / 2 * sq(gg - g_prev)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_pruned_copy_update_beats_every_support(k):
    g = torch.Generator().manual_seed(4)
    t, a = HYPER["tau"], HYPER["alpha"]
    w, g_prev = randn(2, 3, g=g), prune(randn(2, 3, g=g), k)
    closed = compressed_update(w, g_prev, lambda c: prune(c, k), t, a)
    assert int(torch.count_nonzero(closed)) <= k
    f = block_g(w, g_prev, t, a)
    c = (t * w + a * g_prev) / (t + a)
    best = min(  # on a fixed support the minimiser is c restricted to it
        float(
            f(
                torch.zeros(6, dtype=D)
                .index_put((torch.tensor(s),), c.reshape(-1)[list(s)])
                .reshape(2, 3)
            )
        )
        for s in itertools.combinations(range(6), k)
    )
    assert float(f(closed)) <= best + 1e-12


def test_two_core_tt_copy_update_beats_a_numerical_low_rank_minimiser():
    """Two cores: the TT-matrix tensor is an (m_1 n_1) x (m_2 n_2) matrix and TT rounding its
    truncated SVD, the exact projection; LBFGS over the factors cannot do better."""
    g = torch.Generator().manual_seed(5)
    t, a, r = HYPER["tau"], HYPER["alpha"], 2
    rows, cols = (2, 3), (2, 2)
    w = randn(6, 4, g=g)
    g_prev = tt_round(randn(6, 4, g=g), rows, cols, r)
    closed = compressed_update(w, g_prev, lambda c: tt_round(c, rows, cols, r), t, a)
    f = block_g(w, g_prev, t, a)
    from proxrank.tt import from_tt_tensor

    def f_factors(left, right):  # TT tensor (4 x 6) = left (4 x r) @ right (r x 6)
        return f(from_tt_tensor(left @ right, rows, cols))

    starts = [[randn(4, r, g=g), randn(r, 6, g=g)] for _ in range(4)]
    assert float(f(closed)) <= lbfgs_min(f_factors, starts) + 1e-9


def test_tt_copy_update_safeguard_never_increases_the_block():
    """More than two cores: TT-SVD is quasi-optimal, so a worse candidate is rejected."""
    g = torch.Generator().manual_seed(6)
    w, g_prev = randn(8, 8, g=g), randn(8, 8, g=g)
    far = lambda c: c + 100.0  # noqa: E731  (a "projection" farther than g_prev)
    assert torch.equal(compressed_update(w, g_prev, far, 1.0, 1.0), g_prev)
    rows = cols = (2, 2, 2)
    g_prev = tt_round(g_prev, rows, cols, 2)
    for seed in range(20):
        w = randn(8, 8, g=torch.Generator().manual_seed(seed))
        new = compressed_update(w, g_prev, lambda c: tt_round(c, rows, cols, 2), 1.0, 0.5)
        f = block_g(w, g_prev, 1.0, 0.5)
        assert float(f(new)) <= float(f(g_prev)) + 1e-12
        assert torch.allclose(tt_round(new, rows, cols, 2), new, atol=1e-10)  # TT rank <= 2
        g_prev = new


# -- the sweep: objective, sufficient decrease, summability, O(1/k) -----------------------


def mlp(widths, bias, seed):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        mods += [nn.Linear(a, b, bias=bias)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*mods).double()


def rate_violations(history, residuals, alpha, tol):
    """The checks of the convergence claims; returns the failed ones (empty: all hold).

    * monotone: Phi_{k+1} <= Phi_k;
    * sufficient decrease: Phi_k - Phi_{k+1} >= alpha/2 ||x^{k+1} - x^k||^2;
    * summable, and the best step decays as O(1/k):
      k min_{j<k} r_j <= sum_{j<k} r_j <= 2 (Phi_0 - Phi_k) / alpha for every k."""
    bad = []
    for k, r in enumerate(residuals):
        if history[k + 1] > history[k] + tol:
            bad.append(("increase", k))
        if history[k] - history[k + 1] < alpha / 2 * r - tol:
            bad.append(("decrease", k))
        prefix = residuals[: k + 1]
        if (
            not (k + 1) * min(prefix)
            <= sum(prefix)
            <= 2 * (history[0] - history[k + 1]) / alpha + tol
        ):
            bad.append(("rate", k))
    return bad


problems = st.fixed_dictionaries(
    {
        "widths": st.lists(st.sampled_from([2, 4, 6, 8, 9]), min_size=2, max_size=4),
        "n": st.integers(2, 12),
        "bias": st.booleans(),
        "compress": st.sampled_from(["tt", "prune"]),
        "rank": st.integers(1, 3),
        "keep": st.floats(0.05, 1.0),
        "tau": st.floats(0.05, 20),
        "gamma": st.floats(0.05, 20),
        "rho": st.floats(0.05, 20),
        "alpha": st.floats(0.05, 5),
        "labels": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def fit_problem(p, iterations):
    model = mlp(p["widths"], p["bias"], p["seed"])
    g = torch.Generator().manual_seed(p["seed"])
    x = randn(p["n"], p["widths"][0], g=g)
    y = (
        torch.randint(0, p["widths"][-1], (p["n"],), generator=g)
        if p["labels"]
        else randn(p["n"], p["widths"][-1], g=g)
    )
    opts = {"ranks": p["rank"]} if p["compress"] == "tt" else {"keep": p["keep"]}
    hyper = {k: p[k] for k in ("tau", "gamma", "rho", "alpha")}
    bcd = NNBCD(model, p["compress"], **opts, **hyper)
    return bcd, bcd.fit(x, y, iterations)


@given(problems)
@settings(max_examples=25, deadline=None)
def test_fit_decreases_sufficiently_and_the_best_step_decays_as_one_over_k(p):
    bcd, history = fit_problem(p, 15)
    assert len(history) == 16 and len(bcd.residuals) == 15
    assert all(math.isfinite(h) for h in history)
    tol = 1e-9 * (1 + abs(history[0]))
    assert rate_violations(history, bcd.residuals, p["alpha"], tol) == []
    assert history[-1] == pytest.approx(bcd.objective(), rel=1e-12)


def test_the_rate_check_can_fail():
    """Claiming a proximal weight 1000 times larger than the one used breaks the bounds."""
    p = {
        "widths": [4, 8, 3],
        "n": 10,
        "bias": True,
        "compress": "tt",
        "rank": 2,
        "keep": 0.5,
        "tau": 1.0,
        "gamma": 1.0,
        "rho": 1.0,
        "alpha": 0.5,
        "labels": True,
        "seed": 0,
    }
    bcd, history = fit_problem(p, 10)
    assert rate_violations(history, bcd.residuals, 0.5, 1e-12) == []
    assert rate_violations(history, bcd.residuals, 500.0, 1e-12) != []


@pytest.mark.slow
def test_long_run_steps_are_summable_and_settle():
    p = {
        "widths": [8, 16, 16, 4],
        "n": 40,
        "bias": True,
        "compress": "prune",
        "rank": 2,
        "keep": 0.3,
        "tau": 2.0,
        "gamma": 2.0,
        "rho": 1.0,
        "alpha": 0.2,
        "labels": True,
        "seed": 1,
    }
    bcd, history = fit_problem(p, 400)
    r = bcd.residuals
    assert rate_violations(history, r, 0.2, 1e-9 * history[0]) == []
    best = [min(r[: k + 1]) for k in range(len(r))]
    assert all(k * best[k - 1] <= 2 * history[0] / 0.2 for k in range(1, len(r) + 1))
    assert best[-1] < 1e-3 * best[0]  # the steps die out: a critical point is approached


# -- model I/O ------------------------------------------------------------------------------


def test_fit_writes_w_and_load_compressed_writes_g():
    model = mlp([4, 6, 6, 3], True, 0)
    g = torch.Generator().manual_seed(0)
    x, y = randn(20, 4, g=g), torch.randint(0, 3, (20,), generator=g)
    bcd = NNBCD(model, "prune", keep=[0.25, 0.5, None], tau=3.0, gamma=2.0)
    history = bcd.fit(x, y, 5)
    assert bcd.objective() == history[-1]
    dense = [(m.weight.clone(), m.bias.clone()) for m in model[::2]]
    assert all(int(torch.count_nonzero(w)) == w.numel() for w, _ in dense)  # W: not pruned
    bcd.load_compressed()
    for m, (w, b), k in zip(model[::2], dense, [6, 18, None], strict=True):
        assert torch.equal(m.bias, b)
        if k is None:  # uncompressed: W
            assert torch.equal(m.weight, w)
        else:  # G: k entries, and near W (tau couples them)
            assert int(torch.count_nonzero(m.weight)) == k
            assert sq(m.weight - w) < sq(w)
    assert bcd.compressed_parameters() == [6, 18, 18]


def test_tt_parameters_and_ranks_of_the_loaded_copies():
    model = mlp([8, 8, 4], False, 1)
    g = torch.Generator().manual_seed(1)
    layout = [((2, 2, 2), (2, 2, 2)), ((2, 2), (4, 2))]
    bcd = NNBCD(model, "tt", ranks=[(2, 3), 1], layout=layout, tau=1.0)
    bcd.fit(randn(12, 8, g=g), randn(12, 4, g=g), 3)
    bcd.load_compressed()
    for m, (rows, cols), r in zip(model[::2], layout, [(2, 3), 1], strict=True):
        assert torch.allclose(tt_round(m.weight, rows, cols, r), m.weight, atol=1e-10)
    assert bcd.compressed_parameters() == [1 * 4 * 2 + 2 * 4 * 3 + 3 * 4 * 1, 1 * 8 * 1 + 1 * 4 * 1]


def test_labels_are_one_hot_targets():
    runs = []
    for y in (torch.tensor([0, 2, 1, 2]), torch.eye(3, dtype=D)[[0, 2, 1, 2]]):
        bcd = NNBCD(mlp([3, 4, 3], True, 2), "prune", keep=0.5)
        runs.append(bcd.fit(randn(4, 3, g=torch.Generator().manual_seed(2)), y, 3))
    assert runs[0] == runs[1]


def test_non_finite_iterate_raises_and_leaves_the_model():
    model = mlp([3, 4, 2], True, 3)
    before = [p.clone() for p in model.parameters()]
    bcd = NNBCD(model, "prune", keep=0.5)
    with pytest.raises(FloatingPointError, match="model is unchanged"):
        bcd.fit(torch.full((4, 3), 1e300, dtype=D), torch.zeros(4, 2, dtype=D), 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Linear(3, 2), "nn.Sequential"),
        (nn.Sequential(nn.Linear(3, 2), nn.ReLU()), "ending with a Linear"),
        (nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2)), "module 1 is Tanh"),
        (nn.Sequential(nn.ReLU(), nn.ReLU(), nn.Linear(2, 2)), "module 0 is ReLU"),
    ],
)
def test_model_structure_errors(model, match):
    with pytest.raises(TypeError, match=match):
        NNBCD(model, "prune", keep=0.5)


def test_non_finite_weights_are_refused():
    model = mlp([3, 2], True, 0)
    with torch.no_grad():
        model[0].bias[0] = math.nan
    with pytest.raises(ValueError, match="layer 0 .bias. holds non-finite"):
        NNBCD(model, "prune", keep=0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"compress": "svd"}, ValueError, "compress must be one of"),
        ({"compress": "tt"}, ValueError, "needs ranks="),
        ({"compress": "tt", "ranks": 2, "keep": 0.5}, ValueError, "keep= is the pruning"),
        ({"compress": "prune"}, ValueError, "needs keep="),
        ({"compress": "prune", "keep": 0.5, "ranks": 2}, ValueError, "TT options"),
        ({"compress": "prune", "keep": 0.0}, ValueError, r"fraction in \(0, 1\]"),
        ({"compress": "prune", "keep": [0.5]}, ValueError, "list of 2"),
        ({"compress": "tt", "ranks": 0}, ValueError, "int >= 1"),
        ({"compress": "tt", "ranks": (2, 2, 2)}, ValueError, "3-core layout has 2 bonds"),
        ({"compress": "tt", "ranks": 2, "cores": 1}, ValueError, "cores must be"),
        (
            {"compress": "tt", "ranks": 2, "layout": [((2, 2), (3, 2)), None]},
            ValueError,
            "products 4 and 8",
        ),
        ({"compress": "tt", "ranks": 2, "layout": [((4,), (8,)), None]}, ValueError, "needs >= 1"),
        ({"compress": "tt", "ranks": 2, "layout": ((2, 2), (2, 4))}, ValueError, "must be a list"),
        ({"compress": "tt", "ranks": 2, "layout": [(2, 2, 2), None]}, ValueError, "pair"),
        ({"compress": "prune", "keep": 0.5, "tau": 0}, ValueError, "tau must be a finite"),
        ({"compress": "prune", "keep": 0.5, "alpha": math.inf}, ValueError, "alpha must be"),
        ({"compress": "prune", "keep": 0.5, "gamma": "1"}, TypeError, "gamma must be"),
    ],
)
def test_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        NNBCD(mlp([8, 4, 2], True, 0), **kwargs)


@pytest.mark.parametrize(
    ("x", "y", "iterations", "match"),
    [
        (torch.zeros(5, 3), torch.zeros(5, 2), 1, "samples x 4 features"),
        (torch.zeros(5, 4), torch.zeros(4, 2), 1, "5 rows"),
        (torch.zeros(5, 4), torch.zeros(5, 3), 1, r"shape \(n, 2\)"),
        (torch.zeros(5, 4), torch.tensor([0, 1, 2, 0, 1]), 1, r"in \[0, 2\)"),
        (torch.full((5, 4), math.nan), torch.zeros(5, 2), 1, "must be finite"),
        (torch.zeros(5, 4), torch.zeros(5, 2), 0, "iterations must be"),
    ],
)
def test_data_errors_leave_the_model(x, y, iterations, match):
    model = mlp([4, 3, 2], True, 0)
    before = [p.clone() for p in model.parameters()]
    bcd = NNBCD(model, "prune", keep=0.5)
    with pytest.raises(ValueError, match=match):
        bcd.fit(x, y, iterations)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="call fit"):
        bcd.load_compressed()

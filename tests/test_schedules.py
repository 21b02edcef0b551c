"""Schedules: ramps, rank targets, periodic prox, phases, budgets through the optimizer, resume."""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import proxrank
from proxrank import Ramp, Schedule
from proxrank.budget import layer_cost

SETTINGS = settings(max_examples=20, deadline=None)


def _matrix(m, n, s, seed=0):
    """``U diag(s) V^T`` with random orthonormal U, V (float64)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (U * torch.tensor(np.array(s, dtype=np.float64))) @ V.T


def _linear(W):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(W)
    return lin


def _zero_grad_steps(opt, params, steps):
    """SGD on f = 0: only the prox moves the weights."""
    for _ in range(steps):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()


# -- ramps ----------------------------------------------------------------------------------
@SETTINGS
@given(
    st.sampled_from(sorted(proxrank.schedules.RAMP_KINDS)),
    st.floats(0.01, 10.0),
    st.floats(0.01, 10.0),
    st.integers(0, 50),
    st.integers(0, 50),
)
def test_ramps_are_monotone_and_hit_their_end_points(kind, start, end, n0, length):
    ramp = Ramp(start, end, n0, n0 + length, kind)
    values = [ramp(n) for n in range(n0 + length + 5)]
    if kind == "constant":
        assert all(v == end for v in values)
        return
    assert all(v == start for v in values[:n0])
    assert ramp(n0) == (start if length else end)  # a zero-length ramp jumps at n1
    assert ramp(n0 + length) == end and all(v == end for v in values[n0 + length :])
    diffs = np.diff(values) * (1 if end >= start else -1)
    assert (diffs >= -1e-12 * max(start, end)).all()


def test_ramp_shapes_match_their_formulas():
    x = 0.3
    assert Ramp(0, 1, 0, 10, "linear")(3) == pytest.approx(x)
    assert Ramp(0, 1, 0, 10, "cosine")(3) == pytest.approx(0.5 * (1 - math.cos(math.pi * x)))
    assert Ramp(1, 0, 0, 10, "cubic")(3) == pytest.approx((1 - x) ** 3)
    assert Ramp(1e-3, 1, 0, 10, "exponential")(3) == pytest.approx(1e-3 ** (1 - x))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1, 10, 5), r"ends \(n1=5\) before it starts \(n0=10\)"),
        ((0, 1, 0, 5, "exponential"), "geometrically"),
        ((0, 1, 0, 5, "quadratic"), "kind="),
        ((0, math.nan, 0, 5), "finite"),
        ((0, 1, -1, 5), "n0"),
    ],
)
def test_ramp_errors(args, match):
    with pytest.raises(ValueError, match=match):
        Ramp(*args)


@SETTINGS
@given(
    st.sampled_from(["cubic", "linear", "cosine"]),
    st.integers(0, 20),
    st.integers(0, 40),
    st.integers(1, 64),
    st.integers(0, 64),
)
def test_rank_ramp_is_monotone_and_exact_at_both_ends(kind, warmup, length, k, final):
    final = min(final, k)
    sch = Schedule(target=max(final, 1), warmup=warmup, ramp_end=warmup + length, ramp=kind)
    ranks = [sch.rank_at(n, k, final) for n in range(warmup + length + 3)]
    assert ranks[warmup] == k if length else ranks[warmup] == final
    assert ranks[warmup + length] == final
    assert all(a >= b for a, b in itertools.pairwise(ranks))


def test_cubic_rank_ramp_is_gradual_magnitude_pruning():
    sch = Schedule(target=4, warmup=10, ramp_end=30)
    for n in range(10, 31):
        expected = 4 + (64 - 4) * (1 - (n - 10) / 20) ** 3
        assert sch.rank_at(n, 64, 4) == math.ceil(expected - 1e-9)


# -- rank targets through the optimizer ------------------------------------------------------
@SETTINGS
@given(
    st.integers(4, 12),
    st.integers(4, 12),
    st.sampled_from(["soft", "hard"]),
    st.sampled_from(["cubic", "linear"]),
    st.integers(0, 2**31),
)
def test_kept_rank_follows_the_target(m, n, threshold, kind, seed):
    k = min(m, n)
    s = np.sort(np.random.default_rng(seed).uniform(0.5, 5.0, k))[::-1]
    lin = _linear(_matrix(m, n, s, seed))
    sch = Schedule(target=0.25, warmup=2, ramp_end=12, ramp=kind, threshold=threshold)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, schedule=sch)
    final = math.ceil(0.25 * k)
    for n_step in range(1, 16):
        _zero_grad_steps(opt, [lin.weight], 1)
        target = sch.rank_at(n_step, k, final)
        kept = int((torch.linalg.svdvals(lin.weight) > 1e-9).sum())
        assert target - 1 <= kept <= target
    assert kept == final


def test_soft_rank_target_shrinks_kept_values_by_the_next_one():
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    lin = _linear(_matrix(6, 5, s))
    sch = Schedule(target=2, ramp_end=1)  # straight to rank 2
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, schedule=sch)
    _zero_grad_steps(opt, [lin.weight], 1)
    got = torch.linalg.svdvals(lin.weight)[:3]
    torch.testing.assert_close(got, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))

    lin = _linear(_matrix(6, 5, s))
    sch = Schedule(target=2, ramp_end=1, threshold="hard")
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, schedule=sch)
    _zero_grad_steps(opt, [lin.weight], 1)
    expected = torch.from_numpy(np.r_[s[:2], 0.0])
    torch.testing.assert_close(torch.linalg.svdvals(lin.weight)[:3], expected)


def test_rank_prox_asks_the_backend_for_r_plus_one_triplets():
    seen = []

    class Spy(proxrank.backends.ExactBackend):
        def svd(self, Y, cutoff, state, min_rank=0):
            seen.append(min_rank)
            return super().svd(Y, cutoff, state, min_rank)

    lin = _linear(_matrix(8, 8, np.linspace(3, 1, 8)))
    opt = proxrank.ProxRank(
        torch.optim.SGD(lin.parameters(), lr=0.1),
        lin,
        backend=Spy(),
        schedule=Schedule(target=3, ramp_end=2, ramp="linear"),
    )
    _zero_grad_steps(opt, [lin.weight], 3)
    assert seen == [7, 4, 4]  # r(1) = 3 + ceil(5 / 2) = 6, r(2) = 3, then frozen at 3


# -- periodic prox --------------------------------------------------------------------------
@SETTINGS
@given(st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31))
def test_periodic_prox_with_accumulated_threshold_equals_every_step(every, rounds, seed):
    """On f = 0 soft thresholding composes, so k steps of tau equal one step of k tau; the lr
    changes every step (an LR scheduler) and lam ramps up, so the sum is of lam(n) * lr(n)."""
    s = np.sort(np.random.default_rng(seed).uniform(0.0, 2.0, 6))[::-1]
    W = _matrix(7, 6, s, seed)
    results = []
    for k in (1, every):
        lin = _linear(W)
        base = torch.optim.SGD(lin.parameters(), lr=0.05)
        sch = Schedule(lam=Ramp(0.0, 1.0, 0, 7, "cosine"), warmup=1, every=k)
        opt = proxrank.ProxRank(base, lin, lam=2.0, schedule=sch)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
        for _ in range(1 + every * rounds):
            _zero_grad_steps(opt, [lin.weight], 1)
            lr_sched.step()
        results.append(lin.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(results[0], W)  # the prox did act


# -- phases ---------------------------------------------------------------------------------
def test_warmup_applies_no_prox_and_freeze_keeps_the_rank_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    sch = Schedule(lam=5.0, warmup=3, freeze_at=6)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=1.0, schedule=sch
    )
    ref = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for n in range(1, 15):
        for mod, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            nn.functional.cross_entropy(mod(x), y).backward()
            o.step()
        rank = int(torch.linalg.matrix_rank(model[0].weight))
        if n <= 3:
            assert sch.phase(n) == "warmup"
            torch.testing.assert_close(model[0].weight, ref[0].weight)
        if n == 6:
            frozen = rank
            assert frozen < 12
            assert opt.matrix("0.weight").schedule_state["rank"] == frozen
        if n > 6:
            assert sch.phase(n) == "freeze" and rank == frozen


# -- budgets through the optimizer ----------------------------------------------------------
def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)
    )


def _factorized_size(model):
    size = 0
    for lin in (mod for mod in model if isinstance(mod, nn.Linear)):
        m, n = lin.weight.shape
        size += layer_cost(m, n, int(torch.linalg.matrix_rank(lin.weight)))
    return size


@pytest.mark.parametrize("budget", [0.3, 1500])
def test_one_schedule_argument_reaches_a_parameter_budget(budget):
    model = _mlp()
    full = sum(mod.weight.numel() for mod in model if isinstance(mod, nn.Linear))
    limit = budget * full if isinstance(budget, float) else budget
    x, y = torch.randn(128, 32), torch.randint(0, 5, (128,))
    sch = Schedule(budget=budget, warmup=5, ramp_end=25)
    opt = proxrank.ProxRank(torch.optim.Adam(model.parameters(), lr=1e-2), model, schedule=sch)
    for n in range(1, 36):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if n == 5:
            assert _factorized_size(model) == full
    assert _factorized_size(model) <= limit
    assert _factorized_size(model) > 0.8 * limit  # the budget is used, not undershot


def test_compact_mode_and_fisher_weights_through_the_schedule():
    model = _mlp()
    names = [t.name for t in proxrank.selection.select_targets(model)]
    sch = Schedule(mode="compact", tolerance=0.5, ramp_end=1, weights=dict.fromkeys(names, 2.0))
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.0), model, schedule=sch)
    spectra = [torch.linalg.svdvals(model[i].weight.double()) for i in (0, 2, 4)]
    _zero_grad_steps(opt, list(model.parameters()), 1)
    alloc = proxrank.allocate_ranks(
        spectra, [(48, 32), (48, 48), (5, 48)], mode="compact", tolerance=0.5, weights=[2.0] * 3
    )
    got = tuple(opt.matrix(f"{i}.weight").schedule_state["final_rank"] for i in (0, 2, 4))
    assert got == alloc.ranks


def test_uniform_allocation_keeps_the_ranks_of_compress_at_the_same_ratio():
    model = _mlp()
    sch = Schedule(budget=0.3, allocation="uniform", ramp_end=1)
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.0), model, schedule=sch)
    reference = proxrank.compress(_mlp(), ratio=0.3)
    _zero_grad_steps(opt, list(model.parameters()), 1)
    got = [opt.matrix(r.name).schedule_state["final_rank"] for r in reference]
    assert got == [r.rank for r in reference] == [5, 7, 1]
    assert [int(torch.linalg.matrix_rank(model[i].weight)) for i in (0, 2, 4)] == got


# -- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": 0.5, "warmup": 10, "ramp_end": 5}, "ramp_end=5 is before the end of warmup"),
        ({"target": 1.5, "ramp_end": 5}, r"\(0, 1\]"),
        ({"target": 0.0, "ramp_end": 5}, r"\(0, 1\]"),
        ({"target": -2, "ramp_end": 5}, "rank and must be >= 0"),
        ({"target": 0.5}, "needs ramp_end"),
        ({"target": 0.5, "budget": 0.5, "ramp_end": 5}, "either target"),
        ({"target": 0.5, "ramp_end": 5, "lam": 2.0}, "drop lam"),
        ({"target": 0.5, "ramp_end": 5, "freeze_at": 4}, "freeze_at=4 is before ramp_end"),
        ({"ramp_end": 5}, "ramp_end= is for rank targets"),
        ({"every": 0}, "every must be >= 1"),
        ({"warmup": -1}, "warmup"),
        ({"threshold": "firm"}, "threshold="),
        ({"mode": "compact"}, "tolerance"),
        ({"mode": "tiny"}, "mode="),
        ({"lam": 1.0, "warmup": 5, "freeze_at": 2}, "freeze_at=2 is before the end of warmup"),
        ({"lam": Ramp(1.0, -1.0, 0, 5)}, "must be >= 0"),
        ({"budget": 0.5, "ramp_end": 5, "min_rank": -1}, "min_rank"),
        ({"budget": 0.5, "ramp_end": 5, "allocation": "fisher"}, "allocation='fisher'"),
        ({"budget": 500, "ramp_end": 5, "allocation": "uniform"}, "ratio budget"),
        ({"target": 0.5, "ramp_end": 5, "allocation": "uniform"}, "ratio budget"),
        (
            {"budget": 0.5, "ramp_end": 5, "allocation": "uniform", "weights": {"a": 1.0}},
            "drop them",
        ),
    ],
)
def test_schedule_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_budget_errors_are_raised_when_the_optimizer_is_built():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for budget, match in [(1.2, r"\(0, 1\]"), (10, "below the smallest possible size")]:
        with pytest.raises(ValueError, match=match):
            proxrank.ProxRank(
                torch.optim.SGD(model.parameters(), lr=0.1),
                model,
                schedule=Schedule(budget=budget, ramp_end=5),
            )
    with pytest.raises(ValueError, match=r"weights has no value for \['2.weight'"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            schedule=Schedule(budget=0.5, ramp_end=5, weights={"0.weight": 1.0}),
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_lam_is_required_without_a_rank_target():
    lin = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="lam= is required"):
        proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin)
    with pytest.raises(TypeError, match="lam= is required"):
        proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, schedule=Schedule())
    with pytest.raises(TypeError, match="lam must be a number or a"):
        Schedule(lam="warm")
    with pytest.raises(TypeError, match="schedule must be"):
        proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=1.0, schedule=3)


# -- resume ---------------------------------------------------------------------------------
def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(32, 32, generator=g), torch.randint(0, 5, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda: Schedule(budget=0.25, warmup=3, ramp_end=12, ramp="cosine"),
        lambda: Schedule(budget=0.25, allocation="uniform", warmup=3, ramp_end=12),
        lambda: Schedule(lam=Ramp(1e-3, 1.0, 2, 9, "exponential"), every=3, freeze_at=14),
    ],
)
def test_a_resumed_run_follows_the_same_schedule(make):
    def build(schedule):
        model = _mlp()
        base = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, proxrank.ProxRank(base, model, lam=0.05, schedule=schedule)

    model, opt = build(make())
    _train(model, opt, 10, seed=0)
    _train(model, opt, 10, seed=1)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt = build(make())
    _train(model, opt, 10, seed=0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model, opt = build(None)  # the schedule comes back from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    _train(model, opt, 10, seed=1)
    for a, b in zip(straight, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)

    other = Schedule(target=0.5, ramp_end=30)
    model, opt = build(other)
    with pytest.raises(ValueError, match="same schedule"):
        opt.load_state_dict(ckpt["opt"])
    assert opt.schedule is other and opt.step_count == 0


def test_rank_target_in_the_fisher_metric():
    """A rank target taken in a weighted metric: the weight after the prox is the weighted
    truncation A^{-1/2} [A^{1/2} W]_r of the weight after the base step, with A the damped
    Fisher row weights at that step."""
    from proxrank.metrics import damped, weighted_truncate

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4))
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    sch = Schedule(target=3, warmup=2, ramp_end=2, threshold="hard")
    after_base = []

    class Recording(torch.optim.SGD):  # keeps the weight the base step leaves
        def step(self, closure=None):
            super().step(closure)
            after_base.append(model[0].weight.detach().clone())

    opt = proxrank.ProxRank(
        Recording(model.parameters(), lr=0.1), model, schedule=sch, metric="fisher"
    )
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    W = model[0].weight.detach()
    A = damped(opt.matrix("0.weight").metric_state["fisher"], 1e-2)
    assert not torch.allclose(A, A.mean().expand_as(A))  # a non-trivial metric
    torch.testing.assert_close(W, weighted_truncate(after_base[-1], 3, A=A))
    assert int(torch.linalg.matrix_rank(W)) == 3
    euclid = weighted_truncate(after_base[-1], 3)
    assert not torch.allclose(W, euclid)  # and it differs from the Euclidean truncation


def test_rank_schedule_leaves_groups_with_lam_zero_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lam": 0.0}]
    sch = Schedule(target=2, warmup=0, ramp_end=2)
    opt = proxrank.ProxRank(torch.optim.SGD(groups, lr=0.1), model, schedule=sch)
    x = torch.randn(16, 8)
    for _ in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert int(torch.linalg.matrix_rank(model[0].weight)) == 2
    assert int(torch.linalg.matrix_rank(model[2].weight)) == 6


def test_add_param_group_with_a_budget_schedule_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6))
    opt = proxrank.ProxRank(
        torch.optim.SGD(model[0].parameters(), lr=0.1),
        model,
        schedule=Schedule(budget=0.5, ramp_end=4),
    )
    with pytest.raises(ValueError, match="add_param_group with a budget schedule"):
        opt.add_param_group({"params": model[2].parameters()})
    assert len(opt.param_groups) == 1 and [t.name for t in opt.targets] == ["0.weight"]


@pytest.mark.parametrize("ramp", ["constant", "exponential"])
def test_rank_ramp_shapes_that_cannot_reach_the_target_are_refused(ramp):
    with pytest.raises(ValueError, match=f"ramp='{ramp}' cannot bring a rank"):
        Schedule(target=0.5, ramp_end=10, ramp=ramp)

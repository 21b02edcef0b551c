"""Maps on the matrix itself (proxrank.sparsity, proxrank.tt.TTRound): the maps against float64
references and their mathematical properties, and ProxRank driving them (the textbook
proximal step, schedules, budgets, diagnostics, checkpoints, errors)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import matrices
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import proxrank
from proxrank.prox import MatrixMap, get_prox
from proxrank.schedules import global_magnitude_levels
from proxrank.sparsity import L1, NM, GroupLasso, Magnitude, keep_largest
from proxrank.tt import TTRound, to_tt_tensor

taus = st.sampled_from([0.0, 1e-3, 0.1, 0.5, 2.0])
axes = st.sampled_from(["rows", "columns"])


def _dim(axis: str) -> int:
    return -1 if axis == "rows" else -2


# -- float64 references ---------------------------------------------------------------------
def ref_l1(W: np.ndarray, tau: float) -> np.ndarray:
    return np.sign(W) * np.maximum(np.abs(W) - tau, 0.0)


def ref_group(W: np.ndarray, tau: float, axis: str = "rows") -> np.ndarray:
    """Row (column) by row: ``w_g max(1 - tau / ||w_g||, 0)``, written as a loop."""
    W = W if axis == "rows" else W.T
    out = np.zeros_like(W)
    for i, w in enumerate(W):
        norm = np.linalg.norm(w)
        if norm > tau:
            out[i] = w * (1 - tau / norm)
    return out if axis == "rows" else out.T


# -- the maps: properties -----------------------------------------------------------------------
@given(matrices(batch=True), taus)
def test_l1_is_the_elementwise_soft_threshold_and_moreau_holds(W, tau):
    X = L1()(W, torch.full((W.shape[0],), tau, dtype=W.dtype))
    for Wi, Xi in zip(W, X, strict=True):
        np.testing.assert_allclose(Xi.numpy(), ref_l1(Wi.numpy(), tau), atol=1e-15)
    # Moreau: prox_{tau ||.||_1} + projection onto the dual ball {||.||_inf <= tau} = identity
    torch.testing.assert_close(X + W.clamp(-tau, tau), W, rtol=0, atol=1e-14)


@given(matrices(batch=True), taus, axes)
def test_group_lasso_is_the_group_soft_threshold_and_moreau_holds(W, tau, axis):
    X = GroupLasso(axis)(W, torch.full((W.shape[0],), tau, dtype=W.dtype))
    for Wi, Xi in zip(W, X, strict=True):
        np.testing.assert_allclose(Xi.numpy(), ref_group(Wi.numpy(), tau, axis), atol=1e-13)
    # dual ball of sum_g ||w_g||: every group's norm <= tau
    norm = torch.linalg.vector_norm(W, dim=_dim(axis), keepdim=True)
    proj = W * torch.where(norm > tau, tau / norm.clamp_min(1e-300), 1.0)
    torch.testing.assert_close(X + proj, W, rtol=0, atol=1e-12)


@given(matrices(), st.sampled_from([1e-3, 0.1, 0.5, 2.0]))
def test_l1_optimality_conditions(W, tau):
    """``W - X`` lies in ``tau d||X||_1``: ``tau sign(x)`` where ``x != 0``, ``[-tau, tau]``
    where ``x = 0``."""
    X = L1()(W[None], torch.tensor([tau], dtype=W.dtype))[0]
    G = W - X
    nz = X != 0
    torch.testing.assert_close(G[nz], tau * X[nz].sign(), rtol=0, atol=1e-12)
    assert bool((G[~nz].abs() <= tau + 1e-12).all())


@given(matrices(), st.sampled_from([1e-3, 0.1, 0.5, 2.0]), axes)
def test_group_lasso_optimality_conditions(W, tau, axis):
    """Per group: ``W_g - X_g = tau X_g / ||X_g||`` when ``X_g != 0``, ``||W_g|| <= tau``
    when ``X_g = 0``."""
    X = GroupLasso(axis)(W[None], torch.tensor([tau], dtype=W.dtype))[0]
    Xg, Wg = (X, W) if axis == "rows" else (X.T, W.T)
    for x, w in zip(Xg, Wg, strict=True):
        norm = torch.linalg.vector_norm(x)
        if norm > 0:
            torch.testing.assert_close(w - x, tau * x / norm, rtol=0, atol=1e-12)
        else:
            assert torch.linalg.vector_norm(w) <= tau + 1e-12


@given(matrices(batch=True), taus, st.integers(0, 2**31 - 1), axes)
def test_l1_and_group_lasso_are_non_expansive(A, tau, seed, axis):
    B = A + torch.randn(A.shape, generator=torch.Generator().manual_seed(seed), dtype=A.dtype)
    t = torch.full((A.shape[0],), tau, dtype=A.dtype)
    for prox in (L1(), GroupLasso(axis)):
        dist = torch.linalg.vector_norm(prox(A, t) - prox(B, t), dim=(-2, -1))
        assert bool((dist <= torch.linalg.vector_norm(A - B, dim=(-2, -1)) + 1e-12).all())


@given(matrices(batch=True), st.floats(0.05, 1.0))
def test_magnitude_is_the_projection_onto_k_sparse_matrices(W, density):
    prox = Magnitude(density)
    m, n = W.shape[-2:]
    k = math.ceil(density * m * n)
    X = prox(W, torch.zeros(W.shape[0], dtype=W.dtype))
    for Wi, Xi in zip(W, X, strict=True):
        assert int(torch.count_nonzero(Xi)) <= k
        # the nearest k-sparse matrix drops the m n - k smallest |w|
        drop = np.sort(np.abs(Wi.numpy()).ravel())[: m * n - k]
        assert math.isclose(float((Wi - Xi).square().sum()), float((drop**2).sum()), abs_tol=1e-12)
        kept = Xi != 0
        torch.testing.assert_close(Xi[kept], Wi[kept], rtol=0, atol=0)
    assert torch.equal(prox(X, torch.zeros(W.shape[0])), X)  # idempotent


@given(matrices(batch=True, max_side=4), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 3)]))
def test_nm_keeps_the_n_largest_of_every_m_and_is_idempotent(W, nm):
    n_keep, m = nm
    W = torch.cat([W] * m, dim=-1)  # rows whose length is a multiple of m
    prox = NM(n_keep, m)
    X = prox(W, torch.zeros(W.shape[0], dtype=W.dtype))
    runs_w = W.reshape(*W.shape[:-1], -1, m)
    runs_x = X.reshape(runs_w.shape)
    assert bool((torch.count_nonzero(runs_x, dim=-1) <= n_keep).all())
    # the kept entries of each run are its n largest |w| (the nearest N:M matrix)
    kth = runs_w.abs().sort(dim=-1, descending=True).values[..., n_keep - 1 : n_keep]
    kept = runs_x != 0
    assert bool((runs_w.abs()[kept.logical_not()] <= kth.expand_as(runs_w)[~kept]).all())
    assert torch.equal(prox(X, torch.zeros(W.shape[0])), X)  # idempotent


def _unfolding_ranks(W: torch.Tensor, rows, cols) -> list[int]:
    T = to_tt_tensor(W, rows, cols)
    modes = T.shape
    return [
        int(torch.linalg.matrix_rank(T.reshape(math.prod(modes[: k + 1]), -1)))
        for k in range(len(modes) - 1)
    ]


@given(st.integers(0, 2**31 - 1), st.integers(1, 4))
def test_tt_round_projects_onto_tt_rank_and_is_idempotent(seed, r):
    prox = TTRound((2, 3, 2), (2, 2, 3), ranks=r)
    W = torch.randn(2, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    X = prox(W, torch.zeros(2, dtype=W.dtype))
    for Xi in X:
        assert all(q <= r for q in _unfolding_ranks(Xi, (2, 3, 2), (2, 2, 3)))
    torch.testing.assert_close(prox(X, torch.zeros(2)), X, rtol=0, atol=1e-10)
    assert prox.tt_ranks((12, 12), None) == (min(r, 4), r)
    # a schedule's level replaces the map's ranks (at most what each unfolding allows)
    assert prox.tt_ranks((12, 12), 1) == (1, 1) and prox.tt_ranks((12, 12), 9) == (4, 6)
    assert prox.target_level((12, 12), 0.01) == 1


def test_tt_default_layout_and_levels():
    prox = TTRound(ranks=(2, 3))
    assert prox.layout((8, 27)) == ((2, 2, 2), (3, 3, 3))
    assert prox.full_level((8, 27)) == 6  # modes 6, 6, 6: bonds min(6, 36), min(36, 6)
    assert prox.own_level((8, 27)) == 3
    assert prox.target_level((8, 27), 0.5) == math.ceil(0.5 * prox.full_level((8, 27)))
    assert TTRound().own_level((8, 27)) is None


def test_keep_largest_and_levels():
    w = torch.tensor([[3.0, -1.0, 0.5, -4.0]])
    assert torch.equal(keep_largest(w, 2), torch.tensor([[3.0, 0.0, 0.0, -4.0]]))
    assert torch.equal(keep_largest(w, 9), w)
    assert Magnitude().target_level((4, 5), 0.1) == 2 and Magnitude().target_level((4, 5), 50) == 20
    assert NM(2, 4).target_level((3, 8), 0.5) == 2 and NM(2, 4).full_level((3, 8)) == 4


def test_get_prox_resolves_every_name():
    assert get_prox("l1") == L1() and get_prox("group") == GroupLasso()
    assert get_prox("magnitude") == Magnitude() and get_prox("nm") == NM(2, 4)
    assert get_prox("tt") == TTRound()
    assert GroupLasso("columns") != GroupLasso() and hash(NM(1, 4)) == hash(NM(1, 4))
    with pytest.raises(ValueError, match="'lasso' is not a known prox map.*'l1'"):
        get_prox("lasso")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GroupLasso("cols"), "axis='cols'"),
        (lambda: Magnitude(0.0), "density=0.0"),
        (lambda: Magnitude(True), "density=True"),
        (lambda: NM(3, 2), "n=3 > m=2"),
        (lambda: NM(0, 4), "n=0"),
        (lambda: TTRound((2, 2)), "row_shape and col_shape together"),
        (lambda: TTRound(d=1), "d=1"),
        (lambda: TTRound(ranks=(1, 2, 3)), "TT ranks"),
    ],
)
def test_map_options_are_checked(build, match):
    with pytest.raises(ValueError, match=match):
        build()


# -- ProxRank with these maps -------------------------------------------------------------------
def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 4)
    ).to(dtype)


def _batches(n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(16, 8, generator=g, dtype=dtype), torch.randn(16, 4, generator=g, dtype=dtype))
        for _ in range(n)
    ]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    ("prox", "reference", "lam"),
    [
        ("l1", ref_l1, 0.3),
        ("group", ref_group, 2.0),
        (GroupLasso("columns"), lambda W, tau: ref_group(W, tau, "columns"), 2.0),
    ],
)
def test_proxrank_sgd_is_the_textbook_proximal_step(prox, reference, lam):
    """The issue's check: ProxRank(SGD, prox="l1"/"group") equals the textbook soft threshold
    (elementwise, row groups) of the SGD-updated weight, float64."""
    lr = 0.1
    model, ref = _mlp(), _mlp()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=lr), model, lam=lam, prox=prox)
    for x, y in _batches(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        with torch.no_grad():
            for p in ref.parameters():
                W = (p - lr * p.grad).numpy()
                p.copy_(torch.from_numpy(reference(W, lr * lam) if p.dim() == 2 else W))
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0, atol=1e-14)
    assert any(bool((p == 0).any()) for p in model.parameters())


def test_group_lasso_zeroes_whole_output_units_of_a_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3)
    opt = proxrank.ProxRank(torch.optim.SGD(conv.parameters(), lr=1.0), conv, lam=0.2, prox="group")
    conv(torch.randn(2, 3, 5, 5)).sum().backward()
    with torch.no_grad():
        W = conv.weight.detach().clone() - conv.weight.grad
    opt.step()
    expected = ref_group(W.reshape(6, -1).numpy(), 0.2)
    np.testing.assert_allclose(conv.weight.detach().reshape(6, -1).numpy(), expected, atol=1e-6)
    assert set(np.flatnonzero(~expected.any(axis=1))) == set(
        torch.nonzero(conv.weight.detach().flatten(1).abs().sum(1) == 0).flatten().tolist()
    )


def test_gradual_magnitude_pruning_follows_the_cubic_ramp_then_freezes():
    model = _mlp()
    sched = proxrank.Schedule(target=0.25, ramp="cubic", warmup=1, ramp_end=5)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.05), model, prox="magnitude", schedule=sched
    )
    kept = []
    for batch in _batches(8):
        _train(model, opt, [batch])
        kept.append([int(torch.count_nonzero(model[i].weight)) for i in (0, 2, 4)])
    sizes = [8 * 12, 12 * 12, 12 * 4]
    finals = [math.ceil(0.25 * s) for s in sizes]
    assert kept[0] == sizes  # warm-up
    for step in range(2, 9):
        want = [sched.rank_at(min(step, 5), s, f) for s, f in zip(sizes, finals, strict=True)]
        assert kept[step - 1] == want, step
    assert kept[-1] == finals  # frozen: still projected at every step
    assert [m.schedule_state["final_rank"] for m in opt.matrices()] == finals


def test_nm_ramp_reaches_the_pattern_and_tt_target_sets_the_rank():
    model = _mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        prox="nm",
        schedule=proxrank.Schedule(target=0.5, ramp_end=3),
    )
    _train(model, opt, _batches(4))
    for i in (0, 2, 4):
        runs = model[i].weight.detach().reshape(model[i].weight.shape[0], -1, 4)
        assert bool((torch.count_nonzero(runs, dim=-1) <= 2).all())
    model = _mlp()
    prox = TTRound(d=2)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        prox=prox,
        schedule=proxrank.Schedule(target=1, ramp_end=2),
        diagnostics=True,
    )
    _train(model, opt, _batches(3))
    W = model[2].weight.detach()
    assert _unfolding_ranks(W, *prox.layout((12, 12))) == [1]
    lay = {lay.name: lay for lay in opt.diagnostics().layers}["2.weight"]
    assert lay.tt_ranks == (1,) and lay.rank is None
    assert lay.factorized_params == proxrank.tt.tt_parameters(*prox.layout((12, 12)), (1,))


def test_magnitude_budget_is_one_global_threshold():
    model = _mlp()
    weights = [model[i].weight.detach().clone() for i in (0, 2, 4)]
    sched = proxrank.Schedule(budget=0.2, ramp_end=0)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.0), model, prox="magnitude", schedule=sched
    )
    _train(model, opt, _batches(1))  # lr = 0: the weights the allocation sees are the initial
    levels = global_magnitude_levels(weights, 0.2)
    assert sum(levels) == math.ceil(0.2 * sum(w.numel() for w in weights))
    threshold = torch.cat([w.abs().flatten() for w in weights]).sort(descending=True).values
    cut = threshold[sum(levels) - 1]
    assert levels == [int((w.abs() >= cut).sum()) for w in weights]
    assert [m.schedule_state["final_rank"] for m in opt.matrices()] == levels
    assert [int(torch.count_nonzero(model[i].weight)) for i in (0, 2, 4)] == levels


def test_diagnostics_report_sparsity_groups_and_objective():
    model = _mlp()
    lam, lr = 3.0, 0.1
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=lr), model, lam=lam, prox="group", diagnostics=True
    )
    steps = []
    opt.tracker.record = lambda step, _r=opt.tracker.record: (steps.append(step), _r(step))[1]
    batches = _batches(2)
    _train(model, opt, batches[:1])
    x, y = batches[1]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = float(F.mse_loss(model(x), y))
        penalty = sum(lam * float(model[i].weight.norm(dim=1).sum()) for i in (0, 2, 4))
    opt.step(closure)
    assert all(s.S is None and s.S_new is None and s.rank is None for s in steps)
    snap = opt.diagnostics()
    assert math.isclose(snap.objective, loss + penalty, rel_tol=1e-9)
    for lay in snap.layers:
        W = model.get_submodule(lay.name.removesuffix(".weight")).weight.detach()
        assert lay.rank is None and lay.prox == "group" and lay.backend == "direct"
        assert lay.sparsity == pytest.approx(float((W == 0).double().mean()))
        assert lay.zero_rows == int((W.abs().sum(1) == 0).sum())
        assert lay.zero_cols == int((W.abs().sum(0) == 0).sum())
        assert lay.factorized_params == (W.shape[0] - lay.zero_rows) * W.shape[1]
        assert lay.cutoff == pytest.approx(lam * lr) and lay.tt_ranks is None
    assert any(lay.zero_rows for lay in snap.layers)
    report = opt.report()
    assert "group" in report and "0 rows/cols" in report


@pytest.mark.parametrize(
    "prox", ["l1", GroupLasso("columns"), Magnitude(0.3), NM(2, 4), TTRound(ranks=2, d=2)]
)
def test_state_dict_round_trip_and_bit_exact_resume(prox):
    sched = (
        proxrank.Schedule(target=0.3, warmup=1, ramp_end=4) if isinstance(prox, Magnitude) else None
    )
    if sched is not None:
        prox = "magnitude"

    def build():
        model = _mlp()
        opt = proxrank.ProxRank(
            torch.optim.Adam(model.parameters(), lr=0.01),
            model,
            lam=0.1,
            prox=prox,
            schedule=copy.deepcopy(sched),
            diagnostics=True,
        )
        return model, opt

    batches = _batches(6)
    model, opt = build()
    _train(model, opt, batches[:3])
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    _train(model, opt, batches[3:])
    model2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, batches[3:])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.state_dict()["proxrank"]["matrices"] == opt2.state_dict()["proxrank"]["matrices"]
    assert opt.diagnostics().layers[0].sparsity == opt2.diagnostics().layers[0].sparsity


def test_group_options_and_metrics_are_checked_before_anything_changes():
    model = _mlp()

    def sgd():
        return torch.optim.SGD(model.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="metric='fisher'.*'euclidean'"):
        proxrank.ProxRank(sgd(), model, lam=0.1, prox="l1", metric="fisher")
    with pytest.raises(ValueError, match="'l1' is a penalty.*lam="):
        proxrank.ProxRank(
            sgd(), model, prox="l1", schedule=proxrank.Schedule(target=0.5, ramp_end=2)
        )
    with pytest.raises(ValueError, match="budget=.*'nm'.*target="):
        proxrank.ProxRank(
            sgd(), model, prox="nm", schedule=proxrank.Schedule(budget=0.5, ramp_end=2)
        )
    with pytest.raises(ValueError, match="freeze_at=.*'group'"):
        proxrank.ProxRank(
            sgd(), model, lam=0.1, prox="group", schedule=proxrank.Schedule(freeze_at=3)
        )
    with pytest.raises(ValueError, match="'0.weight'.*'magnitude' is a projection with no level"):
        proxrank.ProxRank(sgd(), model, prox="magnitude")
    with pytest.raises(ValueError, match="'2.weight'.*multiple of 8"):
        proxrank.ProxRank(sgd(), model, prox=NM(2, 8))
    with pytest.raises(ValueError, match="'2.weight'.*row_shape"):
        proxrank.ProxRank(sgd(), model, prox=TTRound((3, 4), (2, 4), ranks=1))
    with pytest.raises(TypeError, match="lam= is required"):
        proxrank.ProxRank(sgd(), model, prox="l1")
    # a param group switched to a map that cannot act on its matrices: the next step raises
    # before the base step, nothing changes
    opt = proxrank.ProxRank(sgd(), model, lam=0.1, prox="l1")
    x, y = _batches(1)[0]
    F.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["prox"] = NM(2, 8)
    with pytest.raises(ValueError, match="'2.weight'.*multiple of 8"):
        opt.step()
    opt.param_groups[0]["metric"] = "fisher"
    opt.param_groups[0]["prox"] = "group"
    with pytest.raises(ValueError, match=r"param_groups\[0\].*'group'.*euclidean"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert opt.step_count == 0


def test_magnitude_budget_mixed_with_spectral_maps_is_refused():
    model = _mlp()
    groups = [
        {"params": model[0].parameters(), "prox": "magnitude"},
        {"params": [*model[2].parameters(), *model[4].parameters()]},
    ]
    with pytest.raises(ValueError, match="budget= over both prox='magnitude' and other maps"):
        proxrank.ProxRank(
            torch.optim.SGD(groups, lr=0.1),
            model,
            schedule=proxrank.Schedule(budget=0.5, ramp_end=2),
        )
    with pytest.raises(ValueError, match="'magnitude' has no level"):
        Magnitude()(torch.ones(1, 2, 2), torch.zeros(1))
    for budget, error, match in (
        (1.5, ValueError, "fraction of entries kept"),
        ("all", TypeError, "a fraction in"),
    ):
        with pytest.raises(error, match=match):
            global_magnitude_levels([torch.ones(2, 2)], budget)
    with pytest.raises(ValueError, match="entries kept must lie in"):
        proxrank.ProxRank(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            prox="magnitude",
            schedule=proxrank.Schedule(budget=10**6, ramp_end=2),
        )


def test_matrix_maps_batch_same_shape_matrices_in_one_call():
    model = _mlp()
    calls = []

    class Counting(L1):
        def __call__(self, W, tau, level=None):
            calls.append(tuple(W.shape))
            return super().__call__(W, tau, level)

    assert isinstance(Counting(), MatrixMap)
    extra = nn.Linear(12, 12).double()
    model.append(extra)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, prox=Counting()
    )
    x, _ = _batches(1)[0]
    model[:5](x).sum().backward()
    extra(torch.randn(3, 12, dtype=torch.float64)).sum().backward()
    opt.step()
    assert sorted(calls) == [(1, 4, 12), (1, 12, 8), (2, 12, 12)]


@given(matrices(batch=True), taus, taus, axes)
def test_soft_thresholds_compose(W, a, b, axis):
    """``prox_b(prox_a(W)) = prox_{a + b}(W)`` for l1 and group lasso: what
    ``Schedule(every=k)``'s accumulated threshold relies on."""
    t = torch.ones(W.shape[0], dtype=W.dtype)
    for prox in (L1(), GroupLasso(axis)):
        torch.testing.assert_close(
            prox(prox(W, a * t), b * t), prox(W, (a + b) * t), rtol=1e-12, atol=1e-12
        )


def test_weighted_prox_refuses_maps_on_the_entries():
    with pytest.raises(ValueError, match="prox='l1' acts on the entries"):
        proxrank.metrics.weighted_prox(torch.eye(3), 0.1, prox="l1")


def test_a_failing_map_writes_nothing_and_names_the_weights():
    """The prox of a later batch fails: no batch is written (the base step was taken)."""

    class Failing(L1):
        def __call__(self, W, tau, level=None):
            if W.shape[-2:] == (4, 12):
                raise RuntimeError("no luck")
            return super().__call__(W, tau, level)

    model = _mlp()
    lr = 0.1
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=lr), model, lam=1.0, prox=Failing(), diagnostics=True
    )
    x, y = _batches(1)[0]
    bare = copy.deepcopy(model)
    for net in (model, bare):
        F.mse_loss(net(x), y).backward()
    torch.optim.SGD(bare.parameters(), lr=lr).step()
    expected = list(bare.parameters())
    with pytest.raises(
        RuntimeError, match="'4.weight' failed after the base step.*no luck.*options of prox 'l1'"
    ):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters(), strict=True))
    assert opt.step_count == 0 and opt.tracker.state_dict()["layers"] == {}


@pytest.mark.parametrize(("prox", "reference"), [("l1", ref_l1), ("group", ref_group)])
def test_penalty_with_a_strength_schedule_is_the_textbook_step(prox, reference):
    """A penalty under a schedule without a level (warm-up, a ``lam`` ramp, ``every=2``): the
    textbook soft threshold by the accumulated ``tau`` on the steps due (``plan`` asked a
    penalty for its full level and raised at the first step)."""
    lr, lam = 0.1, 0.5
    sched = proxrank.Schedule(lam=proxrank.schedules.Ramp(0.0, 1.0, 1, 5), warmup=1, every=2)
    model, ref = _mlp(), _mlp()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=lr), model, lam=lam, prox=prox, schedule=sched
    )
    acc = 0.0
    for n, (x, y) in enumerate(_batches(6), start=1):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        ref.zero_grad()
        F.mse_loss(ref(x), y).backward()
        acc += 0.0 if n <= 1 else lr * lam * sched.lam(n)
        due = n > 1 and (n - 1) % 2 == 0
        with torch.no_grad():
            for p in ref.parameters():
                W = (p - lr * p.grad).numpy()
                p.copy_(torch.from_numpy(reference(W, acc) if p.dim() == 2 and due else W))
        acc = 0.0 if due else acc
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=0, atol=1e-14)


@given(
    matrices(batch=True),
    st.sampled_from([1e-30, 1e-20, 1e20, 1e30]),
    st.sampled_from([0.1, 0.9, 1.1]),
    axes,
)
def test_group_lasso_in_float32_with_tiny_and_huge_entries(W, scale, ratio, axis):
    """Float32 groups whose squares underflow (overflow) still get the float64 reference's
    threshold (``tau`` near the groups' median norm; the norm of the squares made them all 0,
    or left them as they were)."""
    W32 = (W * scale).float()
    norms = np.linalg.norm(W32.double().numpy(), axis=_dim(axis))  # float64: no underflow
    tau = ratio * float(np.median(norms))
    X = GroupLasso(axis)(W32, torch.full((W.shape[0],), tau))
    for i in range(W.shape[0]):
        expected = ref_group(W32[i].double().numpy(), tau, axis)
        np.testing.assert_allclose(X[i].double().numpy(), expected, rtol=1e-5, atol=0)
    assert torch.isfinite(GroupLasso(axis).regularizer(W32[0]))


def test_map_errors_with_a_closure_and_in_add_param_group_change_nothing():
    """A map that cannot act on a matrix is refused before the base step when ``step`` has a
    closure (its prox is prepared after the base step), and by ``add_param_group`` before the
    group is added."""
    model = _mlp()
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, prox="l1")
    before = [p.detach().clone() for p in model.parameters()]
    for prox, metric, match in (
        (NM(2, 8), "euclidean", "'2.weight'.*multiple of 8"),
        ("group", "fisher", r"param_groups\[0\].*'group'.*euclidean"),
    ):
        opt.param_groups[0]["prox"], opt.param_groups[0]["metric"] = prox, metric
        with pytest.raises(ValueError, match=match):
            opt.step(closure)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert opt.step_count == 0

    extra = nn.Linear(6, 5).double()
    both = nn.ModuleDict({"a": model, "b": extra})
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), both, lam=0.1)
    with pytest.raises(ValueError, match="'b.weight'.*multiple of 4"):
        opt.add_param_group({"params": extra.parameters(), "prox": NM(2, 4)})
    assert len(opt.param_groups) == 1 and len(opt.matrices()) == 3
    with pytest.raises(TypeError, match="ordered collections"):  # torch's own check stays
        opt.add_param_group({"params": set(extra.parameters()), "prox": "l1"})
    opt.add_param_group({"params": extra.parameters(), "prox": "l1"})
    assert len(opt.matrices()) == 4


@pytest.mark.parametrize(
    "prox",
    [
        GroupLasso("columns"),
        Magnitude(0.5),
        NM(2, 4),
        TTRound(ranks=2, d=2),
        proxrank.prox.HardThreshold(),
    ],
)
def test_checkpoint_with_a_map_object_loads_with_weights_only(prox, tmp_path):
    """A map given as an object is saved in the param groups; ``torch.load``'s default
    (``weights_only=True``) reads it back, equal to the map."""
    model = _mlp()
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, prox=prox)
    _train(model, opt, _batches(1))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert saved["param_groups"][0]["prox"] == prox
    opt.load_state_dict(saved)
    assert opt.step_count == 1


@given(
    st.integers(1, 5),
    st.integers(1, 8),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_projections_on_ties_zeros_and_extreme_scales(m, n, seed, scale, dtype):
    """Entries in {-1, 0, 1} (many ties) times ``scale``: magnitude keeps at most ``k`` entries,
    exactly, none smaller than one it drops; N:M likewise per run; TT rounding is finite and
    idempotent; each projection idempotent."""
    g = torch.Generator().manual_seed(seed)
    W = (torch.randint(-1, 2, (2, m, 4 * n), generator=g).to(torch.float64) * scale).to(dtype)
    zeros = torch.zeros(2, dtype=dtype)
    for prox, runs in ((Magnitude(0.3), 4 * m * n), (NM(2, 4), 4)):
        X = prox(W, zeros)
        w, x = W.reshape(2, -1, runs), X.reshape(2, -1, runs)
        k = math.ceil(0.3 * runs) if isinstance(prox, Magnitude) else 2
        assert bool((torch.count_nonzero(x, dim=-1) <= k).all())
        kept = x != 0
        assert torch.equal(x[kept], w[kept])
        smallest_kept = torch.where(kept, w.abs(), math.inf).amin(dim=-1, keepdim=True)
        largest_dropped = torch.where(kept, -math.inf, w.abs()).amax(dim=-1, keepdim=True)
        assert bool((largest_dropped <= smallest_kept).all())
        assert torch.equal(prox(X, zeros), X)
    tt = TTRound(ranks=1, d=2)
    if W.shape[-1] > 1 or W.shape[-2] > 1:
        X = tt(W, zeros)
        assert bool(torch.isfinite(X).all())
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(tt(X, zeros), X, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize(
    "schedule", [None, proxrank.Schedule(lam=proxrank.schedules.Ramp(0.0, 1.0, 0, 4))]
)
def test_a_projection_ignores_a_zero_learning_rate(schedule):
    """A projection at its own level does not read ``tau = lam * lr``: a step at ``lr = 0``
    (a warm-up from zero) still projects (it was skipped as if it were the identity)."""
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    warmup = torch.optim.lr_scheduler.LambdaLR(base, lambda s: float(s > 0))
    opt = proxrank.ProxRank(base, model, prox=Magnitude(0.25), schedule=copy.deepcopy(schedule))
    assert opt.param_groups[0]["lr"] == 0
    _train(model, opt, _batches(1))
    for t in opt.targets:
        assert int(torch.count_nonzero(t.param)) == math.ceil(0.25 * t.param.numel())
    warmup.step()

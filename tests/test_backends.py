"""Backends: agreement with the exact prox within the certified bound, fallback, state."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxrank
from proxrank.backends import (
    AutoBackend,
    GramBackend,
    PolarBackend,
    SubspaceBackend,
    SVDResult,
    get_backend,
    polar_svt,
)
from proxrank.functional import prox_step, rank_prox_step, svt
from proxrank.prox import SoftThreshold

FAST = ("gram", "subspace", "auto", "polar")


def make(name: str):
    """A backend by name; ``auto`` without its small-matrix shortcut to the exact SVD."""
    return AutoBackend(min_size=1) if name == "auto" else get_backend(name)


def spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    """float64 ``m x n`` matrix with singular values ``s`` (padded with zeros)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    full = torch.zeros(k, dtype=torch.float64)
    full[: len(s)] = s[:k]
    return (U * full) @ V.T


def drift(Y: torch.Tensor, size: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return Y + size * torch.randn(Y.shape, generator=g, dtype=Y.dtype)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 36),
    n=st.integers(2, 36),
    rank_frac=st.floats(0.0, 1.0),
    gap=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    name=st.sampled_from(FAST),
    seed=st.integers(0, 2**16),
)
def test_fast_backends_agree_with_exact_within_bound(m, n, rank_frac, gap, dtype, name, seed):
    k = min(m, n)
    r = round(rank_frac * k)
    cutoff = 1.0
    g = torch.Generator().manual_seed(seed)
    if gap:  # kept values well above the cutoff, the rest well below
        s = torch.cat([2 + 3 * torch.rand(r, generator=g), 0.5 * torch.rand(k - r, generator=g)])
    else:  # values spread through the cutoff
        s = 3 * torch.rand(k, generator=g)
    s = s.double().sort(descending=True).values
    Y0 = spectrum_matrix(m, n, s, seed)
    backend, state = make(name), {}
    for step in range(3):  # the first step builds the basis, later ones are warm
        Y = drift(Y0, 1e-3, seed + step)
        res = prox_step(Y.to(dtype), cutoff, backend=backend, state=state)
        ref = svt(Y, cutoff)
        err = torch.linalg.matrix_norm(res.X.double() - ref).item()
        bound = res.svd.error_bound.item()
        slack = 200 * torch.finfo(dtype).eps * max(m, n) * Y.norm().item()
        assert bound <= 1e-4 * Y.norm().item() + slack  # certified or redone exactly
        assert err <= bound + slack
        assert state["backend"] in ("exact", "gram", "subspace", "polar")
        exact_above = int((torch.linalg.svdvals(Y) > cutoff * (1 + 1e-6)).sum())
        assert int((res.svd.S > cutoff).sum()) >= exact_above


def warm_state(backend, Y: torch.Tensor, cutoff: float) -> dict:
    state: dict = {}
    prox_step(Y, cutoff, backend=backend, state=state)
    return state


def low_rank_plus_noise(m=60, n=80, r=6, seed=0) -> torch.Tensor:
    s = torch.cat([torch.linspace(8, 3, r), torch.full((min(m, n) - r,), 0.3)]).double()
    return spectrum_matrix(m, n, s, seed)


def test_subspace_is_used_and_certified_on_a_warm_low_rank_matrix():
    Y = low_rank_plus_noise()
    backend = SubspaceBackend(iterations=2)
    state = warm_state(backend, Y, 1.0)
    assert state["backend"] == "exact" and state["basis"].shape == (60, 6 + 8)
    Y2 = drift(Y, 1e-4, 1)
    res = prox_step(Y2, 1.0, backend=backend, state=state)
    assert state["backend"] == "subspace" and not state["fallback"]
    bound = res.svd.error_bound.item()
    assert 0 < bound <= 1e-4 * Y2.norm().item()
    assert torch.linalg.matrix_norm(res.X - svt(Y2, 1.0)) <= bound


def test_auto_uses_gram_when_full_rank_and_subspace_when_low_rank():
    auto = AutoBackend(min_size=1)
    full = spectrum_matrix(30, 80, torch.linspace(9, 2, 30).double(), 0)
    state = warm_state(auto, full, 1.0)
    prox_step(full, 1.0, backend=auto, state=state)
    assert state["backend"] == "gram"
    square = spectrum_matrix(40, 40, torch.linspace(9, 2, 40).double(), 0)
    state = warm_state(auto, square, 1.0)
    assert state["backend"] == "exact"
    state = warm_state(AutoBackend(min_size=1, gram_aspect=1.0), square, 1.0)
    assert state["backend"] == "gram"  # the Gram route for squares when asked for
    low = low_rank_plus_noise(seed=3)
    state = warm_state(auto, low, 1.0)
    prox_step(drift(low, 1e-6, 2), 1.0, backend=auto, state=state)
    assert state["backend"] == "subspace"


def test_second_round_certifies_a_basis_one_power_step_cannot_fix():
    Y = low_rank_plus_noise()
    backend = SubspaceBackend(iterations=2)
    state = warm_state(backend, Y, 1.0)
    U = torch.linalg.svd(Y).U
    k = state["basis"].shape[-1]
    state["basis"] = U[:, :k] + U[:, -k:]  # 45 degrees off the signal
    res = prox_step(Y, 1.0, backend=backend, state=state)
    assert state["rounds"] == 2 and state["backend"] == "subspace" and not state["fallback"]
    bound = res.svd.error_bound.item()
    assert 0 < bound <= 1e-4 * Y.norm().item()
    assert torch.linalg.matrix_norm(res.X - svt(Y, 1.0)) <= bound
    # a hard step doubles the oversampling margin (8 for 6 triplets) of the next block
    assert k == 6 + 8 and state["basis"].shape[-1] == 6 + 2 * 8


@pytest.mark.parametrize("power", [0, 1, 3])
def test_every_power_of_the_tail_bound_certifies_a_clear_gap(power):
    # power 0: probes only; 1: the power step fused into the Ritz products; 3: two more
    s = torch.cat([torch.linspace(8, 3, 6), torch.full((54,), 0.01)]).double()
    Y = spectrum_matrix(60, 80, s, 7)
    backend = SubspaceBackend(power=power)
    state = warm_state(backend, Y, 1.0)
    res = prox_step(drift(Y, 1e-4, 2), 1.0, backend=backend, state=state)
    assert state["backend"] == "subspace" and not state["fallback"]
    bound = res.svd.error_bound.item()
    assert torch.linalg.matrix_norm(res.X - svt(drift(Y, 1e-4, 2), 1.0)) <= bound


def test_ritz_values_just_below_the_cutoff_join_the_certified_block():
    # s_drop = 0.999: sqrt(s_drop^2 + tail^2) > cutoff for any honest tail bound, so the
    # certificate must take the three values just below the cutoff into U_1
    s = torch.cat(
        [torch.linspace(8, 3, 6), torch.tensor([0.999, 0.998, 0.997]), torch.full((51,), 0.05)]
    )
    Y = spectrum_matrix(60, 80, s.double(), 8)
    backend = SubspaceBackend()
    state = warm_state(backend, Y, 1.0)
    Y2 = drift(Y, 1e-5, 3)
    res = prox_step(Y2, 1.0, backend=backend, state=state)
    assert state["backend"] == "subspace" and not state["fallback"] and state["triplets"] == 6
    bound = res.svd.error_bound.item()
    assert torch.linalg.matrix_norm(res.X - svt(Y2, 1.0)) <= bound <= 1e-4 * Y2.norm().item()


def test_fallback_when_the_warm_basis_misses_the_top_directions():
    Y = low_rank_plus_noise()
    backend = SubspaceBackend(iterations=1)
    state = warm_state(backend, Y, 1.0)
    U = torch.linalg.svd(Y).U
    state["basis"] = U[:, -state["basis"].shape[-1] :].clone()  # orthogonal to the signal
    res = prox_step(Y, 1.0, backend=backend, state=state)
    assert state["backend"] == "exact" and state["fallback"]
    assert res.svd.error_bound.item() == 0
    assert torch.allclose(res.X, svt(Y, 1.0), atol=1e-10)
    # the exact fallback rebuilt the basis: the next step is fast again
    prox_step(Y, 1.0, backend=backend, state=state)
    assert state["backend"] == "subspace" and not state["fallback"]


def test_uncertifiable_tail_gives_infinite_bound_and_exact_result():
    # a flat spectrum right at the cutoff: a small block cannot certify ||E22|| <= cutoff
    Y = spectrum_matrix(50, 50, torch.full((50,), 1.0).double() + 1e-3 * torch.arange(50), 4)
    backend = SubspaceBackend(iterations=1)
    state = {"basis": torch.eye(50, 5, dtype=torch.float64), "shape": (50, 50)}
    res = prox_step(Y, 1.02, backend=backend, state=state)
    assert state["fallback"] and state["backend"] == "exact"
    assert torch.allclose(res.X, svt(Y, 1.02), atol=1e-10)


def test_tol_controls_the_fallback():
    Y = low_rank_plus_noise()
    strict, loose = SubspaceBackend(tol=1e-14), SubspaceBackend(tol=1.0)
    for backend, fell_back in ((strict, True), (loose, False)):
        state = warm_state(backend, Y, 1.0)
        prox_step(drift(Y, 1e-2, 5), 1.0, backend=backend, state=state)
        assert state["fallback"] is fell_back


@pytest.mark.parametrize("name", FAST)
def test_batched_equals_unbatched(name):
    mats = [drift(low_rank_plus_noise(seed=s), 0, 0) for s in range(3)]
    cut = torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64)
    single = [make(name) for _ in mats]
    states_1 = [warm_state(b, Y, c.item()) for b, Y, c in zip(single, mats, cut, strict=True)]
    batched = make(name)
    states_b = [{} for _ in mats]
    prox_step(torch.stack(mats), cut, backend=batched, state=states_b)
    for step in range(2):
        Ys = [drift(Y, 1e-5, step) for Y in mats]
        one = [
            prox_step(Y, c, backend=b, state=s).X
            for Y, c, b, s in zip(Ys, cut, single, states_1, strict=True)
        ]
        many = prox_step(torch.stack(Ys), cut, backend=batched, state=states_b).X
        assert torch.allclose(many, torch.stack(one), atol=1e-9)
        assert [s["backend"] for s in states_b] == [s["backend"] for s in states_1]


def test_tall_and_wide_give_the_same_prox():
    Y = low_rank_plus_noise(40, 90)
    for name in FAST:
        a = prox_step(Y, 1.0, backend=make(name), state={}).X
        b = prox_step(Y.T.contiguous(), 1.0, backend=make(name), state={}).X
        assert torch.allclose(a, b.T, atol=1e-10)


def test_shape_change_raises_clearly():
    backend = AutoBackend()
    state = warm_state(backend, low_rank_plus_noise(), 1.0)
    with pytest.raises(ValueError, match="changed shape"):
        prox_step(low_rank_plus_noise(61, 80), 1.0, backend=backend, state=state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": 0}, "tol"),
        ({"tol": math.nan}, "tol"),
        ({"iterations": 0}, "iterations"),
        ({"refresh": 1.5}, "refresh"),
        ({"power": -1}, "power"),
        ({"max_ratio": -0.1}, "max_ratio"),
        ({"min_size": 0}, "min_size"),
    ],
)
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoBackend(**kwargs)


def test_state_must_match_the_batch():
    with pytest.raises(ValueError, match="sequence of 2 dicts"):
        prox_step(torch.randn(2, 5, 5), 0.1, backend=GramBackend(), state=[{}])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 48), torch.nn.Tanh(), torch.nn.Linear(48, 24), torch.nn.Linear(24, 48)
    )


def train(opt: proxrank.ProxRank, model: torch.nn.Module, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 24, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def build(model, backend=None, **kw) -> proxrank.ProxRank:
    backend = AutoBackend(min_size=1) if backend is None else backend
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return proxrank.ProxRank(base, model, lam=20.0, backend=backend, **kw)


def test_optimizer_auto_matches_exact_and_records_diagnostics():
    m_auto, m_exact = make_model(), make_model()
    o_auto, o_exact = build(m_auto), build(m_exact, "exact")
    train(o_auto, m_auto, 8)
    train(o_exact, m_exact, 8)
    for a, b in zip(m_auto.parameters(), m_exact.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    states = [info.backend_state for info in o_auto.matrices()]
    assert {s["backend"] for s in states} <= {"gram", "subspace", "exact"}
    assert all(float(s["error_bound"]) <= 1e-4 * 50 for s in states)


def test_bases_survive_state_dict_round_trip():
    model = make_model()
    opt = build(model)
    train(opt, model, 6)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    clone = make_model()
    clone.load_state_dict(saved["model"])
    opt2 = build(clone)
    opt2.load_state_dict(saved["opt"])
    pairs = zip(opt.matrices(), opt2.matrices(), strict=True)
    for a, b in ((x.backend_state, y.backend_state) for x, y in pairs):
        assert a.keys() == b.keys()
        if "basis" in a:
            assert torch.equal(a["basis"], b["basis"])
    train(opt, model, 3, seed=1)
    train(opt2, clone, 3, seed=1)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loading_into_a_resized_parameter_raises_and_changes_nothing():
    model = make_model()
    opt = build(model)
    train(opt, model, 2)
    sd = opt.state_dict()
    other = torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24), torch.nn.Linear(24, 48)
    )
    opt2 = build(other)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="shape"):
        opt2.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters(), strict=True))


def test_small_matrices_go_to_the_exact_svd_under_auto():
    state = warm_state(AutoBackend(), low_rank_plus_noise(), 1.0)
    assert state["backend"] == "exact"


def test_optimizer_tol_and_backend_options():
    assert build(make_model(), "gram", tol=1e-3).backend.tol == 1e-3
    assert isinstance(build(make_model(), "auto").backend, AutoBackend)
    with pytest.raises(ValueError, match="tol"):
        build(make_model(), "auto", tol=-1.0)
    with pytest.raises(ValueError, match="backend"):
        build(make_model(), "svd")


def test_half_precision_weights_use_a_float32_prox():
    model = make_model().to(torch.bfloat16)
    opt = build(model)
    train_x = torch.randn(8, 24, dtype=torch.bfloat16)
    opt.zero_grad()
    model(train_x).float().square().mean().backward()
    opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())


# -- regressions (issue 10) ------------------------------------------------------------------


def finite_state(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", FAST)
def test_a_layer_shrunk_to_zero_stores_nothing_nan_and_recovers(name):
    Y = low_rank_plus_noise(60, 120).float()
    backend, state = make(name), {}
    sequence = [Y, Y, torch.zeros_like(Y), torch.zeros_like(Y), Y, 0.2 * Y, Y]
    for Yt in sequence:  # 0.2 Y: a prox that zeroes everything
        res = prox_step(Yt, 1.0, backend=backend, state=state)
        assert finite_state(state) and torch.isfinite(res.X).all()
        err = torch.linalg.matrix_norm(res.X.double() - svt(Yt.double(), 1.0))
        assert err <= res.svd.error_bound.double() + 1e-5 * Yt.norm()


def test_a_nan_basis_from_an_old_checkpoint_is_dropped():
    Y = low_rank_plus_noise()
    backend = SubspaceBackend()
    state = warm_state(backend, Y, 1.0)
    state["basis"] = torch.full_like(state["basis"], math.nan)
    res = prox_step(Y, 1.0, backend=backend, state=state)
    assert finite_state(state)
    assert torch.allclose(res.X, svt(Y, 1.0), atol=1e-8)


def test_values_repeated_exactly_at_the_cutoff_on_the_first_step():
    s = torch.cat([torch.full((20,), 3.0), torch.full((60,), 1.0), 0.5 * torch.rand(80)])
    Y = spectrum_matrix(160, 320, s.double(), 0).float()
    for backend in (AutoBackend(), SubspaceBackend(), GramBackend()):
        state: dict = {}
        for _ in range(3):
            res = prox_step(Y, 1.0, backend=backend, state=state)
            err = torch.linalg.matrix_norm(res.X.double() - svt(Y.double(), 1.0))
            assert err <= res.svd.error_bound.double() + 1e-5 * Y.norm()
            assert finite_state(state)


def test_the_bound_covers_float32_rounding_on_a_decaying_spectrum():
    Y0 = spectrum_matrix(192, 448, 0.9 ** torch.arange(192).double(), 0)
    backend, state = AutoBackend(), {}
    used = set()
    for step in range(4):
        Y = drift(Y0, 1e-5, step)
        res = prox_step(Y.float(), 0.05, backend=backend, state=state)
        used.add(state["backend"])
        err = torch.linalg.matrix_norm(res.X.double() - svt(Y, 0.05)).item()
        assert err <= res.svd.error_bound.item()  # no allowance: the bound is the whole error
    assert used <= {"gram", "subspace"}


def failing_batch() -> tuple[torch.Tensor, list[dict]]:
    """Two 256 x 512 matrices under ``auto``: the first planned ``gram`` whose certificate
    fails (values repeated exactly at the cutoff), the second planned ``subspace`` whose
    warm basis misses the signal."""
    clustered = torch.cat([torch.full((30,), 3.0), torch.full((100,), 1.0), torch.zeros(126)])
    A = spectrum_matrix(256, 512, clustered.double(), 1)
    B = low_rank_plus_noise(256, 512, seed=2)
    U = torch.linalg.svd(B).U
    states = [{}, {"basis": U[:, -20:].clone(), "shape": (256, 512)}]
    return torch.stack([A, B]), states


def test_mixed_plans_whose_first_certificates_fail_in_one_batch():
    Y, states = failing_batch()
    backend = AutoBackend()
    assert [backend.planner.plan(s, 256, 512) for s in states] == ["gram", "subspace"]
    res = prox_step(Y, 1.0, backend=backend, state=states)
    assert all(s["rounds"] >= 2 for s in states)
    assert torch.allclose(res.X, svt(Y, 1.0), atol=1e-6)
    assert all(finite_state(s) for s in states)


@pytest.mark.parametrize("name", ["exact", *FAST])
@pytest.mark.parametrize("repeated", [False, True])
def test_rank_requests_return_the_largest_triplets(name, repeated):
    # a rank target asks for min_rank = r + 1 with cutoff +inf
    s = torch.linspace(5, 1, 40).double()
    if repeated:
        s[5:12] = s[5].item()  # seven equal values, the request's edge among them
    Y = spectrum_matrix(40, 90, s, 3)
    backend = AutoBackend(min_size=1) if name == "auto" else get_backend(name)
    state: dict = {}
    for r in (3, 6, 20, 39):  # the request grows past the warm block
        res = backend.svd(Y, torch.tensor(math.inf, dtype=Y.dtype), state, min_rank=r + 1)
        assert torch.allclose(res.S[: r + 1], s[: r + 1], atol=1e-9)
        assert finite_state(state)


class LinAlgFailure:
    """Makes ``torch.linalg.<fn>`` raise like LAPACK for inputs of the given dtypes."""

    def __init__(self, monkeypatch, fn: str, dtypes, element: int | None = None):
        self.real = getattr(torch.linalg, fn)
        self.dtypes, self.element, self.fn = dtypes, element, fn
        monkeypatch.setattr(torch.linalg, fn, self)

    def __call__(self, A, *args, **kwargs):
        if A.dtype in self.dtypes:
            where = "" if self.element is None else f"(Batch element {self.element}): "
            raise torch.linalg.LinAlgError(f"linalg.{self.fn}: {where}failed to converge")
        return self.real(A, *args, **kwargs)


@pytest.mark.parametrize(
    ("name", "fn"), [("exact", "svd"), ("gram", "eigh"), ("subspace", "eigh"), ("auto", "svd")]
)
def test_lapack_failures_are_retried_in_float64(monkeypatch, name, fn):
    Y = torch.stack([low_rank_plus_noise(seed=s) for s in range(2)]).float()
    backend = make(name)
    states = [{}, {}]
    prox_step(Y, 1.0, backend=backend, state=states)  # builds the bases
    LinAlgFailure(monkeypatch, fn, {torch.float32})
    res = prox_step(Y, 1.0, backend=backend, state=states)
    assert torch.allclose(res.X.double(), svt(Y.double(), 1.0), atol=1e-4)


@pytest.mark.parametrize("name", ["exact", "gram"])
@pytest.mark.parametrize("element", [None, 1])
def test_lapack_failure_in_float64_too_raises_backend_error_and_changes_nothing(
    monkeypatch, name, element
):
    from proxrank.backends import BackendError

    Y = torch.stack([low_rank_plus_noise(seed=s) for s in range(3)]).float()
    backend = make(name)
    states = [{}, {}, {}]
    prox_step(Y, 1.0, backend=backend, state=states)
    before = [dict(s) for s in states]
    LinAlgFailure(
        monkeypatch, "svd" if name == "exact" else "eigh", {torch.float32, torch.float64}, element
    )
    with pytest.raises(BackendError, match="float64") as info:
        prox_step(Y, 1.0, backend=backend, state=states)
    assert isinstance(info.value, RuntimeError) and info.value.index == element
    assert all(a == b for a, b in zip(before, states, strict=True))


def test_non_finite_input_raises_backend_error_naming_the_matrix():
    from proxrank.backends import BackendError

    Y = torch.stack([low_rank_plus_noise(seed=s) for s in range(3)])
    Y[2, 0, 0] = math.inf
    states = [{}, {}, {}]
    with pytest.raises(BackendError, match="matrix 2") as info:
        prox_step(Y, 1.0, backend=GramBackend(), state=states)
    assert info.value.index == 2 and states == [{}, {}, {}]


def run_steps(backend, states, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.stack([low_rank_plus_noise(60, 120, seed=s) for s in range(2)]).float()
    out = []
    for _ in range(steps):
        Y = base + 0.05 * torch.randn(base.shape, generator=g)
        out.append(prox_step(Y, 1.0, backend=backend, state=states).X)
    return out


@pytest.mark.parametrize("name", ["exact", *FAST])
def test_resume_is_bit_exact(name):
    import copy

    backend, states = make(name), [{}, {}]
    # refresh=2 under subspace: exact recomputations interleave and the basis grows at random
    if name == "subspace":
        backend = SubspaceBackend(refresh=2)
    run_steps(backend, states, 3, 0)
    saved = copy.deepcopy((backend.state_dict(), states))
    first = run_steps(backend, states, 4, 1)
    clone = make(name) if name != "subspace" else SubspaceBackend(refresh=2)
    clone.load_state_dict(saved[0])
    again = run_steps(clone, saved[1], 4, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert set(backend.state_dict()) <= {"generators"}


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ([], "expects"),
        ({"seed": 1}, "expects"),
        ({"generators": 3}, "generators"),
        ({"generators": {"cpu": torch.zeros(3)}}, "uint8"),
        ({"generators": {"cpu": torch.zeros(3, dtype=torch.uint8)}}, "invalid"),
        ({"generators": {"nowhere": torch.Generator().get_state()}}, "invalid"),
    ],
)
def test_bad_backend_state_raises_and_changes_nothing(bad, match):
    backend = SubspaceBackend()
    run_steps(backend, [{}, {}], 2, 0)
    before = backend.state_dict()
    with pytest.raises(ValueError, match=match):
        backend.load_state_dict(bad)
    after = backend.state_dict()
    assert before["generators"].keys() == after["generators"].keys() == {"cpu"}
    assert torch.equal(before["generators"]["cpu"], after["generators"]["cpu"])


def test_a_user_backend_needs_only_svd():
    class TopK(proxrank.Backend):
        def svd(self, Y, cutoff, state, min_rank=0):
            for entry in state:
                entry["backend"] = "topk"
            U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
            return SVDResult(U, S, Vh, torch.zeros(Y.shape[:-2], dtype=Y.dtype))

    backend = TopK()
    assert backend.state_dict() == {}
    backend.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        backend.load_state_dict({"generators": {}})
    states = [{}, {}]
    Y = torch.randn(2, 5, 7, dtype=torch.float64)
    assert torch.allclose(prox_step(Y, 0.5, backend=backend, state=states).X, svt(Y, 0.5))
    assert get_backend(backend) is backend and states[0]["backend"] == "topk"


@pytest.mark.parametrize("name", FAST)
def test_states_are_assigned_never_mutated_in_place(name):
    import copy

    backend, states = make(name), [{}, {}]
    run_steps(backend, states, 2, 0)
    snapshot = copy.deepcopy(states)
    copies = [dict(s) for s in states]  # shallow: the tensors are shared
    run_steps(backend, copies, 3, 1)
    for old, snap in zip(states, snapshot, strict=True):
        assert old.keys() == snap.keys()
        for key, value in old.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, snap[key])
            else:
                assert value == snap[key]


def test_auto_composes_a_planner_with_the_kernels():
    from proxrank.backends import AutoPlanner, CertifiedBackend

    auto = AutoBackend(min_size=64, max_ratio=0.5)
    assert isinstance(auto, CertifiedBackend) and not isinstance(auto, SubspaceBackend)
    assert isinstance(auto.planner, AutoPlanner) and auto.planner.min_size == 64
    assert "min_size=64" in repr(auto)
    with pytest.raises(ValueError, match="planner"):
        CertifiedBackend("auto")


# -- polar (matrix products only) ------------------------------------------------------------


def _spectral(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    level=st.floats(0.0, 1.2),
    scale=st.sampled_from([1e-20, 1.0, 1e20]),
    double=st.booleans(),
)
def test_polar_svt_matches_float64_svt_within_its_bound(m, n, seed, level, scale, double):
    """Random spectra in [0, 1] (some values exactly zero), the threshold anywhere in them:
    polar_svt is within its bound of the float64 SVT, and the bound is small in float64."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = torch.rand(k, generator=g, dtype=torch.float64)
    s[torch.rand(k, generator=g) < 0.2] = 0
    Y = _spectral(m, n, s, seed) * scale
    tau = torch.tensor(level * scale, dtype=torch.float64)
    ref = svt(Y, tau)
    dtype = torch.float64 if double else torch.float32
    X, bound = polar_svt(Y.to(dtype), tau.to(dtype))
    assert X.shape == Y.shape and X.dtype == dtype and torch.isfinite(X).all()
    err = float(torch.linalg.matrix_norm(X.double() - ref))
    assert err <= float(bound) + 1e-6 * float(torch.linalg.matrix_norm(Y))
    if double:
        assert float(bound) <= 1e-4 * float(torch.linalg.matrix_norm(Y)) + 1e-300


def test_polar_svt_batched_equals_one_by_one():
    Y = torch.randn(3, 20, 12, dtype=torch.float64)
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    X, bound = polar_svt(Y, tau)
    for i in range(3):
        Xi, bi = polar_svt(Y[i], tau[i])
        torch.testing.assert_close(X[i], Xi)
        torch.testing.assert_close(bound[i], bi)
        torch.testing.assert_close(X[i], svt(Y[i], tau[i]), atol=1e-9, rtol=0)


def test_polar_svt_traces_without_graph_breaks():
    """No host synchronisation nor data-dependent control flow: one graph."""
    compiled = torch.compile(polar_svt, fullgraph=True, backend="aot_eager")
    Y = torch.randn(2, 16, 24, dtype=torch.float64)
    tau = torch.tensor([0.3, 0.6], dtype=torch.float64)
    X, bound = compiled(Y, tau)
    torch.testing.assert_close(X, svt(Y, tau), atol=1e-9, rtol=0)
    assert torch.isfinite(bound).all()


def test_polar_backend_prox_and_fallbacks():
    Y = _spectral(30, 50, torch.linspace(3, 0.1, 30, dtype=torch.float64), 1).float()
    states: list[dict] = [{}]
    out = prox_step(Y[None], 1.0, backend=get_backend("polar"), state=states)
    assert states[0]["backend"] == "polar" and not states[0]["fallback"]
    ref = svt(Y.double(), 1.0)
    assert float((out.X[0].double() - ref).norm()) <= float(states[0]["error_bound"]) + 1e-5
    # a rank request goes to the exact SVD
    res = get_backend("polar").svd(Y, torch.tensor(math.inf), {}, min_rank=3)
    top = torch.linalg.svdvals(Y.double())[:3]
    torch.testing.assert_close(res.S[:3].double(), top, rtol=1e-5, atol=0)


@pytest.mark.parametrize("floor", [0.0, 1.0, -1e-3, math.inf])
def test_polar_rejects_bad_floor(floor):
    with pytest.raises(ValueError, match="floor"):
        PolarBackend(floor=floor)


def test_polar_rejects_bad_tol():
    with pytest.raises(ValueError, match="tol"):
        get_backend("polar", tol=-1.0)


def test_auto_planner_falls_back_to_gram_for_oblong_matrices_only():
    from proxrank.backends import AutoPlanner

    planner = AutoPlanner()
    assert planner.fallback(384, 1536) == "gram" and planner.fallback(384, 384) == "exact"
    assert planner.fallback(100, 1000) == "exact"  # below min_size: the SVD
    basis = torch.zeros(384, 40)
    late = {"backend": "gram", "rounds": 3, "basis": basis, "since_refresh": 0}
    assert planner.plan(late, 384, 1536) == "gram"  # its subspace rounds failed last step
    assert planner.plan({**late, "rounds": 1}, 384, 1536) == "subspace"
    assert planner.plan(late, 384, 384) == "exact"
    failed = {**late, "backend": "exact"}
    assert planner.plan(failed, 384, 384) == "exact"
    assert planner.plan({**failed, "rounds": 1}, 384, 384) == "subspace"


def test_subspace_rounds_that_fail_take_the_gram_route_before_the_exact_svd():
    # a rank request whose (r+1)-th value sits in a dense tail: the tail bound cannot
    # certify it, the float64 Gram eigendecomposition can
    g = torch.Generator().manual_seed(0)
    m, n, r = 170, 400, 20
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    top = 2 + torch.rand(r, generator=g, dtype=torch.float64)
    s = torch.cat([top, 0.05 * torch.rand(m - r, generator=g, dtype=torch.float64)])
    Y = ((U * s.sort(descending=True).values) @ V.T).float()
    backend = AutoBackend()
    state: dict = {}
    seen = set()
    for _ in range(4):
        Yt = Y + 1e-4 * torch.randn(Y.shape, generator=g)
        res = rank_prox_step(Yt, r, SoftThreshold(), backend, state)
        seen.add((state["backend"], state["rounds"] > 1))
        S = torch.linalg.svdvals(Yt.double())
        assert (res.svd.S[: r + 1].double() - S[: r + 1]).abs().max() <= res.svd.error_bound + 1e-5
    assert ("gram", True) in seen

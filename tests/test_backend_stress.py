"""Randomized stress test of every backend against a float64 exact SVD.

Random batches (shapes square, oblong and transposed, up to 200 on the smaller side; spectra
random, decaying, clustered exactly at the cutoff, zero, rank-deficient, at huge and tiny
scales; cutoffs through the spectrum, zero, above it; rank requests), several consecutive
steps with warm state and small drifts. Per call: the soft-threshold prox built from the
result is within the reported bound plus a float32 rounding allowance of the float64 prox,
and the bound is within ``tol ||Y||_F`` (or the matrix fell back to the exact SVD); rank
requests return the largest values; nothing NaN or infinite is returned or stored; stored
tensors are never mutated in place. Dense tails (:func:`dense_tail_case`): low-rank plus a
noise tail with the cutoff or the rank request inside it, through the certificate from the
spectrum (``spectrum=True``), the rank prox itself checked against its float64 reference.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from proxrank.backends import (
    AutoBackend,
    ExactBackend,
    GramBackend,
    PolarBackend,
    SubspaceBackend,
)
from proxrank.functional import reconstruct

TOL = 1e-4
KINDS = ("random", "decaying", "cluster", "zero", "deficient", "gap")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_backend(name: str):
    return {
        "exact": ExactBackend,
        "gram": lambda: GramBackend(tol=TOL),
        "subspace": lambda: SubspaceBackend(tol=TOL),
        "auto": lambda: AutoBackend(tol=TOL),
        "auto-small": lambda: AutoBackend(tol=TOL, min_size=1),
        "polar": lambda: PolarBackend(tol=TOL),
    }[name]()


BACKENDS = ("exact", "gram", "subspace", "auto", "auto-small")
ALL = (*BACKENDS, "polar")  # polar has its own random cases (test_stress_polar)


def randint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (), generator=g))


def uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def spectrum(kind: str, k: int, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """Singular values (float64, length ``k``) and a cutoff for them."""
    if kind == "zero":
        return torch.zeros(k, dtype=torch.float64), uniform(g)
    if kind == "decaying":
        s = (0.5 + 0.45 * uniform(g)) ** torch.arange(k, dtype=torch.float64)
    elif kind == "cluster":  # many values exactly at the cutoff, some just around it
        s = 0.8 * torch.rand(k, generator=g, dtype=torch.float64)
        top = randint(g, 0, k // 3)
        reps = randint(g, 1, max(1, k - top))
        s[:top] = 1.5 + torch.rand(top, generator=g, dtype=torch.float64)
        s[top : top + reps] = 1.0
        s[top + reps : top + reps + 3] = 1.0 + 1e-7 * torch.randn(
            min(3, max(0, k - top - reps)), generator=g, dtype=torch.float64
        )
        return s.abs().sort(descending=True).values, 1.0
    elif kind == "deficient":
        s = torch.zeros(k, dtype=torch.float64)
        r = randint(g, 0, k - 1)
        s[:r] = 0.1 + torch.rand(r, generator=g, dtype=torch.float64)
    elif kind == "gap":
        r = randint(g, 0, k)
        s = torch.cat(
            [
                2 + torch.rand(r, generator=g, dtype=torch.float64),
                0.3 * torch.rand(k - r, generator=g, dtype=torch.float64),
            ]
        )
        s = s.sort(descending=True).values
        return s, 1.0
    else:
        s = torch.rand(k, generator=g, dtype=torch.float64).sort(descending=True).values
    s = s.sort(descending=True).values
    choice = randint(g, 0, 4)
    if choice == 0:
        cut = 0.0
    elif choice == 1:
        cut = float(s[0]) * (1 + uniform(g))  # above the spectrum: the prox zeroes everything
    else:
        cut = float(s[randint(g, 0, k - 1)])  # exactly at a value
    return s, cut


def matrix(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * s) @ V.T


def finite_states(states: list[dict]) -> None:
    for st in states:
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), f"non-finite state {key!r}"


def check_call(backend, Y: torch.Tensor, cut: torch.Tensor, states, min_rank: int) -> None:
    """One backend call on a batch ``Y`` with the float64 checks."""
    frozen = [{k: v for k, v in st.items() if isinstance(v, torch.Tensor)} for st in states]
    before = copy.deepcopy(frozen)
    res = backend.svd(Y, cut, states, min_rank=min_rank)
    for old, snap in zip(frozen, before, strict=True):  # assigned, never mutated in place
        for key in old:
            assert torch.equal(old[key], snap[key]), f"{key!r} mutated in place"
    finite_states(states)
    for t in res:
        assert torch.isfinite(t).all()
    Yd = Y.double()
    U, S, Vh = torch.linalg.svd(Yd, full_matrices=False)
    u = torch.finfo(Y.dtype).eps / 2
    norms = torch.linalg.matrix_norm(Yd)
    m, n = Y.shape[-2:]
    allow = 30 * u * math.sqrt(max(m, n)) * norms  # rounding of the reconstruction itself
    if min_rank == 0:
        ref = reconstruct(U, (S - cut.double().unsqueeze(-1)).clamp_min(0), Vh)
        S_new = (res.S.double() - cut.double().unsqueeze(-1)).clamp_min(0)
        X = reconstruct(res.U.double(), S_new, res.Vh.double())
        err = torch.linalg.matrix_norm(X - ref)
        # every value above the cutoff by more than the bound is returned (Weyl)
        margin = (res.error_bound.double() + allow).unsqueeze(-1)
        above = (S > cut.double().unsqueeze(-1) + margin).sum(-1)
        assert bool(((res.S > cut.unsqueeze(-1)).sum(-1) >= above).all())
    else:  # the min_rank largest values
        got = res.S[..., :min_rank].double()
        err = (got - S[..., :min_rank]).abs().amax(-1)
    bound = res.error_bound.double()
    for i, st in enumerate(states):
        assert err[i] <= bound[i] + allow[i], (
            f"{st.get('backend')}: error {err[i]:.3g} > bound {bound[i]:.3g} + {allow[i]:.3g}"
        )
        assert bound[i] <= TOL * norms[i] + allow[i] or st.get("backend") == "exact"


def run_case(seed: int, name: str | None = None, big: bool = False) -> None:
    """One random batch through a random (or the named) backend for a few steps."""
    g = torch.Generator().manual_seed(seed)
    name = name or BACKENDS[randint(g, 0, len(BACKENDS) - 1)]
    small = randint(g, 160, 200) if big else randint(g, 1, 40)
    large = small * (1 + randint(g, 0, 2)) + randint(g, 0, 8)
    m, n = (small, large) if uniform(g) < 0.5 else (large, small)
    b = randint(g, 1, 3)
    dtype = torch.float32 if uniform(g) < 0.8 else torch.float64
    scale = [1.0, 1e-25, 1e25, 1e-8, 1e8][randint(g, 0, 4) if uniform(g) < 0.3 else 0]
    k = min(m, n)
    mats, cuts = [], []
    for _ in range(b):
        kind = KINDS[randint(g, 0, len(KINDS) - 1)]
        s, cut = spectrum(kind, k, g)
        mats.append(matrix(m, n, s, g) * scale)
        cuts.append(cut * scale)
    Y0 = torch.stack(mats)
    rank_request = uniform(g) < 0.15
    min_rank = randint(g, 1, k) if rank_request else 0
    cut = torch.tensor(cuts, dtype=torch.float64)
    if rank_request:
        cut = torch.full((b,), math.inf, dtype=torch.float64)
    backend = make_backend(name)
    states: list[dict] = [{} for _ in range(b)]
    for _ in range(randint(g, 1, 4)):
        drift = 1e-3 * torch.randn(Y0.shape, generator=g, dtype=torch.float64)
        Y = Y0 + drift * torch.linalg.matrix_norm(Y0)[:, None, None] / math.sqrt(m * n)
        if uniform(g) < 0.1:  # a layer shrunk to exactly zero
            Y[randint(g, 0, b - 1)] = 0
        check_call(backend, Y.to(dtype), cut.to(dtype), states, min_rank)


@pytest.mark.parametrize("seed", range(40))
def test_stress_quick(seed):
    run_case(seed)


@pytest.mark.parametrize("seed", range(12))
def test_stress_polar(seed):
    run_case(500 + seed, "polar")


@pytest.mark.parametrize("name", ALL)
def test_stress_large_matrices(name):
    for seed in range(4):
        run_case(1000 + seed, name, big=True)


@pytest.mark.slow
def test_stress_many_batches():
    for seed in range(100, 2100):
        run_case(seed)


@pytest.mark.slow
def test_stress_many_polar_batches():
    for seed in range(3000, 3400):
        run_case(seed, "polar")


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_stress_many_large_batches(name):
    for seed in range(8):
        run_case(2000 + seed, name, big=True)


def dense_tail_case(seed: int, name: str) -> tuple[int, int]:
    """A low-rank matrix plus a dense noise tail (what one optimizer step adds to a rank-``r``
    weight), warm steps with drifts, a rank request or a cutoff inside the tail: the tail
    bound cannot certify, the spectrum can. Checks as :func:`check_call`, and for rank
    requests the rank prox (soft threshold at the ``min_rank``-th value) within the bound
    when the spectrum certified it. Returns (calls certified by the spectrum, calls)."""
    g = torch.Generator().manual_seed(seed)
    m = randint(g, 40, 90)
    n = m * (1 + randint(g, 0, 2))
    m, n = (m, n) if uniform(g) < 0.7 else (n, m)
    k = min(m, n)
    b = randint(g, 1, 3)
    r = randint(g, 1, k // 3)
    dtype = torch.float32 if uniform(g) < 0.8 else torch.float64
    mats = []
    for _ in range(b):
        top = 1 + 3 * torch.rand(r, generator=g, dtype=torch.float64)
        tail = 0.05 * torch.rand(k - r, generator=g, dtype=torch.float64)
        s = torch.cat([top, tail]).sort(descending=True).values
        mats.append(matrix(m, n, s, g))
    Y0 = torch.stack(mats)
    rank_request = uniform(g) < 0.6
    min_rank = r + 1 if rank_request else 0
    cut = torch.full((b,), math.inf if rank_request else 0.03, dtype=torch.float64)
    backend = make_backend(name)
    backend.spectrum = True
    states: list[dict] = [{} for _ in range(b)]
    spectral = calls = 0
    for _ in range(randint(g, 3, 5)):
        drift = 1e-3 * torch.randn(Y0.shape, generator=g, dtype=torch.float64)
        Y = (Y0 + drift * torch.linalg.matrix_norm(Y0)[:, None, None] / math.sqrt(m * n)).to(dtype)
        res = backend.svd(Y, cut.to(dtype), states, min_rank=min_rank)
        check_call(backend, Y, cut.to(dtype), [dict(st) for st in states], min_rank)
        for i, st in enumerate(states):
            calls += 1
            if not st.get("spectrum"):
                continue
            spectral += 1
            if rank_request:  # the rank prox itself, not only the values
                U, S, Vh = torch.linalg.svd(Y[i].double(), full_matrices=False)
                ref = reconstruct(U, (S - S[r]).clamp_min(0), Vh)
                got = res.S[i].double()
                X = reconstruct(res.U[i].double(), (got - got[r]).clamp_min(0), res.Vh[i].double())
                allow = 30 * torch.finfo(dtype).eps * math.sqrt(max(m, n)) * S.norm()
                assert (X - ref).norm() <= res.error_bound[i].double() + allow
    return spectral, calls


@pytest.mark.parametrize("name", ["subspace", "auto-small"])
def test_stress_dense_tail(name):
    spectral = calls = 0
    for seed in range(6):
        got = dense_tail_case(4000 + seed, name)
        spectral, calls = spectral + got[0], calls + got[1]
    assert spectral > 0, "the spectrum certified nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["subspace", "auto-small"])
def test_stress_many_dense_tails(name):
    spectral = calls = 0
    for seed in range(200):
        got = dense_tail_case(5000 + seed, name)
        spectral, calls = spectral + got[0], calls + got[1]
    assert spectral > calls // 10, f"the spectrum certified {spectral} of {calls} calls"

"""Global rank allocation (proxrank.budget) against brute force over all rank combinations."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxrank.budget import allocate_ranks, budget_size, layer_cost

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw, max_layers=3):
    """A few small layers with random spectra, curvature weights and cost weights."""
    L = draw(st.integers(1, max_layers))
    shapes = [(draw(st.integers(2, 6)), draw(st.integers(2, 6))) for _ in range(L)]
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    spectra = [torch.tensor(rng.uniform(0.01, 3.0, min(s))) for s in shapes]
    weights = [float(x) for x in rng.uniform(0.1, 10.0, L)]
    return shapes, spectra, weights


def _reference(shapes, spectra, weights, min_rank=1):
    """(cost, loss) of every rank combination, from the definitions."""
    per_layer = []
    for (m, n), s, f in zip(shapes, spectra, weights, strict=True):
        s = np.sort(s.numpy())[::-1]
        k = min(m, n)
        per_layer.append(
            [
                (r, layer_cost(m, n, r), 0.5 * f * float((s[r:] ** 2).sum()))
                for r in range(min_rank, k + 1)
            ]
        )
    for combo in itertools.product(*per_layer):
        yield (
            tuple(r for r, _, _ in combo),
            sum(c for _, c, _ in combo),
            sum(d for _, _, d in combo),
        )


@SETTINGS
@given(problems(), st.floats(0.0, 1.0))
def test_budget_mode_is_optimal(problem, where):
    shapes, spectra, weights = problem
    lo = sum(layer_cost(m, n, 1) for m, n in shapes)
    full = sum(m * n for m, n in shapes)
    budget = int(lo + where * (full - lo))
    alloc = allocate_ranks(spectra, shapes, budget=budget, weights=weights, method="exact")
    best = min(d for _, c, d in _reference(shapes, spectra, weights) if c <= budget)
    assert alloc.cost <= budget
    assert alloc.predicted_loss == pytest.approx(best, rel=1e-9, abs=1e-12)
    # the reported cost and loss are those of the reported ranks
    ref = {ranks: (c, d) for ranks, c, d in _reference(shapes, spectra, weights)}
    assert ref[alloc.ranks][0] == alloc.cost
    assert ref[alloc.ranks][1] == pytest.approx(alloc.predicted_loss, rel=1e-9, abs=1e-12)


@SETTINGS
@given(problems(), st.floats(0.0, 1.0))
def test_compact_mode_is_optimal(problem, where):
    shapes, spectra, weights = problem
    combos = list(_reference(shapes, spectra, weights))
    tolerance = where * max(d for _, _, d in combos)
    alloc = allocate_ranks(
        spectra, shapes, mode="compact", tolerance=tolerance, weights=weights, method="exact"
    )
    best = min(c for _, c, d in combos if d <= tolerance)
    assert alloc.predicted_loss <= tolerance
    assert alloc.cost == best


@SETTINGS
@given(problems(max_layers=4), st.floats(0.0, 1.0))
def test_greedy_respects_budget_and_tolerance(problem, where):
    shapes, spectra, weights = problem
    lo = sum(layer_cost(m, n, 1) for m, n in shapes)
    budget = int(lo + where * (sum(m * n for m, n in shapes) - lo))
    greedy = allocate_ranks(spectra, shapes, budget=budget, weights=weights, method="greedy")
    exact = allocate_ranks(spectra, shapes, budget=budget, weights=weights, method="exact")
    assert greedy.cost <= budget
    assert budget_size(budget, shapes) == budget
    assert greedy.predicted_loss >= exact.predicted_loss - 1e-12
    tol = where * exact.predicted_loss
    compact = allocate_ranks(
        spectra, shapes, mode="compact", tolerance=tol, weights=weights, method="greedy"
    )
    assert compact.predicted_loss <= tol + 1e-12


def test_fisher_weight_keeps_more_rank_where_the_loss_is_sensitive():
    s = torch.linspace(2.0, 0.1, 16)
    shapes = [(16, 16), (16, 16)]
    plain = allocate_ranks([s, s], shapes, budget=0.3)
    assert plain.ranks[0] == plain.ranks[1]
    weighted = allocate_ranks([s, s], shapes, budget=0.3, weights=[100.0, 1.0])
    assert weighted.ranks[0] > weighted.ranks[1]


def test_layers_that_would_not_save_count_at_full_size():
    assert layer_cost(10, 10, 4) == 80
    assert layer_cost(10, 10, 5) == 100  # r (m + n) = m n: no saving
    assert layer_cost(10, 10, 9) == 100
    s = torch.ones(10)
    alloc = allocate_ranks([s], [(10, 10)], budget=1.0)
    assert alloc.ranks == (10,) and alloc.cost == alloc.full_cost == 100


def test_cost_weights_count_flops():
    s = torch.linspace(1.0, 0.1, 8)
    alloc = allocate_ranks([s, s], [(8, 8), (8, 8)], budget=640, cost_weights=[9.0, 1.0])
    assert alloc.full_cost == 640.0
    assert alloc.cost <= 640
    cheap = allocate_ranks([s, s], [(8, 8), (8, 8)], budget=400, cost_weights=[9.0, 1.0])
    assert cheap.ranks[0] < cheap.ranks[1]  # the expensive layer is cut first


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 1.5}, r"budget=1.5 .* \(0, 1\]"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": 10}, "below the smallest possible size"),
        ({"budget": 0.01, "min_rank": 3}, "below the smallest possible size"),
        ({"budget": 0.5, "tolerance": 1.0}, "budget"),
        ({"mode": "compact"}, "tolerance"),
        ({"mode": "compact", "tolerance": -1.0}, "tolerance must be"),
        ({"mode": "smallest", "budget": 0.5}, "mode="),
        ({"budget": 0.5, "weights": [1.0]}, "weights must hold one"),
        ({"budget": 0.5, "cost_weights": [1.0, 0.0]}, "cost_weights"),
        ({"budget": 0.5, "method": "dp"}, "method="),
        ({"budget": 0.5, "min_rank": -1}, "min_rank"),
    ],
)
def test_errors(kwargs, match):
    s = torch.linspace(1.0, 0.1, 8)
    with pytest.raises(ValueError, match=match):
        allocate_ranks([s, s], [(8, 8), (8, 8)], **kwargs)


def test_type_and_shape_errors():
    s = torch.ones(8)
    with pytest.raises(TypeError, match="budget must be"):
        allocate_ranks([s], [(8, 8)], budget=True)
    with pytest.raises(ValueError, match="8 singular values"):
        allocate_ranks([torch.ones(5)], [(8, 8)], budget=0.5)
    with pytest.raises(ValueError, match="same layers"):
        allocate_ranks([s], [(8, 8), (8, 8)], budget=0.5)

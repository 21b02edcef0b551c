"""TT-SVD rounding and the TT-matrix layout (:mod:`proxrank.tt`) against plain references."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from proxrank.tt import (
    factor_shape,
    from_tt_tensor,
    to_tt_tensor,
    tt_full,
    tt_parameters,
    tt_round,
    tt_svd,
)


@st.composite
def layouts(draw):
    d = draw(st.integers(1, 3))
    rows = tuple(draw(st.integers(1, 4)) for _ in range(d))
    cols = tuple(draw(st.integers(1, 4)) for _ in range(d))
    return rows, cols


@given(layouts(), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_layout_round_trip_and_entries(layout, seed):
    rows, cols = layout
    m, n = math.prod(rows), math.prod(cols)
    W = torch.randn(2, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    T = to_tt_tensor(W, rows, cols)
    assert T.shape == (2, *(r * c for r, c in zip(rows, cols, strict=True)))
    assert torch.equal(from_tt_tensor(T, rows, cols), W)
    # one entry by the definition: T[(i_k, j_k)_k] = W[(i_1..i_d), (j_1..j_d)]
    i = [r - 1 for r in rows]
    j = [c - 1 for c in cols]
    row = sum(i[k] * math.prod(rows[k + 1 :]) for k in range(len(rows)))
    col = sum(j[k] * math.prod(cols[k + 1 :]) for k in range(len(cols)))
    assert T[(1, *(i[k] * cols[k] + j[k] for k in range(len(rows))))] == W[1, row, col]


@given(layouts(), st.integers(1, 4), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_tt_round_is_exact_on_low_tt_rank_and_idempotent(layout, r, seed):
    rows, cols = layout
    g = torch.Generator().manual_seed(seed)
    modes = [a * b for a, b in zip(rows, cols, strict=True)]
    ranks = [1] + [r] * (len(modes) - 1) + [1]
    cores = [
        torch.randn(ranks[k], modes[k], ranks[k + 1], generator=g, dtype=torch.float64)
        for k in range(len(modes))
    ]
    W = from_tt_tensor(tt_full(cores), rows, cols)
    torch.testing.assert_close(tt_round(W, rows, cols, r), W, rtol=1e-9, atol=1e-9)
    V = torch.randn(W.shape, generator=g, dtype=torch.float64)
    once = tt_round(V, rows, cols, r)
    torch.testing.assert_close(tt_round(once, rows, cols, r), once, rtol=1e-9, atol=1e-9)


@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
@settings(max_examples=30, deadline=None)
def test_quasi_optimal_error_and_bond_ranks(seed, r):
    rows, cols = (2, 3, 2), (3, 2, 2)
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64)
    T = to_tt_tensor(W, rows, cols)
    cores = tt_svd(T, r)
    for k, G in enumerate(cores[:-1]):
        assert G.shape[-1] <= r
        # the rank of unfolding k of the rounded tensor is at most r
        R = tt_full(cores).reshape(math.prod(T.shape[: k + 1]), -1)
        assert torch.linalg.matrix_rank(R) <= r
    err = (tt_full(cores) - T).norm()
    bound = 0.0
    for k in range(T.dim() - 1):
        s = torch.linalg.svdvals(T.reshape(math.prod(T.shape[: k + 1]), -1))
        bound += (s[r:] ** 2).sum()
    assert err <= math.sqrt(bound) * (1 + 1e-9) + 1e-12


def test_batched_equals_one_by_one():
    W = torch.randn(3, 8, 9, dtype=torch.float64)
    out = tt_round(W, (2, 4), (3, 3), 2)
    for b in range(3):
        torch.testing.assert_close(out[b], tt_round(W[b], (2, 4), (3, 3), 2))


def test_factor_shape_and_parameters():
    assert factor_shape(256, 2) == (16, 16)
    assert math.prod(factor_shape(384, 3)) == 384
    assert factor_shape(7, 2) == (7, 1)
    assert tt_parameters((4, 4), (4, 4), (3,)) == 16 * 3 + 3 * 16
    with pytest.raises(ValueError, match="products must be"):
        to_tt_tensor(torch.zeros(6, 6), (2, 2), (3, 2))
    with pytest.raises(ValueError, match="TT ranks"):
        tt_svd(torch.zeros(2, 2, 2), (1,))

"""proxrank.factorize, tensor-train and sparse forms: TTLinear applies the TT cores of the
rounded weight (float64 reference), costs tt_parameters numbers and the multiply-adds it
reports; SparseLinear equals the dense layer; factorize picks them when smaller, says why not
otherwise, and reloads them."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from proxrank import factorize, load_factorized
from proxrank.factorize import SparseLinear, TTLinear, tt_numerical_ranks
from proxrank.tt import default_layout, tt_parameters, tt_round


@st.composite
def layouts(draw):
    d = draw(st.integers(1, 3))
    rows = tuple(draw(st.integers(1, 4)) for _ in range(d))
    cols = tuple(draw(st.integers(1, 4)) for _ in range(d))
    return rows, cols


def tt_low_rank(rows, cols, rank, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(math.prod(rows), math.prod(cols), generator=gen, dtype=torch.float64)
    return tt_round(W, rows, cols, rank).to(dtype)


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), rank=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 99))
def test_tt_linear_applies_the_rounded_weight(layout, rank, bias, seed):
    rows, cols = layout
    W = tt_low_rank(rows, cols, rank, seed)
    b = torch.randn(W.shape[0], dtype=torch.float64) if bias else None
    layer = TTLinear.from_dense(W, b, rows, cols)
    x = torch.randn(3, 2, W.shape[1], dtype=torch.float64)
    ref = x @ W.T + (0 if b is None else b)
    assert torch.allclose(layer(x), ref, atol=1e-12 * max(1.0, float(ref.abs().max())))
    assert torch.allclose(layer.weight, W, atol=1e-12)
    assert all(r <= rank for r in layer.ranks)
    cores = sum(G.numel() for G in layer.cores)
    assert layer.parameters_count() == cores == tt_parameters(rows, cols, layer.ranks)
    assert sum(p.numel() for p in layer.parameters()) == cores + (0 if b is None else W.shape[0])
    if min(rows + cols) >= 2:  # a contraction over a size-1 mode is a product torch does not count
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * layer.macs(6)


@settings(max_examples=20, deadline=None)
@given(layout=layouts(), ranks=st.integers(1, 3), seed=st.integers(0, 99))
def test_tt_linear_with_given_ranks_is_the_tt_rounding(layout, ranks, seed):
    rows, cols = layout
    W = torch.randn(math.prod(rows), math.prod(cols), dtype=torch.float64)
    layer = TTLinear.from_dense(W, None, rows, cols, ranks=ranks)
    assert torch.allclose(layer.weight, tt_round(W, rows, cols, ranks), atol=1e-12)


def test_tt_numerical_ranks_and_default_layout():
    W = tt_low_rank((2, 3, 4), (4, 3, 2), 2)
    assert tt_numerical_ranks(W, (2, 3, 4), (4, 3, 2)) == (2, 2)
    layer = TTLinear.from_dense(W.float())  # the default layout of 24 x 24
    assert (layer.row_shape, layer.col_shape) == default_layout(24, 24)
    assert layer.weight.dtype == torch.float32 and layer.tt_shape.tolist() == [
        list(layer.row_shape),
        list(layer.col_shape),
    ]


def test_tt_linear_trains_and_refuses_bad_input():
    W = tt_low_rank((2, 4), (3, 2), 2, dtype=torch.float32).requires_grad_()
    layer = TTLinear.from_dense(W, torch.zeros(8, requires_grad=True), (2, 4), (3, 2))
    layer(torch.randn(5, 6)).square().sum().backward()
    assert all(G.grad is not None for G in layer.cores) and layer.bias.grad is not None
    with pytest.raises(AttributeError, match="cannot be assigned"):
        layer.weight = W
    with pytest.raises(ValueError, match="TT core 1"):
        TTLinear([torch.zeros(1, 6, 2), torch.zeros(3, 8, 1)], (2, 4), (3, 2))
    with pytest.raises(ValueError, match="as many cores"):
        TTLinear([torch.zeros(1, 6, 1)], (2, 4), (3, 2))
    with pytest.raises(ValueError, match="bias"):
        TTLinear([torch.zeros(1, 6, 1)], (2,), (3,), torch.zeros(3))
    with pytest.raises(ValueError, match="needs a matrix"):
        TTLinear.from_dense(torch.zeros(8))
    with pytest.raises(ValueError, match="cannot be read"):
        TTLinear.from_dense(torch.zeros(8, 6), row_shape=(3, 3), col_shape=(3, 2))


# -- CSR ---------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.2, 0.6, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 99),
)
def test_sparse_linear_equals_dense(m, n, density, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    W = W * (torch.rand(m, n, generator=gen) < density)
    b = torch.randn(m, generator=gen, dtype=torch.float64) if bias else None
    layer = SparseLinear.from_dense(W.requires_grad_(), b)
    x = torch.randn(4, 2, n, generator=gen, dtype=torch.float64)
    ref = x @ W.T + (0 if b is None else b)
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert torch.equal(layer.weight, W)
    assert layer.nnz == int((W != 0).sum()) and layer.stored_numbers() == 2 * layer.nnz + m + 1
    layer(x).sum().backward()
    (x @ W.T).sum().backward()
    assert torch.allclose(layer.values.grad, W.grad[W != 0])


def test_sparse_linear_refuses_a_malformed_csr():
    with pytest.raises(ValueError, match="not a CSR matrix"):
        SparseLinear(3, 2, torch.tensor([0, 2, 1]), torch.tensor([0]), torch.ones(1))
    with pytest.raises(ValueError, match="not a CSR matrix"):
        SparseLinear(3, 2, torch.tensor([0, 1, 1]), torch.tensor([3]), torch.ones(1))
    with pytest.raises(ValueError, match="bias"):
        SparseLinear.from_dense(torch.eye(3), torch.zeros(2))
    with pytest.raises(AttributeError, match="cannot be assigned"):
        SparseLinear.from_dense(torch.eye(3)).weight = torch.eye(3)


# -- factorize -------------------------------------------------------------------------------


def tt_model(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 60), nn.ReLU(), nn.Linear(60, 10)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(tt_low_rank((5, 4, 3), (2, 3, 4), 2, dtype=dtype))
    return model


def test_factorize_tt_replaces_a_low_tt_rank_linear():
    model = tt_model()
    x = torch.randn(7, 24, dtype=torch.float64)
    small, summary = factorize(model, tt={"0": ((5, 4, 3), (2, 3, 4))}, example_inputs=x)
    assert isinstance(small[0], TTLinear) and small[0].ranks == (2, 2)
    assert torch.allclose(small(x), model(x), atol=1e-12)
    row = summary.layers[0]
    assert row.factorized and row.split == "tt" and row.tt_ranks == (2, 2)
    cores = tt_parameters((5, 4, 3), (2, 3, 4), (2, 2))
    assert row.params_after == cores + 60 == sum(p.numel() for p in small[0].parameters())
    assert row.macs_before == 7 * 24 * 60 and row.macs_after == small[0].macs(7)
    assert summary.model_params_after == sum(p.numel() for p in small.parameters())
    assert "tt(2,2)" in str(summary)
    # the same weight read in another layout has higher TT ranks: stays as it is
    other, summary = factorize(model, tt=True, min_saving=0.99)
    assert type(other[0]) is nn.Linear and "TT " in summary.layers[0].reason


def test_factorize_tt_keeps_the_cheaper_low_rank_form():
    model = tt_model()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(60, 1).double() @ torch.randn(1, 24).double())
    _, summary = factorize(model, tt=True)  # rank 1: 84 numbers beat every TT layout
    assert summary.layers[0].split == "linear" and summary.layers[0].tt_ranks is None


def test_factorize_sparse_csr_and_the_notes_when_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(20, 30) < 0.1)  # about 60 non-zeros of 600
        model[2].weight[0, :5] = 0  # a few zeros: CSR would store more
    x = torch.randn(4, 30)
    small, summary = factorize(model, sparse="csr", example_inputs=x, prune=False)
    assert isinstance(small[0], SparseLinear) and type(small[2]) is nn.Linear
    assert torch.allclose(small(x), model(x), atol=1e-6)
    first, second = summary.layers
    nnz = int((model[0].weight != 0).sum())
    assert first.split == "csr" and first.nnz == nnz and first.params_after == nnz + 20
    assert first.macs_after == 4 * nnz
    assert "CSR would store" in second.reason and not second.factorized
    _, summary = factorize(model, prune=False)
    assert "would store" in summary.layers[1].reason and "sparse='csr'" in summary.layers[1].reason


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"tt": {"2": ((2, 5), (4, 5))}}, ValueError, "not a TT-matrix layout"),
        ({"tt": {"1": ((1,), (1,))}}, ValueError, "the TT form is for those layers"),
        ({"tt": {"0.weight": ((5, 12), (24,))}}, ValueError, "equal length"),
        ({"tt": "yes"}, TypeError, "mapping"),
        ({"sparse": "coo"}, ValueError, "sparse must be"),
        ({"prune": 1}, TypeError, "prune must be"),
    ],
)
def test_bad_options_raise_before_anything_changes(kwargs, error, words):
    model = tt_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=words):
        factorize(model, inplace=True, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model[0]) is nn.Linear


def test_tt_and_csr_layers_save_and_reload():
    model = tt_model(torch.float32)
    with torch.no_grad():
        model[2].weight.mul_(torch.rand(10, 60) < 0.05)
    small, summary = factorize(model, tt={"0": ((5, 4, 3), (2, 3, 4))}, sparse="csr")
    assert [row.split for row in summary.layers] == ["tt", "csr"]
    assert small[2].in_features == 60  # a layer with a TT layout keeps its shape
    assert bool((model[2].weight == 0).all(dim=0).any())
    assert "zero input features kept: 0 keeps its shape for the TT layout" in (
        summary.layers[1].reason
    )
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    again = load_factorized(tt_model(torch.float32), torch.load(buf, weights_only=True))
    x = torch.randn(3, 24)
    assert isinstance(again[0], TTLinear) and isinstance(again[2], SparseLinear)
    assert torch.equal(again(x), small(x))
    # the cores are row-major, as reloaded: the same sums, bit for bit, on every input
    assert all(G.is_contiguous() for G in small[0].cores)
    x3 = torch.randn(2, 5, 24)
    assert torch.equal(again(x3), small(x3))
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), small(x))


def test_convolution_with_unstructured_zeros_stays_dense_with_a_note():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) < 0.2)
    same, summary = factorize(conv, sparse="csr")
    assert type(same) is nn.Conv2d
    zeros = int((conv.weight == 0).sum())
    note = f"{zeros} of 576 weights are zero, left dense (CSR is for nn.Linear and transformers'"
    assert note in summary.layers[0].reason


def test_transformers_conv1d_takes_the_tt_and_csr_forms():
    """GPT-2's Conv1D (weight stored in x out) is the linear map of weight.T: factorize gives
    it the TT and CSR forms, the outputs stay, and load_factorized rebuilds it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    block = model.transformer.h[0]
    with torch.no_grad():
        W = block.mlp.c_fc.weight.T  # 128 x 32
        block.mlp.c_fc.weight.copy_(tt_round(W, *default_layout(*W.shape), 2).T)
        block.mlp.c_proj.weight.mul_(torch.rand(block.mlp.c_proj.weight.shape) < 0.1)
    x = torch.randint(0, 40, (2, 8))
    small, summary = factorize(model, tt=True, sparse="csr")
    forms = {row.name: row.split for row in summary.layers}
    assert forms["transformer.h.0.mlp.c_fc.weight"] == "tt"
    assert forms["transformer.h.0.mlp.c_proj.weight"] == "csr"
    assert isinstance(small.transformer.h[0].mlp.c_fc, TTLinear)
    assert isinstance(small.transformer.h[0].mlp.c_proj, SparseLinear)
    torch.testing.assert_close(small(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    fresh = transformers.GPT2LMHeadModel(cfg).eval()
    rebuilt = load_factorized(fresh, small.state_dict())
    assert torch.equal(rebuilt(x).logits, small(x).logits)

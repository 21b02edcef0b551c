"""proxrank.factorize: factorized layers compute the dense low-rank layer's function, cost
r (m + n) parameters, and behave as ordinary modules (save, compile, export, train)."""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import proxrank
from proxrank import factorize, load_factorized
from proxrank.factorize import Factorized, FactorizedMultiheadAttention

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def set_low_rank(module: nn.Module, rank: int, split: str = "kernel-first", seed: int = 0):
    """Give ``module`` a weight of rank ``rank`` in the matrix view of ``split`` (per group),
    built from random factors in float64."""
    gen = torch.Generator().manual_seed(seed)
    W = module.weight
    g = getattr(module, "groups", 1)
    og, in_g, k = W.shape[0] // g, W.shape[1], tuple(W.shape[2:])
    K = math.prod(k)
    blocks = []
    for _ in range(g):
        if split == "pointwise-first":
            A = torch.randn(og * K, rank, generator=gen, dtype=torch.float64)
            B = torch.randn(rank, in_g, generator=gen, dtype=torch.float64)
            blocks.append((A @ B).reshape(og, *k, in_g).movedim(-1, 1))
        else:
            A = torch.randn(og, rank, generator=gen, dtype=torch.float64)
            B = torch.randn(rank, in_g * K, generator=gen, dtype=torch.float64)
            blocks.append((A @ B).reshape(og, in_g, *k))
    with torch.no_grad():
        W.copy_(torch.cat(blocks) / math.sqrt(in_g * K * rank))
    return module


def assert_same_outputs(dense: nn.Module, fact: nn.Module, x: torch.Tensor, rtol: float):
    with torch.no_grad():
        ref, got = dense(x).double(), fact(x).double()
    scale = ref.abs().max().clamp_min(1e-30)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max() / scale) <= rtol


# -- output equality -----------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    rank=st.integers(1, 6),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_linear_equals_dense_low_rank(m, n, rank, bias, dtype):
    rank = min(rank, m, n)
    dense = set_low_rank(nn.Linear(n, m, bias=bias, dtype=dtype), rank)
    fact, summary = factorize(dense)
    x = torch.randn(5, 3, n, dtype=dtype)
    saves = rank * (m + n) < m * n
    assert isinstance(fact, Factorized) == saves
    assert summary.layers[0].rank == rank
    assert_same_outputs(dense, fact, x, 1e-5 if dtype == torch.float32 else 1e-12)
    n_bias = m if bias else 0
    expected = rank * (m + n) + n_bias if saves else m * n + n_bias
    assert sum(p.numel() for p in fact.parameters()) == expected
    assert summary.model_params_after == expected


@settings(max_examples=30, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    cin=st.integers(2, 8),
    cout=st.integers(2, 12),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same"]),
    padding_mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    split=st.sampled_from(["kernel-first", "pointwise-first"]),
    rank=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_conv_equals_dense_low_rank(
    dims, cin, cout, k, stride, dilation, padding, padding_mode, groups, bias, split, rank, dtype
):
    if padding == "same":
        stride = 1  # torch refuses padding='same' with stride > 1
    cin, cout = cin * groups, cout * groups
    conv = CONVS[dims](
        cin,
        cout,
        k,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
        dtype=dtype,
    )
    set_low_rank(conv, rank, split)
    fact, summary = factorize(conv)
    x = torch.randn(2, cin, *([9] * dims), dtype=dtype)
    assert_same_outputs(conv, fact, x, 2e-5 if dtype == torch.float32 else 1e-11)
    row = summary.layers[0]
    if row.factorized:
        assert isinstance(fact, Factorized)
        assert fact.rank <= rank
        assert row.params_after == sum(p.numel() for p in fact.parameters())
        assert row.params_after < row.params_before
    else:
        assert fact is not conv and type(fact) is type(conv)


@pytest.mark.parametrize("split", ["kernel-first", "pointwise-first"])
def test_conv_uses_the_cheaper_split(split):
    conv = set_low_rank(nn.Conv2d(16, 16, 3, padding=1), 2, split)
    fact, summary = factorize(conv)
    assert fact.split == split and summary.layers[0].split == split
    m, n = (16, 16 * 9) if split == "kernel-first" else (16 * 9, 16)
    assert sum(p.numel() for p in fact.first.parameters()) + fact.second.weight.numel() == 2 * (
        m + n
    )
    assert_same_outputs(conv, fact, torch.randn(2, 16, 7, 7), 1e-5)


def test_grouped_conv_factorizes_per_group():
    conv = set_low_rank(nn.Conv2d(8, 12, 3, padding=1, groups=4), 1)
    fact, summary = factorize(conv)
    # each group's block is 3 x (2 * 9) of rank 1: 4 * 1 * (3 + 18) weights instead of 12 * 18
    assert fact.first.groups == fact.second.groups == 4
    assert summary.layers[0].params_after == 4 * 21 + 12
    assert_same_outputs(conv, fact, torch.randn(2, 8, 6, 6), 1e-5)


def test_depthwise_conv_stays_dense():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    fact, summary = factorize(nn.Sequential(conv))
    assert fact[0].weight.shape == conv.weight.shape
    assert not summary.layers[0].factorized and "factors would cost" in summary.layers[0].reason


def test_conv3d():
    conv = set_low_rank(nn.Conv3d(4, 6, 3, stride=(1, 2, 1), padding=1), 2)
    fact, _ = factorize(conv)
    assert isinstance(fact, Factorized)
    assert_same_outputs(conv, fact, torch.randn(1, 4, 5, 6, 5), 1e-5)


def test_bfloat16_loose():
    lin = set_low_rank(nn.Linear(48, 40), 3).to(torch.bfloat16)
    conv = set_low_rank(nn.Conv1d(40, 32, 3, padding=1), 2).to(torch.bfloat16)
    for dense, x in ((lin, torch.randn(16, 48)), (conv, torch.randn(2, 40, 10))):
        fact, summary = factorize(dense)
        assert summary.layers[0].rank == (3 if dense is lin else 2)
        assert fact.first.weight.dtype == fact.second.weight.dtype == torch.bfloat16
        assert_same_outputs(dense, fact, x.bfloat16(), 3e-2)


# -- tolerance and the saving rule ---------------------------------------------------------


def test_tolerance_drops_small_singular_values():
    torch.manual_seed(0)
    lin = set_low_rank(nn.Linear(30, 20, dtype=torch.float64), 3)
    with torch.no_grad():
        lin.weight.add_(1e-9 * torch.randn_like(lin.weight))
    _, full = factorize(lin)
    assert full.layers[0].rank == 20 and not full.layers[0].factorized
    fact, truncated = factorize(lin, rtol=1e-6)
    assert truncated.layers[0].rank == 3
    U, S, Vh = torch.linalg.svd(lin.weight.detach())
    ref = copy.deepcopy(lin)
    with torch.no_grad():
        ref.weight.copy_((U[:, :3] * S[:3]) @ Vh[:3])
    assert_same_outputs(ref, fact, torch.randn(4, 30, dtype=torch.float64), 1e-12)
    _, absolute = factorize(lin, atol=1e-6)
    assert absolute.layers[0].rank == 3


def test_layer_that_would_not_save_stays_dense():
    torch.manual_seed(0)
    model = nn.Sequential(set_low_rank(nn.Linear(20, 20), 9), nn.Linear(20, 20))
    fact, summary = factorize(model)
    # rank 9: 9 * 40 = 360 < 400 saves; the random layer has full rank 20
    assert isinstance(fact[0], Factorized) and type(fact[1]) is nn.Linear
    assert torch.equal(fact[1].weight, model[1].weight)
    assert summary.layers[1].rank == 20 and not summary.layers[1].factorized
    # a 10 % saving is required: 360 weights is only 10 % below 400 -> stays dense at 0.2
    kept, s2 = factorize(model, min_saving=0.2)
    assert type(kept[0]) is nn.Linear and "factors would cost 360 of 400" in s2.layers[0].reason
    ok, _ = factorize(model, min_saving=0.05)
    assert isinstance(ok[0], Factorized)


def test_zero_weight_becomes_rank_one_zero_factors():
    lin = nn.Linear(16, 16)
    nn.init.zeros_(lin.weight)
    fact, summary = factorize(lin)
    assert summary.layers[0].rank == 1
    x = torch.randn(3, 16)
    assert torch.allclose(fact(x), lin.bias.expand(3, 16))


# -- module plumbing -----------------------------------------------------------------------


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        set_low_rank(nn.Conv2d(3, 16, 3, padding=1), 2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        set_low_rank(nn.Linear(16 * 4 * 4, 32), 4),
        nn.ReLU(),
        nn.Linear(32, 5),
    )


def test_copy_or_inplace_and_state_carried_over():
    model = _model().eval()
    model[4].weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    fact, _ = factorize(model)
    assert fact is not model and type(model[0]) is nn.Conv2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not fact.training and not fact[0].training and not fact[0].first.training
    assert not fact[4].first.weight.requires_grad and fact[4].second.bias.requires_grad
    assert fact[1] is not model[1] and torch.equal(fact[1].running_mean, model[1].running_mean)
    same, _ = factorize(model, inplace=True)
    assert same is model and isinstance(model[0], Factorized)


def test_selection_include_exclude():
    fact, summary = factorize(_model(), exclude=["0"])
    assert type(fact[0]) is nn.Conv2d and isinstance(fact[4], Factorized)
    assert [lay.name for lay in summary.layers] == ["4.weight", "6.weight"]


def test_shared_module_replaced_everywhere_and_tied_weight_kept():
    lin = set_low_rank(nn.Linear(12, 12), 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    fact, _ = factorize(model)
    assert isinstance(fact[0], Factorized) and fact[0] is fact[2]
    a, b = set_low_rank(nn.Linear(12, 12), 2), nn.Linear(12, 12)
    b.weight = a.weight
    tied, summary = factorize(nn.Sequential(a, b))
    assert type(tied[0]) is nn.Linear and tied[0].weight is tied[1].weight
    assert summary.layers[0].reason == "weight shared by several modules"


def test_summary_table_json_and_macs_match_flop_counter():
    model = nn.Sequential(
        set_low_rank(nn.Conv2d(4, 16, 3, stride=2, padding=1, groups=2), 1, "pointwise-first"),
        set_low_rank(nn.Conv2d(16, 16, 3, padding=1), 2),
        nn.Flatten(),
        set_low_rank(nn.Linear(16 * 16, 20), 2),
    )
    x = torch.randn(2, 4, 8, 8)
    fact, summary = factorize(model, example_inputs=x)
    assert [lay.split for lay in summary.layers] == ["pointwise-first", "kernel-first", "linear"]
    for net, key in ((model, "before"), (fact, "after")):
        with FlopCounterMode(display=False) as counter:
            net(x)
        assert counter.get_total_flops() == 2 * summary.totals("macs")[key == "after"]
    bn = nn.Sequential(nn.BatchNorm2d(4), model[0]).train()
    _, bn_summary = factorize(bn, example_inputs=x, inplace=True)
    assert bn.training and bn[0].training and torch.equal(bn[0].running_mean, torch.zeros(4))
    assert bn_summary.layers[0].macs_before == summary.layers[0].macs_before
    text = str(summary)
    assert "pointwise-first" in text and f"{summary.compression:.2f}x smaller" in text
    data = json.loads(json.dumps(summary.to_dict()))
    assert data["model_params_after"] == sum(p.numel() for p in fact.parameters())
    per_position = factorize(model)[1].layers[-1]
    assert per_position.macs_before == 20 * 256 and per_position.macs_after == 2 * (20 + 256)


def test_bad_options_raise_and_change_nothing():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    for kwargs, exc, word in [
        ({"rtol": -1.0}, ValueError, "rtol"),
        ({"atol": float("nan")}, ValueError, "atol"),
        ({"min_saving": 1.0}, ValueError, "min_saving"),
        ({"min_saving": "0.1"}, TypeError, "min_saving"),
        ({"include": [3]}, TypeError, "include"),
    ]:
        with pytest.raises(exc, match=word):
            factorize(model, inplace=True, **kwargs)
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        factorize(torch.zeros(3))
    assert all(type(m) is not Factorized for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- save, compile, export, train ----------------------------------------------------------


def test_save_load_round_trip():
    fact, _ = factorize(_model().eval())
    buf = io.BytesIO()
    torch.save(fact.state_dict(), buf)
    other, _ = factorize(_model().eval())
    for p in other.parameters():
        nn.init.zeros_(p)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(other(x), fact(x))
    buf = io.BytesIO()
    torch.save(fact, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert isinstance(whole[0], Factorized) and torch.equal(whole(x), fact(x))


def test_torch_export():
    model = _model().eval()
    fact, _ = factorize(model)
    x = torch.randn(2, 3, 4, 4)
    exported = torch.export.export(fact, (x,))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_torch_compile_traces_without_graph_breaks():
    """Dynamo + AOTAutograd (backend="aot_eager": no C++ build, a few seconds), forward and
    backward; the inductor backend compiles the same graph."""
    model = nn.Sequential(set_low_rank(nn.Linear(32, 32), 2), nn.ReLU())
    fact, _ = factorize(model)
    x = torch.randn(4, 32)
    compiled = torch.compile(fact, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert torch.allclose(out, model(x), atol=1e-5)
    out.sum().backward()
    assert fact[0].first.weight.grad is not None


def test_fine_tune_with_proxrank_on_the_factors():
    torch.manual_seed(0)
    fact, _ = factorize(nn.Sequential(set_low_rank(nn.Linear(40, 30), 6)))
    factors = (fact[0].first.weight, fact[0].second.weight)
    before = [torch.linalg.svdvals(w.detach()) for w in factors]
    tau = float(before[0][3])  # the prox removes three of the six directions of `first`
    opt = proxrank.ProxRank(torch.optim.SGD(fact.parameters(), lr=0.1), fact, lam=tau / 0.1)
    assert [t.name for t in opt.targets] == ["0.first.weight", "0.second.weight"]
    (0 * fact(torch.randn(8, 40)).sum()).backward()  # zero gradient: the step is the prox
    opt.step()
    for w, s in zip(factors, before, strict=True):
        assert torch.allclose(torch.linalg.svdvals(w.detach()), (s - tau).clamp_min(0), atol=1e-5)
    assert torch.linalg.matrix_rank(factors[0]) == 3


# -- transposed convolutions, transformers' Conv1D, the dense weight ----------------------------

CONV_TS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
#: set_low_rank's view names are a convolution's: a transposed kernel (in, out/g, k) swaps them
TRANSPOSED_VIEW = {"pointwise-first": "kernel-first", "kernel-first": "pointwise-first"}


@settings(max_examples=30, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    cin=st.integers(2, 8),
    cout=st.integers(2, 8),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 1),
    extra=st.booleans(),
    groups=st.sampled_from([1, 2]),
    bias=st.booleans(),
    split=st.sampled_from(["kernel-first", "pointwise-first"]),
    rank=st.integers(1, 3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_conv_transpose_equals_dense_low_rank(
    dims, cin, cout, k, stride, dilation, padding, extra, groups, bias, split, rank, dtype
):
    output_padding = int(extra) * (max(stride, dilation) - 1)  # must be < stride or dilation
    convt = CONV_TS[dims](
        cin * groups,
        cout * groups,
        k,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        bias=bias,
        dilation=dilation,
        dtype=dtype,
    )
    set_low_rank(convt, rank, TRANSPOSED_VIEW[split])
    fact, summary = factorize(convt, include=[type(convt)])
    x = torch.randn(2, cin * groups, *([5] * dims), dtype=dtype)
    assert_same_outputs(convt, fact, x, 2e-5 if dtype == torch.float32 else 1e-11)
    row = summary.layers[0]
    assert row.kind == type(convt).__name__
    if row.factorized:
        assert isinstance(fact, Factorized) and fact.rank <= rank
        assert isinstance(fact.first, type(convt)) and isinstance(fact.second, type(convt))
        assert row.params_after == sum(p.numel() for p in fact.parameters())
    else:
        assert type(fact) is type(convt)


def test_conv_transpose_macs_match_flop_counter():
    model = nn.Sequential(
        set_low_rank(nn.ConvTranspose2d(8, 16, 3, stride=2, padding=1), 2, "pointwise-first"),
        set_low_rank(nn.ConvTranspose2d(16, 6, 3, stride=2, output_padding=1, groups=2), 1),
    )
    x = torch.randn(2, 8, 5, 5)
    fact, summary = factorize(model, include=[nn.ConvTranspose2d], example_inputs=x)
    assert [lay.split for lay in summary.layers] == ["kernel-first", "pointwise-first"]
    for net, key in ((model, "before"), (fact, "after")):
        with FlopCounterMode(display=False) as counter:
            net(x)
        assert counter.get_total_flops() == 2 * summary.totals("macs")[key == "after"]
    assert_same_outputs(model, fact, x, 1e-5)


def _conv1d():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = Conv1D(24, 16)  # nf (out) = 24, nx (in) = 16; weight stored 16 x 24
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 3) @ torch.randn(3, 24))
        layer.bias.normal_()
    return layer, Conv1D


def test_transformers_conv1d_factorized():
    layer, Conv1D = _conv1d()
    fact, summary = factorize(nn.Sequential(layer), include=[Conv1D])
    row = summary.layers[0]
    assert (row.kind, row.shape, row.rank, row.split) == ("Conv1D", (24, 16), 3, "linear")
    assert isinstance(fact[0], Factorized) and fact[0].weight_in_out
    assert (fact[0].nf, fact[0].nx) == (24, 16)
    assert_same_outputs(layer, fact[0], torch.randn(2, 5, 16), 1e-5)


def _dense_and_factorized():
    """(dense, factorized) pairs of every Factorized layout."""
    torch.manual_seed(0)
    layers = [
        set_low_rank(nn.Linear(12, 10), 2),
        set_low_rank(nn.Conv2d(4, 6, 3, groups=2), 1, "kernel-first"),
        set_low_rank(nn.Conv2d(8, 8, 3, padding=1), 1, "pointwise-first"),
        set_low_rank(nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2), 1, "kernel-first"),
        set_low_rank(nn.ConvTranspose1d(8, 8, 3), 1, "pointwise-first"),
    ]
    return [(layer, factorize(layer, include=[type(layer)])[0]) for layer in layers]


def test_weight_is_the_dense_product_read_only_and_not_a_parameter():
    pairs = _dense_and_factorized()
    layer, _ = _conv1d()
    pairs.append((layer, factorize(nn.Sequential(layer), include=[type(layer)])[0][0]))
    for dense, fact in pairs:
        assert isinstance(fact, Factorized)
        W = fact.weight
        assert type(W) is torch.Tensor and W.shape == dense.weight.shape
        assert W.dtype == dense.weight.dtype and W.device == dense.weight.device
        assert torch.allclose(W, dense.weight, atol=1e-5)
        assert all(W is not p for p in fact.parameters())
        assert fact.bias is fact.second.bias and torch.equal(fact.bias, dense.bias)
        for attr in ("in_features", "in_channels", "kernel_size", "stride", "transposed"):
            assert getattr(fact, attr, None) == getattr(dense, attr, None)
        with pytest.raises(AttributeError, match="change first.weight / second.weight"):
            fact.weight = dense.weight.detach()
        with pytest.raises(KeyError, match="'weight' already exists"):
            fact.weight = dense.weight  # a Parameter: refused by nn.Module
        W.sum().backward()  # the product is differentiable in the factors
        assert fact.first.weight.grad is not None


# -- attention ----------------------------------------------------------------------------------


def low_rank_blocks(param: torch.Tensor, rank: int, blocks: int = 1) -> None:
    """Project each of ``blocks`` row blocks of ``param`` onto rank ``rank`` (float64 SVD)."""
    h = param.shape[0] // blocks
    with torch.no_grad():
        for j in range(0, param.shape[0], h):
            U, S, Vh = torch.linalg.svd(param[j : j + h].double(), full_matrices=False)
            param[j : j + h] = ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(param.dtype)


def _attention(seed=0, ranks=(2, 2, 2), **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(16, 4, dtype=torch.float64, **kwargs)
    if mha._qkv_same_embed_dim:
        for j, r in enumerate(ranks):
            low_rank_blocks(mha.in_proj_weight[j * 16 : (j + 1) * 16], r)
    else:
        for block, r in zip("qkv", ranks, strict=True):
            low_rank_blocks(getattr(mha, f"{block}_proj_weight"), r)
    return mha.eval()


@settings(max_examples=40, deadline=None)
@given(
    batch_first=st.booleans(),
    bias=st.booleans(),
    add_bias_kv=st.booleans(),
    add_zero_attn=st.booleans(),
    cross=st.booleans(),
    batched=st.booleans(),
    need_weights=st.booleans(),
    average=st.booleans(),
    mask=st.sampled_from(["none", "padding", "bool-2d", "float-3d", "both", "causal"]),
)
def test_attention_equals_dense(
    batch_first, bias, add_bias_kv, add_zero_attn, cross, batched, need_weights, average, mask
):
    dims = {"kdim": 6, "vdim": 10} if cross else {}
    mha = _attention(
        batch_first=batch_first,
        bias=bias,
        add_bias_kv=add_bias_kv,
        add_zero_attn=add_zero_attn,
        **dims,
    )
    fact, summary = factorize(mha, include=[nn.MultiheadAttention])
    assert isinstance(fact, FactorizedMultiheadAttention)
    assert [row.rank for row in summary.layers] == [2, 2, 2]
    L, S, N, H = 5, 6, 3, 4
    if mask == "causal":
        S = L
    gen = torch.Generator().manual_seed(1)

    def seq(n, d):
        shape = (N, n, d) if batch_first else (n, N, d)
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        return x if batched else x[0] if batch_first else x[:, 0]

    q, k, v = seq(L, 16), seq(S, mha.kdim), seq(S, mha.vdim)
    pad = torch.rand(N, S, generator=gen) < 0.3
    pad[:, 0] = False
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    if mask in ("padding", "both"):
        kwargs["key_padding_mask"] = pad if batched else pad[0]
    if mask in ("bool-2d", "both"):
        kwargs["attn_mask"] = torch.rand(L, S, generator=gen) < 0.3
        kwargs["attn_mask"][:, 0] = False
        if mask == "both":
            kwargs["key_padding_mask"] = kwargs["key_padding_mask"].double() * -1e4
            kwargs["attn_mask"] = kwargs["attn_mask"].double() * -1e4
    if mask == "float-3d":
        kwargs["attn_mask"] = torch.randn((N if batched else 1) * H, L, S, generator=gen).double()
    if mask == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L).double()
        kwargs["is_causal"] = True
    with torch.no_grad():
        ref_out, ref_w = mha(q, k, v, **kwargs)
        out, w = fact(q, k, v, **kwargs)
    assert out.shape == ref_out.shape and torch.allclose(out, ref_out, atol=1e-10)
    assert (w is None) == (ref_w is None)
    if w is not None:
        assert w.shape == ref_w.shape and torch.allclose(w, ref_w, atol=1e-10)


def test_attention_blocks_dense_weights_and_fused_paths_off():
    mha = _attention(ranks=(2, 16, 3))  # W_k full rank: stays a dense Linear
    fact, summary = factorize(mha, include=[nn.MultiheadAttention])
    assert [(row.factorized, row.rank) for row in summary.layers] == [
        (True, 2),
        (False, 16),
        (True, 3),
    ]
    assert "factors would cost" in summary.layers[1].reason
    assert type(fact.k_proj) is nn.Linear and isinstance(fact.q_proj, Factorized)
    assert summary.model_params_after == sum(p.numel() for p in fact.parameters())
    assert summary.layers[0].params_after == 2 * 32 + 16  # r (m + n) + the block's bias
    assert torch.allclose(fact.in_proj_weight, mha.in_proj_weight, atol=1e-12)
    assert torch.equal(fact.in_proj_bias, mha.in_proj_bias)
    assert fact.out_proj is not mha.out_proj and torch.equal(
        fact.out_proj.weight, mha.out_proj.weight
    )
    assert not fact._qkv_same_embed_dim and fact.batch_first == mha.batch_first
    assert all(p is not fact.in_proj_weight for p in fact.parameters())
    cross = _attention(kdim=6, vdim=10)
    small = factorize(cross, include=[nn.MultiheadAttention])[0]
    assert small.in_proj_weight is None
    for block in "qkv":
        dense = getattr(cross, f"{block}_proj_weight")
        assert torch.allclose(getattr(small, f"{block}_proj_weight"), dense, atol=1e-12)
    full = _attention(ranks=(16, 16, 16))
    same, rows = factorize(full, include=[nn.MultiheadAttention])
    assert type(same) is nn.MultiheadAttention and not any(r.factorized for r in rows.layers)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("attention", [False, True])
def test_transformer_encoder_inference_paths(attention):
    """Factorized feed-forward layers keep the encoder's fused nested-tensor path (it reads the
    dense ``linear1.weight``); a factorized attention switches that path off."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2)
    for layer in enc.layers:
        low_rank_blocks(layer.linear1.weight, 2)
        low_rank_blocks(layer.linear2.weight, 2)
        low_rank_blocks(layer.self_attn.in_proj_weight, 2, blocks=3)
    enc.eval()
    include = [nn.Linear, nn.MultiheadAttention] if attention else [nn.Linear]
    small, _ = factorize(enc, include=include)
    assert isinstance(small.layers[1].linear2, Factorized)
    assert small.use_nested_tensor is (not attention)
    x, pad = torch.randn(2, 6, 16), torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        ref, out = enc(x, src_key_padding_mask=pad), small(x, src_key_padding_mask=pad)
    valid = ~pad[..., None]
    assert torch.allclose(out * valid, ref * valid, atol=1e-5)
    assert bool((out[1, 4:] == 0).all()) is not attention  # nested path: zeros at padding


def test_attention_errors_match_torch():
    mha = _attention()
    fact = factorize(mha, include=[nn.MultiheadAttention])[0]
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    for module in (mha, fact):
        with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal"):
            module(x, x, x, is_causal=True)
    with pytest.raises(TypeError, match="attn_mask"):
        fact(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        fact(x, x, x, attn_mask=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="query must be 2-D"):
        fact(x[None], x[None], x[None])


def test_attention_macs_per_block():
    mha = _attention(ranks=(2, 3, 16), kdim=6, vdim=10)
    q, kv = torch.randn(5, 2, 16, dtype=torch.float64), torch.randn(7, 2, 6, dtype=torch.float64)
    v = torch.randn(7, 2, 10, dtype=torch.float64)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, q, k, v):
            return self.attn(q, k, value=v)[0]

    include = [nn.MultiheadAttention, nn.Linear]
    _, summary = factorize(Net(), include=include, example_inputs=(q, kv, v))
    macs = [(row.macs_before, row.macs_after) for row in summary.layers]
    # q, k, v blocks (v full rank: dense), then out_proj (never called: as many rows as q)
    q_, k_, v_ = (16 * 16 * 10, 2 * 32 * 10), (16 * 6 * 14, 3 * 22 * 14), (16 * 10 * 14,) * 2
    assert macs == [q_, k_, v_, (16 * 16 * 10,) * 2]


def test_other_kinds_are_reported_and_kept():
    model = nn.Sequential(nn.Embedding(20, 8), nn.LSTM(8, 6))
    fact, summary = factorize(model, include=[nn.Embedding, nn.LSTM])
    emb, *lstm = summary.layers
    assert emb.name == "0.weight" and emb.rank == -1 and "not a weight of a kind" in emb.reason
    assert [row.name for row in lstm] == [
        f"1.weight_{w}_l0[{g}]" for w in ("ih", "hh") for g in "ifgo"
    ]
    assert all("recurrent layers stay dense" in row.reason for row in lstm)
    assert [type(m) for m in fact] == [nn.Embedding, nn.LSTM]


# -- load_factorized ----------------------------------------------------------------------------


class Mixed(nn.Module):
    """A convolution, a transposed one, attention and linear layers, for save/load."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)
        self.dense = nn.Linear(5, 5)

    def forward(self, x):
        y = self.up(self.conv(x)).flatten(2).transpose(1, 2)
        return self.dense(self.head(self.attn(y, y, y)[0]))


def _mixed(seed: int) -> Mixed:
    torch.manual_seed(seed)
    model = Mixed()
    set_low_rank(model.conv, 1, "pointwise-first", seed)
    set_low_rank(model.up, 1, TRANSPOSED_VIEW["kernel-first"], seed)
    for j, r in enumerate((1, 8, 2)):  # W_k full rank: a dense block
        low_rank_blocks(model.attn.in_proj_weight[8 * j : 8 * (j + 1)], r)
    set_low_rank(model.head, 1, seed=seed)
    return model.eval()


def test_load_factorized_rebuilds_from_architecture_and_state_dict():
    small, summary = factorize(
        _mixed(0), include=[nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.MultiheadAttention]
    )
    assert [row.split for row in summary.layers if row.factorized] == [
        "pointwise-first",
        "kernel-first",
        "linear",
        "linear",
        "linear",
    ]
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    fresh = _mixed(1)
    rebuilt = load_factorized(fresh, torch.load(buf, weights_only=True))
    assert type(fresh.attn) is nn.MultiheadAttention  # the argument is not changed
    assert [type(m) for m in rebuilt.modules()] == [type(m) for m in small.modules()]
    assert rebuilt.conv.split == "pointwise-first" and rebuilt.up.split == "kernel-first"
    assert type(rebuilt.attn.k_proj) is nn.Linear and rebuilt.attn.q_proj.rank == 1
    assert not rebuilt.training and not rebuilt.attn.q_proj.training
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), small(x))


def test_load_factorized_errors_change_nothing():
    small = factorize(_mixed(0))[0]
    state = small.state_dict()
    fresh = Mixed()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_factorized(state, state)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_factorized(fresh, list(state.items()))
    bad = dict(state)
    bad["head.first.weight"] = torch.zeros(2, 4)  # a rank-2 first factor of the wrong width
    with pytest.raises(RuntimeError, match="head"):
        load_factorized(fresh, bad)
    del bad["head.first.weight"]  # then head is read as dense: its factors are unexpected
    with pytest.raises(RuntimeError, match='Unexpected key.*"head.second.weight"'):
        load_factorized(fresh, bad)
    assert type(fresh.head) is nn.Linear and type(fresh.conv) is nn.Conv2d

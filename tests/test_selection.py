"""Which parameters get the prox."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from proxrank.selection import Target, select_targets


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 6, 3)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.head = nn.Linear(16, 1)  # a 1 x 16 matrix: too small to matter
        self.attn = nn.MultiheadAttention(8, 2)


def names(targets):
    return [t.name for t in targets]


def test_default_selects_weight_matrices_of_known_layer_kinds_only():
    net = Net()
    got = names(select_targets(net))
    assert got == [
        "conv.weight",
        "fc1.weight",
        "fc2.weight",
        "attn.in_proj_weight[q]",
        "attn.in_proj_weight[k]",
        "attn.in_proj_weight[v]",
        "attn.out_proj.weight",
    ]


def test_conv_is_reshaped_out_by_in_kernel():
    (t,) = select_targets(Net(), include=["conv.weight"])
    assert t.shape2d == (6, 3 * 3 * 3)
    assert t.module_type is nn.Conv2d


def test_include_replaces_default_and_exclude_removes():
    net = Net()
    assert names(select_targets(net, include=[nn.Embedding, "fc*"])) == [
        "emb.weight",
        "fc1.weight",
        "fc2.weight",
    ]
    assert names(select_targets(net, include=nn.MultiheadAttention)) == [
        "attn.in_proj_weight[q]",
        "attn.in_proj_weight[k]",
        "attn.in_proj_weight[v]",
    ]
    assert names(select_targets(net, exclude=["fc2", nn.Conv2d, "attn*"])) == ["fc1.weight"]


def test_named_parameters_select_every_matrix():
    net = Net()
    got = names(select_targets(net.named_parameters()))
    expected = [
        n
        for n, p in net.named_parameters()
        if p.dim() >= 2 and min(p.shape[0], p.numel() // p.shape[0]) > 1
    ]
    assert got == expected and "head.weight" not in got


def test_tied_weights_selected_once():
    a = nn.Linear(6, 6)
    b = nn.Linear(6, 6)
    b.weight = a.weight
    targets = select_targets(nn.Sequential(a, b))
    assert len(targets) == 1 and isinstance(targets[0], Target)


def test_error_paths():
    net = Net()
    with pytest.raises(ValueError, match=r"'again' was given twice \(also as 'fc1.weight'\)"):
        select_targets([("fc1.weight", net.fc1.weight), ("again", net.fc1.weight)])
    with pytest.raises(TypeError, match="needs the model itself"):
        select_targets(net.named_parameters(), include=[nn.Linear])
    with pytest.raises(TypeError, match="include entries must be name patterns"):
        select_targets(net, include=[3])
    with pytest.raises(TypeError, match="iterable of \\(name, parameter\\) pairs"):
        select_targets([net.fc1.weight])
    with pytest.raises(TypeError, match="is a list, not a torch.Tensor"):
        select_targets([("w", [1.0])])


def test_complex_and_empty_weights_are_left_out():
    """Complex weights get no prox (its complex SVT is not implemented): they are not selected,
    named or by default; nor are zero-size matrices."""
    w = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    assert select_targets([("w", w)]) == []
    assert select_targets(nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 3))) == []


@pytest.mark.parametrize("emb_first", [True, False])
def test_tied_weight_selected_whichever_owner_is_registered_first(emb_first):
    """An embedding tied to a Linear head: the head's weight is left out by default (with a
    warning: the prox would act on the embedding) and selected by an include pattern naming the
    head, in either registration order."""
    emb, head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head} if emb_first else {"head": head, "emb": emb})
    assert names(select_targets(model)) == []
    with pytest.warns(UserWarning, match="head.weight shares its tensor with an embedding"):
        select_targets(model, warn=True)
    assert names(select_targets(model, include=["head.weight"])) == ["head.weight"]
    assert names(select_targets(model, include=[nn.Embedding])) == ["emb.weight"]


def test_views_of_every_default_layer_kind():
    """Each kind's matrices, read through their views, are the operators the layer applies."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "lstm": nn.LSTM(3, 5, bidirectional=True),
            "gru": nn.GRU(3, 4),
            "rnn": nn.RNN(3, 4),
            "deconv": nn.ConvTranspose2d(6, 4, 3),
            "mha": nn.MultiheadAttention(8, 2, kdim=5, vdim=3),
        }
    )
    got = {t.name: t for t in select_targets(model)}
    lstm = model["lstm"]
    for gi, gate in enumerate("ifgo"):
        for name in ("weight_ih_l0", "weight_hh_l0_reverse"):
            t = got[f"lstm.{name}[{gate}]"]
            block = getattr(lstm, name)[5 * gi : 5 * (gi + 1)]
            assert t.kind == "recurrent" and torch.equal(t.view.read(t.param), block)
    assert [n for n in got if n.startswith("gru.weight_ih")] == [
        "gru.weight_ih_l0[r]",
        "gru.weight_ih_l0[z]",
        "gru.weight_ih_l0[n]",
    ]
    assert got["rnn.weight_hh_l0"].shape2d == (4, 4)
    assert (
        got["deconv.weight"].shape2d == (6, 4 * 9) and got["deconv.weight"].kind == "conv_transpose"
    )
    assert {"mha.q_proj_weight", "mha.k_proj_weight", "mha.v_proj_weight"} <= set(got)
    assert got["mha.k_proj_weight"].shape2d == (8, 5)


def test_hf_conv1d_is_read_transposed_and_gpt2_qkv_per_block():
    transformers = pytest.importorskip("transformers")
    conv = transformers.pytorch_utils.Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight is 4 x 6
    (t,) = select_targets(nn.Sequential(conv))
    assert t.kind == "hf_conv1d" and t.shape2d == (6, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(conv(x), x @ t.view.read(t.param).T + conv.bias)
    attn = nn.Module()
    attn.c_attn = transformers.pytorch_utils.Conv1D(12, 4)  # GPT-2's stacked q/k/v
    targets = select_targets(attn)
    assert [t.name for t in targets] == ["c_attn.weight[q]", "c_attn.weight[k]", "c_attn.weight[v]"]
    q, k, v = (attn.c_attn(x) - attn.c_attn.bias).split(4, dim=-1)
    for t, out in zip(targets, (q, k, v), strict=True):
        assert t.shape2d == (4, 4)
        torch.testing.assert_close(x @ t.view.read(t.param).T, out)


def test_view_write_round_trips_blocks_and_transposes():
    from proxrank.selection import MatrixView

    p = torch.arange(24.0).reshape(6, 4)
    views = (MatrixView(), MatrixView(2, 4), MatrixView(transposed=True), MatrixView(1, 3, True))
    for q in (p.clone(), p.clone().T.contiguous().T):  # contiguous, and not
        for view in views:
            before = q.clone()
            X = torch.randn(view.shape(q))
            view.write(q, X)
            assert torch.equal(view.read(q), X)
            touched = torch.zeros_like(q)
            view.write(touched, torch.ones(view.shape(q)))
            assert int(touched.sum()) == X.numel()
            assert torch.equal(q[touched == 0], before[touched == 0])
    assert MatrixView(1, 3, True).shape(p) == (2, 6)
    assert torch.equal(MatrixView(1, 3, True).read(p), p[:, 1:3].T)


def test_unknown_layer_kinds_are_named_in_a_warning():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = nn.Parameter(torch.randn(4, 4))
            self.lin = nn.Linear(4, 4)

    with pytest.warns(UserWarning, match=r"1 weight matrices .* get no prox: mix"):
        targets = select_targets(Custom(), warn=True)
    assert names(targets) == ["lin.weight"]
    assert names(select_targets(Custom(), include=["mix"])) == ["mix"]

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


def test_default_selects_linear_and_conv_weights_only():
    net = Net()
    got = names(select_targets(net))
    assert got == ["conv.weight", "fc1.weight", "fc2.weight", "attn.out_proj.weight"]


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
    assert names(select_targets(net, include=nn.MultiheadAttention)) == ["attn.in_proj_weight"]
    assert names(select_targets(net, exclude=["fc2", nn.Conv2d])) == [
        "fc1.weight",
        "attn.out_proj.weight",
    ]


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
    w = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="'w' has dtype torch.complex64"):
        select_targets([("w", w)])


@pytest.mark.parametrize("emb_first", [True, False])
def test_tied_weight_selected_whichever_owner_is_registered_first(emb_first):
    """An embedding tied to a Linear head: the head's weight is selected by default (a Linear
    weight) and by an include pattern naming the head, in either registration order."""
    emb, head = nn.Embedding(10, 6), nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head} if emb_first else {"head": head, "emb": emb})
    assert names(select_targets(model)) == ["head.weight"]
    assert names(select_targets(model, include=["head.weight"])) == ["head.weight"]
    assert names(select_targets(model, include=[nn.Embedding])) == ["emb.weight"]

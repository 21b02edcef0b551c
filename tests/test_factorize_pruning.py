"""proxrank.factorize, structured pruning: zero units leave chains of layers, the outputs stay,
the parameter counts are exact, and structures where removal is not provably exact are left
alone with the reason."""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from proxrank import ProxRank, factorize, load_factorized

BETWEEN = {
    "relu": lambda n: nn.ReLU(),
    "tanh": lambda n: nn.Tanh(),
    "gelu": lambda n: nn.GELU(),
    "sigmoid": lambda n: nn.Sigmoid(),
    "identity": lambda n: nn.Identity(),
    "dropout": lambda n: nn.Dropout(0.3),
    "bn": lambda n: nn.BatchNorm1d(n, dtype=torch.float64),
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> bool:
    return a.shape == b.shape and float((a - b).abs().max()) <= rtol * max(
        1.0, float(b.abs().max())
    )


def randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.copy_(torch.randn(m.num_features, generator=gen))


@st.composite
def chains(draw):
    """A float64 ``nn.Sequential`` of Linears (every one but the first with a bias) with random
    per-unit modules between them (a middle stretch possibly nested in its own Sequential),
    random zero rows (some with a zero bias) and zero columns."""
    layers = draw(st.integers(2, 4))
    widths = [draw(st.integers(2, 6)) for _ in range(layers + 1)]  # sides of 1: not selected
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mods: list[nn.Module] = []
    for k in range(layers):
        bias = draw(st.booleans()) if k == 0 else True
        mods.append(nn.Linear(widths[k], widths[k + 1], bias=bias, dtype=torch.float64))
        if k < layers - 1:
            for name in draw(st.lists(st.sampled_from(sorted(BETWEEN)), max_size=3)):
                mods.append(BETWEEN[name](widths[k + 1]))
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64))
            rows = torch.tensor(draw(st.lists(st.booleans(), min_size=lin.out_features,
                                              max_size=lin.out_features)))  # fmt: skip
            cols = torch.tensor(draw(st.lists(st.booleans(), min_size=lin.in_features,
                                              max_size=lin.in_features)))  # fmt: skip
            lin.weight[rows] = 0
            lin.weight[:, cols] = 0
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.out_features, generator=gen, dtype=torch.float64))
                lin.bias[rows & (torch.rand(lin.out_features, generator=gen) < 0.5)] = 0
    if draw(st.booleans()) and len(mods) > 3:  # nest a middle stretch
        mods = [mods[0], nn.Sequential(*mods[1:-1]), mods[-1]]
    model = nn.Sequential(*mods)
    randomise_norms(model, gen)
    return model.eval()


def expected_widths(model: nn.Module) -> list[int]:
    """Reference: the hidden widths after pruning, boundary by boundary. Unit ``j`` between two
    Linears goes when the consumer's column ``j`` is zero or the producer's (already sliced)
    row ``j`` is zero (every consumer has a bias, so a constant always folds); one is kept."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [lin.weight.detach().clone() for lin in linears]
    for k in range(len(weights) - 1):
        dead = (weights[k] == 0).all(dim=1)
        ignored = (weights[k + 1] == 0).all(dim=0)
        remove = dead | ignored
        if remove.all():
            remove[int(remove.nonzero()[0])] = False
        weights[k], weights[k + 1] = weights[k][~remove], weights[k + 1][:, ~remove]
    return [w.shape[0] for w in weights[:-1]]


@settings(max_examples=40, deadline=None)
@given(model=chains(), batch=st.integers(1, 4))
def test_random_chains_keep_outputs_and_count_exactly(model, batch):
    x = torch.randn(batch, model[0].in_features, dtype=torch.float64)
    small, summary = factorize(model, min_saving=0.99)  # no low-rank factors here
    with torch.no_grad():
        assert close(small(x), model(x))
    linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    originals = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears[:-1]] == expected_widths(model)
    assert linears[0].in_features == originals[0].in_features  # the model's interface stays
    assert linears[-1].out_features == originals[-1].out_features
    for lin, following in itertools.pairwise(linears):
        assert following.in_features == lin.out_features
    norms = [m for m in small.modules() if isinstance(m, nn.BatchNorm1d)]
    widths = [lin.in_features for lin in linears] + [linears[-1].out_features]
    count = sum(
        widths[k] * widths[k + 1] + (widths[k + 1] if linears[k].bias is not None else 0)
        for k in range(len(linears))
    )
    count += sum(2 * bn.num_features for bn in norms)
    assert n_params(small) == count == summary.model_params_after
    assert summary.model_params_before == n_params(model)
    for row in summary.layers:
        lin = small.get_submodule(row.name.rpartition(".")[0])
        assert not row.factorized
        assert row.params_after == n_params(lin)
        if row.shape_after is None:
            assert row.shape == tuple(lin.weight.shape)
        else:
            assert row.shape_after == tuple(lin.weight.shape) != row.shape


def test_zero_rows_with_bias_fold_into_the_next_bias_through_norm_and_activation():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Sigmoid(), nn.Dropout(0.5), nn.Linear(6, 3)
    ).eval()
    randomise_norms(model, torch.Generator().manual_seed(1))
    with torch.no_grad():
        model[0].weight[[0, 3]] = 0  # constant outputs sigmoid(bn(b_j)) != 0
    small, summary = factorize(model)
    assert small[0].out_features == small[1].num_features == small[4].in_features == 4
    x = torch.randn(8, 5)
    assert torch.allclose(small(x), model(x), atol=1e-6)
    row = summary.layers[0]
    assert row.shape == (6, 5) and row.shape_after == (4, 5)
    assert row.params_before == 36 and row.params_after == 24
    assert summary.layers[1].shape_after == (3, 4)


def test_constant_unit_stays_when_the_consumer_has_no_bias():
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0  # sigmoid(b_1) != 0: nowhere to fold it
        model[0].weight[2] = 0
        model[0].bias[2] = -1e4  # sigmoid(-1e4) == 0 exactly: removable
    small, summary = factorize(model)
    assert small[0].out_features == 4
    assert "1 zero output units kept" in summary.layers[0].reason
    assert "no bias" in summary.layers[0].reason
    x = torch.randn(3, 4)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_zero_columns_remove_the_previous_layers_units_even_with_a_bias():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[2].weight[:, [1, 2, 5]] = 0  # group lasso over input features
    small, summary = factorize(model)
    assert small[0].out_features == 3 and small[2].in_features == 3
    assert summary.layers[0].shape_after == (3, 4) and summary.layers[1].shape_after == (3, 3)
    x = torch.randn(5, 4)
    assert torch.allclose(small(x), model(x), atol=1e-6)


def test_all_units_removable_keeps_one():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.zero_()
    small, summary = factorize(model)
    assert small[0].out_features == 1 and small[2].in_features == 1
    assert "a layer needs at least one" in summary.layers[0].reason
    x = torch.randn(5, 3)
    assert torch.allclose(small(x), model(x))


def test_factorize_after_group_lasso_removes_zero_units_and_keeps_outputs():
    """The issue's check: ProxRank(SGD, prox="group") zeroes whole units; factorize removes
    them (with the next layer's inputs) and the outputs stay."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)
    )
    opt = ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        lam=0.6,
        prox="group",
        include=["0.weight", "2.weight"],
    )
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    zero = [int((model[k].weight == 0).all(dim=1).sum()) for k in (0, 2)]
    assert min(zero) > 0 and zero[0] < 32 and zero[1] < 16
    small, summary = factorize(model)
    assert small[0].out_features == 32 - zero[0] and small[2].out_features == 16 - zero[1]
    assert summary.model_params_after == n_params(small) < n_params(model)
    assert torch.allclose(small(x), model(x), atol=1e-5)


# -- convolutions ------------------------------------------------------------------------------


def conv_model(padding, padding_mode="zeros", bias=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=padding, padding_mode=padding_mode, bias=bias),
    )
    randomise_norms(model, torch.Generator().manual_seed(2))
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0
        model[0].bias[1] = 5.0  # a constant channel: relu(bn(5)) is not zero
    return model.eval()


@pytest.mark.parametrize(("padding", "mode"), [(0, "zeros"), (1, "reflect"), (1, "circular")])
def test_conv_constant_channels_fold_where_the_border_sees_the_constant(padding, mode):
    model = conv_model(padding, mode)
    small, summary = factorize(model)
    assert small[0].out_channels == small[1].num_features == small[4].in_channels == 4
    assert summary.layers[0].shape_after == (4, 3, 3, 3)
    x = torch.randn(2, 3, 10, 10)
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_conv_with_zero_padding_keeps_non_zero_constant_channels():
    model = conv_model(1)
    with torch.no_grad():  # channel 1 carries relu(5 / sqrt(var + eps)) > 0, channel 4 zero
        model[1].running_mean.zero_()
        model[1].weight.fill_(1.0)
        model[1].bias.zero_()
        model[0].bias[4] = 0.0
    small, summary = factorize(model)
    assert small[0].out_channels == 5 and small[4].in_channels == 5
    assert "1 zero output units kept" in summary.layers[0].reason
    assert "pads with zeros" in summary.layers[0].reason
    x = torch.randn(2, 3, 10, 10)
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_conv_pool_flatten_linear_chain():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.BatchNorm1d(8),
        nn.Linear(8, 5),
    ).eval()
    randomise_norms(model, torch.Generator().manual_seed(3))
    with torch.no_grad():
        model[0].weight[[0, 5, 6]] = 0
        model[6].weight[:, 2] = 0
    small, _ = factorize(model)
    assert small[0].out_channels == small[5].num_features == small[6].in_features == 4
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(small(x), model(x), atol=1e-5)


# -- left alone, with the reason ---------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x


def zero_rows(layer: nn.Module, rows: list[int]) -> None:
    with torch.no_grad():
        layer.weight[rows] = 0


@pytest.mark.parametrize(
    ("build", "layer", "words"),
    [
        (
            lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)),
            "0",
            "LayerNorm",
        ),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.Softmax(-1), nn.Linear(6, 2)), "0", "Softmax"),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), "2", "leaves the"),
        (lambda: Residual(), "a", "inside an nn.Sequential"),
        (
            lambda: nn.Sequential(nn.Conv2d(4, 6, 1, groups=2), nn.ReLU(), nn.Conv2d(6, 2, 1)),
            "0",
            "grouped convolution",
        ),
        (lambda: nn.Sequential(nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Linear(6, 2)), "0", "one to one"),
        (lambda: nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(3), nn.Linear(6, 2)), "0", "norm"),
    ],
)
def test_unsafe_structures_are_left_alone_with_the_reason(build, layer, words):
    model = build().eval()
    zero_rows(model.get_submodule(layer), [0, 1])
    small, summary = factorize(model)
    assert small.get_submodule(layer).weight.shape == model.get_submodule(layer).weight.shape
    row = next(r for r in summary.layers if r.name == f"{layer}.weight")
    assert row.shape_after is None
    assert "2 zero output units kept" in row.reason and words in row.reason


def test_shared_layer_and_hooks_and_first_input_are_left_alone():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    zero_rows(shared, [1])
    small, summary = factorize(model)
    assert small[0].weight.shape == (4, 4)
    assert "several places" in summary.layers[0].reason
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    zero_rows(model[0], [1])
    with torch.no_grad():
        model[0].weight[:, 2] = 0  # the model's input: stays
    model[2].register_forward_hook(lambda *args: None)
    small, summary = factorize(model)
    assert small[0].weight.shape == (5, 4)
    assert "forward hooks" in summary.layers[0].reason
    assert "1 zero input features kept: its input comes from outside" in summary.layers[0].reason


def test_prune_false_and_unselected_producer_leave_units():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    zero_rows(model[0], [1, 3])
    small, summary = factorize(model, prune=False)
    assert small[0].weight.shape == (5, 4) and summary.layers[0].shape_after is None
    small, summary = factorize(model, exclude=["0"])
    assert small[0].weight.shape == (5, 4) and small[2].weight.shape == (2, 5)
    small, _ = factorize(model, exclude=["2"])  # the consumer is sliced though not selected
    assert small[2].weight.shape == (2, 3)


# -- saving ------------------------------------------------------------------------------------


def test_pruned_model_saves_and_reloads():
    model = conv_model(0)
    small, _ = factorize(model)
    x = torch.randn(2, 3, 10, 10)
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    again = load_factorized(conv_model(0), torch.load(buf, weights_only=True)).eval()
    assert torch.equal(again(x), small(x))
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), small(x))


def test_units_without_a_known_constant_stay_with_the_reason():
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 2)
    ).eval()
    zero_rows(model[0], [1, 2])
    small, summary = factorize(model)
    assert small[0].out_features == 5
    assert "2 zero output units kept" in summary.layers[0].reason
    assert "not a known constant" in summary.layers[0].reason


@st.composite
def conv_chains(draw):
    """Conv2d -> per-channel modules -> Conv2d, float64, with random dead output channels
    (random biases, some zero) and zero input channels of the second convolution."""
    c0, c1, c2 = (draw(st.integers(2, 4)) for _ in range(3))
    padding = draw(st.sampled_from([0, 1]))
    mode = draw(st.sampled_from(["zeros", "reflect", "circular"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mids = {
        "bn": lambda: nn.BatchNorm2d(c1, dtype=torch.float64),
        "relu": nn.ReLU,
        "maxpool": lambda: nn.MaxPool2d(2),
        "avgpool": lambda: nn.AvgPool2d(2),
        "sumpool": lambda: nn.AvgPool2d(2, divisor_override=1),
        "tanh": nn.Tanh,
    }
    between = [mids[k]() for k in draw(st.lists(st.sampled_from(sorted(mids)), max_size=3))]
    first = nn.Conv2d(c0, c1, 3, padding=1, dtype=torch.float64)
    second = nn.Conv2d(c1, c2, 3, padding=padding, padding_mode=mode, dtype=torch.float64)
    with torch.no_grad():
        for conv in (first, second):
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen, dtype=torch.float64))
        dead = torch.rand(c1, generator=gen) < 0.5
        first.weight[dead] = 0
        first.bias[dead & (torch.rand(c1, generator=gen) < 0.5)] = 0
        second.weight[:, torch.rand(c1, generator=gen) < 0.3] = 0
    model = nn.Sequential(first, *between, second)
    randomise_norms(model, gen)
    return model.eval()


@settings(max_examples=25, deadline=None)
@given(model=conv_chains())
def test_random_conv_chains_keep_outputs_and_remove_exactly_the_removable(model):
    first, second = model[0], model[-1]
    x = torch.randn(2, first.in_channels, 24, 24, dtype=torch.float64)
    small, summary = factorize(model, min_saving=0.99)
    with torch.no_grad():
        assert close(small(x), model(x))
        # reference: the constant each dead channel carries, read inside a constant map
        image = first.bias.reshape(1, -1, 1, 1).expand(1, -1, 24, 24)
        constant = nn.Sequential(*list(model)[1:-1])(image)
    value = constant[0, :, constant.shape[2] // 2, constant.shape[3] // 2]
    dead = (first.weight == 0).flatten(1).all(dim=1)
    ignored = (second.weight == 0).transpose(0, 1).flatten(1).all(dim=1)
    exact_fold = second.padding_mode != "zeros" or second.padding == (0, 0)
    removable = ignored | (dead & ((value == 0) | exact_fold))
    assert small[0].out_channels == small[-1].in_channels == max(int((~removable).sum()), 1)
    assert n_params(small) == summary.model_params_after


@pytest.mark.parametrize(
    ("conv", "pool", "size"),
    [
        (nn.Conv2d, nn.AvgPool2d((2, 3), divisor_override=2), (6, 6)),
        (nn.Conv3d, nn.AvgPool3d(2, divisor_override=3), (4, 4, 4)),
    ],
)
def test_average_pool_with_a_divisor_scales_the_folded_constant(conv, pool, size):
    """A pool with ``divisor_override`` outputs a window's sum over the divisor: a dead
    channel's constant ``c`` becomes ``c * (kernel entries) / divisor`` before the fold."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), pool, conv(4, 3, 1))
    model = model.double().eval()
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0.7
    small, _ = factorize(model, min_saving=0.99)
    assert small[0].out_channels == 3
    x = torch.randn(2, 2, *size, dtype=torch.float64)
    with torch.no_grad():
        assert close(small(x), model(x))


def test_inplace_with_failing_example_inputs_leaves_the_model_unchanged():
    """``inplace=True`` prunes the model itself: example inputs its forward rejects are found
    before any unit is removed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].weight[1] = 0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError):
        factorize(model, inplace=True, example_inputs=torch.randn(2, 7, dtype=torch.float64))
    assert model[0].out_features == 5 and model[2].in_features == 5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    small, _ = factorize(model, inplace=True, example_inputs=torch.randn(2, 6, dtype=torch.float64))
    assert small is model and model[0].out_features == 4


@settings(max_examples=20, deadline=None)
@given(model=chains(), seed=st.integers(0, 1))
def test_training_mode_chains_keep_the_mode_and_the_original(model, seed):
    """A model in training mode: the original is left as it was (a forward on the example
    inputs runs in eval mode), the result keeps the mode, its eval-mode outputs equal the
    original's, and so do its training-mode outputs where no BatchNorm or dropout lies in a
    chain (through BatchNorm, batch statistics map a constant unit to the norm's shift)."""
    model.train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, model[0].in_features, dtype=torch.float64)
    small, _ = factorize(model, min_saving=0.99, example_inputs=x[:1] if seed else None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and small.training
    with torch.no_grad():
        if not any(isinstance(m, nn.BatchNorm1d | nn.Dropout) for m in model.modules()):
            assert close(small(x), model(x))
        assert close(small.eval()(x), model.eval()(x))

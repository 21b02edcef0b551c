"""Torch's conventions for parameters and atomic steps: what is not updated is not touched, and
every error is raised before anything changes (or, after the base step, before the prox changes
anything), naming the weight."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import proxrank
from proxrank.backends import Backend, ExactBackend
from proxrank.functional import svt
from proxrank.prox import HardThreshold, SoftThreshold


def mlp(seed: int = 0, width: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Linear(width, 3)
    )


def backward(model: nn.Module, scale: float = 1.0) -> None:
    torch.manual_seed(1)
    (scale * model(torch.randn(8, 6)).pow(2).sum()).backward()


def snapshot(model: nn.Module, opt: proxrank.ProxRank) -> dict:
    """Everything a step could change: weights, the base state, proxrank's records."""
    return copy.deepcopy(
        {
            "weights": [p.detach() for p in model.parameters()],
            "base": opt.optimizer.state_dict(),
            "matrices": [
                (i.backend_state.copy(), i.metric_state.copy(), i.schedule_state.copy())
                for i in opt.matrices()
            ],
            "step": opt.step_count,
            "backend": opt.backend.state_dict(),
        }
    )


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN == NaN here


# -- what torch would not update is not touched --------------------------------------------------
def test_weights_without_gradient_are_not_touched():
    model = mlp()
    model[2].weight.requires_grad_(False)  # frozen but kept in the optimizer
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=5.0)
    frozen = model[2].weight.detach().clone()
    backward(model)
    model[3].weight.grad = None  # an unused branch this step
    unused = model[3].weight.detach().clone()
    opt.step()
    assert torch.equal(model[2].weight, frozen) and torch.equal(model[3].weight, unused)
    assert int(torch.linalg.matrix_rank(model[0].weight)) < 6  # the others got the prox
    assert "error_bound" not in opt.matrix("2.weight").backend_state


@pytest.mark.parametrize("prox", ["soft", "hard"])
def test_zero_threshold_is_the_identity_bit_for_bit(prox):
    runs = []
    for wrap in (False, True):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if wrap:
            opt = proxrank.ProxRank(opt, model, lam=3.0, prox=prox)
        for g in opt.param_groups:
            g["lr"] = 0.0
        for _ in range(2):
            opt.zero_grad()
            backward(model)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert_same(runs[0], runs[1])


def test_zero_size_weights_are_skipped():
    model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 4), nn.Linear(8, 5))
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=1.0)
    assert [t.name for t in opt.targets] == ["2.weight"]


def test_resized_parameter_gets_a_correct_prox_with_fresh_state():
    lin = nn.Linear(6, 8, bias=False)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=2.0)
    lin.weight.grad = torch.randn(8, 6)
    opt.step()
    assert opt.matrix("weight").backend_state["basis"].shape[0] == 6
    torch.manual_seed(3)
    lin.weight.data = torch.randn(10, 7)
    lin.weight.grad = torch.randn(10, 7)
    expected = svt(lin.weight.detach() - 0.1 * lin.weight.grad, 0.2)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    info = opt.matrix("weight")
    assert info.shape == (10, 7) and info.backend_state["basis"].shape[0] == 7


# -- errors before anything changes ------------------------------------------------------------
def test_overflowing_fisher_statistic_changes_nothing():
    model = mlp()
    opt = proxrank.ProxRank(
        torch.optim.Adam(model.parameters(), lr=1e-2), model, lam=0.5, metric="fisher"
    )
    backward(model)
    opt.step()
    opt.zero_grad()
    backward(model)
    model[3].weight.grad[0, 0] = 1e30  # finite, but its square overflows float32
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="weight '3.weight': the fisher statistic"):
        opt.step()
    assert_same(snapshot(model, opt), before)  # the earlier layers' statistics included


def test_nan_in_a_sparse_gradient_changes_nothing():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 6, sparse=True)
    opt = proxrank.ProxRank(
        torch.optim.SGD(emb.parameters(), lr=0.1), emb, lam=1.0, include=[nn.Embedding]
    )
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    opt.zero_grad()
    (emb(torch.tensor([4, 5])).sum() * math.nan).backward()
    before = snapshot(emb, opt)
    with pytest.raises(FloatingPointError, match="gradient of 'weight' is not finite before"):
        opt.step()
    assert_same(snapshot(emb, opt), before)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: sd["proxrank"].update(step_count=-1), "step_count"),
        (lambda sd: sd["proxrank"].update(step_count=2.5), "step_count"),
        (
            lambda sd: sd["proxrank"]["matrices"][1]["backend"].update(
                basis=torch.full((12, 4), math.nan)
            ),
            r"'2.weight': backend\['basis'\] is not finite",
        ),
        (
            lambda sd: sd["proxrank"]["matrices"][0]["backend"].update(basis=torch.zeros(5, 2)),
            r"'0.weight': backend basis of shape \(5, 2\)",
        ),
        (lambda sd: sd["proxrank"]["matrices"].pop(), "saved with prox matrices"),
        (lambda sd: sd["proxrank"]["matrices"][0].update(metric=[1]), "'metric' is not a dict"),
    ],
)
def test_corrupted_checkpoint_is_rejected_before_anything_loads(corrupt, match):
    model = mlp()
    opt = proxrank.ProxRank(torch.optim.Adam(model.parameters(), lr=1e-2), model, lam=0.5)
    for _ in range(2):
        opt.zero_grad()
        backward(model)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    backward(model, scale=2.0)
    opt.step()
    corrupt(sd)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(snapshot(model, opt), before)


class Failing(Backend):
    """Fails on the matrix of the batch at ``index``, after drawing from a generator."""

    name = "failing"

    def __init__(self, index: int | None) -> None:
        self.index, self.gen = index, torch.Generator().manual_seed(0)

    def svd(self, Y, cutoff, state, min_rank=0):
        for st in state:
            st["touched"] = True
        torch.randn(3, generator=self.gen)
        err = RuntimeError("linalg.svd: The algorithm failed to converge")
        err.index = self.index
        raise err

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])


@pytest.mark.parametrize("index, expect", [(1, "'1.weight'"), (None, "'0.weight', '1.weight'")])
def test_a_failing_decomposition_names_the_weight_and_applies_no_prox(index, expect):
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    backend = Failing(index)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=1.0, backend=backend
    )
    backward_model = nn.Sequential(model, nn.Linear(6, 3))
    torch.manual_seed(1)
    backward_model(torch.randn(4, 6)).pow(2).sum().backward()
    after_base = [p.detach().clone().add_(p.grad, alpha=-0.1) for p in model.parameters()]
    gen_state = backend.gen.get_state()
    with pytest.raises(RuntimeError, match=f"the prox of {expect} failed after the base step"):
        opt.step()
    for p, q in zip(model.parameters(), after_base, strict=True):  # the base step, no prox
        assert torch.equal(p.detach(), q)
    assert torch.equal(backend.gen.get_state(), gen_state)
    assert all("touched" not in i.backend_state for i in opt.matrices())
    assert opt.step_count == 0


# -- batching ----------------------------------------------------------------------------------
class Counting(ExactBackend):
    def __init__(self) -> None:
        self.calls: list[int] = []

    def svd(self, Y, cutoff, state, min_rank=0):
        self.calls.append(Y.shape[0])
        return super().svd(Y, cutoff, state, min_rank)


@pytest.mark.parametrize(
    "schedule",
    [
        None,
        proxrank.Schedule(lam=proxrank.Ramp(0.5, 1.0, 0, 4), every=1),
        proxrank.Schedule(target=0.5, ramp_end=3),
    ],
)
def test_same_shape_matrices_share_one_backend_call_also_under_schedules(schedule):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    backend = Counting()
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1),
        model,
        lam=1.0,
        backend=backend,
        schedule=schedule,
    )
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
    assert backend.calls and all(b == 4 for b in backend.calls)
    assert len(backend.calls) <= 3


def test_prox_maps_are_values():
    assert SoftThreshold() == SoftThreshold() and hash(SoftThreshold()) == hash(SoftThreshold())
    assert SoftThreshold() != HardThreshold()


def test_describe_and_matrices_are_read_only_views():
    model = nn.Sequential(nn.Linear(4, 6), nn.MultiheadAttention(6, 2))
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=1.0)
    table = opt.describe()
    assert "1.in_proj_weight[k]  attention  6x6" in table and "0.weight" in table
    info = opt.matrix("0.weight")
    with pytest.raises(TypeError):
        info.backend_state["basis"] = torch.zeros(1)  # type: ignore[index]
    with pytest.raises(KeyError, match="no selected matrix is called 'nope'"):
        opt.matrix("nope")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, None])
def test_finite_check_flags_exactly_the_non_finite_gradients(dtype, bad):
    """The finite check sums each tensor first: entries whose sum overflows (finite, huge) are
    not flagged, any inf/NaN entry is, in every floating dtype."""
    model = mlp().to(dtype)
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.0), model, lam=1.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    huge = torch.finfo(dtype).max
    model[2].weight.grad.fill_(huge)  # finite; its sum overflows
    if bad is not None:
        model[2].weight.grad[3, 5] = bad
        with pytest.raises(FloatingPointError, match="gradient of '2.weight' is not finite"):
            opt.step()
    else:
        opt.step()  # lr = 0: the identity, no error

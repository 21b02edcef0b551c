"""A budget allocation that cuts a matrix to a tiny rank says so, naming it."""

from __future__ import annotations

import warnings

import pytest
import torch

import proxrank


def two_layers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # a small-scaled layer: the allocator cuts it first
    return model


def step(model, schedule):
    opt = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.01), model, schedule=schedule)
    opt.zero_grad()
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    return opt


def test_tiny_rank_warns_with_the_layer_name():
    model = two_layers()
    with pytest.warns(UserWarning, match=r"1 matrices below 1/32 of their rank \(1.weight -> 1"):
        step(model, proxrank.Schedule(budget=0.3, ramp_end=4))


def test_no_warning_with_a_rank_floor():
    model = two_layers()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(model, proxrank.Schedule(budget=0.3, ramp_end=4, min_rank=2))

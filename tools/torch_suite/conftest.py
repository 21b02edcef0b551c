"""Run PyTorch's own ``test_optim.py`` with every ``OptimizerInfo`` optimizer wrapped in ProxRank.

Before ``test_optim.py`` is imported, each entry of torch's optimizer database
(``torch.testing._internal.common_optimizers.optim_db``) gets its ``optim_cls`` replaced by a
factory of the same name that builds the base optimizer exactly as the test asks and returns

    ProxRank(base, [("p0", p0), ("p1", p1), ...], lam=PROXRANK_LAM)

over every parameter of the base's param groups (named parameters: every parameter with two or
more dims whose matrix has both sides > 1 is selected). Environment:

* ``PROXRANK_LAM``: ``bare`` (default: no wrapping, the reference run) or a number ``>= 0``.

A test whose parameters hold no selectable matrix (only vectors, scalars or ``1 x n``
matrices) still gets a ProxRank (it warns and steps as its base); the terminal summary counts
them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from torch.testing._internal.common_optimizers import optim_db

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import proxrank

LAM = os.environ.get("PROXRANK_LAM", "bare")

#: Per test: how many optimizers were wrapped with matrices selected, and with none.
_built: dict[str, Counter] = {}
_current = ["<collection>"]


def _wrapping(cls: type, lam: float):
    def make(params, *args, **kwargs):
        base = cls(params, *args, **kwargs)
        # each tensor once, as model.named_parameters() gives them (a base optimizer accepts
        # a repeated parameter with a warning; ProxRank refuses named duplicates)
        flat = list({id(p): p for group in base.param_groups for p in group["params"]}.values())
        counts = _built.setdefault(_current[0], Counter())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "no weight matrix": counted below
            opt = proxrank.ProxRank(base, [(f"p{i}", p) for i, p in enumerate(flat)], lam=lam)
        counts["wrapped" if opt.targets else "bare"] += 1
        return opt

    make.__name__ = cls.__name__
    make.__qualname__ = cls.__qualname__
    make.__module__ = cls.__module__
    make.__doc__ = cls.__doc__
    return make


if LAM != "bare":
    for info in optim_db:
        info.optim_cls = _wrapping(info.optim_cls, float(LAM))


@pytest.fixture(autouse=True)
def _track_test(request):
    _current[0] = request.node.nodeid
    yield
    _current[0] = "<between tests>"


def pytest_report_header(config):
    where = "bare optimizers" if LAM == "bare" else f"ProxRank(lam={LAM})"
    return f"proxrank torch_suite: {where}"


def pytest_terminal_summary(terminalreporter):
    if LAM == "bare":
        return
    only_bare = sorted(t for t, c in _built.items() if c["bare"] and not c["wrapped"])
    some_bare = sorted(t for t, c in _built.items() if c["bare"] and c["wrapped"])
    wrapped = sum(1 for c in _built.values() if c["wrapped"])
    tr = terminalreporter
    tr.section("proxrank torch_suite")
    tr.write_line(f"tests that built at least one ProxRank: {wrapped}")
    tr.write_line(
        f"tests whose optimizers all stayed bare (no selectable matrix): {len(only_bare)}"
    )
    tr.write_line(f"tests with some bare optimizers: {len(some_bare)}")
    for t in only_bare:
        tr.write_line(f"  all bare: {t}")

"""Turn low-rank weights into genuinely smaller layers: :func:`factorize`.

A weight matrix ``W`` (``m x n``) of rank ``r`` stored densely costs ``m n`` parameters; as the
product ``W = A B`` of an ``m x r`` and an ``r x n`` factor it costs ``r (m + n)``, which is
smaller exactly when ``r < m n / (m + n)``. :func:`factorize` computes the thin SVD
``W = U diag(s) V^T``, drops the singular values at or below a tolerance, and splits the rest
evenly, ``A = U_r diag(sqrt(s_r))`` and ``B = diag(sqrt(s_r)) V_r^T``, so that both factors have
the same spectrum (a balanced split, well conditioned for training on).

* ``nn.Linear(n, m)`` becomes ``Linear(n, r, bias=False)`` then ``Linear(r, m)``.
* A convolution with kernel ``(out, in/g, k...)`` has two matrix views, and each gives a split:

  - ``"kernel-first"``: ``out x (in/g prod(k))`` (the view ProxRank regularises): a ``k x k``
    convolution to ``r`` channels carrying stride, padding, dilation and padding mode, then a
    ``1 x 1`` convolution to ``out`` channels;
  - ``"pointwise-first"``: ``(out prod(k)) x (in/g)``: a ``1 x 1`` convolution to ``r``
    channels, then the ``k x k`` convolution to ``out`` channels. A pointwise map without bias
    commutes with every padding mode, so this is exact too.

  The split with fewer parameters is used. A grouped convolution (``groups = g``) is
  factorized group by group (each group's block has its own SVD), as a grouped convolution to
  ``g r`` channels then a grouped ``1 x 1`` convolution, with ``r`` the largest rank of a block.

The bias goes to the second layer; dtype, device, ``requires_grad`` and train/eval mode are
carried over. The factorized model computes the same function as the dense model whose
weights are truncated at the tolerance, up to floating-point rounding: the factors are
computed in float64 and rounded once to the weight's dtype, so outputs agree to a few units of
that dtype's rounding error times the layer's norm (about ``1e-6`` relative in float32,
``1e-14`` in float64, ``1e-2`` in bfloat16).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .selection import Selector, select_targets

__all__ = [
    "FactorizeSummary",
    "Factorized",
    "LayerSummary",
    "default_rtol",
    "factorize",
    "numerical_rank",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SPLITS = ("kernel-first", "pointwise-first")


class Factorized(nn.Module):
    """A layer stored as two thin layers: ``forward(x) = second(first(x))``.

    ``first`` has no bias; ``second`` carries the original layer's bias. Both are ordinary
    ``nn.Linear`` / ``nn.ConvNd`` modules, so the model saves with ``state_dict`` and
    ``torch.save``, traces with ``torch.compile`` / ``torch.export``, trains, and can be handed
    to :class:`proxrank.ProxRank` again (its factors are selected like any other layer).
    """

    def __init__(self, first: nn.Module, second: nn.Module, rank: int, split: str) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.rank = rank
        self.split = split

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, split={self.split!r}"


@dataclass
class LayerSummary:
    """One selected layer: its weight's matrix shape, the rank kept and what it costs.

    ``macs_*`` are multiply-adds of the layer for one forward pass over ``example_inputs``
    (or per output position when no example was given; ``None`` when the example did not
    reach the layer). ``split`` is ``"linear"``, ``"kernel-first"`` or ``"pointwise-first"``,
    or ``None`` for a layer left dense, and then ``reason`` says why. ``rank`` is ``-1`` for a
    selected weight that cannot be factorized (not a Linear/Conv weight, or tied).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    factorized: bool
    split: str | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    reason: str = ""


@dataclass
class FactorizeSummary:
    """What :func:`factorize` did: one :class:`LayerSummary` per selected layer plus the
    parameter count of the whole model before and after. ``str(summary)`` is a table."""

    layers: list[LayerSummary] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def compression(self) -> float:
        """Whole-model parameter ratio ``before / after``."""
        return self.model_params_before / max(self.model_params_after, 1)

    def totals(self, key: str) -> tuple[int, int]:
        """``(before, after)`` summed over the selected layers for ``"params"`` or ``"macs"``
        (layers without a MAC count are skipped)."""
        if key not in ("params", "macs"):
            raise ValueError(f"key must be 'params' or 'macs', got {key!r}")
        rows = [lay for lay in self.layers if getattr(lay, f"{key}_before") is not None]
        return (
            sum(getattr(lay, f"{key}_before") for lay in rows),
            sum(getattr(lay, f"{key}_after") for lay in rows),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form."""
        return {
            "layers": [asdict(lay) for lay in self.layers],
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "compression": self.compression,
        }

    def __str__(self) -> str:
        head = ("layer", "kind", "matrix", "rank", "split", "params", "MACs", "note")
        rows = [head]
        for lay in self.layers:
            macs = "-" if lay.macs_before is None else f"{lay.macs_before} -> {lay.macs_after}"
            rows.append(
                (
                    lay.name,
                    lay.kind,
                    "x".join(map(str, lay.shape)),
                    f"{lay.rank}/{lay.full_rank}",
                    lay.split or "dense",
                    f"{lay.params_before} -> {lay.params_after}",
                    macs,
                    lay.reason,
                )
            )
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(
            f"model parameters: {self.model_params_before} -> {self.model_params_after} "
            f"({self.compression:.2f}x smaller)"
        )
        return "\n".join(line.rstrip() for line in lines)


@dataclass
class _Plan:
    """Factors of one layer for one split: per group ``(A_j, B_j)`` with ``W_j = A_j B_j``."""

    split: str
    rank: int
    full_rank: int
    factors: list[tuple[Tensor, Tensor]]
    params: int


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _blocks(W: Tensor, groups: int, split: str) -> list[Tensor]:
    """The matrix view of each group's block of a weight ``(out, in_g, k...)`` for ``split``."""
    og = W.shape[0] // groups
    blocks = []
    for j in range(groups):
        Wj = W[j * og : (j + 1) * og]
        if split == "pointwise-first":  # (out_g k...) x in_g
            blocks.append(Wj.movedim(1, -1).reshape(-1, Wj.shape[1]))
        else:  # out_g x (in_g k...)
            blocks.append(Wj.reshape(og, -1))
    return blocks


def default_rtol(m: int, n: int, dtype: torch.dtype) -> float:
    """The default relative rank tolerance for an ``m x n`` matrix stored in ``dtype``:
    ``min(eps(dtype) * sqrt(max(m, n)), 1e-2)``.

    A matrix that ProxRank left at rank ``r`` keeps, after the prox is computed and rounded to
    ``dtype``, trailing singular values of about ``eps * s_1`` (float32 / float64: the prox's
    own rounding) or ``0.1 eps * s_1`` (bfloat16: the rounding of the stored weight); the
    factor ``sqrt(max(m, n))`` leaves a margin as :func:`torch.linalg.matrix_rank` does, and the
    cap keeps half precision from cutting singular values above 1% of the largest.
    """
    return min(torch.finfo(dtype).eps * math.sqrt(max(m, n)), 1e-2)


def numerical_rank(S: Tensor, rtol: float, atol: float = 0.0) -> int:
    """The number of singular values ``S`` (descending) above ``max(atol, rtol * S[0])``."""
    return int((S > max(atol, rtol * float(S[0]))).sum()) if S.numel() else 0


def _plan(module: nn.Module, split: str, rtol: float | None, atol: float) -> _Plan:
    """SVD of every group's block; rank = most singular values above the tolerance
    ``max(atol, rtol * s_max)`` in a block (at least 1: layers cannot have zero channels)."""
    groups = getattr(module, "groups", 1)
    blocks = _blocks(module.weight.detach().to(torch.float64), groups, split)
    m, n = blocks[0].shape
    rel = default_rtol(m, n, module.weight.dtype) if rtol is None else rtol
    svds = [torch.linalg.svd(M, full_matrices=False) for M in blocks]
    ranks = [numerical_rank(S, rel, atol) for _, S, _ in svds]
    rank = max(max(ranks), 1)
    factors = []
    for (U, S, Vh), r_j in zip(svds, ranks, strict=True):
        root = S[:rank].sqrt()
        root[r_j:] = 0  # below the tolerance counts as zero
        factors.append((U[:, :rank] * root, root[:, None] * Vh[:rank]))
    return _Plan(split, rank, min(m, n), factors, groups * rank * (m + n))


def _build(module: nn.Module, plan: _Plan) -> Factorized:
    W = module.weight
    kw = {"device": W.device, "dtype": W.dtype}
    has_bias = module.bias is not None
    A = torch.cat([a for a, _ in plan.factors])  # (out [k...]) stacked over groups, x r
    B = torch.cat([b for _, b in plan.factors])  # (groups r) x (in_g [k...])
    r = plan.rank
    if isinstance(module, nn.Linear):
        first = nn.Linear(module.in_features, r, bias=False, **kw)
        second = nn.Linear(r, module.out_features, bias=has_bias, **kw)
        first.weight.data.copy_(B)
        second.weight.data.copy_(A)
    else:
        conv = type(module)
        g, k = module.groups, tuple(module.kernel_size)
        ones = (1,) * len(k)
        spatial = {
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "padding_mode": module.padding_mode,
        }
        out, in_g = module.out_channels, module.in_channels // g
        if plan.split == "kernel-first":
            first = conv(module.in_channels, g * r, k, groups=g, bias=False, **spatial, **kw)
            second = conv(g * r, out, 1, groups=g, bias=has_bias, **kw)
            first.weight.data.copy_(B.reshape(g * r, in_g, *k))
            second.weight.data.copy_(A.reshape(out, r, *ones))
        else:
            first = conv(module.in_channels, g * r, 1, groups=g, bias=False, **kw)
            second = conv(g * r, out, k, groups=g, bias=has_bias, **spatial, **kw)
            first.weight.data.copy_(B.reshape(g * r, in_g, *ones))
            second.weight.data.copy_(A.reshape(out, *k, r).movedim(-1, 1))
    if has_bias:
        second.bias.data.copy_(module.bias.detach())
        second.bias.requires_grad_(module.bias.requires_grad)
    for layer in (first, second):
        layer.weight.requires_grad_(W.requires_grad)
    new = Factorized(first, second, r, plan.split)
    return new.train(module.training)


def _positions(module: nn.Module, x: Tensor, y: Tensor) -> tuple[int, int]:
    """``(input positions, output positions)`` of one call: rows for a Linear, batch times
    spatial size for a convolution (which may be unbatched)."""
    if isinstance(module, nn.Linear):
        rows = x.numel() // module.in_features
        return rows, rows
    return x.numel() // module.in_channels, y.numel() // module.out_channels


def _record_positions(
    model: nn.Module, modules: list[nn.Module], example_inputs: Any
) -> dict[int, tuple[int, int]]:
    """Run ``model(*example_inputs)`` once in eval mode and count each module's positions
    (summed over calls)."""
    counts: dict[int, tuple[int, int]] = {}

    def hook(mod: nn.Module, args: tuple, output: Tensor) -> None:
        p_in, p_out = _positions(mod, args[0], output)
        old = counts.get(id(mod), (0, 0))
        counts[id(mod)] = (old[0] + p_in, old[1] + p_out)

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no batch-norm statistics update, no dropout
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return counts


def _macs(module: nn.Module, positions: tuple[int, int], plan: _Plan | None) -> int:
    """Multiply-adds of the dense layer (``plan`` None) or of its factorized form."""
    p_in, p_out = positions
    if isinstance(module, nn.Linear):
        g, out, in_g, K = 1, module.out_features, module.in_features, 1
    else:
        g, out, in_g = module.groups, module.out_channels, module.in_channels // module.groups
        K = math.prod(module.kernel_size)
    if plan is None:
        return out * in_g * K * p_out
    r = plan.rank
    if plan.split == "pointwise-first":
        return g * r * in_g * p_in + out * r * K * p_out
    return (g * r * in_g * K + out * r) * p_out


def _check_options(rtol: float | None, atol: float, min_saving: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol), ("min_saving", min_saving)):
        if value is None and name == "rtol":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    if min_saving >= 1:
        raise ValueError(
            f"min_saving is the fraction of a layer's parameters that must be saved, in [0, 1); "
            f"got {min_saving!r}"
        )


def factorize(
    model: nn.Module,
    *,
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
    inplace: bool = False,
    rtol: float | None = None,
    atol: float = 0.0,
    min_saving: float = 0.0,
    example_inputs: Any = None,
) -> tuple[nn.Module, FactorizeSummary]:
    r"""Replace every selected low-rank ``nn.Linear`` / ``nn.Conv1d/2d/3d`` by a
    :class:`Factorized` pair of thin layers that computes the same function.

    For each selected weight (the same selection as :class:`proxrank.ProxRank`:
    :func:`proxrank.select_targets` with ``include`` / ``exclude``) the rank ``r`` is the number
    of singular values ``s_i > max(atol, rtol * s_1)`` of its matrix view (per group for a
    grouped convolution); smaller ones count as zero and are dropped. The layer is replaced
    when its factorized form has fewer parameters, ``r (m + n) < m n`` (for the cheaper of the
    two convolution splits, see :mod:`proxrank.factorize`), and saves at least the fraction
    ``min_saving`` of the layer's weight; otherwise it stays dense. Everything else is left
    untouched.

    Args:
        model: the model; a copy is changed and returned unless ``inplace=True``.
        include, exclude: which weights, as in :class:`proxrank.ProxRank`.
        inplace: change ``model`` itself instead of a deep copy.
        rtol: relative rank tolerance; default ``min(eps(dtype) * sqrt(max(m, n)), 1e-2)``
            for the weight's dtype and matrix shape (see :func:`default_rtol`). A larger value
            (e.g. ``1e-3``) also truncates small non-zero singular values: the factorized model
            then equals the *truncated* dense model.
        atol: absolute rank tolerance (default 0).
        min_saving: keep a layer dense unless it saves at least this fraction (in ``[0, 1)``) of
            its weight's parameters.
        example_inputs: an input (or tuple of inputs) for ``model``; when given, one forward
            pass counts each layer's multiply-adds exactly. Without it, MACs are per output
            position (a Linear: per input row), with ``prod(stride)`` input positions for the
            pointwise convolution that runs before a strided one.

    Returns:
        ``(model, summary)``: the factorized model (``model`` itself when ``inplace``) and a
        :class:`FactorizeSummary` (print it for a table).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_options(rtol, atol, min_saving)
    if not inplace:
        model = copy.deepcopy(model)
    summary = FactorizeSummary(model_params_before=_count_params(model))
    targets = select_targets(model, include, exclude)
    paths: dict[int, list[str]] = {}
    owners: dict[int, dict[int, nn.Module]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
        weight = getattr(mod, "weight", None)
        if isinstance(weight, Tensor):
            owners.setdefault(id(weight), {})[id(mod)] = mod
    supported = [
        mod
        for t in targets
        for mod in owners.get(id(t.param), {}).values()
        if isinstance(mod, (nn.Linear, *_CONVS))
    ]
    positions = (
        None if example_inputs is None else _record_positions(model, supported, example_inputs)
    )
    for t in targets:
        mods = list(owners.get(id(t.param), {}).values())
        module = mods[0] if len(mods) == 1 else None
        row = _summarise(t.name, t.param, module, rtol, atol, min_saving, positions, len(mods))
        summary.layers.append(row[0])
        if row[1] is not None:
            new = _build(module, row[1])
            for path in paths[id(module)]:
                if path == "":
                    model = new
                else:
                    parent, _, leaf = path.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, new)
    summary.model_params_after = _count_params(model)
    return model, summary


def _summarise(
    name: str,
    param: Tensor,
    module: nn.Module | None,
    rtol: float | None,
    atol: float,
    min_saving: float,
    positions: dict[int, tuple[int, int]] | None,
    n_owners: int,
) -> tuple[LayerSummary, _Plan | None]:
    """The summary row of one selected weight and the plan to factorize it (None: stays)."""
    shape = tuple(param.shape)
    kind = type(module).__name__ if module is not None else "-"
    bias = getattr(module, "bias", None)
    dense = param.numel() + (bias.numel() if isinstance(bias, Tensor) else 0)
    row = LayerSummary(name, kind, shape, -1, -1, False, None, dense, dense, None, None)
    if n_owners > 1:
        row.reason = "weight shared by several modules"
    elif module is None or not isinstance(module, (nn.Linear, *_CONVS)):
        row.reason = "not a Linear/Conv1d/2d/3d weight"
    if row.reason:
        return row, None
    k = getattr(module, "kernel_size", (1,))
    splits = ("linear",) if isinstance(module, nn.Linear) else SPLITS[: 1 + (math.prod(k) > 1)]
    plans = [_plan(module, s, rtol, atol) for s in splits]
    best = min(plans, key=lambda p: p.params)
    row.rank, row.full_rank = plans[0].rank, plans[0].full_rank
    pos = (math.prod(getattr(module, "stride", (1,))), 1) if positions is None else None
    if positions is not None and id(module) in positions:
        pos = positions[id(module)]
    if pos is not None:
        row.macs_before = row.macs_after = _macs(module, pos, None)
    if best.params >= param.numel() * (1 - min_saving) or best.params >= param.numel():
        row.reason = (
            f"rank {row.rank} of {row.full_rank}: factors would cost {best.params} of "
            f"{param.numel()} weights"
        )
        return row, None
    row.factorized, row.split, row.rank, row.full_rank = True, best.split, best.rank, best.full_rank
    row.params_after = best.params + (dense - param.numel())
    if pos is not None:
        row.macs_after = _macs(module, pos, best)
    return row, best

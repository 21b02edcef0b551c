"""The conversion itself: :func:`factorize` (dense low-rank model -> smaller model) and
:func:`load_factorized` (original architecture + saved ``state_dict`` -> smaller model)."""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..selection import Selector, select_targets
from ..tt import default_layout, tt_parameters
from .layers import SHAPE_ATTRS, Factorized, FactorizedMultiheadAttention
from .prune import PruneResult, prune_units, resized
from .sparse import SparseLinear
from .summary import FactorizeSummary, LayerSummary
from .tolerance import default_rtol, numerical_rank
from .ttlinear import TTLinear, tt_numerical_ranks

#: A TT-matrix layout: ``(row_shape, col_shape)``.
Layout = tuple[tuple[int, ...], tuple[int, ...]]

__all__ = ["default_rtol", "factorize", "load_factorized", "numerical_rank"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Gate blocks of a recurrent layer's stacked weights, by ``nn.RNNBase.mode``.
_GATES = {"LSTM": "ifgo", "GRU": "rzn", "RNN_TANH": "", "RNN_RELU": ""}
_QKV = "qkv"
#: Why recurrent layers stay dense (the summary's ``reason``): their fused kernels take dense
#: weights, and a factorized recurrence would need a Python loop over time steps.
RECURRENT_REASON = "recurrent layers stay dense (fused kernel)"
_UNKNOWN_REASON = (
    "not a weight of a kind factorize knows (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
    "transformers Conv1D, MultiheadAttention)"
)


def _hf_conv1d() -> type | None:
    """transformers' ``Conv1D`` class when transformers is loaded (a model holding one has
    loaded it), without importing transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_conv1d(module: nn.Module) -> bool:
    cls = _hf_conv1d()
    return cls is not None and isinstance(module, cls)


@dataclass
class _Unit:
    """One matrix that may become two factors: the weight in its layer's layout (``out x in``
    for a linear map; ``(out, in/g, k...)`` for a convolution; ``(in, out/g, k...)`` for a
    transposed one), its bias, and where its input / output positions are recorded."""

    name: str
    module: nn.Module
    kind: str  # "linear", "conv" or "conv-transpose"
    weight: Tensor
    bias: Tensor | None
    attr: str = "weight"
    slots: tuple[int, int] = (0, 1)
    weight_in_out: bool = False  # transformers' Conv1D: weight stored in x out
    shape_attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return getattr(self.module, "groups", 1) if self.kind != "linear" else 1

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def splits(self) -> tuple[str, ...]:
        """The matrix views that can be factorized, the one ProxRank regularises first."""
        if self.kind == "linear":
            return ("linear",)
        order = ("kernel-first", "pointwise-first")
        if self.kind == "conv-transpose":
            order = order[::-1]
        return order[: 1 + (math.prod(self.kernel) > 1)]

    def rows_view(self, split: str) -> bool:
        """Whether ``split`` factors the view ``d0/g x (d1 prod(k))`` (else ``(d0/g prod(k)) x
        d1``), for the weight ``(d0, d1, k...)``."""
        return split in ("linear", "kernel-first" if self.kind == "conv" else "pointwise-first")


@dataclass
class _Plan:
    """Factors of one unit for one split: per group ``(A_j, B_j)`` with ``W_j = A_j B_j``."""

    split: str
    rank: int
    full_rank: int
    factors: list[tuple[Tensor, Tensor]]
    params: int


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _blocks(W: Tensor, groups: int, rows: bool) -> list[Tensor]:
    """The matrix view of each group's block of a weight ``(d0, d1, k...)``: ``d0/g x (d1
    prod(k))`` when ``rows``, else ``(d0/g prod(k)) x d1``."""
    og = W.shape[0] // groups
    blocks = []
    for j in range(groups):
        Wj = W[j * og : (j + 1) * og]
        blocks.append(Wj.reshape(og, -1) if rows else Wj.movedim(1, -1).reshape(-1, Wj.shape[1]))
    return blocks


def _plan(unit: _Unit, split: str, rtol: float | None, atol: float) -> _Plan:
    """SVD of every group's block; rank = most singular values above the tolerance
    ``max(atol, rtol * s_max)`` in a block (at least 1: layers cannot have zero channels)."""
    g = unit.groups
    blocks = _blocks(unit.weight.detach().to(torch.float64), g, unit.rows_view(split))
    m, n = blocks[0].shape
    rel = default_rtol(m, n, unit.weight.dtype) if rtol is None else rtol
    svds = [torch.linalg.svd(M, full_matrices=False) for M in blocks]
    ranks = [numerical_rank(S, rel, atol) for _, S, _ in svds]
    rank = max(max(ranks), 1)
    factors = []
    for (U, S, Vh), r_j in zip(svds, ranks, strict=True):
        root = S[:rank].sqrt()
        root[r_j:] = 0  # below the tolerance counts as zero
        factors.append((U[:, :rank] * root, root[:, None] * Vh[:rank]))
    return _Plan(split, rank, min(m, n), factors, g * rank * (m + n))


def _zero_plan(unit: _Unit, split: str, rank: int) -> _Plan:
    """Zero factors of the given rank (the shapes of a plan, for :func:`load_factorized`)."""
    g = unit.groups
    m, n = _blocks(unit.weight.detach(), g, unit.rows_view(split))[0].shape
    zeros = [(torch.zeros(m, rank), torch.zeros(rank, n)) for _ in range(g)]
    return _Plan(split, rank, min(m, n), zeros, g * rank * (m + n))


def _build(unit: _Unit, plan: _Plan) -> Factorized:
    """The two thin layers of ``plan`` (see :mod:`proxrank.factorize`)."""
    W = unit.weight
    kw = {"device": W.device, "dtype": W.dtype}
    has_bias = unit.bias is not None
    A = torch.cat([a for a, _ in plan.factors])  # d0 (x k) stacked over groups, x r
    B = torch.cat([b for _, b in plan.factors])  # (groups r) x d1 (x k)
    r, g = plan.rank, unit.groups
    if unit.kind == "linear":
        first = nn.Linear(W.shape[1], r, bias=False, **kw)
        second = nn.Linear(r, W.shape[0], bias=has_bias, **kw)
        first.weight.data.copy_(B)
        second.weight.data.copy_(A)
    else:
        module, k = unit.module, unit.kernel
        ones = (1,) * len(k)
        d0, d1 = W.shape[0], W.shape[1]
        keys = ("stride", "padding", "dilation", "padding_mode")
        if unit.kind == "conv-transpose":
            keys += ("output_padding",)
        spatial = {key: getattr(module, key) for key in keys}
        if unit.rows_view(plan.split):  # A: d0 x r (pointwise), B: r x d1 k (carries k)
            a_t, b_t = A.reshape(d0, r, *ones), B.reshape(g * r, d1, *k)
            a_kw, b_kw = {}, spatial
        else:  # A: d0 k x r (carries k), B: r x d1 (pointwise)
            a_t, b_t = A.reshape(d0, *k, r).movedim(-1, 1), B.reshape(g * r, d1, *ones)
            a_kw, b_kw = spatial, {}
        conv = type(module)
        if unit.kind == "conv-transpose":  # weight (in, out/g, k): A is on the input side
            first = conv(d0, g * r, a_t.shape[2:], groups=g, bias=False, **a_kw, **kw)
            second = conv(g * r, g * d1, b_t.shape[2:], groups=g, bias=has_bias, **b_kw, **kw)
            first.weight.data.copy_(a_t)
            second.weight.data.copy_(b_t)
        else:  # weight (out, in/g, k): B is on the input side
            first = conv(g * d1, g * r, b_t.shape[2:], groups=g, bias=False, **b_kw, **kw)
            second = conv(g * r, d0, a_t.shape[2:], groups=g, bias=has_bias, **a_kw, **kw)
            first.weight.data.copy_(b_t)
            second.weight.data.copy_(a_t)
    if has_bias:
        second.bias.data.copy_(unit.bias.detach())
        second.bias.requires_grad_(unit.bias.requires_grad)
    for layer in (first, second):
        layer.weight.requires_grad_(W.requires_grad)
    new = Factorized(
        first, second, r, plan.split, weight_in_out=unit.weight_in_out, shape_attrs=unit.shape_attrs
    )
    return new.train(unit.module.training)


def _dense_linear(unit: _Unit) -> nn.Linear:
    """A dense ``nn.Linear`` holding a linear unit (a block of attention left dense)."""
    W, b = unit.weight, unit.bias
    lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None, device=W.device, dtype=W.dtype)
    lin.weight.data.copy_(W.detach())
    lin.weight.requires_grad_(W.requires_grad)
    if b is not None:
        lin.bias.data.copy_(b.detach())
        lin.bias.requires_grad_(b.requires_grad)
    return lin.train(unit.module.training)


# -- which matrices a module holds -------------------------------------------------------------


def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    return {key: getattr(module, key) for key in SHAPE_ATTRS if hasattr(module, key)}


def _is_linear_layer(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: a layer a :class:`TTLinear` or
    :class:`SparseLinear` of its ``out x in`` matrix replaces (both map ``(..., in)`` to
    ``(..., out)``)."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _layer_unit(module: nn.Module, name: str) -> _Unit | None:
    """The unit of a Linear / ConvNd / ConvTransposeNd / transformers Conv1D weight."""
    if isinstance(module, nn.Linear):
        kind, weight = "linear", module.weight
    elif isinstance(module, _CONVS):
        kind, weight = "conv", module.weight
    elif isinstance(module, _CONV_TS):
        kind, weight = "conv-transpose", module.weight
    elif _is_conv1d(module):
        return _Unit(
            name,
            module,
            "linear",
            module.weight.T,
            module.bias,
            weight_in_out=True,
            shape_attrs=_shape_attrs(module),
        )
    else:
        return None
    return _Unit(name, module, kind, weight, module.bias, shape_attrs=_shape_attrs(module))


def _mha_units(module: nn.MultiheadAttention, prefix: str) -> list[_Unit]:
    """The query, key and value projections of an attention layer, one unit each (rows
    ``0:E``, ``E:2E``, ``2E:3E`` of a packed ``in_proj_weight``)."""
    E = module.embed_dim
    biases = [None] * 3 if module.in_proj_bias is None else list(module.in_proj_bias.chunk(3))
    units = []
    for j, block in enumerate(_QKV):
        if module._qkv_same_embed_dim:
            attr, name = "in_proj_weight", f"{prefix}in_proj_weight[{block}]"
            weight = module.in_proj_weight[j * E : (j + 1) * E]
        else:
            attr = f"{block}_proj_weight"
            name = prefix + attr
            weight = getattr(module, attr)
        shape_attrs = {"in_features": weight.shape[1], "out_features": E}
        units.append(
            _Unit(name, module, "linear", weight, biases[j], attr, (j, j), shape_attrs=shape_attrs)
        )
    return units


def _recurrent_units(module: nn.RNNBase, attr: str, name: str) -> list[_Unit]:
    """One unit per gate block of a recurrent layer's stacked weight (dense rows only)."""
    weight = getattr(module, attr)
    gates = _GATES.get(module.mode, "") if not attr.startswith("weight_hr") else ""
    bias = getattr(module, attr.replace("weight", "bias", 1), None)
    if not gates:
        return [_Unit(name, module, "linear", weight, bias, attr)]
    h = weight.shape[0] // len(gates)
    return [
        _Unit(
            f"{name}[{gate}]",
            module,
            "linear",
            weight[j * h : (j + 1) * h],
            None if bias is None else bias[j * h : (j + 1) * h],
            attr,
        )
        for j, gate in enumerate(gates)
    ]


# -- multiply-adds ------------------------------------------------------------------------------


def _record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple[int, ...]:
    """Positions of one call: ``(query, key, value)`` rows of an attention layer; ``(input,
    output)`` positions of a convolution (batch times spatial size); rows of a linear map."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("query", "key", "value")
        q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
        return (q.numel() // module.embed_dim, k.numel() // module.kdim, v.numel() // module.vdim)
    x = args[0] if args else next(iter(kwargs.values()))
    if isinstance(module, _CONVS + _CONV_TS):
        return x.numel() // module.in_channels, output.numel() // module.out_channels
    rows = x.numel() // module.weight.shape[0 if _is_conv1d(module) else 1]
    return rows, rows


def _record_positions(
    model: nn.Module, modules: list[nn.Module], example_inputs: Any
) -> dict[int, tuple[int, ...]]:
    """Run ``model(*example_inputs)`` once in eval mode and count each module's positions
    (summed over calls)."""
    counts: dict[int, tuple[int, ...]] = {}

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        new = _record(mod, args, kwargs, output)
        old = counts.get(id(mod), (0,) * len(new))
        counts[id(mod)] = tuple(a + b for a, b in zip(old, new, strict=True))

    handles = [
        m.register_forward_hook(hook, with_kwargs=True)
        for m in {id(m): m for m in modules}.values()
    ]
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
    for m in modules:  # nn.MultiheadAttention applies out_proj's weight without calling it
        if isinstance(m, nn.MultiheadAttention) and id(m) in counts:
            counts.setdefault(id(m.out_proj), (counts[id(m)][0],) * 2)
    return counts


def _default_positions(unit: _Unit) -> tuple[int, int]:
    """Per position: per output position of a convolution (``prod(stride)`` input positions),
    per input position of a transposed one, per row of a linear map."""
    stride = math.prod(getattr(unit.module, "stride", (1,)))
    return {"conv": (stride, 1), "conv-transpose": (1, stride)}.get(unit.kind, (1, 1))


def _macs(unit: _Unit, positions: tuple[int, int], plan: _Plan | None) -> int:
    """Multiply-adds of the dense unit (``plan`` None) or of its factorized form."""
    p_in, p_out = positions
    W, g = unit.weight, unit.groups
    d0, d1, K = W.shape[0], W.shape[1], math.prod(unit.kernel)
    if unit.kind == "conv-transpose":  # scatters from every input position
        if plan is None:
            return d0 * d1 * K * p_in
        r = plan.rank
        if plan.split == "pointwise-first":
            return d0 * r * p_in + g * r * d1 * K * p_in
        return d0 * r * K * p_in + g * r * d1 * p_out
    if plan is None:
        return d0 * d1 * K * p_out
    r = plan.rank
    if plan.split == "pointwise-first":
        return g * r * d1 * p_in + d0 * r * K * p_out
    return (g * r * d1 * K + d0 * r) * p_out


# -- factorize ----------------------------------------------------------------------------------


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


def _replace(model: nn.Module, paths: list[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at every path of a module; returns the (possibly new) root."""
    for path in paths:
        if path == "":
            model = new
        else:
            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, new)
    return model


def _disable_nested_tensors(model: nn.Module) -> None:
    """``nn.TransformerEncoder`` decides at construction whether its inference path packs the
    batch into nested tensors, which only the fused encoder layer (one packed dense attention
    weight) can take: switch it off where a layer's attention is now factorized, as its
    constructor would have."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), FactorizedMultiheadAttention)
            for layer in mod.layers
        ):
            mod.use_nested_tensor = False


@dataclass
class _Options:
    rtol: float | None
    atol: float
    min_saving: float
    positions: dict[int, tuple[int, ...]] | None
    tt: bool | Mapping[str, Layout] = False
    sparse: str | None = None


def _positions(unit: _Unit, opts: _Options) -> tuple[int, int] | None:
    """The unit's ``(input, output)`` positions: recorded, per position, or None (the
    example did not reach it)."""
    if opts.positions is None:
        return _default_positions(unit)
    if id(unit.module) in opts.positions:
        recorded = opts.positions[id(unit.module)]
        return recorded[unit.slots[0]], recorded[unit.slots[1]]
    return None


def _row(unit: _Unit, opts: _Options, reason: str = "") -> tuple[LayerSummary, _Plan | None]:
    """The summary row of one unit and the plan to factorize it (None: stays dense)."""
    kind = type(unit.module).__name__
    dense = unit.weight.numel() + (unit.bias.numel() if unit.bias is not None else 0)
    row = LayerSummary(
        unit.name, kind, tuple(unit.weight.shape), -1, -1, False, None, dense, dense, None, None
    )
    plans = [_plan(unit, s, opts.rtol, opts.atol) for s in unit.splits]
    best = min(plans, key=lambda p: p.params)
    row.rank, row.full_rank = plans[0].rank, plans[0].full_rank
    if reason:
        row.reason = reason
        return row, None
    pos = _positions(unit, opts)
    if pos is not None:
        row.macs_before = row.macs_after = _macs(unit, pos, None)
    n = unit.weight.numel()
    if best.params >= n * (1 - opts.min_saving) or best.params >= n:
        row.reason = (
            f"rank {row.rank} of {row.full_rank}: factors would cost {best.params} of {n} weights"
        )
        return row, None
    row.factorized, row.split, row.rank, row.full_rank = True, best.split, best.rank, best.full_rank
    row.params_after = best.params + (dense - n)
    if pos is not None:
        row.macs_after = _macs(unit, pos, best)
    return row, best


def _reason_row(name: str, param: Tensor, module: nn.Module | None, reason: str) -> LayerSummary:
    n = param.numel()
    kind = type(module).__name__ if module is not None else "-"
    shape = tuple(param.shape)
    return LayerSummary(name, kind, shape, -1, -1, False, None, n, n, None, None, reason)


def _convert(
    module: nn.Module, prefix: str, attrs: list[str], opts: _Options
) -> tuple[list[LayerSummary], nn.Module | None]:
    """Summary rows of a module's selected weights (``attrs``; parameter names start with
    ``prefix``) and its replacement (None: it stays)."""
    if isinstance(module, nn.MultiheadAttention):
        rows, projs, changed = [], [], False
        for unit in _mha_units(module, prefix):
            plan = None
            if unit.attr in attrs:
                row, plan = _row(unit, opts)
                rows.append(row)
            projs.append(_dense_linear(unit) if plan is None else _build(unit, plan))
            changed |= plan is not None
        return rows, FactorizedMultiheadAttention(module, *projs) if changed else None
    if isinstance(module, nn.RNNBase):
        units = [u for attr in attrs for u in _recurrent_units(module, attr, prefix + attr)]
        return [_row(u, opts, RECURRENT_REASON)[0] for u in units], None
    unit = _layer_unit(module, prefix + "weight")
    rows = [
        _reason_row(prefix + attr, getattr(module, attr), module, _UNKNOWN_REASON)
        for attr in attrs
        if unit is None or attr != "weight"
    ]
    if unit is None or "weight" not in attrs:
        return rows, None
    row, plan = _row(unit, opts)
    compact = _compact(unit, opts, row)
    if compact is not None:
        return [row, *rows], compact
    return [row, *rows], None if plan is None else _build(unit, plan)


def _layout(unit: _Unit, opts: _Options) -> Layout:
    """The TT-matrix layout of a linear unit: given by weight or layer name in ``opts.tt``
    (checked to fit; pruning leaves those layers' shapes alone), else
    :func:`proxrank.tt.default_layout`."""
    if isinstance(opts.tt, Mapping):
        for key in (unit.name, unit.name.rpartition(".")[0]):
            if key in opts.tt:
                rows, cols = opts.tt[key]
                return tuple(rows), tuple(cols)
    return default_layout(*unit.weight.shape)


def _compact(unit: _Unit, opts: _Options, row: LayerSummary) -> nn.Module | None:
    """A :class:`TTLinear` (``opts.tt``) or :class:`SparseLinear` (``opts.sparse``) for an
    ``nn.Linear`` weight when it stores fewer numbers than the form ``row`` chose (and saves
    ``min_saving``); ``row`` is updated. Otherwise None, and ``row.reason`` notes what the
    other forms would cost and exact zeros left dense."""
    W, b = unit.weight, unit.bias  # a Conv1D's weight.T: the same map as nn.Linear(W, b)
    if not _is_linear_layer(unit.module):
        zeros = W.numel() - int(torch.count_nonzero(W.detach()))
        if zeros and not row.factorized:
            note = (
                f"{zeros} of {W.numel()} weights are zero, left dense (CSR is for nn.Linear "
                "and transformers' Conv1D)"
            )
            row.reason = f"{row.reason}; {note}" if row.reason else note
        return None
    m, n = W.shape
    n_bias = 0 if b is None else b.numel()
    limit = min(row.params_after - n_bias, W.numel() * (1 - opts.min_saving))
    pos = _positions(unit, opts)
    notes, choices = [], []
    if opts.tt is not False:
        rows, cols = _layout(unit, opts)
        ranks = tt_numerical_ranks(W, rows, cols, opts.rtol, opts.atol)
        cost = tt_parameters(rows, cols, ranks)
        notes.append(f"TT {rows}x{cols} ranks {ranks}: cores would cost {cost} of {m * n}")
        choices.append((cost, "tt", (rows, cols, ranks)))
    nnz = int(torch.count_nonzero(W.detach()))
    stored = 2 * nnz + m + 1
    if opts.sparse == "csr":
        notes.append(f"CSR would store {stored} numbers ({nnz} non-zeros) of {m * n}")
        choices.append((stored, "csr", None))
    elif nnz < m * n:
        notes.append(
            f"{m * n - nnz} of {m * n} weights are zero, left dense (sparse='csr' would store "
            f"{stored} numbers)"
        )
    best = min((c for c in choices if c[0] < limit), default=None, key=lambda c: c[0])
    if best is None:
        if notes and not row.factorized:
            row.reason = "; ".join([row.reason, *notes] if row.reason else notes)
        return None
    cost, form, layout = best
    row.factorized, row.split, row.reason = True, form, ""
    if form == "tt":
        new = TTLinear.from_dense(W, b, layout[0], layout[1], ranks=layout[2])
        row.tt_ranks, row.params_after = new.ranks, new.parameters_count() + n_bias
        row.macs_after = None if pos is None else new.macs(pos[0])
    else:
        new = SparseLinear.from_dense(W, b)
        row.nnz, row.params_after = nnz, nnz + n_bias
        row.macs_after = None if pos is None else nnz * pos[0]
    return new.train(unit.module.training)


def _check_forms(
    model: nn.Module,
    targets: list[Any],
    prune: object,
    tt: object,
    sparse: object,
) -> None:
    """Check ``prune``, ``tt`` (every named layout fits a selected ``nn.Linear`` weight) and
    ``sparse``, before anything changes."""
    if not isinstance(prune, bool):
        raise TypeError(f"prune must be True or False, got {prune!r}")
    if sparse not in (None, "csr"):
        raise ValueError(f"sparse must be None or 'csr', got {sparse!r}")
    if isinstance(tt, bool):
        return
    if not isinstance(tt, Mapping):
        raise TypeError(
            "tt must be True / False or a mapping from a weight's (or its layer's) name to its "
            f"TT-matrix layout (row_shape, col_shape); got {type(tt).__name__}"
        )
    linears = {}
    for t in targets:
        path, _, attr = t.param_name.rpartition(".")
        module = model.get_submodule(path)
        if attr == "weight" and _is_linear_layer(module):
            shape = tuple(t.param.shape)  # a Conv1D stores in x out
            linears[t.param_name] = linears[path] = shape[::-1] if _is_conv1d(module) else shape
    for key, layout in tt.items():
        if key not in linears:
            raise ValueError(
                f"tt names {key!r}, which is not a selected nn.Linear (or transformers Conv1D) "
                "weight or its layer: the TT form is for those layers (others get the dense or "
                f"low-rank form); selected: {sorted(linears)}"
            )
        m, n = linears[key]
        ok = isinstance(layout, Sequence) and len(layout) == 2
        rows, cols = layout if ok else ((), ())
        ok = ok and all(isinstance(s, Sequence) and s for s in (rows, cols))
        ok = (
            ok
            and len(rows) == len(cols)
            and all(isinstance(k, int) and k >= 1 for k in (*rows, *cols))
        )
        if not ok or math.prod(rows) != m or math.prod(cols) != n:
            raise ValueError(
                f"tt[{key!r}] = {layout!r} is not a TT-matrix layout of the {m} x {n} weight: "
                f"give (row_shape, col_shape) of equal length with products {m} and {n}, e.g. "
                f"{default_layout(m, n)}"
            )


def _report_pruning(
    rows: list[LayerSummary], path: str, module: nn.Module, pruning: PruneResult
) -> None:
    """Put what structured pruning did to the layer at ``path`` into its weight's row."""
    name = f"{path}.weight" if path else "weight"
    for row in rows:
        if row.name != name:
            continue
        before, after = pruning.shapes.get(path, (row.shape, row.shape))
        if before != after:
            pruned, n_before = math.prod(after), math.prod(before)
            bias = 0 if module.bias is None else before[0]
            row.shape, row.shape_after = before, after
            row.params_before = n_before + bias
            if row.macs_before is not None:
                row.macs_before = row.macs_before // pruned * n_before
        note = pruning.reason(path, module.weight)
        if note:
            row.reason = f"{row.reason}; {note}" if row.reason else note


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
    prune: bool = True,
    tt: bool | Mapping[str, tuple[Sequence[int], Sequence[int]]] = False,
    sparse: str | None = None,
) -> tuple[nn.Module, FactorizeSummary]:
    r"""Replace every selected low-rank layer by a smaller one that computes the same function.

    For each selected weight (the same selection as :class:`proxrank.ProxRank`:
    :func:`proxrank.select_targets` with ``include`` / ``exclude``) the rank ``r`` is the number
    of singular values ``s_i > max(atol, rtol * s_1)`` of its matrix view (per group for a
    grouped convolution, per block ``W_q``, ``W_k``, ``W_v`` of an attention layer's packed
    ``in_proj_weight``); smaller ones count as zero and are dropped. The layer is replaced when
    its factorized form has fewer parameters, ``r (m + n) < m n`` (for the cheaper of the two
    convolution splits, see :mod:`proxrank.factorize`), and saves at least the fraction
    ``min_saving`` of the weight; otherwise it stays dense.

    * ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and transformers'
      ``Conv1D`` become a :class:`Factorized` pair of thin layers;
    * ``nn.MultiheadAttention`` becomes a :class:`FactorizedMultiheadAttention` when one of its
      query / key / value blocks saves (each block has its own rank; a block that does not save
      is a dense ``nn.Linear``); its ``out_proj`` is an ``nn.Linear`` and is factorized as one;
    * ``nn.RNN/LSTM/GRU`` weights are reported per gate block with their rank and stay dense
      (``reason`` says why); other selected weights (embeddings, ...) stay too.

    Before that, with ``prune=True`` (default), zero units are removed: a zero output unit
    (row) of a selected layer, or a zero input feature (column), together with the matching
    column of the next layer or row of the previous one, and their BatchNorm channel, inside
    ``nn.Sequential`` chains of Linear / ungrouped Conv layers where that is exact (a zero row
    with a bias outputs a constant, folded into the next layer's bias where exact); see
    :mod:`proxrank.factorize.prune`. The summary says why zero units that stay were kept. The
    pruned model equals the original in eval mode (BatchNorm running statistics, no dropout).

    An ``nn.Linear`` (or transformers ``Conv1D``, as the linear map of its ``weight.T``) weight
    can also take two other forms, each used when it stores fewer numbers than the dense or
    low-rank form (and saves ``min_saving``):

    * ``tt``: a :class:`TTLinear` of the weight's TT-SVD in its TT-matrix layout, at the TT
      ranks of the tolerance (each unfolding's singular values ``> max(atol, rtol s_1)``,
      :func:`tt_numerical_ranks`), costing :func:`proxrank.tt.tt_parameters` numbers;
    * ``sparse="csr"``: a :class:`SparseLinear` holding the exact non-zeros, costing
      ``2 nnz + m + 1`` stored numbers (values, column indices, row pointers). Without it a
      weight with exact zeros is left dense and the summary notes what CSR would store.

    Everything else is left untouched, except that an ``nn.TransformerEncoder`` whose
    attention is factorized no longer packs its inference batch into nested tensors (that
    path needs the fused dense encoder layer). A weight shared by several modules (tied) stays
    dense.

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
            pass counts each layer's multiply-adds exactly. Without it, MACs are per position:
            per output position of a convolution (with ``prod(stride)`` input positions for the
            pointwise convolution that runs before a strided one), per input position of a
            transposed convolution, per row of a linear map.
        prune: remove zero units first (structured pruning, above). A layer named in a ``tt``
            mapping keeps its shape (its layout fits that shape), and so do its neighbours'
            matching units.
        tt: ``True``: try the TT form for every selected ``nn.Linear`` / ``Conv1D`` weight, in
            :func:`proxrank.tt.default_layout` ``(m, n)``; a mapping from weight names
            (``"fc.weight"``) or layer names (``"fc"``) to ``(row_shape, col_shape)``: those
            layouts (the layout the weight was trained in: ``ProxRank(prox="tt")`` uses the
            default layout unless given one), the default layout for the other Linears.
            ``False`` (default): no TT form.
        sparse: ``"csr"``: try the CSR form for every selected ``nn.Linear`` / ``Conv1D``
            weight; ``None``
            (default): none.

    Returns:
        ``(model, summary)``: the factorized model (``model`` itself when ``inplace``) and a
        :class:`FactorizeSummary` (print it for a table). Save the result with
        ``torch.save(small.state_dict(), path)`` and rebuild it from the original architecture
        with :func:`load_factorized`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_options(rtol, atol, min_saving)
    _check_forms(model, select_targets(model, include, exclude), prune, tt, sparse)
    if not inplace:
        model = copy.deepcopy(model)
    elif example_inputs is not None and prune:  # inputs that fail fail before pruning
        _record_positions(model, [], example_inputs)
    summary = FactorizeSummary(model_params_before=_count_params(model))
    targets = select_targets(model, include, exclude)
    pruning = None
    if prune:  # the same weights stay selected, also where pruning left a side of length 1
        weights = [t.param_name for t in targets]
        selected_paths = {w.rpartition(".")[0] for w in weights if w.rpartition(".")[2] == "weight"}
        layouts = tt if isinstance(tt, Mapping) else {}
        fixed = {
            key.removesuffix(".weight"): f"{key} keeps its shape for the TT layout given in tt="
            for key in layouts
        }
        pruning = prune_units(model, selected_paths, fixed)
        params = dict(model.named_parameters())
        targets = [dataclasses.replace(t, param=params[t.param_name]) for t in targets]
    paths: dict[int, list[str]] = {}
    owners: dict[int, dict[int, tuple[nn.Module, str]]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(name)
        for attr, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), {})[id(mod)] = (mod, attr)
    # rows in target order; a module's rows where its first selected weight comes
    order: list[tuple[str, Any]] = []
    selected: dict[int, tuple[nn.Module, list[str]]] = {}
    for t in targets:
        own = list(owners.get(id(t.param), {}).values())
        if len(own) != 1:
            row = _reason_row(t.name, t.param, None, "weight shared by several modules")
            order.append(("row", row))
            continue
        mod, attr = own[0]
        if id(mod) not in selected:
            selected[id(mod)] = (mod, [])
            order.append(("module", id(mod)))
        if attr not in selected[id(mod)][1]:
            selected[id(mod)][1].append(attr)
    known = [
        m
        for m, _ in selected.values()
        if isinstance(m, nn.MultiheadAttention) or _layer_unit(m, "") is not None
    ]
    positions = None if example_inputs is None else _record_positions(model, known, example_inputs)
    opts = _Options(rtol, atol, min_saving, positions, tt, sparse)
    for what, item in order:
        if what == "row":
            summary.layers.append(item)
            continue
        module, attrs = selected[item]
        path = paths[id(module)][0]
        rows, new = _convert(module, f"{path}." if path else "", attrs, opts)
        if pruning is not None and isinstance(module, (nn.Linear, *_CONVS)):
            _report_pruning(rows, path, module, pruning)
        summary.layers.extend(rows)
        if new is not None:
            model = _replace(model, paths[id(module)], new)
    _disable_nested_tensors(model)
    summary.model_params_after = _count_params(model)
    return model, summary


# -- load_factorized ----------------------------------------------------------------------------


def _saved_layout(unit: _Unit, first: Tensor) -> tuple[int, str]:
    """``(rank, split)`` of a saved factorized unit from the shape of its ``first`` weight."""
    if unit.kind == "linear":
        return first.shape[0], "linear"
    has_kernel = math.prod(first.shape[2:]) > 1 or math.prod(unit.kernel) == 1
    if unit.kind == "conv":
        return first.shape[0] // unit.groups, "kernel-first" if has_kernel else "pointwise-first"
    return first.shape[1], "kernel-first" if math.prod(first.shape[2:]) > 1 else "pointwise-first"


def _restored(module: nn.Module, prefix: str, state: Mapping[str, Any]) -> nn.Module | None:
    """The factorized layer a saved state dict holds at ``prefix`` (None: it is dense)."""
    if isinstance(module, nn.MultiheadAttention):
        units = _mha_units(module, prefix)
        keys = [f"{prefix}{b}_proj.first.weight" for b in _QKV]
        if not any(
            f"{prefix}{b}_proj.weight" in state or k in state
            for b, k in zip(_QKV, keys, strict=True)
        ):
            return None
        projs = [
            _build(u, _zero_plan(u, "linear", state[k].shape[0]))
            if k in state
            else _dense_linear(u)
            for u, k in zip(units, keys, strict=True)
        ]
        return FactorizedMultiheadAttention(module, *projs)
    key = f"{prefix}first.weight"
    unit = _layer_unit(module, "")
    if _is_linear_layer(module) and f"{prefix}tt_shape" in state:
        rows, cols = (tuple(int(k) for k in s) for s in state[f"{prefix}tt_shape"])
        cores = [torch.zeros(state[f"{prefix}cores.{k}"].shape) for k in range(len(rows))]
        bias = state.get(f"{prefix}bias")
        layer = TTLinear(cores, rows, cols, None if bias is None else torch.zeros(bias.shape))
        return layer.to(module.weight)
    if _is_linear_layer(module) and f"{prefix}crow_indices" in state:
        m, n = (int(k) for k in state[f"{prefix}shape"])
        crow, cols = state[f"{prefix}crow_indices"], state[f"{prefix}col_indices"]
        bias = state.get(f"{prefix}bias")
        zeros = torch.zeros(cols.shape)
        layer = SparseLinear(n, m, crow, cols, zeros, None if bias is None else torch.zeros(m))
        return layer.to(module.weight)
    if unit is None or key not in state:
        return None
    rank, split = _saved_layout(unit, state[key])
    return _build(unit, _zero_plan(unit, split, rank))


def _saved_sizes(module: nn.Module, prefix: str, state: Mapping[str, Any]) -> tuple[int, ...]:
    """The units a saved state dict gives the (possibly pruned) layer at ``prefix``:
    ``(out, in)`` of a Linear / Conv in any of its forms, ``(features,)`` of a BatchNorm; ``()``
    when the state says nothing."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for key in ("running_mean", "weight"):
            if f"{prefix}{key}" in state:
                return (state[f"{prefix}{key}"].shape[0],)
        return ()
    if f"{prefix}weight" in state:
        return tuple(state[f"{prefix}weight"].shape[:2])
    if f"{prefix}first.weight" in state and f"{prefix}second.weight" in state:
        return state[f"{prefix}second.weight"].shape[0], state[f"{prefix}first.weight"].shape[1]
    if f"{prefix}tt_shape" in state:
        return tuple(math.prod(int(k) for k in s) for s in state[f"{prefix}tt_shape"])
    if f"{prefix}crow_indices" in state:
        return tuple(int(k) for k in state[f"{prefix}shape"])
    return ()


def load_factorized(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Rebuild a factorized model from its original architecture and its saved ``state_dict``.

    ``model`` is the dense model as built before :func:`factorize` (any weights: they are
    replaced). Every layer whose entry in ``state_dict`` is factorized (``<layer>.first.weight``
    / ``<layer>.second.weight``; for attention ``<layer>.q_proj...``) is replaced by the
    factorized layer of the rank and split those shapes give (a :class:`TTLinear` where it holds
    ``<layer>.tt_shape`` and ``<layer>.cores.*``, a :class:`SparseLinear` where it holds
    ``<layer>.crow_indices``); a Linear, ungrouped Conv or BatchNorm whose saved units are fewer
    (structured pruning) is shrunk to them first. Then ``state_dict`` is loaded
    strictly (a missing or unexpected key, or a shape that does not fit, raises). Returns a new
    model; ``model`` itself is not changed::

        small, summary = proxrank.factorize(model)
        torch.save(small.state_dict(), "small.pt")
        ...
        small = proxrank.load_factorized(build_model(), torch.load("small.pt"))

    (``torch.save(small)`` / ``torch.load(path, weights_only=False)`` round-trip the whole
    module as well.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict must be a mapping such as small.state_dict(), got "
            f"{type(state_dict).__name__}"
        )
    model = copy.deepcopy(model)
    found: dict[int, tuple[nn.Module, list[str]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        found.setdefault(id(mod), (mod, []))[1].append(path)
    for mod, mod_paths in list(found.values()):  # layers shrunk by structured pruning
        sizes = _saved_sizes(mod, f"{mod_paths[0]}." if mod_paths[0] else "", state_dict)
        small = resized(mod, sizes) if sizes else None
        if small is not None:
            model = _replace(model, mod_paths, small)
            found[id(mod)] = (small, mod_paths)
    for mod, mod_paths in found.values():
        new = _restored(mod, f"{mod_paths[0]}." if mod_paths[0] else "", state_dict)
        if new is not None:
            model = _replace(model, mod_paths, new)
    _disable_nested_tensors(model)
    model.load_state_dict(state_dict)
    return model

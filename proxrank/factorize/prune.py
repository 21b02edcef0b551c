r"""Structured pruning: zero units removed from chains of layers, :func:`prune_units`.

Inside an ``nn.Sequential`` (plain, nested ``nn.Sequential`` flattened into it) a producer
``P`` (``nn.Linear`` or an ungrouped ``nn.Conv1d/2d/3d``) feeds a consumer ``C`` of the same
family through modules that act on each unit (feature / channel) separately: elementwise
activations, dropout, ``BatchNorm`` (its channel is sliced too), and for convolutions pooling,
plus ``AdaptiveAvg/MaxPool(1) -> Flatten -> Linear`` (each channel becomes one input feature).
Unit ``j`` between them can be removed (row ``j`` of ``P`` with its bias, channel ``j`` of
the norms, column ``j`` of ``C``) when

* column ``j`` of ``C`` is zero (group lasso over input features): ``C`` ignores the unit; or
* row ``j`` of ``P`` is zero (group lasso over output units): the unit carries the constant
  ``c_j = f(b_j)`` (``f`` the modules in between, in eval mode: running statistics, no
  dropout), and ``c_j`` is folded into ``C``'s bias, ``b_C += c_j sum_k C[:, j, k]``. That is
  exact when ``c_j = 0``, for a linear ``C``, and for a convolution that does not pad with
  zeros (its padded border would see ``0``, not ``c_j``); otherwise the unit stays.

The result computes the same function (eval mode, to rounding; removing units whose value is
zero is exact in training mode too, but for a unit that passes a ``BatchNorm``: there batch
statistics map a constant channel to the norm's shift ``beta_j``, not to ``c_j``).
Everything else stays as it is, with the reason: a unit at the input of the first layer or
the output of the last (the model's interface), units before a module that mixes them
(``LayerNorm``, attention, an unknown module), layers or weights used in several places,
grouped convolutions, layers with hooks. At least one unit of each layer is kept.

Assumed, as for any ``nn.Sequential``: its modules are called only through it (a model whose
own ``forward`` also calls ``seq[0]`` directly, or reads its sizes, is not seen as such), and a
``BatchNorm1d`` after a Linear normalises that Linear's features (2-D input).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["PruneResult", "prune_units", "resized"]

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity,
)  # fmt: skip
_DROPOUT = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout
)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Pools that keep a constant map constant (max pools pad with -inf).
_CONSTANT_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE = (
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


#: Why zero units stay when no chain explains it.
NOT_IN_CHAIN = "structured pruning handles Linear and ungrouped Conv layers inside an nn.Sequential"


@dataclass
class PruneResult:
    """What :func:`prune_units` did, by module path: the weight shape before and after, and
    why zero units that are still there were kept (``notes[(path, "rows" | "cols")]``)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    notes: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def note(self, path: str, side: str, text: str) -> None:
        texts = self.notes.setdefault((path, side), [])
        if text not in texts:
            texts.append(text)

    def reason(self, path: str, weight: Tensor) -> str:
        """Why the zero rows / columns still in ``weight`` (the layer at ``path``) stay
        (``""`` when there are none)."""
        parts = []
        for side, zeros, what in (
            ("rows", _zero_rows(weight), "zero output units"),
            ("cols", _zero_cols(weight), "zero input features"),
        ):
            if zeros.any():
                why = "; ".join(self.notes.get((path, side)) or [NOT_IN_CHAIN])
                parts.append(f"{int(zeros.sum())} {what} kept: {why}")
        return "; ".join(parts)


@dataclass
class _Entry:
    """One module of a flattened chain and where it sits (``parent._modules[key]``)."""

    parent: nn.Module
    key: str
    path: str

    @property
    def module(self) -> nn.Module:
        return self.parent._modules[self.key]

    def replace(self, new: nn.Module) -> None:
        self.parent._modules[self.key] = new


def _kind(module: nn.Module) -> str | None:
    """``"linear"`` / ``"conv"`` for a layer that may give or take units, else None."""
    if type(module) is nn.Linear:
        return "linear"
    if type(module) in _CONVS and module.groups == 1:
        return "conv"
    return None


def _units(module: nn.Module) -> tuple[int, int]:
    """``(outputs, inputs)`` of a layer."""
    W = module.weight
    return W.shape[0], W.shape[1]


def _flatten(seq: nn.Sequential, path: str) -> list[_Entry]:
    entries = []
    for key, mod in seq._modules.items():
        sub = f"{path}.{key}" if path else key
        if type(mod) is nn.Sequential:
            entries.extend(_flatten(mod, sub))
        elif mod is not None:
            entries.append(_Entry(seq, key, sub))
    return entries


def _chains(model: nn.Module) -> list[list[_Entry]]:
    """The outermost plain ``nn.Sequential`` modules, each flattened."""
    chains, inner = [], set()
    for path, mod in model.named_modules():
        if type(mod) is nn.Sequential and id(mod) not in inner:
            chains.append(_flatten(mod, path))
            inner.update(id(m) for m in mod.modules())
    return chains


def _zero_rows(W: Tensor) -> Tensor:
    return (W.detach() == 0).reshape(W.shape[0], -1).all(dim=1)


def _zero_cols(W: Tensor) -> Tensor:
    return (W.detach() == 0).transpose(0, 1).reshape(W.shape[1], -1).all(dim=1)


def _between(mods: list[nn.Module], kind: str, units: int) -> tuple[str, bool]:
    """Why the modules between a producer of ``units`` units and the next layer do not act on
    each unit separately (``""`` when they do), and whether they end in ``Flatten`` over a
    ``1 x 1`` map (the consumer then takes one feature per channel)."""
    pooled = flattened = False
    for mod in mods:
        name = type(mod).__name__
        if type(mod) in _ELEMENTWISE + _DROPOUT:
            continue
        if type(mod) in _NORMS:
            if mod.num_features != units or (kind == "linear" and type(mod) is not nn.BatchNorm1d):
                return f"{name}({mod.num_features}) does not normalise these {units} units", False
            continue
        if kind == "conv" and type(mod) in _CONSTANT_POOLS + _AVG_POOLS:
            if type(mod) in _ADAPTIVE:
                size = mod.output_size
                pooled = all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
            continue
        if kind == "conv" and type(mod) is nn.Flatten and pooled:
            if mod.start_dim == 1 and mod.end_dim == -1:
                flattened, kind = True, "linear"  # one feature per channel from here on
                continue
        return f"{name} is not known to act on each unit separately", False
    return "", flattened


def _constants(mod: nn.Module, known: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """The constant each known unit carries after ``mod`` (eval mode)."""
    if type(mod) in _ELEMENTWISE:
        return known, mod(value)
    if type(mod) in _NORMS:
        if mod.running_mean is None:  # normalised with batch statistics: not a known constant
            return torch.zeros_like(known), value
        value = (value - mod.running_mean.double()) / (mod.running_var.double() + mod.eps).sqrt()
        if mod.affine:
            value = value * mod.weight.detach().double() + mod.bias.detach().double()
        return known, value
    if type(mod) in _AVG_POOLS and (mod.ceil_mode or any(_tuple(mod.padding))):
        return known & (value == 0), value  # zeros padded in: only 0 stays a constant
    divisor = getattr(mod, "divisor_override", None)  # a window's sum over it, not its mean
    if type(mod) in _AVG_POOLS and divisor:
        k, dims = _tuple(mod.kernel_size), _AVG_POOLS.index(type(mod)) + 1
        return known, value * (math.prod(k) if len(k) == dims else k[0] ** dims) / divisor
    return known, value


def _tuple(x: int | tuple[int, ...] | str) -> tuple[int, ...]:
    return x if isinstance(x, tuple) else (x,)


def _pads_zeros(conv: nn.Module) -> bool:
    """Whether a convolution reads zeros beyond its input's border."""
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return conv.padding != "valid" and any(_tuple(conv.padding))


def _sliced(mod: nn.Module, keep: Tensor, dim: int) -> nn.Module:
    """A copy of a Linear / Conv (``dim`` 0: output units, 1: input units) or BatchNorm
    (``dim`` 0) keeping the units ``keep``."""
    kw = {"device": keep.device}
    if type(mod) in _NORMS:
        new = type(mod)(len(keep), mod.eps, mod.momentum, mod.affine, mod.track_running_stats, **kw)
        tensors = [(new, mod, name) for name in ("weight", "bias", "running_mean", "running_var")]
    else:
        W = mod.weight
        shape = list(W.shape)
        shape[dim] = len(keep)
        has_bias = mod.bias is not None
        if type(mod) is nn.Linear:
            new = nn.Linear(shape[1], shape[0], bias=has_bias, dtype=W.dtype, **kw)
        else:
            new = type(mod)(
                shape[1], shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
                dilation=mod.dilation, bias=has_bias, padding_mode=mod.padding_mode,
                dtype=W.dtype, **kw,
            )  # fmt: skip
        tensors = [(new, mod, "weight")] + ([(new, mod, "bias")] if dim == 0 else [])
        if dim == 1 and has_bias:
            new.bias.data.copy_(mod.bias.detach())
            new.bias.requires_grad_(mod.bias.requires_grad)
    for dst, src, name in tensors:
        old = getattr(src, name)
        if old is None:
            continue
        target = getattr(dst, name)
        target.data = old.detach().index_select(dim if name == "weight" else 0, keep).clone()
        if isinstance(old, nn.Parameter):
            target.requires_grad_(old.requires_grad)
    if type(mod) in _NORMS and mod.num_batches_tracked is not None:
        new.num_batches_tracked.copy_(mod.num_batches_tracked)
    return new.train(mod.training)


def _shared(model: nn.Module) -> set[int]:
    """Modules and parameters that appear at more than one place in ``model``."""
    seen: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for key in (id(mod), *(id(p) for p in mod.parameters(recurse=False))):
            seen[key] = seen.get(key, 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _device(mod: nn.Module) -> torch.device:
    tensors = [*mod.parameters(), *mod.buffers()]
    return tensors[0].device if tensors else torch.device("cpu")


def _prune_pair(
    chain: list[_Entry], i: int, j: int, selected: set[str], result: PruneResult
) -> None:
    """Remove the removable units between the layers ``chain[i]`` and ``chain[j]``."""
    P, C, mids = chain[i].module, chain[j].module, chain[i + 1 : j]
    units = _units(P)[0]
    known = torch.zeros(units, dtype=torch.bool)
    value = torch.zeros(units, dtype=torch.float64)
    if chain[i].path in selected:
        known = _zero_rows(P.weight).cpu()
        if P.bias is not None:
            value = torch.where(known, P.bias.detach().double().cpu(), value)
    ignored = torch.zeros(units, dtype=torch.bool)
    if chain[j].path in selected:
        ignored = _zero_cols(C.weight).cpu()
    dead = known
    with torch.no_grad():
        for e in mids:
            known, value = _constants(e.module, known, value.to(_device(e.module)))
            known, value = known.cpu(), value.cpu()
    lost = dead & ~known & ~ignored
    if lost.any():
        result.note(
            chain[i].path,
            "rows",
            f"{int(lost.sum())} of them are not a known constant after the modules between "
            f"{chain[i].path} and {chain[j].path} (BatchNorm without running statistics, or "
            "average pooling that pads with zeros)",
        )
    constant = known & ~ignored & (value != 0)
    if constant.any():
        why = ""
        if C.bias is None:
            why = "it has no bias to fold their constant output into"
        elif type(C) in _CONVS and _pads_zeros(C):
            why = "it pads with zeros (a constant channel is not constant at its border)"
        if why:
            result.note(
                chain[i].path,
                "rows",
                f"{int(constant.sum())} of them output a non-zero constant and the next layer "
                f"{chain[j].path} ({type(C).__name__}) cannot absorb it: {why}",
            )
            known = known & ~constant
    remove = ignored | known
    if bool(remove.all()):
        remove[int(remove.nonzero()[0])] = False
        for path, side in ((chain[i].path, "rows"), (chain[j].path, "cols")):
            result.note(path, side, "one unit kept: a layer needs at least one")
    if not remove.any():
        return
    keep = (~remove).nonzero().flatten()
    fold = remove & ~ignored & (value != 0)
    with torch.no_grad():
        if fold.any():
            Wc = C.weight.detach().double().cpu()
            column_sums = Wc.reshape(Wc.shape[0], Wc.shape[1], -1).sum(dim=2)  # (out, units)
            C.bias.add_((column_sums[:, fold] @ value[fold]).to(C.bias))
        for e in mids:
            if type(e.module) in _NORMS:
                e.replace(_sliced(e.module, keep.to(_device(e.module)), 0))
        for e, dim in ((chain[i], 0), (chain[j], 1)):
            before = tuple(e.module.weight.shape)
            e.replace(_sliced(e.module, keep.to(e.module.weight.device), dim))
            first = result.shapes.get(e.path, (before, before))[0]
            result.shapes[e.path] = (first, tuple(e.module.weight.shape))


def prune_units(
    model: nn.Module, selected: set[str], fixed: Mapping[str, str] | None = None
) -> PruneResult:
    """Remove, in place, the zero units of the layers at the module paths ``selected`` where
    the model's structure makes that exact (see :mod:`proxrank.factorize.prune`). Zero rows
    count for a selected producer, zero columns for a selected consumer; the partner layer is
    sliced to match whether selected or not. The layers at the paths of ``fixed`` keep their
    shape (the value says why). Returns the shapes changed and, for every layer of a chain
    whose zero rows or columns may stay, why."""
    fixed = fixed or {}
    result = PruneResult()
    shared = _shared(model)
    for chain in _chains(model):
        layers = [k for k, e in enumerate(chain) if isinstance(e.module, (nn.Linear, *_CONVS))]
        if not layers:
            continue
        result.note(chain[layers[0]].path, "cols", "its input comes from outside the chain")
        result.note(chain[layers[-1]].path, "rows", "its output leaves the chain")
        for a, b in itertools.pairwise(layers):
            reason = next((fixed[e.path] for e in (chain[a], chain[b]) if e.path in fixed), "")
            reason = reason or _pair_reason(chain, a, b, shared)
            if reason:
                result.note(chain[a].path, "rows", reason)
                result.note(chain[b].path, "cols", reason)
            else:
                _prune_pair(chain, a, b, selected, result)
    return result


def _pair_reason(chain: list[_Entry], a: int, b: int, shared: set[int]) -> str:
    """Why the units between ``chain[a]`` and ``chain[b]`` cannot be removed (``""``: they
    can)."""
    P, C = chain[a].module, chain[b].module
    for e in chain[a : b + 1]:
        mod = e.module
        if id(mod) in shared or any(id(p) in shared for p in mod.parameters(recurse=False)):
            return f"{e.path} (or its weight) is used at several places"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"{e.path} has forward hooks"
    for e in (chain[a], chain[b]):
        if _kind(e.module) is None:
            what = "a grouped convolution" if getattr(e.module, "groups", 1) > 1 else "not plain"
            return f"{e.path} ({type(e.module).__name__}) is {what}"
    kind_p, kind_c = _kind(P), _kind(C)
    units = _units(P)[0]
    why, flattened = _between([e.module for e in chain[a + 1 : b]], kind_p, units)
    if why:
        return f"between {chain[a].path} and {chain[b].path}: {why}"
    if (kind_c != ("linear" if flattened else kind_p)) or _units(C)[1] != units:
        return (
            f"{chain[a].path} ({type(P).__name__}, {units} outputs) and {chain[b].path} "
            f"({type(C).__name__}, {_units(C)[1]} inputs) do not share their units one to one"
        )
    if math.prod(P.weight.shape) == 0:
        return f"{chain[a].path} is empty"
    return ""


def resized(module: nn.Module, sizes: tuple[int, ...]) -> nn.Module | None:
    """A copy of a layer :func:`prune_units` can shrink, with ``sizes`` units: ``(out, in)``
    for a Linear / ungrouped Conv, ``(features,)`` for a BatchNorm (its leading entries; the
    values are meant to be overwritten, e.g. by ``load_state_dict``). None for other modules,
    and unless ``sizes`` are smaller than the module's (none larger)."""
    if type(module) in _NORMS:
        if len(sizes) != 1 or not 1 <= sizes[0] < module.num_features:
            return None
        return _sliced(module, torch.arange(sizes[0], device=_device(module)), 0)
    if _kind(module) is None or len(sizes) != 2:
        return None
    out, inp = _units(module)
    if not (1 <= sizes[0] <= out and 1 <= sizes[1] <= inp) or sizes == (out, inp):
        return None
    device = module.weight.device
    rows = _sliced(module, torch.arange(sizes[0], device=device), 0)
    return _sliced(rows, torch.arange(sizes[1], device=device), 1)

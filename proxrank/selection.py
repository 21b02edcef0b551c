"""Which weight matrices get the prox, and how each is read from its parameter.

A selected matrix is a :class:`Target`: a parameter plus a :class:`MatrixView` saying which
matrix of it the prox acts on. A parameter of shape ``(d0, d1, d2, ...)`` is first flattened to
``d0 x (d1 d2 ...)``; the view may then take a block of its rows and may transpose it:

=====================================  ===========================================================
layer kind (``Target.kind``)           matrices
=====================================  ===========================================================
``linear``  ``nn.Linear``              ``weight`` (``out x in``)
``conv``  ``nn.Conv1d/2d/3d``          ``weight`` as ``out x (in/groups prod(k))``
``conv_transpose``  ``nn.ConvTranspose1d/2d/3d``  ``weight`` as ``in x (out/groups prod(k))``
``hf_conv1d``  ``transformers`` ``Conv1D``  ``weight.T`` (stored ``in x out``; the matrix is
                                       ``out x in``, as for ``nn.Linear``); GPT-2's ``c_attn``
                                       as three blocks ``[q]``, ``[k]``, ``[v]``
``attention``  ``nn.MultiheadAttention``  ``in_proj_weight`` as three ``d x d`` blocks ``[q]``,
                                       ``[k]``, ``[v]`` (or ``q/k/v_proj_weight`` when the key
                                       and value dims differ); ``out_proj`` is an ``nn.Linear``
``recurrent``  ``nn.RNN/LSTM/GRU``     ``weight_ih_l*``, ``weight_hh_l*`` (both directions), one
                                       block per gate: ``[i] [f] [g] [o]`` (LSTM), ``[r] [z] [n]``
                                       (GRU), the whole matrix (RNN)
``embedding``  ``nn.Embedding``        opt-in (``include=``)
``parameter``                          a parameter selected by name, or from named parameters
=====================================  ===========================================================

Stacked operators are thresholded **per block**: the query, key and value projections (and the
gates of a recurrent layer) are different linear maps, and the nuclear norm of their stack
couples their spectra (one large block makes the others' small singular values look like noise).
Per block, each map gets its own prox and keeps its own rank, and ``factorize`` gives each its
own factors.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["DEFAULT_MODULE_TYPES", "MatrixView", "Selector", "Target", "select_targets"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_GATES = {nn.LSTM: "ifgo", nn.GRU: "rzn", nn.RNN: ""}

#: Module types whose weight matrices are selected when ``include`` is not given (plus
#: transformers' ``Conv1D`` when transformers is installed).
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    *_CONVS,
    *_CONV_TRANSPOSES,
    nn.MultiheadAttention,
    *_RECURRENT,
)

Selector = str | type[nn.Module]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class MatrixView:
    """Which matrix of a parameter the prox acts on: the parameter flattened to
    ``d0 x (d1 d2 ...)``, transposed when ``transposed``, then rows ``[start, stop)`` of that
    (``stop=None``: all rows). :meth:`read` returns the matrix (a view of the parameter's
    storage); :meth:`write` writes a matrix of that shape back in place."""

    start: int = 0
    stop: int | None = None
    transposed: bool = False
    label: str = ""

    def _matrix(self, t: Tensor) -> Tensor:
        flat = t.reshape(t.shape[0], -1)
        M = flat.mT if self.transposed else flat
        return M if self.stop is None and self.start == 0 else M[self.start : self.stop]

    def shape(self, param: Tensor) -> tuple[int, int]:
        """``(m, n)`` of the matrix for a parameter of ``param``'s shape."""
        d0 = param.shape[0]
        rest = param.numel() // d0 if d0 else 0
        full = (rest, d0) if self.transposed else (d0, rest)
        return (full[0] if self.stop is None else self.stop) - self.start, full[1]

    def read(self, t: Tensor) -> Tensor:
        """The matrix of ``t`` (the parameter or a tensor of its shape, e.g. its gradient)."""
        return self._matrix(t)

    def write(self, param: Tensor, X: Tensor) -> None:
        """Write ``X`` (the matrix's shape, any float dtype) into ``param`` in place."""
        X = X.to(param.dtype)
        if param.is_contiguous():
            self._matrix(param).copy_(X)  # reshape of a contiguous tensor is a view
            return
        flat = param.reshape(param.shape[0], -1).clone()
        self._matrix(flat).copy_(X)
        param.copy_(flat.reshape(param.shape))


@dataclass(frozen=True)
class Target:
    """A selected weight matrix: its name (the parameter's qualified name, with ``[block]``
    for a block of a stacked parameter), the parameter, the :class:`MatrixView` the prox acts
    on, the layer kind (see the module docstring) and the type of the module that owns it
    (``None`` when selected from named parameters)."""

    name: str
    param: nn.Parameter
    view: MatrixView = MatrixView()
    kind: str = "parameter"
    module_type: type[nn.Module] | None = None

    @property
    def shape2d(self) -> tuple[int, int]:
        """``(m, n)``: the shape of the matrix the prox acts on."""
        return self.view.shape(self.param)

    @property
    def param_name(self) -> str:
        """The qualified name of the parameter (without the block label)."""
        return self.name.partition("[")[0]


def _hf_conv1d() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` (weight stored ``in x out``), if transformers is imported."""
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _kind(module: nn.Module | None) -> str:
    conv1d = _hf_conv1d()
    for types, kind in (
        ((nn.Linear,), "linear"),
        (_CONVS, "conv"),
        (_CONV_TRANSPOSES, "conv_transpose"),
        ((nn.MultiheadAttention,), "attention"),
        (_RECURRENT, "recurrent"),
        (_EMBEDDINGS, "embedding"),
    ):
        if isinstance(module, types):
            return kind
    if conv1d is not None and isinstance(module, conv1d):
        return "hf_conv1d"
    return "parameter"


@dataclass(frozen=True)
class _Candidate:
    name: str  # qualified parameter name
    local: str  # name within its module
    module_name: str
    module: nn.Module | None
    param: Tensor


def _views(c: _Candidate, kind: str) -> list[MatrixView]:
    """The matrices of a candidate parameter of a layer of ``kind``."""
    module, pname, p = c.module, c.local, c.param
    if kind == "hf_conv1d":  # GPT-2's c_attn stacks q/k/v: nf = 3 nx
        qkv = c.module_name.rpartition(".")[2] == "c_attn"
        if qkv and getattr(module, "nf", None) == 3 * p.shape[0]:
            d = p.shape[0]
            return [MatrixView(i * d, (i + 1) * d, True, q) for i, q in enumerate("qkv")]
        return [MatrixView(transposed=True)]
    if kind == "attention" and pname == "in_proj_weight":
        d = p.shape[0] // 3
        return [MatrixView(i * d, (i + 1) * d, label=q) for i, q in enumerate("qkv")]
    if kind == "recurrent" and pname.startswith(("weight_ih", "weight_hh")):
        gates = _GATES[type(module)] if type(module) in _GATES else ""
        if len(gates) > 1:
            h = p.shape[0] // len(gates)
            return [MatrixView(i * h, (i + 1) * h, label=g) for i, g in enumerate(gates)]
    return [MatrixView()]


def _is_default_matrix(kind: str, pname: str) -> bool:
    """Whether the default selection takes parameter ``pname`` of a layer of ``kind``."""
    if kind in ("linear", "conv", "conv_transpose", "hf_conv1d"):
        return pname == "weight"
    if kind == "attention":
        return pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    if kind == "recurrent":
        return pname.startswith(("weight_ih_l", "weight_hh_l"))
    return False


def _as_selectors(value: Selector | Sequence[Selector] | None, option: str) -> list[Selector]:
    if value is None:
        return []
    items = [value] if isinstance(value, str | type) else list(value)
    for item in items:
        if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
            raise TypeError(
                f"{option} entries must be name patterns (str) or nn.Module subclasses, "
                f"got {item!r}"
            )
    return items


def _matches(
    selectors: list[Selector], param_name: str, module_name: str, module: nn.Module | None
) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatch.fnmatchcase(param_name, sel) or (
                module_name and fnmatch.fnmatchcase(module_name, sel)
            ):
                return True
        elif module is not None and isinstance(module, sel):
            return True
    return False


def _candidates(source: nn.Module | Iterable[tuple[str, nn.Parameter]]) -> list[_Candidate]:
    """Every parameter with its owner; from a model, a tied tensor appears once per owner."""
    if isinstance(source, nn.Module):
        out = []
        for module_name, module in source.named_modules(remove_duplicate=False):
            for local, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{local}" if module_name else local
                out.append(_Candidate(full, local, module_name, module, p))
        return out
    out, names = [], {}
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "model_or_named_params must be an nn.Module or an iterable of (name, parameter) "
                f"pairs such as model.named_parameters(); got an element {item!r:.80}"
            )
        name, p = item
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
        if id(p) in names:
            raise ValueError(
                f"parameter {name!r} was given twice (also as {names[id(p)]!r}); "
                "pass each parameter once"
            )
        names[id(p)] = name
        out.append(_Candidate(name, name, "", None, p))
    return out


def _is_matrix(p: Tensor) -> bool:
    """Two or more dims, no side of length 0 or 1 (a vector's only singular value is its norm)."""
    return p.dim() >= 2 and p.shape[0] > 1 and p.numel() // p.shape[0] > 1


def _warn_left_out(unknown: list[str], tied: list[str]) -> None:
    if unknown:
        shown = ", ".join(unknown[:8]) + (
            f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        )
        warnings.warn(
            f"proxrank: {len(unknown)} weight matrices are in layer kinds the default selection "
            f"does not know and get no prox: {shown}. Add them with include=[...] (name "
            "patterns or module types) if they should be low-rank",
            stacklevel=3,
        )
    if tied:
        warnings.warn(
            f"proxrank: {', '.join(tied)} shares its tensor with an embedding and is left out "
            "(the prox would act on the token embedding); include it by name to opt in",
            stacklevel=3,
        )


def select_targets(
    source: nn.Module | Iterable[tuple[str, nn.Parameter]],
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
    *,
    warn: bool = False,
) -> list[Target]:
    """Select the weight matrices the prox acts on.

    * ``source`` an ``nn.Module``: by default the weight matrices of the layer kinds in the
      module docstring (``DEFAULT_MODULE_TYPES`` and transformers' ``Conv1D``); embeddings,
      norms, biases and weights tied to an embedding are opt-in. An iterable of
      ``(name, parameter)``: by default every parameter with two or more dims.
    * ``include``: name patterns (``fnmatch`` syntax, matched against the parameter name and its
      module's name) or module types; when given it *replaces* the default selection. A module
      type selects that module's own parameters of two or more dims.
    * ``exclude``: patterns or types removed from the selection.

    Matrices with a side of length 0 or 1, and parameters that are not real floating point
    (complex weights: their prox is not implemented), are left alone. ``warn=True`` warns about
    weight matrices of unknown layer kinds left out by the default selection and about weights
    tied to an embedding.
    """
    inc = _as_selectors(include, "include")
    exc = _as_selectors(exclude, "exclude")
    candidates = _candidates(source)
    if not isinstance(source, nn.Module) and any(isinstance(s, type) for s in inc + exc):
        raise TypeError(
            "include/exclude by module type needs the model itself: pass the nn.Module as "
            "model_or_named_params, or use name patterns"
        )
    embedded = {id(c.param) for c in candidates if isinstance(c.module, _EMBEDDINGS)}
    chosen: dict[int, _Candidate] = {}
    unknown, tied = [], []
    for c in candidates:
        kind = _kind(c.module) if c.module is not None else "parameter"
        if inc:
            wanted = _matches(inc, c.name, c.module_name, c.module)
        elif c.module is None:
            wanted = True
        else:
            wanted = _is_default_matrix(kind, c.local)
            if wanted and id(c.param) in embedded and kind != "embedding":
                tied.append(c.name)
                wanted = False
            elif not wanted and kind == "parameter" and _is_matrix(c.param):
                unknown.append(c.name)
        if not wanted or _matches(exc, c.name, c.module_name, c.module):
            continue
        if not _is_matrix(c.param) or c.param.dtype not in _DTYPES:
            continue
        chosen.setdefault(id(c.param), c)  # tied weights: one prox per tensor, first owner
    if warn and not inc:
        selected = set(chosen)
        _warn_left_out(
            [n for n in unknown if id(_param_of(candidates, n)) not in selected],
            [n for n in tied if id(_param_of(candidates, n)) not in selected],
        )
    targets = []
    for c in chosen.values():
        kind = _kind(c.module) if c.module is not None else "parameter"
        for view in _views(c, kind):
            name = f"{c.name}[{view.label}]" if view.label else c.name
            module_type = type(c.module) if c.module is not None else None
            targets.append(Target(name, c.param, view, kind, module_type))
    return targets


def _param_of(candidates: list[_Candidate], name: str) -> Tensor:
    return next(c.param for c in candidates if c.name == name)

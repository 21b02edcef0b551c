"""Which parameters get the prox: selection of weight matrices from a model.

A parameter of shape ``(out, d1, d2, ...)`` is treated as the matrix ``out x (d1 d2 ...)``:
a Linear weight as it is, a conv kernel ``(out, in/groups, kh, kw)`` as ``out x (in/groups kh kw)``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DEFAULT_MODULE_TYPES", "Target", "select_targets"]

#: Module types whose weights are selected when ``include`` is not given.
DEFAULT_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Selector = str | type[nn.Module]
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Target:
    """A selected weight matrix: its qualified name, the parameter, and the type of the module
    that owns it (``None`` when selected from named parameters)."""

    name: str
    param: nn.Parameter
    module_type: type[nn.Module] | None = None

    @property
    def shape2d(self) -> tuple[int, int]:
        """``(m, n)``: the shape of the matrix the prox acts on."""
        m = self.param.shape[0]
        return m, self.param.numel() // m


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


def _candidates(
    source: nn.Module | Iterable[tuple[str, nn.Parameter]],
) -> list[tuple[str, str, nn.Module | None, nn.Parameter]]:
    """``(param_name, module_name, module, param)`` for every parameter; from a model, a tied
    tensor appears once per owner."""
    if isinstance(source, nn.Module):
        # every owner of each tensor, so that tied weights are selected whichever owner matches
        out = []
        for module_name, module in source.named_modules(remove_duplicate=False):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                out.append((full, module_name, module, p))
        return out
    out, names = [], {}
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(
                "model_or_named_params must be an nn.Module or an iterable of (name, parameter) "
                f"pairs such as model.named_parameters(); got an element {item!r:.80}"
            )
        name, p = item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a torch.Tensor")
        if id(p) in names:
            raise ValueError(
                f"parameter {name!r} was given twice (also as {names[id(p)]!r}); "
                "pass each parameter once"
            )
        names[id(p)] = name
        out.append((name, "", None, p))
    return out


def select_targets(
    source: nn.Module | Iterable[tuple[str, nn.Parameter]],
    include: Selector | Sequence[Selector] | None = None,
    exclude: Selector | Sequence[Selector] | None = None,
) -> list[Target]:
    """Select the weight matrices the prox acts on.

    * ``source`` an ``nn.Module``: by default the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d``;
      an iterable of ``(name, parameter)``: by default every parameter with two or more dims.
    * ``include``: name patterns (``fnmatch`` syntax, matched against the parameter name and its
      module's name) or module types; when given it *replaces* the default selection. A module
      type selects that module's own parameters of two or more dims.
    * ``exclude``: patterns or types removed from the selection.

    Matrices with a side of length 1 are left alone (their only singular value is the norm).
    """
    inc = _as_selectors(include, "include")
    exc = _as_selectors(exclude, "exclude")
    candidates = _candidates(source)
    if not isinstance(source, nn.Module) and any(isinstance(s, type) for s in inc + exc):
        raise TypeError(
            "include/exclude by module type needs the model itself: pass the nn.Module as "
            "model_or_named_params, or use name patterns"
        )
    targets, seen = [], set()
    for pname, mname, module, p in candidates:
        if id(p) in seen:  # tied weights: one prox per tensor, under its first matching name
            continue
        if inc:
            chosen = _matches(inc, pname, mname, module)
        elif module is None:
            chosen = True
        else:
            chosen = isinstance(module, DEFAULT_MODULE_TYPES) and pname.split(".")[-1] == "weight"
        if not chosen or _matches(exc, pname, mname, module) or p.dim() < 2:
            continue
        if min(p.shape[0], p.numel() // p.shape[0]) <= 1:
            continue
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"parameter {pname!r} has dtype {p.dtype}; proxrank supports float16, bfloat16, "
                "float32 and float64 weights: exclude it (exclude=[...]) or convert it"
            )
        seen.add(id(p))
        targets.append(Target(pname, p, type(module) if module is not None else None))
    return targets

"""What :func:`proxrank.factorize` did, layer by layer: :class:`FactorizeSummary`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FactorizeSummary", "LayerSummary"]


@dataclass
class LayerSummary:
    """One selected weight matrix (or one block of it): its shape, the rank kept, its cost.

    ``name`` is the parameter's name; a stacked weight is reported block by block, each with its
    own rank: ``in_proj_weight[q]`` / ``[k]`` / ``[v]`` of ``nn.MultiheadAttention``, the gates
    ``[i]`` ``[f]`` ``[g]`` ``[o]`` of an LSTM's ``weight_ih_l*`` / ``weight_hh_l*`` (``[r]``
    ``[z]`` ``[n]`` for a GRU). ``shape`` is the weight's (or block's) own shape and ``rank``
    the rank of its matrix view; ``kind`` the owning module's class. ``macs_*`` are the
    multiply-adds of the block for one forward pass over ``example_inputs`` (or per position when
    no example was given; ``None`` when the example did not reach the layer, and for layers left
    dense by kind). ``split`` is the form the weight now has: ``"linear"``, ``"kernel-first"``
    or ``"pointwise-first"`` (two low-rank factors), ``"tt"`` (a :class:`TTLinear`, TT ranks in
    ``tt_ranks``), ``"csr"`` (a :class:`SparseLinear` holding ``nnz`` non-zeros; its
    ``params_after`` counts the values, the CSR form also stores ``nnz`` column indices and
    ``m + 1`` row pointers), or ``None`` for a block left dense, and then ``reason`` says why.
    ``rank`` is ``-1`` for a selected weight that cannot be factorized (a kind factorize does
    not know, or tied). ``params_*`` count the block's weight and its share of the bias.

    Structured pruning (zero units removed, :mod:`proxrank.factorize.prune`): ``shape`` is the
    weight's shape before, ``shape_after`` the shape of the dense weight after (``None``: not
    pruned); ``rank`` and the factorized form are those of the pruned weight; ``params_before``
    and ``macs_before`` are the unpruned layer's. ``reason`` also says why zero units that are
    still there were kept, and notes unstructured zeros left dense.
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
    shape_after: tuple[int, ...] | None = None
    tt_ranks: tuple[int, ...] | None = None
    nnz: int | None = None

    @property
    def form(self) -> str:
        """The weight's form for the table: ``dense``, the low-rank split, ``tt(r_1,...)`` or
        ``csr(nnz=...)``."""
        if self.split == "tt":
            return f"tt{self.tt_ranks}".replace(" ", "")
        if self.split == "csr":
            return f"csr(nnz={self.nnz})"
        return self.split or "dense"

    @property
    def matrix(self) -> str:
        """``shape`` (``-> shape_after`` when pruned) for the table."""
        text = "x".join(map(str, self.shape))
        if self.shape_after is not None:
            text += " -> " + "x".join(map(str, self.shape_after))
        return text


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
        head = ("layer", "kind", "matrix", "rank", "form", "params", "MACs", "note")
        rows = [head]
        for lay in self.layers:
            macs = "-" if lay.macs_before is None else f"{lay.macs_before} -> {lay.macs_after}"
            rows.append(
                (
                    lay.name,
                    lay.kind,
                    lay.matrix,
                    f"{lay.rank}/{lay.full_rank}",
                    lay.form,
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

r"""A linear layer whose weight is held in tensor-train (TT) form: :class:`TTLinear`.

The weight ``W`` (``m x n``, ``m = m_1 ... m_d``, ``n = n_1 ... n_d``) is the TT-matrix of
cores ``G_k`` (``r_{k-1} x m_k n_k x r_k``, the layout of :mod:`proxrank.tt`):

    W[(i_1 ... i_d), (j_1 ... j_d)] = G_1[:, (i_1, j_1), :] ... G_d[:, (i_d, j_d), :]

``forward`` never forms ``W``: with ``x`` read as ``X[j_1, ..., j_d]`` it contracts the cores one
at a time, last first: after core ``k`` the intermediate holds
``Z_k[j_1 .. j_{k-1}, a_{k-1}, i_k .. i_d] = sum G_k[a_{k-1}, i_k, j_k, a_k] Z_{k+1}[...]``,
which costs

    sum_k (n_1 ... n_{k-1}) r_{k-1} m_k n_k r_k (m_{k+1} ... m_d)

multiply-adds per input row (:meth:`TTLinear.macs`) against ``m n`` for the dense product, and
the cores hold :func:`proxrank.tt.tt_parameters` numbers against ``m n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..tt import default_layout, from_tt_tensor, to_tt_tensor, tt_full, tt_parameters, tt_svd
from .tolerance import default_rtol, numerical_rank

__all__ = ["TTLinear", "tt_numerical_ranks"]


def tt_numerical_ranks(
    weight: Tensor,
    row_shape: Sequence[int],
    col_shape: Sequence[int],
    rtol: float | None = None,
    atol: float = 0.0,
) -> tuple[int, ...]:
    """The TT ranks of ``weight`` (``m x n``) in the TT-matrix layout ``row_shape x col_shape``
    at a tolerance: ``r_k`` is the number of singular values ``s > max(atol, rtol s_1)`` of the
    ``k``-th unfolding ``(m_1 n_1 ... m_k n_k) x (m_{k+1} n_{k+1} ... m_d n_d)`` of the TT tensor
    (its TT rank is exactly the rank of each unfolding), at least 1. ``rtol`` defaults to
    :func:`proxrank.factorize.default_rtol` of the unfolding's shape and the weight's dtype."""
    T = to_tt_tensor(weight.detach().to(torch.float64), row_shape, col_shape)
    ranks = []
    for k in range(1, len(row_shape)):
        M = T.reshape(math.prod(T.shape[:k]), -1)
        rel = default_rtol(*M.shape, weight.dtype) if rtol is None else rtol
        ranks.append(max(numerical_rank(torch.linalg.svdvals(M), rel, atol), 1))
    return tuple(ranks)


class TTLinear(nn.Module):
    """``y = W x + b`` with ``W`` held as TT cores (see :mod:`proxrank.factorize.ttlinear`).

    ``cores`` is an ``nn.ParameterList`` of the cores ``(r_{k-1}, m_k n_k, r_k)``; ``bias`` an
    ``nn.Parameter`` of ``m`` or ``None``; the layout is kept in the integer buffer
    ``tt_shape`` (``2 x d``: ``row_shape`` then ``col_shape``), so a saved ``state_dict``
    says how to rebuild the layer (:func:`proxrank.load_factorized`). ``weight`` answers the
    dense ``m x n`` product of the cores (recomputed on every access, read-only), like the other
    factorized layers; ``in_features`` / ``out_features`` as ``nn.Linear``.
    """

    def __init__(
        self,
        cores: Sequence[Tensor],
        row_shape: Sequence[int],
        col_shape: Sequence[int],
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        d = len(row_shape)
        if len(col_shape) != d or len(cores) != d or d < 1:
            raise ValueError(
                f"TTLinear needs as many cores ({len(cores)}) as row_shape {tuple(row_shape)} "
                f"and col_shape {tuple(col_shape)} have factors (d >= 1)"
            )
        prev = 1
        for k, G in enumerate(cores):
            want = (prev, row_shape[k] * col_shape[k])
            if G.dim() != 3 or tuple(G.shape[:2]) != want or (k == d - 1 and G.shape[2] != 1):
                raise ValueError(
                    f"TT core {k} has shape {tuple(G.shape)}; it must be (r_{k}, m_{k + 1} "
                    f"n_{k + 1}, r_{k + 1}) = ({want[0]}, {want[1]}, r) with r_0 = r_d = 1"
                )
            prev = G.shape[2]
        self.row_shape = tuple(int(s) for s in row_shape)
        self.col_shape = tuple(int(s) for s in col_shape)
        self.in_features = math.prod(self.col_shape)
        self.out_features = math.prod(self.row_shape)
        self.cores = nn.ParameterList(  # row-major, as a reloaded state dict: the same sums
            [nn.Parameter(G.detach().clone(memory_format=torch.contiguous_format)) for G in cores]
        )
        self.register_buffer("tt_shape", torch.tensor([self.row_shape, self.col_shape]))
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(
                f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}"
            )
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_dense(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        row_shape: Sequence[int] | None = None,
        col_shape: Sequence[int] | None = None,
        *,
        ranks: int | Sequence[int] | None = None,
        rtol: float | None = None,
        atol: float = 0.0,
    ) -> TTLinear:
        """The TT-SVD of ``weight`` (``m x n``) in the layout ``row_shape x col_shape`` (default
        :func:`proxrank.tt.default_layout`), truncated to ``ranks`` when given, else to the
        numerical TT ranks at ``rtol`` / ``atol`` (:func:`tt_numerical_ranks`). The cores are
        computed in float64 and rounded once to ``weight``'s dtype; ``requires_grad`` is
        carried over. A weight whose TT ranks are at most ``ranks`` (or whose dropped singular
        values are below the tolerance) is reproduced to rounding."""
        if weight.dim() != 2:
            raise ValueError(f"TTLinear.from_dense needs a matrix, got shape {tuple(weight.shape)}")
        m, n = weight.shape
        if row_shape is None or col_shape is None:
            default_rows, default_cols = default_layout(m, n)
            row_shape = default_rows if row_shape is None else row_shape
            col_shape = default_cols if col_shape is None else col_shape
        T = to_tt_tensor(weight.detach().to(torch.float64), row_shape, col_shape)
        if ranks is None:
            ranks = tt_numerical_ranks(weight, row_shape, col_shape, rtol, atol)
        cores = [G.to(weight.dtype) for G in tt_svd(T, ranks, len(row_shape))]
        layer = cls(cores, row_shape, col_shape, bias).to(weight.device)
        layer.requires_grad_(weight.requires_grad)
        if bias is not None:
            layer.bias.requires_grad_(bias.requires_grad)
        return layer

    @property
    def ranks(self) -> tuple[int, ...]:
        """The TT ranks ``(r_1, ..., r_{d-1})``."""
        return tuple(G.shape[2] for G in self.cores[:-1])

    def parameters_count(self) -> int:
        """Numbers in the cores, :func:`proxrank.tt.tt_parameters` (bias not included)."""
        return tt_parameters(self.row_shape, self.col_shape, self.ranks)

    def macs(self, rows: int = 1) -> int:
        """Multiply-adds of ``forward`` for ``rows`` input rows (bias not included)."""
        r = [1, *self.ranks, 1]
        m, n, d = self.row_shape, self.col_shape, len(self.row_shape)
        per_row = sum(
            math.prod(n[:k]) * r[k] * m[k] * n[k] * r[k + 1] * math.prod(m[k + 1 :])
            for k in range(d)
        )
        return rows * per_row

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-1]
        m, n = self.row_shape, self.col_shape
        B = math.prod(batch)
        # Z: (B, n_1 .. n_{k-1}, n_k, r_k, m_{k+1} .. m_d), flattened as (B, P, n_k, r_k, M)
        Z = x.reshape(B, math.prod(n[:-1]), n[-1], 1, 1)
        for k in range(len(m) - 1, -1, -1):
            G = self.cores[k]
            G = G.reshape(G.shape[0], m[k], n[k], G.shape[2])
            Z = torch.einsum("aijs,bpjsq->bpaiq", G, Z)  # (B, P, r_{k-1}, m_k, M)
            if k > 0:
                Z = Z.reshape(B, math.prod(n[: k - 1]), n[k - 1], G.shape[0], -1)
        y = Z.reshape(*batch, self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> Tensor:
        """The dense ``m x n`` weight of the cores (read-only; recomputed on every access)."""
        return from_tt_tensor(tt_full(list(self.cores)), self.row_shape, self.col_shape)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            "TTLinear.weight is the product of the TT cores and cannot be assigned; change "
            "cores[k] instead, or build a new layer with TTLinear.from_dense"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"row_shape={self.row_shape}, col_shape={self.col_shape}, ranks={self.ranks}, "
            f"bias={self.bias is not None}"
        )

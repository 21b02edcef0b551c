r"""A linear layer whose weight is stored in compressed sparse row (CSR) form:
:class:`SparseLinear`.

An ``m x n`` weight with ``nnz`` non-zeros is held as its non-zero ``values`` (the parameters),
their ``col_indices`` and the row pointers ``crow_indices`` (``m + 1``; the non-zeros of row
``i`` are ``values[crow[i]:crow[i+1]]``), ``2 nnz + m + 1`` stored numbers against ``m n``.
``forward`` computes ``y_i = sum_{k in row i} values_k x_{col_k} + b_i`` by a gather and an
``index_add`` (``nnz`` multiply-adds per input row), never forming the dense matrix; it is plain
torch (any dtype, device, autograd, ``torch.compile``), without the beta sparse-tensor API.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """``y = W x + b`` with ``W`` stored in CSR form (see :mod:`proxrank.factorize.sparse`).

    ``values`` (``nnz``) and ``bias`` (``m`` or ``None``) are parameters; ``shape``
    (``[m, n]``), ``crow_indices`` (``m + 1``) and ``col_indices`` (``nnz``) integer buffers,
    saved in the ``state_dict`` (so :func:`proxrank.load_factorized` rebuilds the layer from
    it). Training changes only the stored non-zeros: the pattern is fixed. ``weight`` answers
    the dense ``m x n`` matrix
    (recomputed on every access, read-only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        crow_indices: Tensor,
        col_indices: Tensor,
        values: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        nnz = values.numel()
        if (
            crow_indices.shape != (out_features + 1,)
            or col_indices.shape != (nnz,)
            or values.dim() != 1
            or int(crow_indices[0]) != 0
            or int(crow_indices[-1]) != nnz
            or bool((crow_indices.diff() < 0).any())
            or (nnz and not 0 <= int(col_indices.min()) <= int(col_indices.max()) < in_features)
        ):
            raise ValueError(
                f"not a CSR matrix of shape {out_features} x {in_features}: crow_indices must be "
                f"{out_features + 1} non-decreasing offsets from 0 to nnz = {nnz}, col_indices "
                f"{nnz} column numbers in [0, {in_features})"
            )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("shape", torch.tensor([out_features, in_features]))
        self.register_buffer("crow_indices", crow_indices.detach().to(torch.int64).clone())
        self.register_buffer("col_indices", col_indices.detach().to(torch.int64).clone())
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None) -> SparseLinear:
        """The CSR form of ``weight`` (``m x n``; its exact zeros are dropped), with
        ``requires_grad`` carried over."""
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear.from_dense needs a matrix, got {tuple(weight.shape)}")
        W = weight.detach()
        rows, cols = (W != 0).nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=W.shape[0])
        crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        layer = cls(W.shape[1], W.shape[0], crow, cols, W[rows, cols], bias)
        layer.values.requires_grad_(weight.requires_grad)
        if bias is not None:
            layer.bias.requires_grad_(bias.requires_grad)
        return layer

    @property
    def nnz(self) -> int:
        """The number of stored non-zeros."""
        return self.values.numel()

    def stored_numbers(self) -> int:
        """Numbers the CSR form stores, ``2 nnz + m + 1`` (values, column indices, row
        pointers; bias not included)."""
        return 2 * self.nnz + self.out_features + 1

    def _rows(self) -> Tensor:
        counts = self.crow_indices.diff()
        positions = torch.arange(self.out_features, device=counts.device)
        return positions.repeat_interleave(counts, output_size=self.nnz)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[:-1]
        X = x.reshape(-1, self.in_features)
        products = X[:, self.col_indices] * self.values
        y = X.new_zeros(X.shape[0], self.out_features).index_add_(1, self._rows(), products)
        y = y.reshape(*batch, self.out_features)
        return y if self.bias is None else y + self.bias

    @property
    def weight(self) -> Tensor:
        """The dense ``m x n`` weight (read-only; recomputed on every access)."""
        W = self.values.new_zeros(self.out_features, self.in_features)
        return W.index_put((self._rows(), self.col_indices), self.values)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            "SparseLinear.weight is computed from the stored non-zeros and cannot be assigned; "
            "change values instead, or build a new layer with SparseLinear.from_dense"
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"bias={self.bias is not None}"
        )

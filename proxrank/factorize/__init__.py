"""Turn low-rank weights into genuinely smaller layers: :func:`factorize`.

A weight matrix ``W`` (``m x n``) of rank ``r`` stored densely costs ``m n`` parameters; as the
product ``W = A B`` of an ``m x r`` and an ``r x n`` factor it costs ``r (m + n)``, which is
smaller exactly when ``r < m n / (m + n)``. :func:`factorize` computes the thin SVD
``W = U diag(s) V^T``, drops the singular values at or below a tolerance, and splits the rest
evenly, ``A = U_r diag(sqrt(s_r))`` and ``B = diag(sqrt(s_r)) V_r^T``, so that both factors have
the same spectrum (a balanced split, well conditioned for training on).

* ``nn.Linear(n, m)`` becomes ``Linear(n, r, bias=False)`` then ``Linear(r, m)``; transformers'
  ``Conv1D`` (weight stored ``in x out``, the matrix is ``weight.T``) the same two Linears.
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
* A transposed convolution, kernel ``(in, out/g, k...)``, likewise: ``"pointwise-first"``
  factors ``in/g x (out/g prod(k))`` (the view ProxRank regularises) into a ``1 x 1``
  transposed convolution to ``r`` channels then the ``k x k`` one carrying stride, padding,
  output padding and dilation; ``"kernel-first"`` factors ``(in/g prod(k)) x out/g``.
* ``nn.MultiheadAttention``: the packed ``in_proj_weight`` is three operators ``W_q, W_k, W_v``
  (as ProxRank thresholds them, block by block), each factorized on its own:
  :class:`FactorizedMultiheadAttention`.
* ``nn.RNN/LSTM/GRU`` stay dense (their fused kernels take dense weights); the summary gives
  the rank of each gate block and the reason.

Three more ways a trained weight can be smaller (see :func:`factorize`):

* structured pruning (``prune=True``, :mod:`proxrank.factorize.prune`): zero units (rows of a
  layer after group lasso over output units, or columns after group lasso over input features)
  are removed with the matching units of the neighbouring layer in ``nn.Sequential`` chains,
  giving smaller dense layers;
* tensor train (``tt=``): :class:`TTLinear` applies the TT cores of a Linear weight in
  sequence (:mod:`proxrank.factorize.ttlinear`);
* unstructured sparsity (``sparse="csr"``): :class:`SparseLinear` stores the non-zeros in CSR
  form (:mod:`proxrank.factorize.sparse`).

The bias goes to the second layer; dtype, device, ``requires_grad`` and train/eval mode are
carried over. The factorized model computes the same function as the dense model whose
weights are truncated at the tolerance, up to floating-point rounding: the factors are
computed in float64 and rounded once to the weight's dtype, so outputs agree to a few units of
that dtype's rounding error times the layer's norm (about ``1e-6`` relative in float32,
``1e-14`` in float64, ``1e-2`` in bfloat16). Every factorized layer still answers ``weight``
(the dense product, recomputed on access, read-only) and ``bias``.

Saving: ``torch.save(small)`` round-trips the whole model (load with ``weights_only=False``);
``torch.save(small.state_dict())`` plus :func:`load_factorized` rebuilds it from the original
architecture (the ranks and splits are read from the factors' shapes).
"""

from .convert import default_rtol, factorize, load_factorized, numerical_rank
from .layers import Factorized, FactorizedMultiheadAttention
from .sparse import SparseLinear
from .summary import FactorizeSummary, LayerSummary
from .ttlinear import TTLinear, tt_numerical_ranks

__all__ = [
    "FactorizeSummary",
    "Factorized",
    "FactorizedMultiheadAttention",
    "LayerSummary",
    "SparseLinear",
    "TTLinear",
    "default_rtol",
    "factorize",
    "load_factorized",
    "numerical_rank",
    "tt_numerical_ranks",
]

"""The smaller layers :func:`proxrank.factorize` puts in place of low-rank ones.

* :class:`Factorized`: a Linear, a convolution, a transposed convolution or a transformers
  ``Conv1D`` stored as two thin layers of the same family, ``forward(x) = second(first(x))``.
* :class:`FactorizedMultiheadAttention`: ``nn.MultiheadAttention`` with its query, key and value
  projections held as three separate layers (each :class:`Factorized` or a dense
  ``nn.Linear``), same forward signature and mask semantics.

Both still answer the attributes that code written for the dense layer reads: ``weight`` (the
dense product ``A B``, recomputed on every access, a plain tensor that is not a parameter and
cannot be assigned), ``bias``, and the shape attributes (``in_features``, ``out_channels``,
``kernel_size``, ...; for attention ``embed_dim``, ``num_heads``, ``batch_first``,
``in_proj_weight``, ``in_proj_bias``, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Factorized", "FactorizedMultiheadAttention"]

#: Attributes of the dense layer that a :class:`Factorized` copies (when the layer has them).
SHAPE_ATTRS = (
    "in_features",
    "out_features",
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "output_padding",
    "transposed",
    "groups",
    "padding_mode",
    "nf",
    "nx",
)


def _kernel(first: nn.Module, second: nn.Module) -> tuple[int, ...]:
    """The kernel size of the composed convolution: the one factor whose kernel is not 1."""
    k = tuple(first.kernel_size)
    return k if math.prod(k) > 1 else tuple(second.kernel_size)


class Factorized(nn.Module):
    """A layer stored as two thin layers: ``forward(x) = second(first(x))``.

    ``first`` has no bias; ``second`` carries the original layer's bias. Both are ordinary
    ``nn.Linear`` / ``nn.ConvNd`` / ``nn.ConvTransposeNd`` modules, so the model saves with
    ``state_dict`` and ``torch.save``, traces with ``torch.compile`` / ``torch.export``, trains,
    and can be handed to :class:`proxrank.ProxRank` again (its factors are selected like any
    other layer).

    ``weight`` is the dense weight ``W`` the pair computes, in the dense layer's layout
    (``out x in`` for a Linear; ``in x out`` when ``weight_in_out``, as transformers' ``Conv1D``
    stores it; the kernel layout of the convolution), recomputed from the factors on every access
    (gradients flow to the factors); ``bias`` is ``second.bias``.
    """

    def __init__(
        self,
        first: nn.Module,
        second: nn.Module,
        rank: int,
        split: str,
        *,
        weight_in_out: bool = False,
        shape_attrs: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.rank = rank
        self.split = split
        self.weight_in_out = weight_in_out
        for key, value in (shape_attrs or {}).items():
            setattr(self, key, value)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @property
    def weight(self) -> Tensor:
        """The dense weight ``A B`` (read-only; recomputed on every access)."""
        F_, S = self.first.weight, self.second.weight
        if isinstance(self.first, nn.Linear):
            W = S @ F_
            return W.T if self.weight_in_out else W
        g = self.first.groups
        k = _kernel(self.first, self.second)
        if self.first.transposed:  # (in, r, K1) and (g r, out_g, K2) -> (in, out_g, k)
            Fg = F_.reshape(g, F_.shape[0] // g, F_.shape[1], -1)
            Sg = S.reshape(g, S.shape[0] // g, S.shape[1], -1)
            W = torch.einsum("gcrk,grol->gcokl", Fg, Sg)
            return W.reshape(F_.shape[0], S.shape[1], *k)
        # (g r, in_g, K1) and (out, r, K2) -> (out, in_g, k)
        Fg = F_.reshape(g, F_.shape[0] // g, F_.shape[1], -1)
        Sg = S.reshape(g, S.shape[0] // g, S.shape[1], -1)
        W = torch.einsum("grik,gorl->goikl", Fg, Sg)
        return W.reshape(S.shape[0], F_.shape[1], *k)

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            "Factorized.weight is the product of the factors and cannot be assigned; "
            "change first.weight / second.weight instead"
        )

    @property
    def bias(self) -> Tensor | None:
        """The original layer's bias (``second.bias``)."""
        return self.second.bias

    def extra_repr(self) -> str:
        return f"rank={self.rank}, split={self.split!r}"


def _float_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not allowed to attend) as an additive float mask of ``-inf``."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating types of {name} are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class FactorizedMultiheadAttention(nn.Module):
    r"""``nn.MultiheadAttention`` with separately stored (low-rank) input projections.

    The packed input projection ``in_proj_weight`` (``3 E x E``) of the dense layer is three
    operators, ``W_q``, ``W_k``, ``W_v`` (its rows ``0:E``, ``E:2E``, ``2E:3E``, or
    ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``E``), each with its own rank:
    ``q_proj``, ``k_proj``, ``v_proj`` are each a :class:`Factorized` pair or a dense
    ``nn.Linear`` (carrying their third of ``in_proj_bias``); ``out_proj`` is the dense layer's own
    (possibly itself factorized). ``forward`` computes exactly what ``nn.MultiheadAttention``
    computes: the same arguments (``key_padding_mask``, ``need_weights``, ``attn_mask``,
    ``average_attn_weights``, ``is_causal``), boolean or additive float masks, 2-D or 3-D
    ``attn_mask``, unbatched inputs, ``batch_first``, attention dropout in training,
    ``add_bias_kv`` and ``add_zero_attn``.

    ``_qkv_same_embed_dim`` is ``False`` (the projections are stored separately, as in
    ``nn.MultiheadAttention`` with different ``kdim``/``vdim``): this turns off the fused
    inference paths of ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (nested
    tensors, ``torch._transformer_encoder_layer_fwd``), which need one packed dense weight; the
    layers then run their ordinary path through this module. ``in_proj_weight`` (when
    ``kdim == vdim == embed_dim``, else ``None``), ``q/k/v_proj_weight`` and ``in_proj_bias`` are
    still answered, as the dense tensors, recomputed on access.
    """

    def __init__(
        self,
        dense: nn.MultiheadAttention,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
    ) -> None:
        super().__init__()
        self.embed_dim = dense.embed_dim
        self.kdim = dense.kdim
        self.vdim = dense.vdim
        self._qkv_same_embed_dim = False
        self.num_heads = dense.num_heads
        self.dropout = dense.dropout
        self.batch_first = dense.batch_first
        self.head_dim = dense.head_dim
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.out_proj = dense.out_proj
        self.bias_k = dense.bias_k
        self.bias_v = dense.bias_v
        self.add_zero_attn = dense.add_zero_attn
        self.train(dense.training)

    @property
    def q_proj_weight(self) -> Tensor:
        """Dense ``W_q`` (``E x E``), recomputed on access."""
        return self.q_proj.weight

    @property
    def k_proj_weight(self) -> Tensor:
        """Dense ``W_k`` (``E x kdim``), recomputed on access."""
        return self.k_proj.weight

    @property
    def v_proj_weight(self) -> Tensor:
        """Dense ``W_v`` (``E x vdim``), recomputed on access."""
        return self.v_proj.weight

    @property
    def in_proj_weight(self) -> Tensor | None:
        """The packed ``[W_q; W_k; W_v]`` (``3 E x E``) when ``kdim == vdim == embed_dim``,
        else ``None`` (as ``nn.MultiheadAttention``)."""
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            return None
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    @property
    def in_proj_bias(self) -> Tensor | None:
        """The packed ``[b_q; b_k; b_v]`` or ``None`` for a layer without bias."""
        biases = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        return None if biases[0] is None else torch.cat(biases)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward``."""
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D, got {query.dim()}-D")
        batched = query.dim() == 3
        key_padding_mask = _float_mask(key_padding_mask, "key_padding_mask", query.dtype)
        attn_mask = _float_mask(attn_mask, "attn_mask", query.dtype)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, N, _ = query.shape
        S, H, hd = key.shape[0], self.num_heads, self.head_dim
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the scaled-dot-product kernel applies the causal mask itself
        else:
            is_causal = False
            if attn_mask is not None:
                shape = (L, S) if attn_mask.dim() == 2 else (N * H, L, S)
                if tuple(attn_mask.shape) != shape:
                    raise RuntimeError(
                        f"The shape of the {attn_mask.dim()}D attn_mask is "
                        f"{tuple(attn_mask.shape)}, but should be {shape}."
                    )
                if attn_mask.dim() == 2:
                    attn_mask = attn_mask.unsqueeze(0)
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, N, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, N, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(L, N * H, hd).transpose(0, 1)
        k = k.reshape(k.shape[0], N * H, hd).transpose(0, 1)
        v = v.reshape(v.shape[0], N * H, hd).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(N * H, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        S = k.shape[1]
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S):
                raise AssertionError(
                    f"Expected key_padding_mask of shape {(N, S)}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            kpm = key_padding_mask.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = torch.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = (weights @ v).transpose(0, 1).reshape(L, N, self.embed_dim)
            weights = weights.view(N, H, L, S)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.shape[0] == 1:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(N, H, -1, S)
            out = F.scaled_dot_product_attention(
                q.view(N, H, L, hd),
                k.view(N, H, S, hd),
                v.view(N, H, S, hd),
                attn_mask,
                p,
                is_causal,
            )
            out = out.permute(2, 0, 1, 3).reshape(L, N, self.embed_dim)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

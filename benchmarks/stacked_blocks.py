"""Stacked q/k/v (one matrix) or per block: what the nuclear-norm prox does to an attention layer.

Trains a small `nn.TransformerEncoder` on a synthetic sequence task with AdamW (no prox), then
applies singular value thresholding to each layer's `in_proj_weight` (3d x d) in two ways at
the same threshold: per block (the query, key and value maps separately, proxrank's default)
and stacked (one SVT of the 3d x d matrix). Prints, per layer, each block's largest singular
value, the ranks kept, each block's relative change, and the parameters of the factorized
layer (per block: sum_i r_i (d + d); stacked: r (3d + d)).

    python benchmarks/stacked_blocks.py [--steps 300] [--keep 0.25]
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from proxrank.functional import svt


def train_encoder(d: int, layers: int, steps: int, seed: int) -> nn.TransformerEncoder:
    """A small encoder trained to output, at each position, a fixed random linear map of the
    running mean of the inputs (attention has to mix positions)."""
    torch.manual_seed(seed)
    enc = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True), layers
    )
    target = torch.randn(d, d) / d**0.5
    opt = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randn(16, 24, d)
        running = x.cumsum(1) / torch.arange(1, 25).view(1, -1, 1)
        loss = nn.functional.mse_loss(enc(x), running @ target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc


def rank(X: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(X, rtol=1e-5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--keep", type=float, default=0.25, help="per-block rank share to aim for")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, threads 1")
    enc = train_encoder(args.d, args.layers, args.steps, args.seed)
    d = args.d
    for li, layer in enumerate(enc.layers):
        W = layer.self_attn.in_proj_weight.detach().double()
        blocks = W.split(d)
        spectra = [torch.linalg.svdvals(B) for B in blocks]
        # the threshold at which the per-block prox keeps args.keep of the blocks' total rank
        pooled = torch.cat(spectra).sort(descending=True).values
        tau = float(pooled[int(args.keep * 3 * d)])
        per_block = [svt(B, tau) for B in blocks]
        stacked = svt(W, tau).split(d)
        print(f"\nlayer {li}: tau = {tau:.4f}")
        print("block  s_1     rank(per block)  rank(stacked)  change(per block)  change(stacked)")
        for name, B, S, P, Q in zip("qkv", blocks, spectra, per_block, stacked, strict=True):
            norm = float(B.norm())
            print(
                f"{name:5s}  {float(S[0]):6.3f}  {rank(P):15d}  {rank(Q):13d}  "
                f"{float((P - B).norm()) / norm:17.3f}  {float((Q - B).norm()) / norm:15.3f}"
            )
        r_blocks = [rank(P) for P in per_block]
        r_stack = rank(torch.cat(stacked))
        print(
            f"factorized in_proj: per block {sum(r_blocks) * 2 * d} params (ranks {r_blocks}), "
            f"stacked {r_stack * 4 * d} params (rank {r_stack}); dense {3 * d * d}"
        )


if __name__ == "__main__":
    main()

"""Softer rank reduction vs one-shot truncation at equal final size: an MLP on sklearn digits.

Every method trains for the same number of epochs and ends with its weight matrices inside
one parameter budget (a ratio of the dense weight count), allocated across layers by
``proxrank.allocate_ranks`` (predicted loss per parameter saved):

* ``one-shot``: dense training, then truncation to the allocated ranks (no further training);
* ``one-shot + fine-tune``: dense training for the first part, truncation, then training
  with the ranks frozen (projection after each step) for the rest;
* ``ISVT lam=...``: nuclear-norm prox with a constant ``lam`` for the first part, then the same
  truncation and frozen fine-tuning (lam has to be tuned: several values are shown);
* ``schedule (soft|hard)``: ``Schedule(budget=..., warmup=..., ramp_end=...)``: a cubic rank
  ramp to the budget allocation, then frozen ranks; no lam.

Prints one table (test accuracy: median and range over seeds; factorized parameter counts)
and writes JSON to ``bench-results/schedules.json``.

    python benchmarks/schedules.py [--budget 0.2] [--seeds 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import proxrank
from proxrank.budget import layer_cost
from proxrank.functional import project_rank

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling digits.py
from digits import data, linears, mlp

HIDDEN = 128
BATCH = 64
LR = 1e-3



def train(model, opt, Xtr, ytr, epochs, seed, after_step=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(Xtr), generator=g).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
            if after_step is not None:
                after_step()


@torch.no_grad()
def accuracy(model, X, y) -> float:
    return float((model(X).argmax(1) == y).float().mean())


def adam_fisher(adam: torch.optim.Adam, weight: torch.Tensor) -> float:
    """Per-layer curvature weight for the allocation: the mean of Adam's second moment (a
    diagonal empirical-Fisher estimate) over the weight's entries."""
    return float(adam.state[weight]["exp_avg_sq"].mean())


@torch.no_grad()
def truncate(model, adam, budget: float, fisher: bool) -> list[int]:
    """Project every weight onto the ranks ``allocate_ranks`` gives at ``budget``."""
    layers = linears(model)
    spectra = [torch.linalg.svdvals(m.weight.double()) for m in layers]
    weights = [adam_fisher(adam, m.weight) for m in layers] if fisher else None
    shapes = [tuple(m.weight.shape) for m in layers]
    alloc = proxrank.allocate_ranks(spectra, shapes, budget=budget, weights=weights)
    freeze(model, alloc.ranks)
    return list(alloc.ranks)


@torch.no_grad()
def freeze(model, ranks) -> None:
    for m, r in zip(linears(model), ranks, strict=True):
        m.weight.copy_(project_rank(m.weight, r))


def size(model) -> tuple[int, list[int]]:
    """Factorized weight count (``min(r (m + n), m n)`` per layer) and the ranks."""
    ranks = [int(torch.linalg.matrix_rank(m.weight)) for m in linears(model)]
    shapes = [m.weight.shape for m in linears(model)]
    return sum(layer_cost(*shape, r) for shape, r in zip(shapes, ranks, strict=True)), ranks


def run(method: str, seed: int, args, Xtr, ytr) -> nn.Module:
    model = mlp(HIDDEN, seed)
    adam = torch.optim.Adam(model.parameters(), lr=LR)
    first, rest = args.epochs - args.finetune, args.finetune
    if method in ("one-shot", "one-shot + fine-tune"):
        train(model, adam, Xtr, ytr, first if method != "one-shot" else args.epochs, seed)
        ranks = truncate(model, adam, args.budget, args.fisher)
        if method == "one-shot + fine-tune":
            train(model, adam, Xtr, ytr, rest, seed + 1, lambda: freeze(model, ranks))
    elif method.startswith("ISVT"):
        lam = float(method.split("=")[1])
        opt = proxrank.ProxRank(adam, model, lam=lam)
        train(model, opt, Xtr, ytr, first, seed)
        ranks = truncate(model, adam, args.budget, args.fisher)
        train(model, adam, Xtr, ytr, rest, seed + 1, lambda: freeze(model, ranks))
    else:
        steps = -(-len(Xtr) // BATCH)
        sch = proxrank.Schedule(
            budget=args.budget,
            warmup=args.warmup * steps,
            ramp_end=first * steps,
            ramp=args.ramp,
            threshold="hard" if "hard" in method else "soft",
            weights=(lambda t: adam_fisher(adam, t.param)) if args.fisher else None,
        )
        opt = proxrank.ProxRank(adam, model, schedule=sch)
        train(model, opt, Xtr, ytr, args.epochs, seed)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2, help="ratio of the dense weights")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="total epochs for every method")
    parser.add_argument("--finetune", type=int, default=10, help="epochs after truncation")
    parser.add_argument("--warmup", type=int, default=10, help="schedule: epochs without prox")
    parser.add_argument("--ramp", default="cubic", help="schedule: rank ramp shape")
    parser.add_argument("--only", default="", help="run only the methods whose name has this")
    parser.add_argument("--lams", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    parser.add_argument(
        "--fisher",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="weight each layer's predicted loss by Adam's mean second moment (all methods)",
    )
    parser.add_argument("--out", default="bench-results/schedules.json")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (small matrices: 1 is fastest)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(" ".join(f"{k}={v}" for k, v in machine.items()))
    Xtr, ytr, Xte, yte = data()
    dense = sum(m.weight.numel() for m in linears(mlp(HIDDEN)))
    biases = sum(m.bias.numel() for m in linears(mlp(HIDDEN)))
    print(
        f"MLP 64-{HIDDEN}-{HIDDEN}-10 on digits ({len(Xtr)} train / {len(Xte)} test), "
        f"{dense} weights + {biases} biases; budget {args.budget} = {int(args.budget * dense)} "
        f"weights; {args.epochs} epochs each, {args.finetune} after truncation; "
        f"{args.seeds} seeds; allocation weights: {'Adam Fisher' if args.fisher else 'none'}"
    )
    methods = [
        "dense (no compression)",
        "one-shot",
        "one-shot + fine-tune",
        *[f"ISVT lam={lam:g}" for lam in args.lams],
        "schedule (soft)",
        "schedule (hard)",
    ]
    rows = []
    for method in (m for m in methods if args.only in m):
        accs, sizes, times, ranks = [], [], [], None
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            if method.startswith("dense"):
                model = mlp(HIDDEN, seed)
                adam = torch.optim.Adam(model.parameters(), lr=LR)
                train(model, adam, Xtr, ytr, args.epochs, seed)
            else:
                model = run(method, seed, args, Xtr, ytr)
            times.append(time.perf_counter() - t0)
            accs.append(accuracy(model, Xte, yte))
            n, ranks = size(model)
            sizes.append(n)
        rows.append(
            {
                "method": method,
                "acc_median": statistics.median(accs),
                "acc_min": min(accs),
                "acc_max": max(accs),
                "accs": accs,
                "weights_median": statistics.median(sizes),
                "params_median": statistics.median(sizes) + biases,
                "ranks_last_seed": ranks,
                "time_s_median": statistics.median(times),
            }
        )
        r = rows[-1]
        print(f"  done: {method} ({r['time_s_median']:.1f} s per run)", flush=True)

    header = (
        f"{'method':24s} {'test acc (median [min, max])':>30s} {'weights':>8s} {'params':>8s} "
        f"{'ratio':>6s}  {'ranks (last seed)':18s} {'s/run':>5s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        acc = f"{r['acc_median']:.4f} [{r['acc_min']:.4f}, {r['acc_max']:.4f}]"
        print(
            f"{r['method']:24s} {acc:>30s} {r['weights_median']:8.0f} {r['params_median']:8.0f} "
            f"{r['weights_median'] / dense:6.3f}  {r['ranks_last_seed']!s:18s} "
            f"{r['time_s_median']:5.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()

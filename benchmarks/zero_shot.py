"""Zero-shot accuracy after one-shot low-rank compression, per metric (no fine-tuning).

Trains an MLP (64-256-256-10) on scikit-learn's digits (ships with the package; no download),
then truncates every Linear weight to rank r with ``proxrank.compress`` in the euclidean,
fisher, activation and two-sided metrics (statistics from calibration batches of the training
set) and measures test accuracy. Repeated over training seeds; prints a table of mean accuracy
and writes everything to ``bench-results/zero_shot.json``.

    make bench-zero-shot            # or: python benchmarks/zero_shot.py --seeds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import proxrank

#: column name -> the metric passed to proxrank.compress (names use plain means over the batches)
METRICS = {
    "euclidean": "euclidean",
    "fisher": "fisher",  # FWSVD: A = diag(row sums of the Fisher), rows = output features
    "fisher_in": proxrank.FisherMetric(side="in", beta=None),  # B from input-feature sums
    "activation": "activation",  # SVD-LLM: B = E[x x^T]
    "two_sided": "two_sided",
}


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.33, random_state=seed, stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return to_x(Xtr), torch.tensor(ytr), to_x(Xte), torch.tensor(yte)


def train_mlp(Xtr, ytr, seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(Xtr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, X, y) -> float:
    return float((model(X).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 6, 8, 12, 16, 32])
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--out", default="bench-results/zero_shot.json")
    args = ap.parse_args()

    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "proxrank": proxrank.__version__,
    }
    print(" ".join(f"{k}={v}" for k, v in machine.items()))

    # acc[metric][rank] -> list over seeds; compress time per metric (all ranks, all seeds)
    acc = {m: {r: [] for r in args.ranks} for m in METRICS}
    seconds = {m: [] for m in METRICS}
    baseline = []
    for seed in range(args.seeds):
        Xtr, ytr, Xte, yte = load_data(seed)
        model = train_mlp(Xtr, ytr, seed, args.epochs)
        baseline.append(accuracy(model, Xte, yte))
        g = torch.Generator().manual_seed(seed)
        calib_idx = torch.randperm(len(Xtr), generator=g)[: 64 * args.calib_batches].split(64)
        calib = [(Xtr[i], ytr[i]) for i in calib_idx]
        for name, metric in METRICS.items():
            for r in args.ranks:
                small = copy.deepcopy(model)
                t0 = time.perf_counter()
                proxrank.compress(small, rank=r, metric=metric, data=calib)
                seconds[name].append(time.perf_counter() - t0)
                acc[name][r].append(accuracy(small, Xte, yte))

    mean = lambda xs: statistics.fmean(xs)  # noqa: E731
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    params = {
        r: sum(min(r, m, n) * (m + n) for m, n in ((256, 64), (256, 256), (10, 256)))
        for r in args.ranks
    }
    full = 256 * 64 + 256 * 256 + 10 * 256
    print(
        f"\nMLP 64-256-256-10 on sklearn digits, {args.seeds} seeds, test accuracy "
        f"uncompressed {mean(baseline):.4f} ± {sd(baseline):.4f}; no fine-tuning after compression"
    )
    header = f"{'rank':>5} {'params':>7} " + " ".join(f"{m:>16}" for m in METRICS)
    print(header)
    print("-" * len(header))
    for r in args.ranks:
        cells = " ".join(f"{mean(acc[m][r]):>7.4f} ± {sd(acc[m][r]):.4f}" for m in METRICS)
        print(f"{r:>5} {params[r] / full:>7.1%} {cells}")
    print(
        "median compress() seconds (whole model): "
        + ", ".join(f"{m} {statistics.median(seconds[m]):.3f}" for m in METRICS)
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args),
                "baseline_accuracy": baseline,
                "param_fraction": {r: params[r] / full for r in args.ranks},
                "accuracy": acc,
                "median_compress_seconds": {m: statistics.median(s) for m, s in seconds.items()},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

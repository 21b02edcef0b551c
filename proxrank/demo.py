"""``python -m proxrank demo``: train with ProxRank, factorize, and compare with a dense model.

On scikit-learn's handwritten digits (1797 8x8 images, 10 classes; they ship with the package,
nothing is downloaded) the demo

1. trains a dense baseline with AdamW,
2. trains the same network with AdamW wrapped in :class:`proxrank.ProxRank`, recording every
   selected layer's rank and singular values as it goes,
3. factorizes the ProxRank model with :func:`proxrank.factorize` (optionally fine-tunes the
   factors for a few epochs),
4. prints a before/after table and writes a report folder: ``model.pt`` (the compressed model,
   ``torch.load(path, weights_only=False)``), ``summary.json``, ``ranks.png`` (rank
   trajectories) and ``spectra.png`` (singular values, dense baseline vs ProxRank).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .factorize import FactorizeSummary, default_rtol, factorize, numerical_rank
from .optimizer import ProxRank

__all__ = ["add_arguments", "main", "run"]

#: Settings ``--quick`` uses (a few seconds, for tests and smoke runs).
QUICK = {"epochs": 3, "finetune_epochs": 1}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options, in groups that other features extend."""
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=30, help="training epochs (%(default)s)")
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (%(default)s)")
    train.add_argument("--batch-size", type=int, default=64, help="batch size (%(default)s)")
    train.add_argument(
        "--finetune-epochs",
        type=int,
        default=5,
        help="epochs of plain AdamW on the factorized model (%(default)s; 0: none)",
    )
    train.add_argument(
        "--finetune-lr", type=float, default=3e-4, help="fine-tuning learning rate (%(default)s)"
    )
    train.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (%(default)s: this network is too small to gain from more, and "
        "busy-waiting threads slow down badly on a shared machine; 0: torch's default)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    reg = parser.add_argument_group("regularizer")
    reg.add_argument(
        "--lam", type=float, default=1.0, help="ProxRank strength lam, tau = lam * lr (%(default)s)"
    )
    reg.add_argument(
        "--prox",
        choices=("soft", "hard"),
        default="soft",
        help="soft: nuclear norm (shrinks the kept singular values); hard: rank penalty "
        "(keeps them) (%(default)s)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, default=Path("demo-report"), help="report folder (%(default)s)"
    )
    out.add_argument(
        "--quick",
        action="store_true",
        help=f"a few-second run for tests ({', '.join(f'{k}={v}' for k, v in QUICK.items())})",
    )
    out.add_argument("--no-progress", action="store_true", help="hide the progress bar")


# -- data and models ---------------------------------------------------------------------


def load_digits_split(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` images in ``[0, 1]``: 75 % train, 25 % test
    (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)

    def images(a: Any) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16

    return images(Xtr), torch.tensor(ytr), images(Xte), torch.tensor(yte)


def build_cnn() -> nn.Module:
    """The demo network: two 3x3 convolutions, max-pooling, two linear layers (71,754 weights)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


# -- training ----------------------------------------------------------------------------


@dataclass
class Recorder:
    """Per-layer ranks after every step and singular values at the end of every epoch."""

    names: list[str]
    params: list[Tensor]
    ranks: dict[str, list[int]] = field(default_factory=dict)
    spectra: dict[str, list[list[float]]] = field(default_factory=dict)

    def labels(self) -> list[str]:
        shapes = ("x".join(map(str, p.shape)) for p in self.params)
        return [f"{n}: {shape}" for n, shape in zip(self.names, shapes, strict=True)]

    @torch.no_grad()
    def singular_values(self) -> list[Tensor]:
        return [
            torch.linalg.svdvals(p.detach().reshape(p.shape[0], -1).float()) for p in self.params
        ]

    def step(self, epoch_end: bool) -> None:
        for name, p, s in zip(self.names, self.params, self.singular_values(), strict=True):
            rtol = default_rtol(p.shape[0], p.numel() // p.shape[0], p.dtype)
            self.ranks.setdefault(name, []).append(numerical_rank(s, rtol))
            if epoch_end:
                self.spectra.setdefault(name, []).append(s.tolist())


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean())
    model.train(was_training)
    return acc


def inference_ms(model: nn.Module, X: Tensor, repeats: int = 30) -> float:
    """Median wall time of ``model(X)`` in eval mode without autograd, in milliseconds."""
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):  # two warm-up calls
            start = time.perf_counter()
            model(X)
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1e3 * statistics.median(times[2:])


def train(
    model: nn.Module,
    data: tuple[Tensor, Tensor],
    epochs: int,
    lr: float,
    args: argparse.Namespace,
    desc: str,
    lam: float | None = None,
    recorder: Recorder | None = None,
) -> float:
    """AdamW (wrapped in ProxRank when ``lam`` is given) with cross-entropy; returns seconds."""
    X, y = data
    opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if lam is not None:
        opt = ProxRank(opt, model, lam=lam, prox=args.prox)
    from tqdm.auto import tqdm

    batches = -(-len(X) // args.batch_size)
    bar = tqdm(total=epochs * batches, desc=desc, unit="step", disable=args.no_progress)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X))
        for i in range(batches):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            loss = loss_fn(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if recorder is not None:
                recorder.step(epoch_end=i == batches - 1)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", ranks=_last_ranks(recorder), refresh=False
                )
            else:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    bar.close()
    return time.perf_counter() - start


def _last_ranks(recorder: Recorder) -> str:
    return "/".join(str(r[-1]) for r in recorder.ranks.values())


# -- report ------------------------------------------------------------------------------


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def comparison_table(results: dict[str, dict[str, Any]]) -> str:
    """The before/after table: one column per model."""
    names = list(results)
    rows = [("", *names)]
    rows.append(("test accuracy", *(f"{results[n]['accuracy']:.2%}" for n in names)))
    rows.append(("parameters", *(f"{results[n]['params']:,}" for n in names)))
    rows.append(("multiply-adds / image", *(f"{results[n]['macs']:,}" for n in names)))
    rows.append(("train wall time", *(f"{results[n]['seconds']:.1f} s" for n in names)))
    rows.append(("inference, test set", *(f"{results[n]['inference_ms']:.2f} ms" for n in names)))
    for layer in results[names[0]]["ranks"]:
        rows.append((f"rank {layer}", *(str(results[n]["ranks"][layer]) for n in names)))
    return _table(rows)


def plot_report(out: Path, rec: Recorder, baseline: list[Tensor], batches: int) -> None:
    """``ranks.png``: rank of every layer against training step; ``spectra.png``: singular
    values (normalised by the largest) of the dense baseline and of ProxRank by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ranks in zip(rec.labels(), rec.ranks.values(), strict=True):
        ax.plot([i / batches for i in range(1, len(ranks) + 1)], ranks, label=label)
    ax.set(xlabel="epoch", ylabel="rank", title="Rank of each layer during ProxRank training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=120)
    plt.close(fig)

    n = len(rec.names)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 3.5), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, name, label, dense in zip(axes[0], rec.names, rec.labels(), baseline, strict=True):
        snaps = rec.spectra[name]
        for e, s in enumerate(snaps):
            s = torch.tensor(s)
            ax.semilogy((s / s[0]).clamp_min(1e-8), color=cmap(e / max(len(snaps) - 1, 1)), lw=0.8)
        ax.semilogy((dense / dense[0]).clamp_min(1e-8), "k--", lw=1.5, label="dense baseline")
        ax.set(title=label, xlabel="index", ylabel="s_i / s_1", ylim=(1e-8, 2))
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("Singular values: ProxRank by epoch (dark to light) vs dense baseline")
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo with parsed ``args``; returns the JSON summary it writes."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for opt in ("epochs", "batch_size"):
        if getattr(args, opt) < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    if args.lam < 0 or args.finetune_epochs < 0:
        raise ValueError("--lam and --finetune-epochs must be >= 0")
    if not (args.lr > 0 and args.finetune_lr > 0):
        raise ValueError("--lr and --finetune-lr must be > 0")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    wall = time.perf_counter()
    torch.manual_seed(args.seed)
    Xtr, ytr, Xte, yte = load_digits_split(args.seed)
    batches = -(-len(Xtr) // args.batch_size)

    dense = build_cnn()
    low = build_cnn()
    low.load_state_dict(dense.state_dict())  # same initialisation for both runs
    t_dense = train(dense, (Xtr, ytr), args.epochs, args.lr, args, "dense AdamW")
    names = [n for n, m in low.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    params = [low.get_submodule(n).weight for n in names]
    rec = Recorder(names, params)
    t_low = train(low, (Xtr, ytr), args.epochs, args.lr, args, "ProxRank(AdamW)", args.lam, rec)

    example = Xte[:1]
    _, dense_summary = factorize(dense, example_inputs=example)  # its 'before' columns
    small, summary = factorize(low, example_inputs=example)

    def column(s: FactorizeSummary, model: nn.Module, seconds: float, factor: bool) -> dict:
        return {
            "accuracy": accuracy(model, Xte, yte),
            "params": s.model_params_after if factor else s.model_params_before,
            "macs": s.totals("macs")[1 if factor else 0],
            "seconds": seconds,
            "inference_ms": inference_ms(model, Xte),
            "ranks": {lay.name.removesuffix(".weight"): lay.rank for lay in s.layers},
        }

    results = {
        "dense AdamW": column(dense_summary, dense, t_dense, False),
        "ProxRank (dense)": column(summary, low, t_low, False),
        "factorized": column(summary, small, t_low, True),
    }
    if args.finetune_epochs:
        t_tune = train(
            small, (Xtr, ytr), args.finetune_epochs, args.finetune_lr, args, "fine-tune factors"
        )
        results["+ fine-tuned"] = column(summary, small, t_low + t_tune, True)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save(small, out / "model.pt")
    plot_report(
        out,
        rec,
        Recorder(names, [dense.get_submodule(n).weight for n in names]).singular_values(),
        batches,
    )
    report = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
        },
        "results": results,
        "factorize": summary.to_dict(),
        "ranks_per_step": rec.ranks,
        "wall_seconds": time.perf_counter() - wall,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    print(summary)
    print()
    print(comparison_table(results))
    print(
        f"\n{summary.compression:.1f}x fewer parameters; report in {out}/ "
        f"(model.pt, summary.json, ranks.png, spectra.png); {report['wall_seconds']:.0f} s in all"
    )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` as the ``demo`` subcommand's options and run it."""
    parser = argparse.ArgumentParser(prog="python -m proxrank demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))

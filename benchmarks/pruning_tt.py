"""Pruned and tensor-train MLPs on sklearn digits: test accuracy against parameters kept and time.

An MLP 64-256-256-10 (ReLU) on the 8x8 digits (1347 training, 450 test images, standardised):

* ``dense AdamW``: cross-entropy, AdamW, no compression (the reference size);
* ``ProxRank(AdamW) prox=...``: the same training with a prox after every step (``soft``: the
  nuclear norm; ``l1``: lasso; ``group``: group lasso on output units; ``magnitude``: gradual
  magnitude pruning to a density, cubic ramp over the first 60% of the steps; ``tt``: TT
  rounding), then :func:`proxrank.factorize` (``prune=True``: zero units removed; ``sparse=
  "csr"`` / ``tt=True`` where the row says so): accuracy and size of the factorized model
  (CSR weights count their nonzero values);
* ``NN-BCD TT`` / ``NN-BCD prune``: :class:`proxrank.bcd.NNBCD` (closed-form block coordinate
  descent on the squared loss of one-hot targets, the paper's setting), from the same random
  initialisation, then the compressed copies ``G_i`` loaded into the model; size = TT cores or
  nonzeros. ``+ warm`` rows start from the dense AdamW model instead (time: the sweeps only).

Every method is one entry of ``METHODS``: a function ``(data, args) -> Row``; a ProxRank
recipe is one ``partial(prox_rank, name=..., forms=<factorize options>, **ProxRank options)``.
Sizes count weights and biases. Prints a markdown table (machine, threads) and writes JSON to
``--out``.

    python benchmarks/pruning_tt.py [--quick] [--threads 1] [--epochs 30] [--sweeps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

import proxrank
from proxrank.bcd import NNBCD
from proxrank.tt import TTRound

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling digits.py
from digits import data, linears, mlp

BATCH = 64
LR = 1e-3
QUICK = {"hidden": 64, "epochs": 2, "sweeps": 3}


@dataclass
class Data:
    xtr: torch.Tensor
    ytr: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor
    hidden: int
    dense: dict[str, torch.Tensor] | None = None  # the dense AdamW model's weights, once trained


@dataclass
class Row:
    method: str
    accuracy: float
    params: int
    seconds: float
    detail: str


def load(hidden: int, seed: int = 0) -> Data:
    return Data(*data(seed), hidden)


@torch.no_grad()
def accuracy(model: nn.Module, d: Data) -> float:
    return float((model(d.xte).argmax(1) == d.yte).float().mean())


def biases(model: nn.Module) -> int:
    return sum(m.bias.numel() for m in linears(model))


def dense_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def factorized(model: nn.Module, **options) -> tuple[nn.Module, int, str]:
    """``proxrank.factorize(model, **options)``: the genuinely smaller model, its parameter count
    (weights and biases) and each weight's form (low-rank split, pruned shape, TT, CSR)."""
    small, summary = proxrank.factorize(model, **options)
    forms = "; ".join(f"{row.matrix} {row.form} rank {row.rank}" for row in summary.layers)
    return small, summary.model_params_after, forms


def train(model: nn.Module, opt: torch.optim.Optimizer, d: Data, epochs: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(d.xtr), generator=g).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(d.xtr[idx]), d.ytr[idx]).backward()
            opt.step()


def dense_adamw(d: Data, args) -> Row:
    model = mlp(d.hidden)
    start = time.perf_counter()
    train(model, torch.optim.AdamW(model.parameters(), lr=LR), d, args.epochs)
    seconds = time.perf_counter() - start
    d.dense = {k: v.clone() for k, v in model.state_dict().items()}
    return Row("dense AdamW", accuracy(model, d), dense_params(model), seconds, "")


def prox_rank(d: Data, args, *, name: str, forms: dict | None = None, **options) -> Row:
    """AdamW wrapped in ``ProxRank(**options)``, trained as the dense row, then turned into
    smaller layers by ``proxrank.factorize(**forms)``: accuracy and size of that model."""
    model = mlp(d.hidden)
    steps = args.epochs * -(-len(d.xtr) // BATCH)
    if "schedule" in options:  # a ramp over the first 60% of the steps, then held
        options["schedule"] = proxrank.Schedule(**options["schedule"], ramp_end=int(0.6 * steps))
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=LR), model, **options)
    start = time.perf_counter()
    train(model, opt, d, args.epochs)
    seconds = time.perf_counter() - start
    small, size, detail = factorized(model.eval(), **(forms or {}))
    return Row(name, accuracy(small, d), size, seconds, detail)


def nn_bcd(d: Data, args, *, name: str, warm: bool = False, **options) -> Row:
    """``NNBCD(**options)`` for ``args.sweeps`` sweeps, then its compressed copies loaded;
    ``warm``: from the dense AdamW model (the dense row must run first)."""
    model = mlp(d.hidden)
    if warm:
        model.load_state_dict(d.dense)
    bcd = NNBCD(model, **options)
    start = time.perf_counter()
    history = bcd.fit(d.xtr, d.ytr, args.sweeps)
    seconds = time.perf_counter() - start
    dense_acc = accuracy(model, d)
    bcd.load_compressed()
    sizes = bcd.compressed_parameters()
    detail = (
        f"weights {'/'.join(map(str, sizes))}; W acc {dense_acc:.3f}; "
        f"Phi {history[0]:.3g} -> {history[-1]:.3g}"
    )
    size = sum(sizes) + biases(model)
    return Row(name, accuracy(model, d), size, seconds, detail)


BCD = {"tau": 300.0, "gamma": 1.0, "rho": 1.0, "alpha": 0.1}
TT_RANKS, KEEP = 8, 0.1
LAM_L1, LAM_GROUP = 0.6, 4.0
METHODS: list[Callable[[Data, argparse.Namespace], Row]] = [
    dense_adamw,
    partial(prox_rank, name="ProxRank(AdamW) prox=soft lam=3", lam=3.0),
    partial(prox_rank, name=f"ProxRank(AdamW) prox=l1 lam={LAM_L1}", lam=LAM_L1, prox="l1",
            forms={"sparse": "csr"}),
    partial(prox_rank, name=f"ProxRank(AdamW) prox=group lam={LAM_GROUP}", lam=LAM_GROUP,
            prox="group"),
    partial(prox_rank, name=f"ProxRank(AdamW) prox=magnitude target={KEEP}", prox="magnitude",
            schedule={"target": KEEP}, forms={"sparse": "csr"}),
    partial(prox_rank, name=f"ProxRank(AdamW) prox=tt ranks={TT_RANKS}",
            prox=TTRound(ranks=TT_RANKS), forms={"tt": True}),
    partial(nn_bcd, name=f"NN-BCD TT ranks={TT_RANKS}", compress="tt", ranks=TT_RANKS, **BCD),
    partial(nn_bcd, name=f"NN-BCD prune keep={KEEP}", compress="prune", keep=KEEP, **BCD),
    partial(
        nn_bcd,
        name=f"NN-BCD TT ranks={TT_RANKS} + warm",
        warm=True,
        compress="tt",
        ranks=TT_RANKS,
        **BCD,
    ),
    partial(
        nn_bcd,
        name=f"NN-BCD prune keep={KEEP} + warm",
        warm=True,
        compress="prune",
        keep=KEEP,
        **BCD,
    ),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def table(rows: list[Row], dense: int) -> str:
    lines = [
        "| method | test accuracy | parameters (kept) | time (s) | detail |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.accuracy:.3f} | {r.params:,} ({r.params / dense:.1%}) "
            f"| {r.seconds:.1f} | {r.detail} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a few seconds: {QUICK}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=30, help="AdamW epochs (dense, ProxRank)")
    parser.add_argument("--sweeps", type=int, default=200, help="NN-BCD sweeps")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    d = load(args.hidden)
    rows = []
    for method in METHODS:
        rows.append(method(d, args))
        print(f"{rows[-1].method}: {rows[-1].accuracy:.3f} ({rows[-1].seconds:.1f} s)", flush=True)
    dense = dense_params(mlp(args.hidden))
    header = (
        f"digits MLP 64-{args.hidden}-{args.hidden}-10; {args.epochs} AdamW epochs, "
        f"{args.sweeps} NN-BCD sweeps; {machine()}, {torch.get_num_threads()} threads"
    )
    text = header + "\n\n" + table(rows, dense)
    print(text)
    report = {"header": header, "dense_params": dense, "rows": [asdict(r) for r in rows]}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "pruning_tt_quick" if args.quick else "pruning_tt"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()

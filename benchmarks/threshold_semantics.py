"""Threshold semantics under a decaying learning rate: ``tau_lr`` = current, initial, cumulative.

An MLP 64-H-H-10 (ReLU) on sklearn digits, AdamW under a linear warm-up then a cosine decay
to ~0 (``LambdaLR``, so every group records its ``initial_lr``), wrapped in
``ProxRank(lam=...)`` (soft prox: the nuclear norm) with each ``tau_lr``:

* ``current``: ``tau_t = lam * lr_t`` (the proximal gradient step on ``f + lam ||W||_*``);
* ``initial``: ``tau_t = lam * lr_0`` (the peak rate): a fixed threshold;
* ``cumulative``: dual averaging: the base step updates a latent ``Z`` and the weight is
  ``prox(Z, lam * sum_{s <= t} lr_s)``.

Each ``lam`` of ``--lams`` trains all three.
A plain AdamW run (``dense``) gives the reference accuracy. Every step records the rate, the
threshold ``tau`` and each layer's rank (at :func:`proxrank.factorize`'s tolerance, from the
diagnostics) and the batch loss; the test accuracy every ``--eval-every`` steps. Writes
``threshold_semantics[_quick].{json,md}`` to ``--out`` and the three-panel figure (rate and
threshold, total rank, loss and accuracy against the step) to ``--figure``.

    python benchmarks/threshold_semantics.py [--quick] [--lams 1 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import proxrank

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling digits.py
from digits import data, mlp

SEMANTICS = ("current", "initial", "cumulative")
BATCH = 64
QUICK = {"hidden": 32, "epochs": 3, "eval_every": 5}


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """``lr_t / lr_0``: linear from ``1 / warmup`` to 1 over ``warmup`` steps, then
    ``(1 + cos(pi (t - warmup) / (total - warmup))) / 2``: ~0 at the last step, never 0."""

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))

    return factor


def run(semantics: str | None, lam: float, args, Xtr, ytr, Xte, yte) -> dict:
    """One training run (``semantics=None``: plain AdamW); per-step records."""
    model = mlp(args.hidden)
    adamw = torch.optim.AdamW(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(Xtr) // BATCH)
    total = args.epochs * steps_per_epoch
    opt = (
        adamw
        if semantics is None
        else proxrank.ProxRank(adamw, model, lam=lam, tau_lr=semantics, diagnostics=True)
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        adamw, warmup_cosine(max(1, round(args.warmup * total)), total)
    )
    rec = {"step": [], "lr": [], "tau": [], "ranks": [], "loss": [], "eval_step": [], "acc": []}
    g = torch.Generator().manual_seed(0)
    step = 0
    for _ in range(args.epochs):
        for idx in torch.randperm(len(Xtr), generator=g).split(BATCH):
            lr = adamw.param_groups[0]["lr"]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            rec["step"].append(step)
            rec["lr"].append(lr)
            rec["loss"].append(float(loss.detach()))
            if semantics is not None:
                layers = opt.diagnostics().layers
                rec["tau"].append(layers[0].tau)
                rec["ranks"].append([lay.rank for lay in layers])
            if step % args.eval_every == 0 or step == total:
                with torch.no_grad():
                    acc = float((model(Xte).argmax(1) == yte).float().mean())
                rec["eval_step"].append(step)
                rec["acc"].append(acc)
    return rec


def summary(name: str, lam: float | None, rec: dict, tail: int) -> dict:
    """End figures: final rate, threshold and ranks, the smallest total rank over the run and
    the largest rise of the total rank above its running minimum (ranks climbing back), the
    mean batch loss over the last ``tail`` steps, the final test accuracy."""
    totals = [sum(r) for r in rec["ranks"]]
    lows = itertools.accumulate(totals, min)
    return {
        "lam": lam,
        "tau_lr": name,
        "lr_end": rec["lr"][-1],
        "tau_end": rec["tau"][-1] if rec["tau"] else None,
        "ranks_end": rec["ranks"][-1] if rec["ranks"] else None,
        "rank_min": min(totals) if totals else None,
        "rank_end": totals[-1] if totals else None,
        "rank_climb": max((t - low for t, low in zip(totals, lows, strict=True)), default=None),
        "loss_end": sum(rec["loss"][-tail:]) / len(rec["loss"][-tail:]),
        "acc_end": rec["acc"][-1],
    }


def table(rows: list[dict], args) -> str:
    lines = [
        f"MLP 64-{args.hidden}-{args.hidden}-10 on digits, AdamW lr {args.lr:g}, "
        f"{args.warmup:.0%} warm-up + cosine to ~0, {args.epochs} epochs",
        "",
        "| lam | tau_lr | final lr | final tau | min total rank | rank climb | final ranks (total) "
        "| train loss (last epoch) | test acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ranks = "-" if r["ranks_end"] is None else f"{r['ranks_end']} ({r['rank_end']})"
        tau = "-" if r["tau_end"] is None else f"{r['tau_end']:.3g}"
        low = "- | -" if r["rank_min"] is None else f"{r['rank_min']} | {r['rank_climb']}"
        lam = "-" if r["lam"] is None else f"{r['lam']:g}"
        lines.append(
            f"| {lam} | {r['tau_lr']} | {r['lr_end']:.2g} | {tau} | {low} | {ranks} "
            f"| {r['loss_end']:.4f} | {r['acc_end']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def figure(dense: dict, records: dict[float, dict[str, dict]], path: Path) -> None:
    """One row of three panels per ``lam``: rate and thresholds, total rank, test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"current": "C0", "initial": "C1", "cumulative": "C2"}
    fig, axes = plt.subplots(len(records), 3, figsize=(12, 3.2 * len(records)), squeeze=False)
    for (lam, runs), (ax_tau, ax_rank, ax_acc) in zip(records.items(), axes, strict=True):
        ax_tau.semilogy(dense["step"], dense["lr"], color="k", ls=":", label="lr")
        ax_acc.plot(dense["eval_step"], dense["acc"], color="0.5", ls="--", label="AdamW (dense)")
        for name, rec in runs.items():
            c = colors[name]
            ax_tau.semilogy(rec["step"], rec["tau"], color=c, label=f"tau ({name})")
            ax_rank.plot(rec["step"], [sum(r) for r in rec["ranks"]], color=c, label=name)
            ax_acc.plot(rec["eval_step"], rec["acc"], color=c, label=name)
        ax_tau.set_title(f"lam = {lam:g}: learning rate and tau", fontsize=10)
        ax_rank.set_title(f"lam = {lam:g}: total rank (factorize's tolerance)", fontsize=10)
        ax_acc.set_title(f"lam = {lam:g}: test accuracy", fontsize=10)
        ax_rank.set_ylim(bottom=0)
        ax_acc.set_ylim(0.5, 1.0)
        ax_acc.legend(fontsize=7, loc="lower right")
        for ax in (ax_tau, ax_rank):
            ax.legend(fontsize=7)
        for ax in (ax_tau, ax_rank, ax_acc):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=64)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny MLP")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=float, default=0.1, help="share of the steps")
    parser.add_argument("--lams", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--figure", default="docs/threshold_semantics.png")
    args = parser.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    torch.set_num_threads(args.threads)
    Xtr, ytr, Xte, yte = data()
    dense = run(None, 0.0, args, Xtr, ytr, Xte, yte)
    tail = -(-len(Xtr) // BATCH)
    rows = [summary("dense AdamW", None, dense, tail)]
    records: dict[float, dict[str, dict]] = {}
    for lam in args.lams:
        records[lam] = {name: run(name, lam, args, Xtr, ytr, Xte, yte) for name in SEMANTICS}
        rows += [summary(name, lam, rec, tail) for name, rec in records[lam].items()]
        print(f"  done: lam={lam:g}", flush=True)
    md = table(rows, args)
    print("\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "threshold_semantics_quick" if args.quick else "threshold_semantics"
    (out / f"{stem}.md").write_text(md)
    report = {
        "args": vars(args),
        "rows": rows,
        "dense": dense,
        "records": {f"{lam:g}": runs for lam, runs in records.items()},
    }
    (out / f"{stem}.json").write_text(json.dumps(report))
    figure(dense, records, Path(args.figure))
    print(f"JSON: {out / stem}.json; figure: {args.figure}")
    return report


if __name__ == "__main__":
    main()

"""``python -m proxrank demo``: train with ProxRank, factorize, and compare with a dense model.

On scikit-learn's handwritten digits (1797 8x8 images, 10 classes; they ship with the package,
nothing is downloaded) the demo

1. trains a dense baseline with AdamW,
2. trains the same network with AdamW wrapped in :class:`proxrank.ProxRank` with diagnostics
   on (:class:`proxrank.Diagnostics`: every prox step records each layer's rank and spectrum)
   and prints the per-layer diagnostics report and the convergence verdict,
3. factorizes the ProxRank model with :func:`proxrank.factorize` (optionally fine-tunes the
   factors for a few epochs),
4. prints a before/after table and writes a report folder: ``model.pt`` (the compressed model,
   ``torch.load(path, weights_only=False)``), ``summary.json``, ``ranks.png`` (rank
   trajectories) and ``spectra.png`` (singular values before and after the last prox, the
   threshold, and the dense baseline's). The table's inference time is the median (and IQR)
   of ``--timing-rounds`` rounds that time the models interleaved, under ``--threads``.

Strength: ``--lam`` (``tau = lam * lr`` at every step), or ``--budget`` (a rank ramp to a
global parameter budget, ``proxrank.Schedule(budget=...)``); ``--metric`` picks the metric of
the prox (the convolutions, which ``activation``/``two_sided`` cannot weight, fall back to
``euclidean``/``fisher``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diagnostics import Diagnostics, ModelDiagnostics, json_safe
from ..factorize import FactorizeSummary, factorize
from ..optimizer import ProxRank
from ..schedules import Schedule

__all__ = ["add_arguments", "prepare", "run"]

#: Settings ``--quick`` uses (a few seconds, for tests and smoke runs).
QUICK = {"epochs": 3, "finetune_epochs": 1, "timing_rounds": 20}
#: Metrics of ``--metric``; the input-based ones weight nn.Linear layers only, so the demo's
#: convolutions get the nearest metric that needs no layer inputs (their own param group).
METRICS = ("euclidean", "fisher", "adam", "activation", "two_sided")
CONV_FALLBACK = {"activation": "euclidean", "two_sided": "fisher"}
#: Rank tolerance of :func:`proxrank.factorize`: singular values below ``1e-5 s_1`` count as
#: zero. The default (``eps sqrt(max(m, n))``, about ``3e-6`` here) fits the Euclidean prox, whose
#: float32 output keeps trailing values near ``5e-8 s_1``; the input-weighted metrics write back
#: ``A^{-1/2} Z B^{-1/2}`` and the ill-conditioned ``B = E[x x^T]`` lifts that rounding to about
#: ``3e-6 s_1``, which the default would count as rank. Kept values stay far above (>= 1e-4 s_1).
FACTORIZE_RTOL = 1e-5
#: ``--budget`` defaults, as fractions of ``--epochs``: warm-up, then the rank ramp to the
#: budget, then the remaining epochs at frozen ranks.
WARMUP_FRACTION, RAMP_END_FRACTION = 1 / 6, 2 / 3


def _number(kind: type, low: float, *, strict: bool = False, high: float | None = None) -> Callable:
    """An argparse ``type``: ``kind`` in ``[low, high]`` (``(low, high]`` when ``strict``)."""
    bound = f"{'>' if strict else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {kind.__name__} {bound}, got {text!r}"
            ) from None
        ok = (value > low if strict else value >= low) and (high is None or value <= high)
        if not (ok and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options, in groups that other features extend."""
    train = parser.add_argument_group("training")
    train.add_argument(
        "--epochs", type=_number(int, 1), default=30, help="training epochs (%(default)s)"
    )
    train.add_argument(
        "--lr",
        type=_number(float, 0, strict=True),
        default=3e-3,
        help="AdamW learning rate (%(default)s)",
    )
    train.add_argument(
        "--batch-size", type=_number(int, 1), default=64, help="batch size (%(default)s)"
    )
    train.add_argument(
        "--finetune-epochs",
        type=_number(int, 0),
        default=5,
        help="epochs of plain AdamW on the factorized model (%(default)s; 0: none)",
    )
    train.add_argument(
        "--finetune-lr",
        type=_number(float, 0, strict=True),
        default=3e-4,
        help="fine-tuning learning rate (%(default)s)",
    )
    train.add_argument(
        "--threads",
        type=_number(int, 0),
        default=1,
        help="torch CPU threads (%(default)s: this network is too small to gain from more, and "
        "busy-waiting threads slow down badly on a shared machine; 0: torch's default)",
    )
    train.add_argument(
        "--timing-rounds",
        type=_number(int, 1),
        default=200,
        help="rounds of the inference timing (%(default)s; the models are interleaved in each "
        "round, the median and IQR reported, under --threads)",
    )
    train.add_argument("--seed", type=int, default=0, help="random seed (%(default)s)")
    reg = parser.add_argument_group("regularizer")
    reg.add_argument(
        "--lam",
        type=_number(float, 0),
        default=None,
        help="ProxRank strength lam, tau = lam * lr (default 1.0; not with --budget, whose rank "
        "ramp sets each threshold)",
    )
    reg.add_argument(
        "--prox",
        choices=("soft", "hard"),
        default="soft",
        help="soft: nuclear norm (shrinks the kept singular values); hard: rank penalty "
        "(keeps them); with --budget, the ramp's threshold (%(default)s)",
    )
    reg.add_argument(
        "--metric",
        choices=METRICS,
        default="euclidean",
        help="metric of the prox (%(default)s); activation and two_sided weight the Linear "
        "layers, the convolutions then use "
        + " and ".join(f"{v} ({k})" for k, v in CONV_FALLBACK.items()),
    )
    reg.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="SVD backend name passed to ProxRank (default: ProxRank's own default)",
    )
    sched = parser.add_argument_group(
        "schedule", "a rank ramp to a global budget instead of a constant --lam"
    )
    sched.add_argument(
        "--budget",
        type=_number(float, 0, strict=True, high=1),
        default=None,
        metavar="RATIO",
        help="size of the selected weight matrices after training, as a ratio of their dense "
        "size (proxrank.Schedule(budget=RATIO); e.g. 0.2)",
    )
    sched.add_argument(
        "--warmup",
        type=_number(float, 0),
        default=None,
        metavar="EPOCHS",
        help="epochs without prox (default: 0, or epochs/6 with --budget)",
    )
    sched.add_argument(
        "--ramp-end",
        type=_number(float, 0),
        default=None,
        metavar="EPOCHS",
        help="with --budget: epoch at which the budget is reached; the ranks stay frozen "
        "afterwards (default: 2 epochs/3)",
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


def prepare(args: argparse.Namespace) -> None:
    """Apply ``--quick``, fill in the schedule defaults and check the options together (the
    command line turns a ValueError into a usage error); builds a throwaway optimizer so that
    ProxRank itself validates ``--backend``, ``--metric`` and the schedule before training."""
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.budget is None:
        if args.ramp_end is not None:
            raise ValueError("--ramp-end is the end of the rank ramp to --budget; add --budget")
        args.lam = 1.0 if args.lam is None else args.lam
        args.warmup = 0.0 if args.warmup is None else args.warmup
    else:
        if args.lam is not None:
            raise ValueError(
                "--lam has no effect with --budget (the rank ramp sets each threshold from the "
                "spectrum); drop one of them"
            )
        if args.warmup is None:
            args.warmup = WARMUP_FRACTION * args.epochs
        if args.ramp_end is None:
            args.ramp_end = max(RAMP_END_FRACTION * args.epochs, args.warmup)
        if args.ramp_end < args.warmup:
            raise ValueError(
                f"--ramp-end {args.ramp_end:g} is before the end of --warmup {args.warmup:g}"
            )
    last = max(args.warmup, args.ramp_end or 0.0)
    if last > args.epochs:
        raise ValueError(
            f"--warmup/--ramp-end ({last:g} epochs) must lie within --epochs {args.epochs}"
        )
    make_optimizer(build_cnn(), args, steps_per_epoch=1).close()


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


def make_schedule(args: argparse.Namespace, steps_per_epoch: int) -> Schedule | None:
    """``--budget``/``--warmup``/``--ramp-end`` (in epochs) as a :class:`proxrank.Schedule`
    (in optimizer steps); ``None`` without them."""

    def steps(epochs: float) -> int:
        return round(epochs * steps_per_epoch)

    if args.budget is not None:
        return Schedule(
            budget=args.budget,
            warmup=steps(args.warmup),
            ramp_end=steps(args.ramp_end),
            threshold=args.prox,
        )
    return Schedule(warmup=steps(args.warmup)) if args.warmup else None


def make_optimizer(model: nn.Module, args: argparse.Namespace, steps_per_epoch: int) -> ProxRank:
    """AdamW wrapped in ProxRank with the options' strength, schedule, metric and backend, and
    diagnostics on (a history long enough to keep every step of the run)."""
    fallback = CONV_FALLBACK.get(args.metric)
    if fallback is None:
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:
        convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
        params = list(model.parameters())
        groups = [
            {"params": [p for p in params if id(p) not in convs]},
            {"params": [p for p in params if id(p) in convs], "metric": fallback},
        ]
    steps = args.epochs * steps_per_epoch
    return ProxRank(
        torch.optim.AdamW(groups, lr=args.lr),
        model,
        lam=args.lam,
        prox=args.prox,
        metric=args.metric,
        schedule=make_schedule(args, steps_per_epoch),
        diagnostics=Diagnostics(history=max(1024, steps + 2)),
        **({} if args.backend is None else {"backend": args.backend}),
    )


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean())
    model.train(was_training)
    return acc


def inference_ms(
    models: dict[str, nn.Module], X: Tensor, rounds: int = 200, warmup: int = 10
) -> dict[str, tuple[float, float]]:
    """Wall time of ``model(X)`` (eval mode, no autograd), in milliseconds, per model: the
    median and the interquartile range over ``rounds`` rounds after ``warmup`` untimed ones.
    The models are *interleaved* (each round times every model once, in an order that rotates
    from round to round), so a slow spell of a shared machine hits all of them alike; the
    caller fixes the thread count (:func:`run`)."""
    names = list(models)
    modes = {name: m.training for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            models[name].eval()
            for _ in range(warmup):
                models[name](X)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                models[name](X)
                times[name].append(time.perf_counter() - start)
    for name, mode in modes.items():
        models[name].train(mode)
    out = {}
    for name, t in times.items():
        q1, med, q3 = statistics.quantiles(t, n=4)
        out[name] = (1e3 * med, 1e3 * (q3 - q1))
    return out


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor],
    epochs: int,
    args: argparse.Namespace,
    desc: str,
) -> float:
    """``epochs`` of ``opt`` on cross-entropy in shuffled mini-batches; returns seconds. With a
    ProxRank, the progress bar shows the ranks its diagnostics recorded (once per epoch)."""
    X, y = data
    from tqdm.auto import tqdm

    batches = -(-len(X) // args.batch_size)
    bar = tqdm(total=epochs * batches, desc=desc, unit="step", disable=args.no_progress)
    loss_fn = nn.CrossEntropyLoss()
    ranks: dict[str, str] = {}
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X))
        for i in range(batches):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]

            def closure(idx: Tensor = idx) -> Tensor:  # the loss reaches the diagnostics
                opt.zero_grad()
                loss = loss_fn(model(X[idx]), y[idx])
                loss.backward()
                return loss

            loss = opt.step(closure)
            if isinstance(opt, ProxRank) and i == batches - 1:
                layers = opt.diagnostics().layers
                ranks = {"ranks": "/".join(str(lay.rank) for lay in layers) or "-"}
            bar.set_postfix(loss=f"{loss.item():.3f}", **ranks, refresh=False)
            bar.update()
    bar.close()
    return time.perf_counter() - start


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
    rows.append(
        (
            "inference, test set",
            *(
                f"{results[n]['inference_ms']:.2f} ms (IQR {results[n]['inference_iqr_ms']:.2f})"
                for n in names
            ),
        )
    )
    for layer in results[names[0]]["ranks"]:
        rows.append((f"rank {layer}", *(str(results[n]["ranks"][layer]) for n in names)))
    return _table(rows)


def verdict(snap: ModelDiagnostics) -> str:
    """The convergence verdict of the diagnostics rule, with the figures behind it."""
    rule, layers = snap.rule, snap.layers
    if not layers:
        return "converged: no (no prox step was recorded)"
    n = len(layers)
    head = (
        f"converged: {'yes' if snap.converged else 'no'} by the rule above; "
        f"{sum(lay.converged for lay in layers)}/{n} layers meet it ({rule})"
    )
    return "\n".join([head, *(f"  {reason}" for reason in snap.reasons())])


def plot_report(out: Path, tracker: Diagnostics, dense: nn.Module, steps_per_epoch: int) -> None:
    """``ranks.png``: each layer's rank after the prox against the epoch (the diagnostics'
    trajectories); ``spectra.png``: per layer, the singular values after the last prox (solid:
    the kept ones) and before it (dashed), and the dense baseline's (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = {name: t for name, t in tracker.trajectories().items() if name != "model"}
    fig, ax = plt.subplots(figsize=(7 + 2 * (len(traj) > 8), 4))
    cmap = plt.colormaps["viridis"]
    for i, (name, t) in enumerate(traj.items()):
        epochs = [(step + 1) / steps_per_epoch for step in t["step"]]
        color = f"C{i}" if len(traj) <= 10 else cmap(i / (len(traj) - 1))
        ax.plot(epochs, t["rank"], label=name, color=color)
    ax.set(xlabel="epoch", ylabel="rank after prox", title="Rank of each layer during training")
    if traj:
        ax.legend(
            fontsize="small" if len(traj) <= 8 else "x-small",
            ncols=max(1, math.ceil(len(traj) / 16)),
            **({"loc": "center left", "bbox_to_anchor": (1.0, 0.5)} if len(traj) > 8 else {}),
        )
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=120)
    plt.close(fig)

    spectra = tracker.spectra()
    snap = tracker.snapshot()
    ranks = {lay.name: lay.rank for lay in snap.layers}
    cutoffs = {  # the singular value the prox cut at (none while a rank target set it)
        lay.name: lay.cutoff for lay in snap.layers if math.isfinite(lay.cutoff) and lay.cutoff > 0
    }
    names = [t.name for t in tracker.optimizer.targets]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        weight = dense.get_parameter(name).detach()
        base = torch.linalg.svdvals(weight.reshape(weight.shape[0], -1)).tolist()
        ax.semilogy(range(1, len(base) + 1), base, "k-", lw=1, label="dense baseline")
        if name in spectra:
            before, after = spectra[name]
            kept = after[: ranks[name]]
            ax.semilogy(
                range(1, len(before) + 1),
                before,
                "C1-",
                lw=2.5,
                alpha=0.5,
                label="before last prox",
            )
            ax.semilogy(
                range(1, len(kept) + 1), kept, "C0.-", ms=3, label=f"after (kept): rank {len(kept)}"
            )
            if name in cutoffs:
                ax.axhline(cutoffs[name], color="C3", ls=":", lw=1, label="threshold")
        ax.set(title=name, xlabel="index i", ylabel="singular value s_i")
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("Singular values after training: ProxRank's last prox vs the dense baseline")
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo with parsed ``args`` (checked by :func:`prepare` first); returns the JSON
    summary it writes."""
    prepare(args)
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
    opt = make_optimizer(low, args, batches)
    adamw = torch.optim.AdamW(dense.parameters(), lr=args.lr)
    t_dense = train(dense, adamw, (Xtr, ytr), args.epochs, args, "dense AdamW")
    t_low = train(low, opt, (Xtr, ytr), args.epochs, args, "ProxRank(AdamW)")
    opt.close()
    diagnostics = opt.diagnostics()
    print(opt.report())
    print(verdict(diagnostics))
    print()

    example = Xte[:1]
    _, dense_summary = factorize(dense, example_inputs=example, rtol=FACTORIZE_RTOL)  # 'before'
    small, summary = factorize(low, example_inputs=example, rtol=FACTORIZE_RTOL)

    def column(s: FactorizeSummary, model: nn.Module, seconds: float, factor: bool) -> dict:
        return {
            "accuracy": accuracy(model, Xte, yte),
            "params": s.model_params_after if factor else s.model_params_before,
            "macs": s.totals("macs")[1 if factor else 0],
            "seconds": seconds,
            "ranks": {lay.name.removesuffix(".weight"): lay.rank for lay in s.layers},
        }

    results = {
        "dense AdamW": column(dense_summary, dense, t_dense, False),
        "ProxRank (dense)": column(summary, low, t_low, False),
        "factorized": column(summary, small, t_low, True),
    }
    if args.finetune_epochs:
        tune = torch.optim.AdamW(small.parameters(), lr=args.finetune_lr)
        t_tune = train(small, tune, (Xtr, ytr), args.finetune_epochs, args, "fine-tune factors")
        results["+ fine-tuned"] = column(summary, small, t_low + t_tune, True)
    # one timing per architecture, interleaved; the fine-tuned model is the factorized one's
    timed = {"dense AdamW": dense, "ProxRank (dense)": low, "factorized": small}
    timings = inference_ms(timed, Xte, rounds=args.timing_rounds)
    for name, result in results.items():
        result["inference_ms"], result["inference_iqr_ms"] = timings.get(
            name, timings["factorized"]
        )

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save(small, out / "model.pt")
    plot_report(out, opt.tracker, dense, batches)
    trajectories = opt.tracker.trajectories()
    report = {
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not callable(v)
        },
        "results": results,
        "factorize": summary.to_dict(),
        "diagnostics": diagnostics.to_dict(),
        "ranks_per_step": {
            name: {"step": t["step"], "rank": [int(r) for r in t["rank"]]}
            for name, t in trajectories.items()
            if name != "model"
        },
        "wall_seconds": time.perf_counter() - wall,
    }
    (out / "summary.json").write_text(json.dumps(json_safe(report), indent=2))
    print(summary)
    print()
    print(comparison_table(results))
    print(
        f"\n{summary.compression:.1f}x fewer parameters; report in {out}/ "
        f"(model.pt, summary.json, ranks.png, spectra.png); {report['wall_seconds']:.0f} s in all"
    )
    return report

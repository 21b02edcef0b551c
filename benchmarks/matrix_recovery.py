"""Deep linear networks on matrix recovery: original vs compressed (Kwon et al. 2024) vs ProxRank.

The paper's three problems (``proxrank.recovery``), float64, plain gradient descent, depth 3,
init scale 1e-2, the same step size for every network:

* ``original``: ``DeepLinear(m, n, 3, width=d)``, orthogonal init;
* ``spectral``: ``DeepLinear.spectral(surrogate, r, 3)``: width ``2r``, spectral init (the paper);
* ``compressed random``: ``DeepLinear(m, n, 3, width=2r)``, orthogonal init (ablation);
* ``ProxRank matrix``: ``ProxRank(SGD([X]), [("X", X)])`` on the matrix itself from ``X = 0``:
  proximal gradient on ``lam ||X||_*`` with lam continuation (``lam_t = s_1 / 2 * 0.98^t``,
  ``s_1`` the surrogate's top singular value) down to the threshold ``0.1 s_1``, then a debias
  phase: hard thresholding at that threshold (``prox="hard"``; no shrinkage of kept values);
* ``ProxRank layers``: ``ProxRank(SGD(net.parameters()), net, lam=5e-5)`` on the original
  network's three layers (nuclear norm of each layer, constant lam).

For each: relative recovery error ``||X - X*||_F / ||X*||_F`` over iterations and over wall
time (one PNG per problem), iterations and time to reach 1e-3, final error, time per iteration;
median and range over seeds. Wall time is the training steps only (forward, backward, optimizer
step; the error evaluation is not timed), on one thread. The invariant-subspace observation is
measured on the original network: the singular values of ``W_l(t) - W_l(0)``.

Writes ``bench-results/matrix_recovery.json`` and PNGs beside it.

    python benchmarks/matrix_recovery.py [--seeds 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import proxrank
from proxrank.recovery import Completion, DeepLinear, Factorization, Problem, Sensing

DEPTH = 3
INIT_SCALE = 1e-2
TOL = 1e-3
#: ProxRank on the network's layers: constant lam (half the initial gradient pull
#: init_scale^(depth-1) on a unit singular value, so learned directions still grow).
LAYER_LAM = 0.5 * INIT_SCALE ** (DEPTH - 1)
#: ProxRank on the matrix: continuation factor per step and final threshold / s_1.
DECAY, FLOOR = 0.98, 0.1
GAP = "sigma_2r+1/sigma_1"
OUTSIDE = "energy outside top 2r"
REGIME_CAP = 10_000
METHODS = ("original", "spectral", "compressed random", "ProxRank matrix", "ProxRank layers")


@dataclass(frozen=True)
class Setting:
    """One problem: how to draw it, its rank, step sizes and iteration budget."""

    name: str
    label: str
    draw: Callable[[int], Problem]
    rank: int
    lr: float  # gradient descent on the networks
    matrix_lr: Callable[[Problem], float]  # SGD step of ProxRank on the matrix
    iters: int


def sensing_lr(problem: Problem) -> float:
    """0.5: the sensing loss is about 1-smooth on low-rank matrices (restricted isometry); the
    full operator's 1/L (about 0.1 at 2000 measurements of 100 x 100) is 5x slower."""
    return 0.5


def settings(quick: bool) -> list[Setting]:
    if quick:
        return [
            Setting("factorization", "factorization d=30, r=2",
                    lambda s: Factorization.random(30, 30, 2, seed=s), 2, 0.2, lambda p: 1.0, 700),
            Setting("completion", "completion d=40, r=2, 40% observed",
                    lambda s: Completion.random(40, 40, 2, 0.4, seed=s), 2, 0.2,
                    lambda p: p.fraction, 700),
            Setting("sensing", "sensing d=20, r=2, 300 measurements",
                    lambda s: Sensing.random(20, 20, 2, 300, seed=s), 2, 0.2, sensing_lr, 700),
        ]  # fmt: skip
    return [
        Setting("factorization", "factorization d=100, r=5",
                lambda s: Factorization.random(100, 100, 5, seed=s), 5, 0.2, lambda p: 1.0, 1500),
        Setting("completion", "completion d=100, r=5, 30% observed",
                lambda s: Completion.random(100, 100, 5, 0.3, seed=s), 5, 0.2,
                lambda p: p.fraction, 1500),
        Setting("sensing", "sensing d=100, r=5, 2000 Gaussian measurements",
                lambda s: Sensing.random(100, 100, 5, 2000, seed=s), 5, 0.2, sensing_lr, 1000),
    ]  # fmt: skip


def regimes(quick: bool) -> list[tuple[str, Callable[[], Problem], int, float]]:
    """Where does the spectral network's speed-up come from? (label, problem, rank, init)."""
    if quick:
        return [("completion d=40, init 3e-2", lambda: Completion.random(40, 40, 2, 0.4), 2, 3e-2)]
    comp100 = lambda: Completion.random(100, 100, 5, 0.3)  # noqa: E731
    return [
        ("completion d=100, init 3e-2", comp100, 5, 3e-2),
        ("completion d=100, init 1e-2", comp100, 5, 1e-2),
        ("completion d=100, init 1e-3", comp100, 5, 1e-3),
        ("completion d=200, init 1e-2", lambda: Completion.random(200, 200, 5, 0.3), 5, 1e-2),
        ("factorization d=200, init 1e-2", lambda: Factorization.random(200, 200, 5), 5, 1e-2),
    ]


@dataclass
class Trace:
    """``errors[t]``: error of the iterate after ``t`` steps; ``times[t]``: seconds of those
    ``t`` steps."""

    errors: list[float]
    times: list[float]

    def ms_per_iter(self) -> float:
        return 1e3 * self.times[-1] / max(len(self.times) - 1, 1)

    def reach(self, tol: float = TOL) -> tuple[int | None, float | None]:
        for t, e in enumerate(self.errors):
            if e <= tol:
                return t, self.times[t]
        return None, None


def run(
    step: Callable[[], torch.Tensor],
    problem: Problem,
    iters: int,
    observe: Callable[[int], None] | None = None,
    stop: float = 0.0,
) -> Trace:
    """Call ``step`` (one training step, returning the iterate it started from) ``iters`` times,
    or until the error is at most ``stop``; only ``step`` is timed."""
    errors, times, elapsed = [], [], 0.0
    for t in range(iters):
        if observe is not None:
            observe(t)
        start = time.perf_counter()
        X = step()
        times.append(elapsed)
        elapsed += time.perf_counter() - start
        errors.append(problem.error(X))
        if not stop < errors[-1] < 1e3:  # reached, or diverged
            break
    return Trace(errors, times)


def network_step(net: DeepLinear, problem: Problem, opt: torch.optim.Optimizer):
    def step() -> torch.Tensor:
        X = net.matrix()
        loss = problem.loss(X)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return X.detach()

    return step


def matrix_step(problem: Problem, lr: float):
    """ProxRank + SGD on the matrix: soft-threshold continuation, then hard-threshold debias."""
    X = torch.nn.Parameter(torch.zeros(problem.shape, dtype=torch.float64))
    s1 = float(torch.linalg.matrix_norm(problem.surrogate(), ord=2))
    opt = proxrank.ProxRank(torch.optim.SGD([X], lr=lr), [("X", X)], lam=s1 / 2)
    group, t = opt.param_groups[0], 0

    def step() -> torch.Tensor:
        nonlocal t
        lam = s1 / 2 * DECAY**t
        if lam > FLOOR * s1:
            group["lam"] = lam
        else:  # keep s > sqrt(2 lam lr) = FLOOR s1, unshrunk
            group["prox"], group["lam"] = "hard", (FLOOR * s1) ** 2 / (2 * lr)
        t += 1
        X0 = X.detach().clone()
        loss = problem.loss(X)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return X0

    return step


def subspace_observer(net: DeepLinear, at: list[int], out: dict):
    """Record the singular values of ``W_l(t) - W_l(0)`` at the iterations ``at``."""
    initial = [layer.weight.detach().clone() for layer in net.layers]

    def observe(t: int) -> None:
        if t in at:
            out[t] = [
                torch.linalg.svdvals(layer.weight.detach() - w0).tolist()
                for layer, w0 in zip(net.layers, initial, strict=True)
            ]

    return observe


def one_seed(setting: Setting, seed: int, subspace: dict | None) -> dict[str, Trace]:
    problem = setting.draw(seed)
    m, n = problem.shape
    d, r, lr, iters = min(m, n), setting.rank, setting.lr, setting.iters
    traces = {}
    gen = torch.Generator().manual_seed(1000 + seed)

    net = DeepLinear(m, n, DEPTH, d, INIT_SCALE, dtype=torch.float64, generator=gen)
    observe = None
    if subspace is not None:
        observe = subspace_observer(net, [iters // 8, iters // 4, iters // 2, iters - 1], subspace)
    traces["original"] = run(
        network_step(net, problem, torch.optim.SGD(net.parameters(), lr=lr)), problem, iters,
        observe,
    )  # fmt: skip
    net = DeepLinear.spectral(problem.surrogate(), r, DEPTH, INIT_SCALE)
    traces["spectral"] = run(
        network_step(net, problem, torch.optim.SGD(net.parameters(), lr=lr)), problem, iters
    )
    net = DeepLinear(m, n, DEPTH, 2 * r, INIT_SCALE, dtype=torch.float64, generator=gen)
    traces["compressed random"] = run(
        network_step(net, problem, torch.optim.SGD(net.parameters(), lr=lr)), problem, iters
    )
    step = matrix_step(problem, setting.matrix_lr(problem))
    traces["ProxRank matrix"] = run(step, problem, iters)
    net = DeepLinear(m, n, DEPTH, d, INIT_SCALE, dtype=torch.float64, generator=gen)
    opt = proxrank.ProxRank(torch.optim.SGD(net.parameters(), lr=lr), net, lam=LAYER_LAM)
    assert len(opt.targets) == DEPTH
    traces["ProxRank layers"] = run(network_step(net, problem, opt), problem, iters)
    return traces


def regime(label: str, problem: Problem, rank: int, init_scale: float) -> dict:
    """Original vs spectral network on one instance (seed 0), each run until error 1e-3."""
    m, n = problem.shape
    out = {}
    nets = {
        "original": DeepLinear(m, n, DEPTH, min(m, n), init_scale, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(1000)),
        "spectral": DeepLinear.spectral(problem.surrogate(), rank, DEPTH, init_scale),
    }  # fmt: skip
    for name, net in nets.items():
        opt = torch.optim.SGD(net.parameters(), lr=0.2)
        trace = run(network_step(net, problem, opt), problem, REGIME_CAP, stop=TOL)
        it, sec = trace.reach()
        out[name] = {"iters_to_tol": it, "seconds_to_tol": sec, "ms_per_iter": trace.ms_per_iter(),
                     "last_error": trace.errors[-1]}  # fmt: skip
    o, s = out["original"], out["spectral"]
    if None not in (o["iters_to_tol"], s["iters_to_tol"]):
        out["iterations ratio"] = s["iters_to_tol"] / o["iters_to_tol"]
        out["time ratio"] = s["seconds_to_tol"] / o["seconds_to_tol"]
        print(f"| {label} | {o['iters_to_tol']} / {s['iters_to_tol']} | "
              f"{out['iterations ratio']:.2f} | {o['ms_per_iter']:.2f} / {s['ms_per_iter']:.2f} | "
              f"{out['time ratio']:.2f} | {1 / out['time ratio']:.1f}x |")  # fmt: skip
    else:
        print(f"| {label} | not reached in {REGIME_CAP} iterations (last errors "
              f"{o['last_error']:.1e} / {s['last_error']:.1e}) | | | | |")  # fmt: skip
    return out


def spread(values: list[float | None]) -> dict:
    """Median and range over seeds (None: a seed that did not reach; then no median)."""
    if any(v is None for v in values):
        reached = [v for v in values if v is not None]
        return {"median": None, "min": min(reached, default=None), "reached": len(reached),
                "values": values}  # fmt: skip
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "reached": len(values), "values": values}  # fmt: skip


def summarise(traces: list[dict[str, Trace]]) -> dict:
    out = {}
    for method in METHODS:
        runs = [t[method] for t in traces]
        reach = [tr.reach() for tr in runs]
        out[method] = {
            "iters_to_tol": spread([it for it, _ in reach]),
            "seconds_to_tol": spread([s for _, s in reach]),
            "final_error": spread([tr.errors[-1] for tr in runs]),
            "ms_per_iter": spread([tr.ms_per_iter() for tr in runs]),
        }
    return out


def median_curve(runs: list[list[float]]) -> list[float]:
    n = min(len(r) for r in runs)
    return [statistics.median(r[t] for r in runs) for t in range(n)]


def plot(setting: Setting, traces: list[dict[str, Trace]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_it, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        runs = [t[method] for t in traces]
        err = median_curve([tr.errors for tr in runs])
        lo = [min(tr.errors[t] for tr in runs) for t in range(len(err))]
        hi = [max(tr.errors[t] for tr in runs) for t in range(len(err))]
        (line,) = ax_it.semilogy(err, label=method)
        ax_it.fill_between(range(len(err)), lo, hi, color=line.get_color(), alpha=0.2)
        ax_time.semilogy(median_curve([tr.times for tr in runs]), err, label=method)
    for ax, xlabel in ((ax_it, "iteration"), (ax_time, "wall time (s, median over seeds)")):
        ax.axhline(TOL, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative error")
        ax.grid(alpha=0.3)
    ax_it.legend(fontsize=8)
    fig.suptitle(f"{setting.label}: depth {DEPTH}, init {INIT_SCALE}, lr {setting.lr}, "
                 f"{len(traces)} seeds (median, range shaded)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_subspace(s: list[float], rank: int) -> dict:
    """Figures of one spectrum ``s`` of ``W_l(t) - W_l(0)`` (descending) against ``2r``: how many
    values exceed 1e-3 and 1e-6 of the largest, ``s_(2r+1) / s_1``, and the share of
    ``||W_l(t) - W_l(0)||_F^2`` outside the top ``2r`` values."""
    top = s[0] if s[0] > 0 else 1.0
    energy = sum(v * v for v in s) or 1.0
    return {
        "above_1e-3": sum(v > 1e-3 * top for v in s),
        "above_1e-6": sum(v > 1e-6 * top for v in s),
        GAP: s[2 * rank] / top if len(s) > 2 * rank else 0.0,
        OUTSIDE: sum(v * v for v in s[2 * rank :]) / energy,
    }


def subspace_report(setting: Setting, snaps: dict, rank: int) -> dict:
    """Print and return :func:`layer_subspace` per snapshot and layer."""
    out = {}
    for t, layers in sorted(snaps.items()):
        out[t] = c = [layer_subspace(s, rank) for s in layers]
        print(
            f"  {setting.name:13s} t={t:5d} 2r={2 * rank}: values > 1e-3 / 1e-6 of the largest "
            f"per layer {[(x['above_1e-3'], x['above_1e-6']) for x in c]}; s_(2r+1)/s_1 "
            f"{', '.join(f'{x[GAP]:.1e}' for x in c)}; share of ||dW||_F^2 outside the top 2r "
            f"{', '.join(f'{x[OUTSIDE]:.1e}' for x in c)}"
        )
    return out


def plot_subspace(snaps: dict[str, dict], ranks: dict[str, int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(snaps), figsize=(5 * len(snaps), 3.8), squeeze=False)
    styles = ("-", "--", ":")
    for ax, (name, by_t) in zip(axes[0], snaps.items(), strict=True):
        for k, (t, layers) in enumerate(sorted(by_t.items())):
            for i, s in enumerate(layers):
                label = f"t={t}" if i == 0 else None
                ax.semilogy(range(1, len(s) + 1), [max(v, 1e-18) for v in s], color=f"C{k}",
                            ls=styles[i % 3], lw=0.9, label=label)  # fmt: skip
        ax.axvline(2 * ranks[name], color="black", lw=0.8, label="2r")
        ax.set_xlim(0, 6 * ranks[name])
        ax.set_xlabel("index i (solid W_1, dashed W_2, dotted W_3)")
        ax.set_ylabel("singular value of W_l(t) - W_l(0)")
        ax.set_title(f"{name} (original network, seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(s: dict, scale: float = 1.0, spec: str = ".0f") -> str:
    if s["median"] is None:
        n = len(s["values"])
        return f"not reached ({s['reached']}/{n})"
    return f"{s['median'] * scale:{spec}} [{s['min'] * scale:{spec}}, {s['max'] * scale:{spec}}]"


def table(summary: dict) -> str:
    rows = ["| method | iterations to 1e-3 | time to 1e-3 (ms) | final error | ms / iteration |",
            "|---|---|---|---|---|"]  # fmt: skip
    for method, s in summary.items():
        rows.append(
            f"| {method} | {fmt(s['iters_to_tol'])} | {fmt(s['seconds_to_tol'], 1e3)} | "
            f"{fmt(s['final_error'], spec='.1e')} | {fmt(s['ms_per_iter'], spec='.2f')} |"
        )
    return "\n".join(rows)


def verdict(summary: dict) -> dict:
    """Spectral vs original: per-seed ratios of iterations and time to 1e-3, and final errors."""
    spec, orig = summary["spectral"], summary["original"]
    ratios = {}
    for key in ("iters_to_tol", "seconds_to_tol"):
        a, b = spec[key]["values"], orig[key]["values"]
        pairs = [x / y for x, y in zip(a, b, strict=True) if x is not None and y]
        ratios[key] = spread(pairs) if len(pairs) == len(a) else {"median": None, "values": pairs}
    speedup = ratios["seconds_to_tol"]["median"]
    smaller = all(
        x < y
        for x, y in zip(spec["final_error"]["values"], orig["final_error"]["values"], strict=True)
    )
    return {
        "spectral/original iterations": ratios["iters_to_tol"],
        "spectral/original time": ratios["seconds_to_tol"],
        "more than 2x faster (median)": speedup is not None and speedup < 0.5,
        "smaller final error (every seed)": smaller,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed (smoke run)")
    parser.add_argument("--out", default="bench-results/matrix_recovery.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = 1 if args.quick else args.seeds
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "processor": platform.processor() or platform.machine(),
               "platform": platform.platform(), "torch": torch.__version__}  # fmt: skip
    print(f"torch {torch.__version__}, {machine['threads']} thread(s) of {os.cpu_count()} CPUs, "
          f"{machine['platform']}; depth {DEPTH}, init scale {INIT_SCALE}, float64, {seeds} "
          f"seed(s)")  # fmt: skip
    result: dict = {"machine": machine, "depth": DEPTH, "init_scale": INIT_SCALE, "tol": TOL,
                    "layer_lam": LAYER_LAM, "continuation": {"decay": DECAY, "floor": FLOOR},
                    "problems": {}}  # fmt: skip
    snaps_all, ranks = {}, {}
    started = time.perf_counter()
    for setting in settings(args.quick):
        snaps: dict = {}
        traces = [one_seed(setting, s, snaps if s == 0 else None) for s in range(seeds)]
        summary = summarise(traces)
        png = out.with_name(f"{out.stem}_{setting.name}.png")
        plot(setting, traces, png)
        print(f"\n## {setting.label} (lr {setting.lr}, {setting.iters} iterations, {seeds} "
              f"seeds; median [min, max])\n\n{table(summary)}")  # fmt: skip
        v = verdict(summary)
        it, sec = v["spectral/original iterations"], v["spectral/original time"]
        print(f"\nspectral / original: iterations {fmt(it, 1, '.2f')}, time {fmt(sec, 1, '.2f')}"
              f"; >2x faster: "
              f"{v['more than 2x faster (median)']}; smaller final error on every seed: "
              f"{v['smaller final error (every seed)']}  ({png})")  # fmt: skip
        print("invariant subspace (original network, seed 0):")
        ranks[setting.name], snaps_all[setting.name] = setting.rank, snaps
        result["problems"][setting.name] = {
            "label": setting.label, "rank": setting.rank, "lr": setting.lr,
            "iters": setting.iters, "seeds": seeds, "summary": summary, "verdict": v,
            "subspace": subspace_report(setting, snaps, setting.rank),
            "curves": {m: {"errors": median_curve([t[m].errors for t in traces])[::10]}
                       for m in METHODS},
        }  # fmt: skip
    print("\n## Regimes (seed 0, lr 0.2, original vs spectral, each run until 1e-3)\n\n"
          "| instance | iterations to 1e-3 (original / spectral) | ratio | ms / iteration "
          "(original / spectral) | time ratio | speed-up |\n|---|---|---|---|---|---|")
    result["regimes"] = {label: regime(label, draw(), rank, scale)
                         for label, draw, rank, scale in regimes(args.quick)}  # fmt: skip
    png = out.with_name(f"{out.stem}_subspace.png")
    plot_subspace(snaps_all, ranks, png)
    result["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(result, indent=1))
    print(f"\nsubspace plot: {png}\nwrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

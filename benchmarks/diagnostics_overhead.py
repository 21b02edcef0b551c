"""Cost of convergence diagnostics, measured side by side in one run.

1. Per matrix: ``prox_step`` against ``Diagnostics.record`` on its result (the only work
   diagnostics add to a step), interleaved, for a few shapes.
2. Whole steps:
an MLP with square and rectangular Linear layers, AdamW base, exact backend. Each repeat times
``steps`` optimizer steps (forward + backward + step) for each configuration in turn; the
figures are medians over repeats. Also prints the memory diagnostics keep (one copy of each
selected weight for the realised step) and the time of ``diagnostics()`` / ``report()``.

    python benchmarks/diagnostics_overhead.py [--width 256] [--steps 20] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import proxrank
from proxrank.functional import prox_step
from proxrank.prox import SoftThreshold
from proxrank.records import ProxStep


def build(width: int, diagnostics: bool | proxrank.Diagnostics, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width),
        torch.nn.GELU(),
        torch.nn.Linear(2 * width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, width),
        torch.nn.GELU(),
        torch.nn.Linear(width, 10),
    )
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = proxrank.ProxRank(base, model, lam=1e-2, diagnostics=diagnostics)
    return model, opt


def run(model, opt, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    return (time.perf_counter() - start) / steps


def per_matrix(shapes: list[tuple[int, int]], repeats: int) -> None:
    """Median times of prox_step and of record (on a precomputed result), interleaved."""
    for m, n in shapes:
        lin = torch.nn.Linear(n, m)
        opt = proxrank.ProxRank(
            torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=1.0, diagnostics=True
        )
        W = lin.weight.detach().clone()
        tau, state = 0.1, {}
        result = prox_step(W, tau, SoftThreshold(), opt.backend, state)
        step = ProxStep(
            name="weight",
            shape=(m, n),
            prox=SoftThreshold(),
            tau=tau,
            rank_target=None,
            lam=1.0,
            lr=0.1,
            W=W,
            Y=W,
            X=result.X,
            S=result.svd.S,
            S_new=result.S_new,
            error_bound=result.svd.error_bound,
            method=opt.backend.name,
            weight_dtype=W.dtype,
        )
        prox_times, record_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            prox_step(W, tau, SoftThreshold(), opt.backend, state)
            prox_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            opt.tracker.record(step)
            record_times.append(time.perf_counter() - start)
        p, r = statistics.median(prox_times), statistics.median(record_times)
        print(
            f"  {m:5d}x{n:<5d} prox_step {1e3 * p:9.3f} ms  record {1e3 * r:.3f} ms ({r / p:.4f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"cpu_count={torch.multiprocessing.cpu_count()}, torch threads={torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    print("per matrix (median of", 5 * args.repeats, "interleaved repeats):")
    per_matrix([(64, 64), (256, 256), (512, 256), (1024, 1024)], 5 * args.repeats)
    x = torch.randn(args.batch, args.width)
    y = torch.randint(0, 10, (args.batch,))
    configs = {
        "off": False,
        "on": True,
        "on, track_step=False": proxrank.Diagnostics(track_step=False),
    }
    built = {name: build(args.width, diag) for name, diag in configs.items()}
    for model, opt in built.values():
        run(model, opt, x, y, 2)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (model, opt) in built.items():
            times[name].append(run(model, opt, x, y, args.steps))
    base = statistics.median(times["off"])
    print(f"width {args.width}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"  diagnostics {name:22s} {1e3 * med:8.2f} ms/step  ({med / base:.3f}x off)")
    _, opt = built["on"]
    kept = sum(t.param.numel() * t.param.element_size() for t in opt.targets)
    print(f"  kept for the realised step: {kept / 2**20:.2f} MiB (= the selected weights)")
    for what, fn in (("diagnostics()", opt.diagnostics), ("report()", opt.report)):
        reps = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            reps.append(time.perf_counter() - start)
        print(f"  {what:14s} {1e3 * statistics.median(reps):.3f} ms")
    print(opt.report())


if __name__ == "__main__":
    main()

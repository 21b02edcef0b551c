"""Cost of the proximal step: every backend against the full-SVD reference.

1. Size sweep: per-step prox time (``prox_step`` through the backend, warm state) for square
   (256..4096) and 1:4 matrices at ranks 5%, 25% and 100% of full, on a matrix sequence that
   drifts a little between steps as weights do in training; relative error of each backend's
   prox against the float64 exact prox; the time also in full-size products (the time of one
   float32 ``m n min(m, n)`` product of that shape: a unit that carries across machines).
2. Growth: ``auto``'s prox of a square matrix against its size and kept rank, and as a share of
   that layer's forward + backward at 2048 and 8192 tokens per step.
3. Transformer encoder (4 x ``nn.TransformerEncoderLayer(384, 6, 1536)``, batch 16 x 128,
   AdamW; all 24 matrices, ``in_proj_weight`` as three blocks): copies trained side by side
   from the same initialisation on the same batches, one per backend (the exact one first), a
   linear rank ramp from full rank to 25% at half the run, then frozen ranks; per step the
   prox time as a share of forward + backward + AdamW, for the full-rank phase (mean rank ratio
   above 0.5), the phase at 25% and the whole run, medians and means, and in full-size
   products of all 24 matrices.

``--device cuda`` runs everything on the GPU (device synchronised around every timing) and adds
the ``polar`` backend to the encoder run. ``--clock cpu`` times by the process's CPU time instead
of the wall clock (with ``OMP_WAIT_POLICY=PASSIVE``, so that idle threads do not spin): on a
machine shared with other jobs the wall clock is meaningless. Timings are medians of repeats.
Prints tables and writes JSON to ``bench-results/``. Run: ``python benchmarks/prox_cost.py``
(``--quick`` for a small smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import proxrank
from proxrank.backends import AutoBackend, get_backend
from proxrank.functional import prox_step, svt

CLOCK = time.perf_counter
"""The benchmark's clock: wall time, or with ``--clock cpu`` the process's CPU time (all its
threads), which a machine shared with other jobs disturbs far less."""

BACKENDS = ("exact", "gram", "subspace", "auto", "polar")
POLAR_CPU_MAX = 512
"""On a CPU the polar backend (float64 products) is swept up to this size only."""


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def sync(device: torch.device) -> None:
    """Wait for queued device work (CUDA), so that host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def test_sequence(m: int, n: int, frac: float, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """``steps + 2`` float32 matrices ``L + N + drift_t``: ``L`` of rank ``frac * min(m, n)``
    with singular values in ``[1.5, 4]`` (cutoff 1), a noise tail of spectral norm ~0.3 and a
    per-step drift of relative Frobenius size 1e-3."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    r = max(1, round(frac * k))
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    Y = (U * torch.linspace(4.0, 1.5, r)) @ V.T
    if r < k:
        Y += torch.randn(m, n, generator=g) * (0.3 / (m**0.5 + n**0.5))
    size = 1e-3 * Y.norm() / (m * n) ** 0.5
    return [Y + size * torch.randn(m, n, generator=g) for _ in range(steps + 2)]


def time_backend(
    name: str, seq: list[torch.Tensor], reps: int, device: torch.device
) -> tuple[float, torch.Tensor, dict]:
    """Median seconds of one warm prox step; the last prox; the last state."""
    backend, state = get_backend(name), {}
    seq = [Y.to(device) for Y in seq]
    out = None
    for Y in seq[: len(seq) - reps]:  # warm-up: builds bases
        out = prox_step(Y, 1.0, backend=backend, state=state).X
    times = []
    for Y in seq[len(seq) - reps :]:
        sync(device)
        t0 = CLOCK()
        out = prox_step(Y, 1.0, backend=backend, state=state).X
        sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times), out.cpu(), state


def sweep(
    shapes: list[tuple[int, int]], fracs: list[float], reps: int, err_max: int, device
) -> list:
    """For matrices with a side >= 4096 the rank-independent references (exact SVD, gram) are
    timed once, at the first rank, and the full-rank case is skipped."""
    rows, once = [], {}
    for m, n in shapes:
        big = max(m, n) >= 4096
        unit = product_unit_s([(m, n)], device)
        for frac in fracs:
            if big and frac == 1.0 and min(m, n) >= 4096:
                continue
            seq = test_sequence(m, n, frac, reps)
            ref = svt(seq[1 + reps].double(), 1.0) if max(m, n) <= err_max else None
            row = {
                "shape": [m, n],
                "rank_frac": frac,
                "time_s": {},
                "products": {},
                "rel_err": {},
                "used": {},
            }
            for name in BACKENDS:
                if name == "subspace" and frac > 0.5:
                    continue  # a block as large as the matrix: not what it is for
                if name == "polar" and device.type == "cpu" and max(m, n) > POLAR_CPU_MAX:
                    continue
                if big and name in ("exact", "gram"):
                    if (m, n, name) not in once:
                        once[m, n, name] = time_backend(name, seq[1:3], 1, device)
                    t, X, state = once[m, n, name]
                else:
                    t, X, state = time_backend(name, seq, reps, device)
                row["time_s"][name] = t
                row["products"][name] = t / unit
                row["used"][name] = state.get("backend", "exact")
                if ref is not None:
                    row["rel_err"][name] = float((X.double() - ref).norm() / ref.norm())
            row["exact_over_auto"] = row["time_s"]["exact"] / row["time_s"]["auto"]
            rows.append(row)
            print_row(row)
    return rows


def print_row(row: dict) -> None:
    m, n = row["shape"]
    times = "  ".join(
        f"{b}={row['time_s'][b] * 1e3:8.1f}ms/{row['products'][b]:5.1f}prod"
        if b in row["time_s"]
        else f"{b}={'-':>19}"
        for b in BACKENDS
    )
    errs = " ".join(f"{b}:{e:.1e}" for b, e in row["rel_err"].items() if b != "exact")
    print(
        f"{m:5d}x{n:<5d} r={row['rank_frac']:4.0%}  {times}  "
        f"exact/auto={row['exact_over_auto']:6.1f}x  [{row['used']['auto']}]  err {errs}",
        flush=True,
    )


def linear_step_s(m: int, n: int, tokens: int, device: torch.device, reps: int) -> float:
    """Median seconds of forward + backward of one ``n -> m`` linear layer on ``tokens``
    tokens (``3 tokens m n`` multiply-adds: what a training step spends per matrix)."""
    W = torch.randn(m, n, device=device, requires_grad=True)
    x = torch.randn(tokens, n, device=device, requires_grad=True)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = CLOCK()
        (x @ W.mT).sum().backward()
        sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times[1:])


def growth(sizes: list[int], reps: int, device: torch.device) -> list[dict]:
    """How the prox cost grows: ``auto``'s warm prox of a square ``s x s`` matrix at kept
    ranks 5%, 25%, 100%, in ms, in full-size products, and as a share of the forward +
    backward of that matrix's linear layer at 2048 and 8192 tokens per step (the prox is
    ``O(m n k)`` per matrix, the step ``O(tokens m n)``)."""
    print(
        "\nhow the prox cost grows (auto, warm): ms | full-size products | share of the "
        "layer's fwd+bwd at 2048 / 8192 tokens"
    )
    rows = []
    for s in sizes:
        unit = product_unit_s([(s, s)], device)
        steps = {t: linear_step_s(s, s, t, device, reps) for t in (2048, 8192)}
        for frac in (0.05, 0.25, 1.0):
            t, _, _ = time_backend("auto", test_sequence(s, s, frac, reps), reps, device)
            row = {
                "size": s,
                "rank_frac": frac,
                "prox_s": t,
                "products": t / unit,
                "share": {str(k): t / v for k, v in steps.items()},
            }
            rows.append(row)
            print(
                f"{s:5d}x{s:<5d} r={frac:4.0%}  {t * 1e3:8.1f} ms  {t / unit:6.1f} prod  "
                + "  ".join(f"{k} tok {t / v:7.1%}" for k, v in steps.items()),
                flush=True,
            )
    return rows


# -- transformer encoder -------------------------------------------------------------------


def encoder(d: int, layers: int, seed: int) -> nn.Module:
    """``layers`` x ``nn.TransformerEncoderLayer(d, 6, 4 d)`` (no dropout): 6 prox matrices per
    layer (``in_proj_weight`` as three ``d x d`` blocks q, k, v; ``out_proj``, ``linear1``,
    ``linear2``)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        *[
            nn.TransformerEncoderLayer(d, 6, 4 * d, dropout=0.0, batch_first=True)
            for _ in range(layers)
        ]
    )


def value(text: str):
    """An option value: ``True``/``False``, an int or a float."""
    if text in ("True", "False"):
        return text == "True"
    return int(text) if text.lstrip("-").isdigit() else float(text)


def make(spec: str):
    """A backend from its name, or ``"auto:key=value,..."`` for AutoBackend options (to run a
    previous configuration side by side, e.g. ``auto:spectrum=False``)."""
    if ":" not in spec:
        return get_backend(spec)
    name, options = spec.split(":", 1)
    kwargs = {k: value(v) for k, v in (kv.split("=") for kv in options.split(","))}
    return {"auto": AutoBackend}[name](**kwargs)


class StampedAdamW(torch.optim.AdamW):
    """AdamW that stamps the clock when its step ends (after a device sync): ProxRank runs the
    prox after it, so the clock splits base step and prox."""

    def step(self, closure=None):  # type: ignore[override]
        out = super().step(closure)
        sync(self.param_groups[0]["params"][0].device)
        self.done = CLOCK()
        return out


class Timed:
    """A ProxRank whose step is split into the base step (forward + backward + AdamW) and the
    prox, by the clock :class:`StampedAdamW` stamps. ``target``/``ramp_end``: a linear rank
    ramp from full rank to ``target`` of it at ``ramp_end``, then frozen ranks."""

    def __init__(
        self, model: nn.Module, backend: str, target: float, ramp_end: int, lr: float
    ) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.base = StampedAdamW(model.parameters(), lr=lr)
        sched = proxrank.Schedule(target=target, ramp_end=ramp_end, ramp="linear")
        self.opt = proxrank.ProxRank(self.base, model, schedule=sched, backend=make(backend))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        sync(self.device)
        t0 = CLOCK()
        self.opt.zero_grad()
        nn.functional.mse_loss(self.model(x), y).backward()
        self.opt.step()
        sync(self.device)
        t1 = CLOCK()
        return self.base.done - t0, t1 - self.base.done


def product_unit_s(shapes: list[tuple[int, int]], device: torch.device, reps: int = 5) -> float:
    """Seconds of one float32 product ``A A^T`` (``A`` oriented short side first, so
    ``m n min(m, n)`` multiply-adds) of every shape in ``shapes``: the cost unit."""
    mats = [torch.randn(min(s), max(s), device=device) for s in shapes]
    times = []
    for _ in range(reps + 1):
        sync(device)
        t0 = CLOCK()
        for A in mats:
            A @ A.mT
        sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times[1:])


def encoder_run(
    d: int,
    layers: int,
    steps: int,
    target: float,
    batch: tuple[int, int],
    lr: float,
    device: torch.device,
    backends: tuple[str, ...] = ("exact", "auto"),
) -> dict:
    ramp_end = steps // 2
    teacher = encoder(d, layers, seed=7).to(device)
    runs = {
        name: Timed(encoder(d, layers, seed=1).to(device), name, target, ramp_end, lr)
        for name in backends
    }
    fast = runs[backends[-1]].opt
    unit = product_unit_s([t.shape2d for t in fast.targets], device)
    g = torch.Generator().manual_seed(0)
    log = []
    for step in range(steps):
        x = torch.randn(*batch, d, generator=g).to(device)
        with torch.no_grad():
            y = teacher(x)
        entry: dict = {"step": step}
        for name, run in runs.items():
            train_s, prox_s = run.step(x, y)
            entry[name] = {"train_s": train_s, "prox_s": prox_s}
        states = [i.backend_state for i in fast.matrices()]
        entry["rank_ratio"] = statistics.mean(
            st["triplets"] / min(i.shape) for st, i in zip(states, fast.matrices(), strict=True)
        )
        entry["methods"] = [str(st["backend"]) for st in states]
        entry["fallbacks"] = sum(bool(st.get("fallback")) for st in states)
        entry["max_rel_bound"] = max(
            float(st["error_bound"]) / max(float(t.param.detach().float().norm()), 1e-30)
            for st, t in zip(states, fast.targets, strict=True)
        )
        log.append(entry)
        print(
            f"step {step:3d} rank ratio {entry['rank_ratio']:.2f}  "
            + "  ".join(
                f"{n}: train {entry[n]['train_s']:.3f}s prox {entry[n]['prox_s']:.3f}s"
                for n in runs
            )
            + f"  {backends[-1]} {''.join(b[0] for b in entry['methods'])}"
            f" fallbacks {entry['fallbacks']} bound {entry['max_rel_bound']:.1e}",
            flush=True,
        )
    flat = {
        n: torch.cat([p.detach().flatten() for p in r.model.parameters()]) for n, r in runs.items()
    }
    ref = flat[backends[0]]
    summary: dict = {
        "product_unit_s": unit,
        "final_weights_rel_diff": {
            n: float((f - ref).norm() / ref.norm()) for n, f in flat.items() if n != backends[0]
        },
        "final_rank_ratio": log[-1]["rank_ratio"],
    }
    phases = {
        "full_rank": [e for e in log if e["rank_ratio"] > 0.5],
        "rank_25": [e for e in log if e["rank_ratio"] <= target + 0.02],
        "whole_run": log,
    }
    for phase, entries in phases.items():
        if not entries:
            continue
        summary[phase] = {"steps": len(entries)}
        for n in runs:
            shares = [e[n]["prox_s"] / e[n]["train_s"] for e in entries]
            summary[phase][n] = {
                "median_share": statistics.median(shares),
                "mean_share": sum(e[n]["prox_s"] for e in entries)
                / sum(e[n]["train_s"] for e in entries),
                "median_prox_s": statistics.median(e[n]["prox_s"] for e in entries),
                "median_train_s": statistics.median(e[n]["train_s"] for e in entries),
                "median_products": statistics.median(e[n]["prox_s"] for e in entries) / unit,
            }
    return {
        "config": {
            "d": d,
            "layers": layers,
            "steps": steps,
            "target": target,
            "ramp_end": ramp_end,
            "batch": list(batch),
            "lr": lr,
            "device": str(device),
        },
        "summary": summary,
        "log": log,
    }


def print_encoder(enc: dict, backends: tuple[str, ...]) -> None:
    s = enc["summary"]
    print(
        "\nprox / (forward + backward + AdamW), medians over the phase's steps (run mean in "
        "brackets);\nproducts: median prox time in full-size m n min(m, n) float32 products of "
        f"every matrix ({s['product_unit_s'] * 1e3:.1f} ms)"
    )
    print(f"{'phase':10s} {'steps':>5s}  " + "  ".join(f"{b:>26s}" for b in backends))
    for phase in ("full_rank", "rank_25", "whole_run"):
        if phase not in s:
            continue
        cells = [
            f"{s[phase][b]['median_share']:6.1%} ({s[phase][b]['mean_share']:6.1%}) "
            f"{s[phase][b]['median_products']:6.1f} prod"
            for b in backends
        ]
        print(f"{phase:10s} {s[phase]['steps']:5d}  " + "  ".join(f"{c:>26s}" for c in cells))
    diffs = ", ".join(f"{n} {v:.2e}" for n, v in s["final_weights_rel_diff"].items())
    print(f"final mean rank ratio {s['final_rank_ratio']:.2f}; final weights vs exact: {diffs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few steps (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="encoder training steps")
    ap.add_argument("--target", type=float, default=0.25, help="final rank ratio")
    ap.add_argument("--d", type=int, default=384, help="encoder width")
    ap.add_argument("--batch", type=int, nargs=2, default=(16, 128), help="sequences, tokens")
    ap.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="encoder backends, the reference first (default: exact auto; polar too on cuda)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time by wall clock or by the process's CPU time (all threads; shared machines)",
    )
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-growth", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--out", default="bench-results/prox_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    info = machine()
    info["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    if args.quick:
        shapes, fracs, d, layers, steps = [(128, 128), (64, 256)], [0.05, 0.25, 1.0], 96, 2, 6
        sizes, batch = [64, 128], (4, 32)
    else:
        shapes = [(s, s) for s in (256, 512, 1024, 2048, 4096)] + [
            (256, 1024),
            (512, 2048),
            (1024, 4096),
        ]
        fracs, d, layers, steps = [0.05, 0.25, 1.0], args.d, 4, args.steps
        sizes, batch = [256, 512, 1024], tuple(args.batch)
    result: dict = {"machine": info}
    svt(torch.randn(64, 64, device=device), 1.0)  # first-call library set-up, not timed
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_sweep:
        print(
            "\nper-step prox time (median), cutoff 1, warm state; err = relative to float64 "
            "exact; prod = time in full-size m n min(m, n) float32 products"
        )
        result["sweep"] = sweep(shapes, fracs, args.reps, err_max=1024, device=device)
        out.write_text(json.dumps(result, indent=1))
    if not args.skip_growth:
        result["growth"] = growth(sizes, args.reps, device)
        out.write_text(json.dumps(result, indent=1))
    if not args.skip_encoder:
        print(
            f"\nencoder {layers} x TransformerEncoderLayer({d}, 6, {4 * d}), batch "
            f"{batch[0]}x{batch[1]}, AdamW, linear rank ramp to {args.target:.0%} at step "
            f"{steps // 2} then frozen; backends side by side"
        )
        names = tuple(args.backends or (("exact", "auto", "polar")[: 3 if cuda else 2]))
        result["encoder"] = enc = encoder_run(
            d, layers, steps, args.target, batch, 1e-3, device, names
        )
        print_encoder(enc, names)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

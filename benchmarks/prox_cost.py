"""Cost of the proximal step: every backend against the full-SVD reference.

1. Size sweep: per-step prox time (``prox_step`` through the backend, warm state) for square
   (256..4096) and 1:4 matrices at ranks 5%, 25% and 100% of full, on a matrix sequence that
   drifts a little between steps as weights do in training; relative error of each backend's
   prox against the float64 exact prox.
2. Transformer encoder (4 layers, d=384, 6 heads, FFN 1536, batch 16 x 128, AdamW): two copies
   trained side by side from the same initialisation on the same batches, one with the exact
   backend and one with ``auto``; per step the prox time as a share of forward + backward +
   AdamW, split into the full-rank phase and the shrunk phase, and the relative distance of
   the final weights.

Timings are medians of repeats. Prints a table and writes JSON to ``bench-results/``.
Run: ``python benchmarks/prox_cost.py`` (``--quick`` for a small smoke run).
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
from proxrank.backends import get_backend
from proxrank.functional import prox_step, svt

BACKENDS = ("exact", "gram", "subspace", "auto")


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


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


def time_backend(name: str, seq: list[torch.Tensor], reps: int) -> tuple[float, torch.Tensor, dict]:
    """Median seconds of one warm prox step; the last prox; the last state."""
    backend, state = get_backend(name), {}
    out = None
    for Y in seq[: len(seq) - reps]:  # warm-up: builds bases
        out = prox_step(Y, 1.0, backend=backend, state=state).X
    times = []
    for Y in seq[len(seq) - reps :]:
        t0 = time.perf_counter()
        out = prox_step(Y, 1.0, backend=backend, state=state).X
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, state


def sweep(shapes: list[tuple[int, int]], fracs: list[float], reps: int, err_max: int) -> list:
    """For matrices with a side >= 4096 the rank-independent references (exact SVD, gram) are
    timed once, at the first rank, and the full-rank case is skipped."""
    rows, once = [], {}
    for m, n in shapes:
        big = max(m, n) >= 4096
        for frac in fracs:
            if big and frac == 1.0 and min(m, n) >= 4096:
                continue
            seq = test_sequence(m, n, frac, reps)
            ref = svt(seq[1 + reps].double(), 1.0) if max(m, n) <= err_max else None
            row = {"shape": [m, n], "rank_frac": frac, "time_s": {}, "rel_err": {}, "used": {}}
            for name in BACKENDS:
                if name == "subspace" and frac > 0.5:
                    continue  # a block as large as the matrix: not what it is for
                if big and name in ("exact", "gram"):
                    if (m, n, name) not in once:
                        once[m, n, name] = time_backend(name, seq[1:3], 1)
                    t, X, state = once[m, n, name]
                else:
                    t, X, state = time_backend(name, seq, reps)
                row["time_s"][name] = t
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
        f"{b}={row['time_s'][b] * 1e3:9.1f}ms" if b in row["time_s"] else f"{b}={'-':>11}"
        for b in BACKENDS
    )
    errs = " ".join(f"{b}:{e:.1e}" for b, e in row["rel_err"].items() if b != "exact")
    print(
        f"{m:5d}x{n:<5d} r={row['rank_frac']:4.0%}  {times}  "
        f"exact/auto={row['exact_over_auto']:6.1f}x  [{row['used']['auto']}]  err {errs}",
        flush=True,
    )


# -- transformer encoder -------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm encoder layer with a fused qkv Linear: 4 prox matrices per layer."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(nn.functional.gelu(self.ff1(self.norm2(x))))


def encoder(d: int, layers: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(d, 6, 4 * d) for _ in range(layers)])


class Timed:
    """A ProxRank whose step is split into the base step (forward+backward timed outside)
    and the prox, using the base optimizer's step post-hook."""

    def __init__(self, model: nn.Module, backend: str, lam: float, lr: float) -> None:
        self.model = model
        base = torch.optim.AdamW(model.parameters(), lr=lr)
        self.opt = proxrank.ProxRank(base, model, lam=lam, backend=backend, check_finite=False)
        self.base_done = 0.0
        base.register_step_post_hook(lambda *_: setattr(self, "base_done", time.perf_counter()))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        nn.functional.mse_loss(self.model(x), y).backward()
        self.opt.step()
        t1 = time.perf_counter()
        return self.base_done - t0, t1 - self.base_done


def encoder_run(d: int, layers: int, steps: int, lam: float, lr: float) -> dict:
    teacher = encoder(d, layers, seed=7)
    runs = {name: Timed(encoder(d, layers, seed=1), name, lam, lr) for name in ("exact", "auto")}
    g = torch.Generator().manual_seed(0)
    log = []
    for step in range(steps):
        x = torch.randn(16, 128, d, generator=g)
        with torch.no_grad():
            y = teacher(x)
        entry = {"step": step}
        for name, run in runs.items():
            train_s, prox_s = run.step(x, y)
            entry[name] = {"train_s": train_s, "prox_s": prox_s}
        states = list(runs["auto"].opt._target_state.values())
        entry["auto_rank_ratio"] = statistics.mean(
            s["triplets"] / min(t.shape2d)
            for s, t in zip(states, runs["auto"].opt._targets, strict=True)
        )
        entry["auto_backends"] = [s["backend"] for s in states]
        entry["auto_fallbacks"] = sum(bool(s.get("fallback")) for s in states)
        entry["auto_max_rel_bound"] = max(
            float(s["error_bound"]) / max(float(t.param.detach().float().norm()), 1e-30)
            for s, t in zip(states, runs["auto"].opt._targets, strict=True)
        )
        log.append(entry)
        print(
            f"step {step:3d} rank ratio {entry['auto_rank_ratio']:.2f}  "
            + "  ".join(
                f"{n}: train {entry[n]['train_s']:.3f}s prox {entry[n]['prox_s']:.3f}s"
                for n in runs
            )
            + f"  auto {''.join(b[0] for b in entry['auto_backends'])}"
            f" fallbacks {entry['auto_fallbacks']} bound {entry['auto_max_rel_bound']:.1e}",
            flush=True,
        )
    flat = {
        n: torch.cat([p.detach().flatten() for p in r.model.parameters()]) for n, r in runs.items()
    }
    summary = {
        "final_weights_rel_diff": float(
            (flat["auto"] - flat["exact"]).norm() / flat["exact"].norm()
        )
    }
    phases = {
        "full_rank": [e for e in log if e["auto_rank_ratio"] > 0.5],
        "shrunk": [e for e in log if e["auto_rank_ratio"] <= 0.25],
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
            }
    return {
        "config": {"d": d, "layers": layers, "steps": steps, "lam": lam, "lr": lr},
        "summary": summary,
        "log": log,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few steps (smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60, help="encoder training steps")
    ap.add_argument("--lam", type=float, default=40.0)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-encoder", action="store_true")
    ap.add_argument("--out", default="bench-results/prox_cost.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(" | ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    if args.quick:
        shapes, fracs, d, layers, steps = [(128, 128), (64, 256)], [0.05, 0.25, 1.0], 96, 2, 6
    else:
        shapes = [(s, s) for s in (256, 512, 1024, 2048, 4096)] + [
            (256, 1024),
            (512, 2048),
            (1024, 4096),
        ]
        fracs, d, layers, steps = [0.05, 0.25, 1.0], 384, 4, args.steps
    result: dict = {"machine": info}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_sweep:
        print(
            "\nper-step prox time (median), cutoff 1, warm state; err = relative to float64 exact"
        )
        result["sweep"] = sweep(shapes, fracs, args.reps, err_max=1024)
        out.write_text(json.dumps(result, indent=1))
    if not args.skip_encoder:
        print(f"\nencoder {layers}x d={d}, batch 16x128, AdamW; exact and auto side by side")
        result["encoder"] = enc = encoder_run(d, layers, steps, args.lam, 1e-3)
        print("\nphase        steps  exact share  auto share   (prox / (fwd+bwd+AdamW), medians)")
        for phase in ("full_rank", "shrunk", "whole_run"):
            if phase in enc["summary"]:
                s = enc["summary"][phase]
                print(
                    f"{phase:12s} {s['steps']:5d}  {s['exact']['median_share']:10.1%}  "
                    f"{s['auto']['median_share']:10.1%}   (run mean: exact "
                    f"{s['exact']['mean_share']:.1%}, auto {s['auto']['mean_share']:.1%})"
                )
        print(
            f"final weights, auto vs exact: {enc['summary']['final_weights_rel_diff']:.2e} relative"
        )
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

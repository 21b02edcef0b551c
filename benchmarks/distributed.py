"""The prox shared across ranks: per-rank prox work, time and bytes for 1 and N processes.

Workload (the issue's): ``nn.TransformerEncoder`` of 4 layers, d=384, 6 heads, FFN 1536, global
batch 16 x 128, AdamW + ``ProxRank`` (backend ``auto``). With N processes (gloo on CPU,
127.0.0.1) the model is wrapped in DDP and each rank trains on 16/N of the same global batch;
every process uses the same number of torch threads (``--threads``, default 1).

Per rank and step (medians over the steps after ``--warmup``):

* ``matrices``: the matrices whose prox this rank computed (the backend calls' batch sizes);
* ``svd``: time inside the backend (the decompositions: the work that is shared);
* ``step``: the whole ``opt.step()`` (AdamW and prox);
* ``prox``: ``opt.step()`` minus a plain AdamW step on a twin model with the same gradients
  (the whole prox: prepare, decompositions, communication, write-back; DDP only);
* ``cpu``: the same three figures in CPU time of the process (``time.process_time``): the work
  a rank does, unaffected by other processes competing for the cores (on a shared machine the
  wall-clock figures measure the load as much as the prox);
* ``sent``/``received``: tensor payload bytes of the engine's collectives
  (``ProxRank.distributed.traffic``), ``meta``: pickled metadata bytes (all-gathered).

With ``--fsdp`` the ranks shard every encoder layer with FSDP2's ``fully_shard`` instead
(the prox gathers each parameter on its owner and scatters it back). ``--metric`` and
``--diagnostics`` add what the owners compute besides the prox (gradient or optimizer-state
gathers for ``fisher``/``adam``, the diagnostics' measures).

Run: ``python benchmarks/distributed.py`` (``--quick``: d=96, 2 layers, batch 4 x 32).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import proxrank
from proxrank.backends import get_backend


class TimedBackend(proxrank.Backend):
    """A backend that counts the matrices it is given and the seconds it spends."""

    name = "timed"

    def __init__(self, inner: str) -> None:
        self.inner = get_backend(inner)
        self.matrices = 0
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def svd(self, Y, cutoff, state, min_rank=0):
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.inner.svd(Y, cutoff, state, min_rank)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.matrices += Y.shape[0]
        return out

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)


def encoder(d: int, layers: int) -> nn.TransformerEncoder:
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d, 6, 4 * d, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=timedelta(seconds=300),
        )
    try:
        model = encoder(args.d, args.layers)
        twin = copy.deepcopy(model)
        net = model
        if world > 1 and args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        elif world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model)
        backend = TimedBackend(args.backend)
        opt = proxrank.ProxRank(
            torch.optim.AdamW(net.parameters(), lr=args.lr), net, lam=args.lam, backend=backend,
            metric=args.metric, diagnostics=args.diagnostics,
        )
        twin_opt = torch.optim.AdamW(twin.parameters(), lr=args.lr)
        g = torch.Generator().manual_seed(0)
        per = args.batch // world
        rows = []
        for step in range(args.warmup + args.steps):
            mine = slice(rank * per, (rank + 1) * per)
            x = torch.randn(args.batch, args.seq, args.d, generator=g)[mine]
            y = torch.randn(args.batch, args.seq, args.d, generator=g)[mine]
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            base_s = base_cpu = float("nan")
            if not (world > 1 and args.fsdp):
                for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                    q.grad = p.grad.clone()
                t0, c0 = time.perf_counter(), time.process_time()
                twin_opt.step()
                base_s, base_cpu = time.perf_counter() - t0, time.process_time() - c0
            m0, s0, sc0 = backend.matrices, backend.seconds, backend.cpu_seconds
            if world > 1:
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            step_s, step_cpu = time.perf_counter() - t0, time.process_time() - c0
            traffic = opt.distributed.traffic if opt.distributed is not None else None
            if step >= args.warmup:
                rows.append(
                    {
                        "matrices": backend.matrices - m0,
                        "svd_s": backend.seconds - s0,
                        "step_s": step_s,
                        "prox_s": step_s - base_s,
                        "svd_cpu": backend.cpu_seconds - sc0,
                        "step_cpu": step_cpu,
                        "prox_cpu": step_cpu - base_cpu,
                        "sent": traffic.sent if traffic else 0,
                        "received": traffic.received if traffic else 0,
                        "meta": traffic.metadata if traffic else 0,
                    }
                )
        results.put((rank, {k: statistics.median(r[k] for r in rows) for k in rows[0]}))
    finally:
        if world > 1:
            dist.destroy_process_group()


def launch(world: int, args: argparse.Namespace) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=run_rank, args=(r, world, port, args, results)) for r in range(world)
    ]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=args.timeout) for _ in range(world))
    for p in procs:
        p.join()
    return [got[r] for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lam", type=float, default=40.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--quick", action="store_true", help="d=96, 2 layers, batch 4 x 32")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP for N > 1")
    ap.add_argument("--metric", default="euclidean", help="ProxRank(metric=...)")
    ap.add_argument("--diagnostics", action="store_true", help="ProxRank(diagnostics=True)")
    ap.add_argument("--out", default="bench-results/distributed.json")
    args = ap.parse_args()
    if args.quick:
        args.d, args.layers, args.batch, args.seq = 96, 2, 4, 32
    print(
        f"encoder {args.layers}x d={args.d}, FFN {4 * args.d}, global batch {args.batch}x"
        f"{args.seq}, AdamW + ProxRank(backend={args.backend!r}, lam={args.lam}, "
        f"metric={args.metric!r}, diagnostics={args.diagnostics}), "
        f"{'FSDP2' if args.fsdp else 'DDP'}, "
        f"{args.threads} thread(s) per process; medians of {args.steps} steps after "
        f"{args.warmup} warm-up steps",
        flush=True,
    )
    table = {w: launch(w, args) for w in args.worlds}
    base = table[min(args.worlds)][0]
    print(
        f"\n{'':10} {'':8} | {'wall-clock seconds':^35} | {'CPU seconds':^35} |\n"
        f"{'procs':>5} {'rank':>4} {'matrices':>8} | {'svd':>8} {'step':>8} {'prox':>8} "
        f"{'vs 1':>8} | {'svd':>8} {'step':>8} {'prox':>8} {'vs 1':>8} | "
        f"{'sent MB':>8} {'recv MB':>8} {'meta KB':>8}"
    )
    for w, ranks in table.items():
        for r, row in enumerate(ranks):
            print(
                f"{w:5d} {r:4d} {row['matrices']:8.0f} | {row['svd_s']:8.3f} "
                f"{row['step_s']:8.3f} {row['prox_s']:8.3f} "
                f"{row['prox_s'] / base['prox_s']:8.2f} | "
                f"{row['svd_cpu']:8.3f} {row['step_cpu']:8.3f} {row['prox_cpu']:8.3f} "
                f"{row['prox_cpu'] / base['prox_cpu']:8.2f} | {row['sent'] / 1e6:8.2f} "
                f"{row['received'] / 1e6:8.2f} {row['meta'] / 1e3:8.1f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "per_rank": table}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

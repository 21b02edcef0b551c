"""Compressed character-level GPT-2 at equal total steps: truncation + fine-tune vs ProxRank.

Workload (issue 12, scaled to run on 2 shared CPU cores): a character-level GPT-2 built from a
config (random init, bytes as tokens), trained on the license texts in
``/usr/share/common-licenses`` (the last 10% held out; loss in nats per character), AdamW with
10% linear warm-up and cosine decay. The dense model is pretrained once for ``--pretrain``
steps and cached under ``bench-results/lm/``. Every method then gets the same ``--steps``
more steps from that checkpoint (equal total steps ``pretrain + steps``), at each budget
(a fraction of the selected weight matrices' parameters, 30% and 12%):

* ``dense``: ``steps`` more dense steps (the uncompressed reference);
* ``trunc-euclidean + ft`` / ``trunc-fisher + ft``: :func:`proxrank.compress` (``ratio=budget``
  per layer, Euclidean or Fisher-weighted SVD), :func:`proxrank.factorize`, ``steps`` of
  fine-tuning the factors; the zero-shot loss (before fine-tuning) is reported too;
* ``isvt(lr) / isvt(fixed) + trunc + heal``: ProxRank ISVT (soft prox, constant ``lam``;
  threshold ``tau = lam * lr`` following the cosine schedule, or ``tau_lr="initial"``,
  ``tau = lam * peak lr``) for ``steps - heal`` steps, then truncation to the budget and
  ``heal`` steps of fine-tuning the factors;
* ``isvt-ramp + trunc + heal``: the same with the strength ramped linearly from 0 to ``2 lam``
  (``Schedule(lam=Ramp(...))``);
* ``schedule-soft`` / ``schedule-hard``: ``Schedule(budget=budget, ramp_end=steps/2,
  threshold="soft"|"hard")``: the ranks shrink to the budget (allocated across layers) by mid-run
  and are frozen for the second half (healing), then :func:`proxrank.factorize`;
* ``ramp-hard`` / ``ramp-hard + latent`` (the README's size recipe):
  ``Schedule(budget=budget, allocation="uniform", threshold="hard", ramp_end=ramp * steps)``,
  the same ranks as the truncations, reached by a cubic ramp and then held (projection) to the
  end, then :func:`proxrank.factorize`; ``+ latent`` with ``tau_lr="cumulative"``: the base
  optimizer updates a latent copy of each matrix and the weights are its projections (dual
  averaging). Their peak rate is ``--ramp_lr`` (5e-4; the others' 1e-3): AdamW on full matrices
  followed by a projection moves the weights more per step than AdamW on the factors;
* ``magnitude-ramp`` / ``tt-ramp`` (issue 16): the same ramp with the entry maps:
  ``prox="magnitude"``, ``Schedule(target=budget, ramp="cubic")`` (gradual magnitude pruning to
  ``budget`` of each matrix's entries), or ``prox=TTRound()`` (default TT-matrix layout, 3
  modes) with ``Schedule(target=r)``, ``r`` the largest bond rank whose TT cores hold at most
  ``budget`` of the selected weights (:func:`tt_rank`); at ``--ramp_lr``. GPT-2's ``Conv1D``
  layers are not converted by ``factorize(sparse="csr" | tt=True)`` (``nn.Linear`` only), so
  "kept" counts the stored size the diagnostics report (nonzero values without their CSR
  indices; TT cores) plus the biases, and the loss is the pruned / TT-rounded dense model's.

Per method and budget: the median validation loss over seeds with its spread (min-max), the
weight-matrix parameters kept (% of dense), wall time, and the share of the wall time spent in
``optimizer.step()`` (base step + prox; compare with ``dense``'s share for the prox's cost).

Run: ``make bench-lm`` (``python benchmarks/lm.py``), ``--quick`` for a seconds-long smoke run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import proxrank
from proxrank.tt import TTRound, tt_parameters

ROOT = Path(__file__).resolve().parents[1]
#: The full run (scaled down from the issue's 600 steps of 16 x 128 so that it stays under about
#: 15 minutes on 2 CPU cores) and the --quick smoke run (the test suite's).
FULL = dict(
    layers=4, d=256, heads=4, seq=64, batch=16, pretrain=300, steps=60, heal=20,
    seeds=2, eval_windows=128, lam=4.0, ramp=0.15, ramp_lr=5e-4,
)  # fmt: skip
QUICK = dict(
    layers=1, d=32, heads=2, seq=32, batch=8, pretrain=6, steps=6, heal=2,
    seeds=1, eval_windows=8, lam=4.0, ramp=0.15, ramp_lr=5e-4,
)  # fmt: skip
BUDGETS = (0.3, 0.12)
LR = 1e-3


def license_text() -> bytes:
    folder = Path("/usr/share/common-licenses")
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


class Data:
    """Bytes of the license texts as token ids; the last 10% held out (fixed windows)."""

    def __init__(self, seq: int, eval_windows: int) -> None:
        ids = torch.tensor(list(license_text()), dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train, held = ids[:split], ids[split:]
        self.seq = seq
        step = max(seq, (len(held) - seq - 1) // eval_windows)
        starts = torch.arange(0, len(held) - seq, step)[:eval_windows]
        self.val = torch.stack([held[s : s + seq] for s in starts])

    def batches(self, batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            starts = torch.randint(0, len(self.train) - self.seq, (batch,), generator=g)
            yield torch.stack([self.train[s : s + self.seq] for s in starts])


def build(cfg: dict) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=cfg["seq"], n_layer=cfg["layers"], n_embd=cfg["d"],
        n_head=cfg["heads"], bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@torch.no_grad()
def val_loss(model: nn.Module, data: Data) -> float:
    model.eval()
    loss = sum(float(lm_loss(model, chunk)) for chunk in data.val.split(32)) / len(
        data.val.split(32)
    )
    model.train()
    return loss


def cosine(total: int):
    warm = max(1, total // 10)
    return lambda s: (
        min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, batches) -> dict[str, float]:
    """``steps`` of ``opt`` under warm-up + cosine decay; wall time and the share of it spent
    in ``opt.step()``."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(steps))
    in_step, start = 0.0, time.perf_counter()
    model.train()
    for _ in range(steps):
        ids = next(batches)
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        if isinstance(opt, proxrank.ProxRank) and opt.tracker is not None:
            opt.tracker.observe_loss(loss)
        t = time.perf_counter()
        opt.step()
        in_step += time.perf_counter() - t
        sched.step()
    wall = time.perf_counter() - start
    return {"seconds": wall, "step_share": in_step / wall if wall else 0.0}


def pretrained(cfg: dict, data: Data, cache: Path) -> tuple[nn.Module, bool]:
    """The dense model after ``pretrain`` steps, from the cache when it holds this config."""
    key = "-".join(f"{k}{cfg[k]}" for k in ("layers", "d", "heads", "seq", "batch", "pretrain"))
    path = cache / f"dense-{key}.pt"
    model = build(cfg)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, True
    torch.manual_seed(0)
    model = build(cfg)
    train(model, torch.optim.AdamW(model.parameters(), lr=LR), cfg["pretrain"],
          data.batches(cfg["batch"], seed=10_000))  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, False


def fork(dense: nn.Module, cfg: dict) -> nn.Module:
    model = build(cfg)
    model.load_state_dict(dense.state_dict())
    return model


def matrix_params(model: nn.Module) -> tuple[int, int]:
    """(dense, factorized) parameters of the selected weight matrices, as factorize finds."""
    _, summary = proxrank.factorize(model)
    return summary.totals("params")


def truncate(
    model: nn.Module, budget: float, metric: str, data: Data, seed: int
) -> tuple[nn.Module, int]:
    """Truncate in ``metric`` to ``ratio=budget`` per layer, factorize: the small model and the
    selected matrices' parameters it keeps."""
    calib = None
    if metric != "euclidean":
        it = data.batches(8, seed=20_000 + seed)
        calib = [(ids, ids) for ids in (next(it) for _ in range(4))]

    def loss_fn(out: Any, ids: torch.Tensor) -> torch.Tensor:
        logits = out.logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    proxrank.compress(model, ratio=budget, metric=metric, data=calib, loss_fn=loss_fn)
    small, summary = proxrank.factorize(model)
    return small, summary.totals("params")[1]


def method_run(name: str, dense: nn.Module, cfg: dict, budget: float, data: Data, seed: int):
    """One method at one budget and seed: returns its result row."""
    torch.manual_seed(seed)
    batches = data.batches(cfg["batch"], seed=seed)
    steps, heal, lam = cfg["steps"], cfg["heal"], cfg["lam"]
    model = fork(dense, cfg)
    row: dict[str, Any] = {"method": name, "budget": budget, "seed": seed}
    full = matrix_params(model)[0]
    if name == "dense":
        timing = train(model, torch.optim.AdamW(model.parameters(), lr=LR), steps, batches)
        kept = full
    elif name.startswith("trunc-"):
        metric = name.removeprefix("trunc-").removesuffix(" + ft")
        small, kept = truncate(model, budget, metric, data, seed)
        row["zero_shot"] = val_loss(small, data)
        timing = train(small, torch.optim.AdamW(small.parameters(), lr=LR), steps, batches)
        model = small
    elif name.startswith("isvt"):
        schedule = None
        if name.startswith("isvt-ramp"):
            schedule = proxrank.Schedule(lam=proxrank.Ramp(0.0, 2.0, n0=0, n1=steps - heal))
        tau_lr = "initial" if "(fixed)" in name else "current"
        opt = proxrank.ProxRank(
            torch.optim.AdamW(model.parameters(), lr=LR), model, lam=lam, schedule=schedule,
            tau_lr=tau_lr, diagnostics=True,
        )  # fmt: skip
        timing = train(model, opt, steps - heal, batches)
        snap = opt.diagnostics()
        row["isvt_matrix_params"] = _selected_factorized(snap)
        row["grad_mapping_norm"] = statistics.median(lay.grad_mapping_norm for lay in snap.layers)
        opt.close()
        small, kept = truncate(model, budget, "euclidean", data, seed)
        row["before_heal"] = val_loss(small, data)
        healed = train(small, torch.optim.AdamW(small.parameters(), lr=LR), heal, batches)
        timing = {
            "seconds": timing["seconds"] + healed["seconds"],
            "step_share": (timing["step_share"] * timing["seconds"]
                           + healed["step_share"] * healed["seconds"])
            / (timing["seconds"] + healed["seconds"]),
        }  # fmt: skip
        model = small
    elif name.startswith("schedule-"):
        sched = proxrank.Schedule(
            budget=budget, ramp_end=steps // 2, threshold=name.removeprefix("schedule-")
        )
        opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=LR), model, schedule=sched)
        timing = train(model, opt, steps, batches)
        opt.close()
        kept = matrix_params(model)[1]
        model, _ = proxrank.factorize(model)
    elif name.startswith("ramp-hard"):
        sched = proxrank.Schedule(
            budget=budget, allocation="uniform", threshold="hard",
            ramp_end=round(cfg["ramp"] * steps),
        )  # fmt: skip
        tau_lr = "cumulative" if name.endswith("+ latent") else "current"
        base = torch.optim.AdamW(model.parameters(), lr=cfg["ramp_lr"])
        opt = proxrank.ProxRank(base, model, schedule=sched, tau_lr=tau_lr)
        timing = train(model, opt, steps, batches)
        opt.close()
        kept = matrix_params(model)[1]
        model, _ = proxrank.factorize(model)
    elif name in ("magnitude-ramp", "tt-ramp"):
        prox = "magnitude" if name == "magnitude-ramp" else TTRound()
        target = budget if name == "magnitude-ramp" else tt_rank(model, prox, budget)
        sched = proxrank.Schedule(target=target, ramp="cubic", ramp_end=round(cfg["ramp"] * steps))
        base = torch.optim.AdamW(model.parameters(), lr=cfg["ramp_lr"])
        opt = proxrank.ProxRank(base, model, prox=prox, schedule=sched, diagnostics=True)
        timing = train(model, opt, steps, batches)
        snap = opt.diagnostics()
        opt.close()
        biases = full - sum(lay.dense_params for lay in snap.layers)
        kept = _selected_factorized(snap) + biases
        if name == "tt-ramp":
            row["tt_rank"] = target
    else:  # pragma: no cover - the method list is fixed below
        raise ValueError(name)
    row.update(timing, val=val_loss(model, data), kept=kept / full)
    return row


def tt_rank(model: nn.Module, tt: TTRound, budget: float) -> int:
    """The largest bond rank ``r`` whose TT cores (``tt``'s layout, every bond capped at ``r``)
    hold at most ``budget`` of the entries of the matrices ProxRank selects (GPT-2's fused
    ``c_attn`` as three ``d x d`` blocks, as the prox sees it; at least 1)."""
    probe = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.0), model, lam=1.0)
    shapes = [info.shape for info in probe.matrices()]
    probe.close()

    def size(r: int) -> int:
        return sum(tt_parameters(*tt.layout(s), tt.tt_ranks(s, r)) for s in shapes)

    limit = budget * sum(m * n for m, n in shapes)
    return max([1, *(r for r in range(1, max(map(tt.full_level, shapes)) + 1) if size(r) <= limit)])


def _selected_factorized(snap: proxrank.diagnostics.ModelDiagnostics) -> int:
    return sum(min(lay.factorized_params, lay.dense_params) for lay in snap.layers)


METHODS = (
    "trunc-euclidean + ft",
    "trunc-fisher + ft",
    "isvt(lr) + trunc + heal",
    "isvt(fixed) + trunc + heal",
    "isvt-ramp + trunc + heal",
    "schedule-soft",
    "schedule-hard",
    "ramp-hard",
    "ramp-hard + latent",
    "magnitude-ramp",
    "tt-ramp",
)


FIELDS = ("val", "zero_shot", "before_heal", "kept", "seconds", "step_share", "grad_mapping_norm")


def summarise(rows: list[dict]) -> list[dict]:
    """Median and min-max over seeds per (budget, method)."""
    out = []
    order = ("dense", *METHODS)
    keys = sorted(
        {(r["budget"], r["method"]) for r in rows}, key=lambda k: (-k[0], order.index(k[1]))
    )
    for budget, method in keys:
        group = [r for r in rows if r["budget"] == budget and r["method"] == method]
        entry: dict[str, Any] = {"budget": budget, "method": method, "seeds": len(group)}
        for field in FIELDS:
            values = [r[field] for r in group if field in r]
            if values:
                entry[field] = statistics.median(values)
                entry[f"{field}_min"], entry[f"{field}_max"] = min(values), max(values)
        out.append(entry)
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| budget | method | val loss: median [min, max] | zero-shot | kept | wall s | step % |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        budget = "dense" if e["method"] == "dense" else f"{e['budget']:.0%}"
        zs = f"{e['zero_shot']:.3f}" if "zero_shot" in e else (
            f"{e['before_heal']:.3f} (before heal)" if "before_heal" in e else "-"
        )  # fmt: skip
        lines.append(
            f"| {budget} | {e['method']} | {e['val']:.3f} [{e['val_min']:.3f}, "
            f"{e['val_max']:.3f}] | {zs} | {e['kept']:.1%} | {e['seconds']:.0f} | "
            f"{e['step_share']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "lm")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (%(default)s: on a shared machine more threads busy-wait and "
        "slow down badly)",
    )
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the methods to run (default: all; dense always runs)",
    )
    ap.add_argument(
        "--seed0", type=int, default=0, help="first seed (run seeds seed0 .. seed0 + seeds - 1)"
    )
    for key, value in FULL.items():
        ap.add_argument(f"--{key}", type=type(value), default=None, help=f"(full: {value})")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: v for k, v in vars(args).items() if k in FULL and v is not None})
    methods = METHODS if args.methods is None else tuple(args.methods.split(","))
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {list(METHODS)}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = Data(cfg["seq"], cfg["eval_windows"])
    dense, cached = pretrained(cfg, data, args.out)
    rows = []
    for seed in range(args.seed0, args.seed0 + cfg["seeds"]):
        rows.append(method_run("dense", dense, cfg, 1.0, data, seed))
        for budget in BUDGETS:
            for method in methods:
                rows.append(method_run(method, dense, cfg, budget, data, seed))
                r = rows[-1]
                print(f"seed {seed} budget {budget:.0%} {method:28s} val {r['val']:.3f} "
                      f"kept {r['kept']:.1%} {r['seconds']:.0f} s", flush=True)  # fmt: skip
    summary = summarise(rows)
    report = {
        "config": cfg,
        "pretrained_val": val_loss(dense, data),
        "cached": cached,
        "rows": rows,
        "summary": summary,
        "wall_seconds": time.perf_counter() - start,
    }
    text = table(summary)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "full"
    (args.out / f"{name}.json").write_text(
        json.dumps(proxrank.diagnostics.json_safe(report), indent=1)
    )
    (args.out / f"{name}.md").write_text(text + "\n")
    print(f"config {cfg}; dense after pretraining: val {report['pretrained_val']:.3f}")
    print(text)
    print(f"{report['wall_seconds']:.0f} s in all")
    return report


if __name__ == "__main__":
    main()

"""The prox shared across ranks (proxrank.distributed): 2 processes with gloo on CPU.

Each scenario runs in two spawned processes (127.0.0.1, a free port). A hung collective fails:
gloo's timeout (60 s) raises in the workers, and the parent gives up after ``TIMEOUT`` seconds
and kills them. The references are single-process runs of the same global batch.
"""

from __future__ import annotations

import copy
import io
import math
import multiprocessing
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import proxrank
from proxrank.backends import get_backend
from proxrank.distributed import Checkpointed, assign_owners

WORLD = 2
BATCH = 8  # per rank
TIMEOUT = 150.0  # seconds for a whole scenario (process start-up included)
LR, LAM = 0.05, 2.0


class Counting(proxrank.Backend):
    """The default backend, counting the matrices it is given (``count``). Its own state, like
    a random generator's, advances with the matrices it decomposes (``draws``, checkpointed)."""

    name = "counting"

    def __init__(self, inner: str = "auto") -> None:
        self.inner = get_backend(inner)
        self.count = 0
        self.draws = 0

    def svd(self, Y, cutoff, state, min_rank=0):
        self.count += Y.shape[0]
        self.draws += Y.numel()
        return self.inner.svd(Y, cutoff, state, min_rank)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "draws": self.draws}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict.get("inner", {}))
        self.draws = state_dict.get("draws", 0)


class FailingOnRank1(proxrank.Backend):
    name = "failing"

    def svd(self, Y, cutoff, state, min_rank=0):
        if dist.get_rank() == 1:
            raise RuntimeError("no convergence here")
        return get_backend("exact").svd(Y, cutoff, state, min_rank)


def _mlp() -> nn.Sequential:
    """Four Linear layers; the last has 7 rows (an uneven Shard(0) split: 4 and 3)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 24),
        nn.Linear(24, 7),
    )


def _data(steps: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(WORLD * BATCH, 12, generator=g), torch.randn(WORLD * BATCH, 7, generator=g))
        for _ in range(steps)
    ]


def _local(data, rank):
    return [(X[rank * BATCH : (rank + 1) * BATCH], Y[rank * BATCH : (rank + 1) * BATCH])
            for X, Y in data]


def _train(model, opt, batches, closure: bool = False) -> None:
    """Steps on ``batches``, the loss handed to the diagnostics (or returned by a closure)."""
    for X, Y in batches:

        def loss_and_grad(X=X, Y=Y):
            opt.zero_grad()
            loss = F.mse_loss(model(X), Y)
            loss.backward()
            return loss

        if closure:
            opt.step(loss_and_grad)
            continue
        loss = loss_and_grad()
        if getattr(opt, "tracker", None) is not None:  # the diagnostics' loss
            opt.tracker.observe_loss(loss)
        opt.step()


def _weights(model) -> list[np.ndarray]:
    out = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(full.detach().clone().numpy())
    return out


def _encoder() -> nn.TransformerEncoder:
    """Two encoder layers: attention's in_proj is one parameter of three blocks (q, k, v)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _sequences() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(2 * WORLD, 5, 16, generator=g),) * 2 for _ in range(3)]


def _encoder_run(model, rank: int | None) -> list[np.ndarray]:
    """SGD (Adam would amplify the rounding of the key bias's zero gradient) with the prox."""
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=LR), model, lam=LAM, backend="exact"
    )
    batches = _sequences()
    if rank is not None:
        batches = [(x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2]) for x, y in batches]
    _train(model, opt, batches)
    return _weights(model)


def _budget() -> proxrank.Schedule:
    return proxrank.Schedule(budget=0.5, ramp_end=3)


def _reference(
    steps: int, metric: str = "euclidean", backend: str = "auto", **kw: Any
) -> list[np.ndarray]:
    return _reference_run(steps, metric=metric, backend=backend, lam=LAM, **kw)[0]


def _reference_run(
    steps: int, closure: bool = False, **kw: Any
) -> tuple[list[np.ndarray], proxrank.ProxRank]:
    """One process on the global batches: the weights after ``steps`` steps, the optimizer."""
    model = _mlp()
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=LR), model, **kw)
    _train(model, opt, _data()[:steps], closure)
    return _weights(model), opt


def _whole_runs() -> dict[str, dict[str, Any]]:
    """What needs whole matrices under FSDP2, each run for ``WHOLE_STEPS`` steps: metrics that
    read gradients or the base optimizer's state, diagnostics, a budget's spectra (and a
    closure: the gradients exist only after the base step, the loss comes from it), the l1
    and group-lasso maps, a magnitude budget."""
    return {
        "fisher": dict(lam=LAM, metric="fisher", diagnostics=True, backend="exact"),
        "two_sided": dict(
            lam=LAM, metric="two_sided", diagnostics=True, backend="exact", closure=True
        ),
        "adam": dict(lam=LAM, metric="adam", backend="exact"),
        "budget": dict(schedule=_budget(), diagnostics=True, backend="exact"),
        # maps on the entries: each whole matrix on its owner, the same zeros on every rank
        "l1": dict(lam=LAM, prox="l1", diagnostics=True),
        "group": dict(lam=2 * LAM, prox="group", diagnostics=True),
        # one global magnitude threshold over matrices read whole on their owners
        "magnitude_budget": dict(
            prox="magnitude", schedule=proxrank.Schedule(budget=0.3, ramp_end=2), diagnostics=True
        ),
    }


WHOLE_STEPS = 4


def _state_arrays(opt: proxrank.ProxRank) -> list[np.ndarray]:
    """Every tensor of every matrix's metric and schedule state, in order."""
    return [
        np.asarray(v)
        for m in opt.matrices()
        for state in (m.metric_state, m.schedule_state)
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ] + [np.asarray(m.schedule_state.get("rank", -1)) for m in opt.matrices()]


def _close_diagnostics(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two ``ModelDiagnostics.to_dict()`` equal up to float tolerance (NaN equal to NaN), the
    layer names up to DDP's ``module.`` prefix."""
    assert a.keys() == b.keys() and len(a["layers"]) == len(b["layers"])
    for x, y in [(a, b), *zip(a["layers"], b["layers"], strict=True)]:
        for key, u in x.items():
            v = y[key]
            if isinstance(u, float) or isinstance(v, float):
                np.testing.assert_allclose(u, v, rtol=1e-3, atol=1e-5, equal_nan=True)
            elif key == "name":
                assert u.removeprefix("module.") == v.removeprefix("module."), (u, v)
            elif key != "layers":
                assert u == v, (key, u, v)


class FailingMetric(proxrank.metrics.Metric):
    """A metric failing on rank 1 only: in its gradient statistics (``where="grad"``), which
    the owners gather, or in its weighting, which the owners compute."""

    name = "failing"
    needs_grads = True

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def observe_grad(self, state, grad):
        if self.where == "grad" and dist.get_rank() == 1:
            raise FloatingPointError("no gradient statistic here")
        return {}

    def statistics(self, state, base_state, shape):
        if self.where == "weighting" and dist.get_rank() == 1:
            raise ValueError("no weighting here")
        return None, None


# -- scenarios (run on each rank) ---------------------------------------------------------------
def _ddp(rank: int, tmp: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    local = _local(_data(), rank)
    out: dict[str, Any] = {}

    def build(backend):
        model = _mlp()
        ddp = DDP(model)
        opt = proxrank.ProxRank(
            torch.optim.AdamW(ddp.parameters(), lr=LR), ddp, lam=LAM, backend=backend,
            diagnostics=True,
        )
        return model, ddp, opt

    model, ddp, opt = build(Counting("subspace"))
    out["engine"] = opt.distributed is not None
    _train(ddp, opt, local[:3])
    if rank == 0:  # a plain state_dict on rank 0
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp / "ddp.pt")
    dist.barrier()
    _train(ddp, opt, local[3:])
    out["weights"] = _weights(model)
    out["count"] = opt.backend.count
    out["owned"] = opt.distributed.traffic.matrices
    buf = io.BytesIO()
    torch.save(opt.backend.state_dict(), buf)
    out["generators"] = buf.getvalue()
    out["report"] = opt.report()
    out["diagnostics"] = opt.diagnostics().to_dict()
    out["bases"] = [
        np.asarray(m.backend_state["basis"]) if "basis" in m.backend_state else None
        for m in opt.matrices()
    ]

    model2, ddp2, opt2 = build(Counting("subspace"))
    saved = torch.load(tmp / "ddp.pt", weights_only=False)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(ddp2, opt2, local[3:])
    out["resumed"] = _weights(model2)

    # activation statistics differ per rank: averaged, the run equals one process's
    model3 = _mlp()
    ddp3 = DDP(model3)
    opt3 = proxrank.ProxRank(
        torch.optim.AdamW(ddp3.parameters(), lr=LR), ddp3, lam=LAM, metric="activation",
        backend="exact",
    )
    _train(ddp3, opt3, local[:3])
    out["activation"] = _weights(model3)
    out["activation_state"] = [np.asarray(m.metric_state["activation"]) for m in opt3.matrices()]

    # a budget: the same spectra, allocation and ranks on every rank
    model6 = _mlp()
    ddp6 = DDP(model6)
    opt6 = proxrank.ProxRank(
        torch.optim.AdamW(ddp6.parameters(), lr=LR), ddp6, schedule=_budget(), backend="exact"
    )
    _train(ddp6, opt6, local[:4])
    out["budget"] = _weights(model6)
    out["budget_ranks"] = [m.schedule_state.get("rank") for m in opt6.matrices()]

    # a decomposition failing on rank 1 is raised on every rank; the prox changed nothing
    opt4 = proxrank.ProxRank(
        torch.optim.SGD(ddp3.parameters(), lr=LR), ddp3, lam=LAM, backend=FailingOnRank1()
    )
    opt4.zero_grad()
    F.mse_loss(ddp3(local[0][0]), local[0][1]).backward()
    try:
        opt4.step()
        out["error"] = None
    except RuntimeError as err:
        out["error"] = str(err)
    out["after_error"] = _weights(model3)

    # an input statistic only rank 1 could not store stops both ranks
    opt5 = proxrank.ProxRank(
        torch.optim.SGD(ddp3.parameters(), lr=LR), ddp3, lam=LAM, metric="activation",
        backend="exact",
    )
    with torch.no_grad():
        ddp3(local[0][0] * (1e30 if rank == 1 else 1.0))  # x^T x overflows on rank 1
    opt5.zero_grad()
    F.mse_loss(ddp3(local[0][0]), local[0][1]).backward()
    try:
        opt5.step()
        out["input_error"] = None
    except FloatingPointError as err:
        out["input_error"] = str(err)
    return out


def _fsdp(rank: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    local = _local(_data(), rank)
    out: dict[str, Any] = {}

    def build():
        model = _mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = proxrank.ProxRank(
            torch.optim.AdamW(model.parameters(), lr=LR), model, lam=LAM, backend=Counting()
        )
        return model, opt

    model, opt = build()
    out["engine"] = opt.distributed is not None and opt.distributed.sharded
    _train(model, opt, local[:3])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"))
    _train(model, opt, local[3:])
    out["weights"] = _weights(model)
    out["count"] = opt.backend.count
    out["bases"] = [
        np.asarray(m.backend_state["basis"]) if "basis" in m.backend_state else None
        for m in opt.matrices()
    ]
    out["step_count"] = opt.step_count

    model2, opt2 = build()
    msd2, osd2 = get_state_dict(model2, opt2)
    dcp.load({"model": msd2, "optim": osd2}, checkpoint_id=str(tmp / "dcp"))
    set_state_dict(model2, opt2, model_state_dict=msd2, optim_state_dict=osd2)
    out["loaded_step_count"] = opt2.step_count
    _train(model2, opt2, local[3:])
    out["resumed"] = _weights(model2)
    out["resumed_step_count"] = opt2.step_count

    # input statistics averaged across ranks, weighting applied on the owner's full matrix
    model3 = _mlp()
    fully_shard(model3)
    opt3 = proxrank.ProxRank(
        torch.optim.AdamW(model3.parameters(), lr=LR), model3, lam=LAM, metric="activation",
        backend="exact",
    )
    _train(model3, opt3, local[:3])
    out["activation"] = _weights(model3)

    # whole matrices on their owners: gradients, optimizer state, spectra, diagnostics
    for name, kw in _whole_runs().items():
        closure = kw.pop("closure", False)
        model5 = _mlp()
        for layer in model5:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model5)
        opt5 = proxrank.ProxRank(torch.optim.AdamW(model5.parameters(), lr=LR), model5, **kw)
        _train(model5, opt5, local[:WHOLE_STEPS], closure)
        out[name] = _weights(model5)
        out[name + "_state"] = _state_arrays(opt5)
        if opt5.tracker is not None:
            out[name + "_diagnostics"] = opt5.diagnostics().to_dict()
            out[name + "_report"] = opt5.report()

    # a metric failing on one rank's matrices stops both ranks before anything changes
    for where in ("grad", "weighting"):
        before = _weights(model3)
        opt6 = proxrank.ProxRank(
            torch.optim.SGD(model3.parameters(), lr=LR), model3, lam=LAM,
            metric=FailingMetric(where),
        )
        try:
            _train(model3, opt6, local[:1])
            out[f"{where}_error"] = None
        except (FloatingPointError, ValueError) as err:
            out[f"{where}_error"] = f"{type(err).__name__}: {err}"
        out[f"{where}_unchanged"] = _same(before, _weights(model3))

    # blocks of one parameter (attention's q, k, v) gathered once, on one owner
    model4 = _encoder()
    for layer in model4.layers:
        fully_shard(layer)
    fully_shard(model4)
    out["encoder"] = _encoder_run(model4, rank)

    # what the sharded engine refuses, each naming the fix
    from torch.distributed.tensor import Shard, distribute_tensor

    errors = {}

    def refused(name, build):
        try:
            build()
        except (NotImplementedError, ValueError) as err:
            errors[name] = f"{type(err).__name__}: {err}"

    def prox(**kw):
        return proxrank.ProxRank(torch.optim.AdamW(model3.parameters(), lr=LR), model3, **kw)

    refused("off", lambda: prox(lam=LAM, distributed=False))
    tp = nn.Linear(8, 6)
    mesh = model3[0].weight.device_mesh
    tp.weight = nn.Parameter(distribute_tensor(tp.weight.detach(), mesh, [Shard(1)]))
    refused(
        "tp",
        lambda: proxrank.ProxRank(torch.optim.SGD(tp.parameters(), lr=LR), tp, lam=LAM),
    )
    out["errors"] = errors
    return out


try:
    import pytorch_lightning as pl
except ImportError:  # pragma: no cover - optional
    pl = None

if pl is not None:

    class LitMLP(pl.LightningModule):
        """The MLP under Lightning; at the end of training each rank saves what it saw."""

        def __init__(self, out: str) -> None:
            super().__init__()
            self.net = _mlp()
            self.out = out

        def training_step(self, batch, _):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return proxrank.ProxRank(
                torch.optim.AdamW(self.parameters(), lr=LR), self, lam=LAM, backend=Counting()
            )

        def on_train_end(self):
            opt = self.trainer.optimizers[0]
            torch.save(
                {
                    "engine": opt.distributed is not None,
                    "count": opt.backend.count,
                    "steps": opt.step_count,
                    "weights": [p.detach().clone() for p in self.net.parameters()],
                },
                Path(self.out) / f"rank{self.global_rank}.pt",
            )


def _lightning(rank: int, tmp: Path) -> dict[str, Any]:
    """One driver process: Lightning spawns two ranks itself (strategy="ddp_spawn")."""
    X = torch.cat([X for X, _ in _data()])
    Y = torch.cat([Y for _, Y in _data()])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=WORLD, strategy="ddp_spawn", logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp,
    )
    trainer.fit(LitMLP(str(tmp)), loader)
    return {}


class _HFModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": F.mse_loss(out, labels), "logits": out}


class _HFData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = torch.cat([X for X, _ in _data()])
        self.y = torch.cat([Y for _, Y in _data()])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf(rank: int, tmp: Path) -> dict[str, Any]:
    """The HF Trainer on ranks launched as torchrun launches them (environment variables):
    its TrainingArguments initialise the process group, before the optimizer is built."""
    import transformers

    args = transformers.TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=BATCH, num_train_epochs=1,
        save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
        disable_tqdm=True, ddp_backend="gloo",
    )
    model = _HFModel()
    opt = proxrank.ProxRank(
        torch.optim.AdamW(model.parameters(), lr=LR), model, lam=LAM, backend=Counting()
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_HFData(), optimizers=(opt, sched)
    )
    trainer.train()
    return {
        "engine": opt.distributed is not None,
        "count": opt.backend.count,
        "steps": opt.step_count,
        "weights": _weights(model),
    }


def _ddp_l1(rank: int, tmp: Path) -> dict[str, Any]:
    """prox="l1" (a map on the entries, no backend) shared across DDP ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _mlp()
    ddp = DDP(model)
    opt = proxrank.ProxRank(
        torch.optim.AdamW(ddp.parameters(), lr=LR), ddp, lam=LAM, prox="l1", diagnostics=True
    )
    _train(ddp, opt, _local(_data(), rank))
    return {
        "weights": _weights(model),
        "owned": opt.distributed.traffic.matrices,
        "report": opt.report(),
    }


SCENARIOS = {"ddp": _ddp, "fsdp": _fsdp, "lightning": _lightning, "hf": _hf, "ddp_l1": _ddp_l1}
#: How a scenario's ranks join the process group: we initialise it, or the framework does
#: (from torchrun's environment variables), or the one process is a driver spawning its own.
LAUNCH = {"ddp": "gloo", "fsdp": "gloo", "lightning": "driver", "hf": "env", "ddp_l1": "gloo"}


def _worker(scenario: str, rank: int, world: int, port: int, tmp: str, results: Any) -> None:
    try:
        torch.set_num_threads(1)
        if LAUNCH[scenario] == "env":
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
            )
        if LAUNCH[scenario] == "gloo":
            dist.init_process_group(
                "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                timeout=timedelta(seconds=60),
            )
        results.put((rank, True, SCENARIOS[scenario](rank, Path(tmp))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, tmp: Path, world: int = WORLD) -> list[dict[str, Any]]:
    """Run a scenario on ``world`` spawned ranks; each rank's result, or the first failure."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(scenario, r, world, port, str(tmp), results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, Any] = {}
    deadline = time.monotonic() + TIMEOUT
    try:
        while len(got) < world:
            try:
                rank, ok, payload = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{scenario}: no result from ranks {set(range(world)) - set(got)} "
                            f"within {TIMEOUT:.0f} s (a hung collective?)")
            if not ok:
                pytest.fail(f"{scenario}: rank {rank} failed:\n{payload}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _close(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_shares_the_prox_and_matches_one_process(tmp_path):
    r0, r1 = _launch("ddp", tmp_path)
    assert r0["engine"] and r1["engine"]
    # ranks bit-identical: weights, warm bases, diagnostics
    assert _same(r0["weights"], r1["weights"])
    assert r0["report"] == r1["report"]
    assert r0["generators"] == r1["generators"]  # the backend's own state: rank 0's
    for a, b in zip(r0["bases"], r1["bases"], strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    # the same as one process on the global batch, diagnostics (measured by each matrix's
    # owner, the loss averaged over the ranks) included
    weights, ref = _reference_run(5, lam=LAM, backend="subspace", diagnostics=True)
    _close(r0["weights"], weights)
    assert repr(r0["diagnostics"]) == repr(r1["diagnostics"])
    _close_diagnostics(r0["diagnostics"], ref.diagnostics().to_dict())
    # each rank proxes its share: 4 matrices a step, 5 steps
    assert r0["count"] + r1["count"] == 4 * 5
    assert max(r0["count"], r1["count"]) < 4 * 5
    assert r0["owned"] + r1["owned"] == 4
    # resume from rank 0's plain state_dict is exact
    assert _same(r0["resumed"], r0["weights"]) and _same(r1["resumed"], r1["weights"])
    # activation statistics: averaged across ranks, equal to one process's
    assert _same(r0["activation_state"], r1["activation_state"])
    assert _same(r0["activation"], r1["activation"])
    _close(r0["activation"], _reference(3, metric="activation", backend="exact"))
    # a budget schedule: ranks agree, and agree with one process
    assert r0["budget_ranks"] == r1["budget_ranks"] and any(r0["budget_ranks"])
    assert _same(r0["budget"], r1["budget"])
    _close(r0["budget"], _reference(4, backend="exact", schedule=_budget()))
    # a failure on one rank is raised on both; the prox wrote nothing (the base step did)
    assert "no convergence here" in r0["error"] and "no convergence here" in r1["error"]
    assert "on rank 1" in r0["error"]
    assert _same(r0["after_error"], r1["after_error"])
    assert "on rank 1: weight 'module.0.weight'" in r0["input_error"]
    assert r0["input_error"] == r1["input_error"]


@pytest.mark.slow
def test_ddp_shares_the_l1_prox_and_matches_one_process(tmp_path):
    r0, r1 = _launch("ddp_l1", tmp_path)
    assert _same(r0["weights"], r1["weights"]) and r0["report"] == r1["report"]
    assert r0["owned"] + r1["owned"] == 4 and min(r0["owned"], r1["owned"]) > 0
    _close(r0["weights"], _reference(5, prox="l1"))
    assert any((w == 0).any() for w in r0["weights"])


@pytest.mark.slow
def test_fsdp2_shards_the_prox_and_resumes_from_a_distributed_checkpoint(tmp_path):
    r0, r1 = _launch("fsdp", tmp_path)
    assert r0["engine"] and r1["engine"]
    assert _same(r0["weights"], r1["weights"])
    for a, b in zip(r0["bases"], r1["bases"], strict=True):
        assert (a is None and b is None) or np.array_equal(a, b)
    _close(r0["weights"], _reference(5))
    assert r0["count"] + r1["count"] == 4 * 5
    assert max(r0["count"], r1["count"]) < 4 * 5
    # torch.distributed.checkpoint round-trips proxrank's state; resuming is exact
    assert r0["loaded_step_count"] == 3
    assert r0["resumed_step_count"] == r0["step_count"] == 5
    assert _same(r0["resumed"], r0["weights"])
    assert _same(r0["activation"], r1["activation"])
    _close(r0["activation"], _reference(3, metric="activation", backend="exact"))
    assert _same(r0["encoder"], r1["encoder"])
    _close(r0["encoder"], _encoder_run(_encoder(), None))
    # gradient and optimizer-state metrics, diagnostics, budgets: ranks bit-identical, equal to
    # one process
    for name, kw in _whole_runs().items():
        weights, opt = _reference_run(WHOLE_STEPS, **kw)
        assert _same(r0[name], r1[name]), name
        _close(r0[name], weights)
        assert _same(r0[name + "_state"], r1[name + "_state"]), name
        _close(r0[name + "_state"], _state_arrays(opt))
        if opt.tracker is not None:
            assert r0[name + "_report"] == r1[name + "_report"]
            assert repr(r0[name + "_diagnostics"]) == repr(r1[name + "_diagnostics"])
            assert r0[name + "_diagnostics"]["loss"] is not None  # the ranks' mean
            _close_diagnostics(r0[name + "_diagnostics"], opt.diagnostics().to_dict())
    for name in ("l1", "group"):  # the maps zeroed rows (units): no silent identity
        assert any((w == 0).all(axis=-1).any() for w in r0[name] if w.ndim == 2), name
    kept = sum(int((w != 0).sum()) for w in r0["magnitude_budget"] if w.ndim == 2)
    assert kept == math.ceil(0.3 * sum(w.size for w in r0["magnitude_budget"] if w.ndim == 2))
    ranks = [int(r) for r in r0["budget_state"][-4:]]
    assert any(0 <= r < k for r, k in zip(ranks, (12, 24, 24, 7), strict=True)), ranks
    for where, message in (("grad", "no gradient statistic here"), ("weighting", "no weighting")):
        e0, e1 = r0[f"{where}_error"], r1[f"{where}_error"]
        assert e0 is not None and message in e0 and "on rank 1" in e0, e0
        assert e1 is not None and message in e1, e1
        assert r0[f"{where}_unchanged"] and r1[f"{where}_unchanged"]
    errors = r0["errors"]
    assert errors == r1["errors"]
    assert "ValueError: weight '0.weight' is sharded" in errors["off"]
    assert "(Shard(dim=1),)" in errors["tp"] and "tensor parallelism" in errors["tp"]


@pytest.mark.slow
@pytest.mark.skipif(pl is None, reason="needs pytorch_lightning")
def test_lightning_ddp_shares_the_prox(tmp_path):
    _launch("lightning", tmp_path, world=1)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    steps = len(_data())  # 5 global batches of WORLD * BATCH, split by Lightning's sampler
    assert r0["engine"] and r1["engine"] and r0["steps"] == r1["steps"] == steps
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"], strict=True))
    assert r0["count"] + r1["count"] == 4 * steps and max(r0["count"], r1["count"]) < 4 * steps


@pytest.mark.slow
def test_hf_trainer_ddp_shares_the_prox(tmp_path):
    pytest.importorskip("transformers")
    r0, r1 = _launch("hf", tmp_path)
    steps = len(_data())
    assert r0["engine"] and r1["engine"] and r0["steps"] == r1["steps"] == steps
    assert _same(r0["weights"], r1["weights"])
    assert r0["count"] + r1["count"] == 4 * steps and max(r0["count"], r1["count"]) < 4 * steps


# -- in one process -----------------------------------------------------------------------------
@given(st.lists(st.floats(0, 1e6), max_size=30), st.integers(1, 8))
def test_owners_are_balanced(costs, world):
    owners = assign_owners(costs, world)
    assert len(owners) == len(costs) and all(0 <= o < world for o in owners)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world)]
    assert max(loads) <= sum(costs) / world + max(costs, default=0) + 1e-6
    assert assign_owners(costs, world) == owners


def test_assign_owners_needs_a_rank():
    with pytest.raises(ValueError, match="world"):
        assign_owners([1.0], 0)


def test_distributed_option():
    model = _mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    assert proxrank.ProxRank(base, model, lam=0.1).distributed is None  # no process group
    with pytest.raises(ValueError, match="init_process_group"):
        proxrank.ProxRank(base, model, lam=0.1, distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        proxrank.ProxRank(base, model, lam=0.1, distributed="yes")
    assert proxrank.ProxRank(base, model, lam=0.1, distributed=False).distributed is None


def test_diagnostics_recorded_from_the_owners_measures():
    """A rank recording the owner's measures (without the matrices) holds the same figures as
    the owner and as one process; it drops its ``X_prev``, so when it owns the matrix again
    its realised step is unknown (NaN), not measured from a stale output."""
    from dataclasses import replace

    from proxrank.prox import SoftThreshold
    from proxrank.records import ProxStep

    w = nn.Parameter(torch.zeros(4, 3))
    trackers = [proxrank.Diagnostics() for _ in range(3)]
    opts = [  # each tracker bound to an optimizer (kept alive here)
        proxrank.ProxRank(torch.optim.SGD([w], lr=0.1), [("w", w)], lam=1.0, diagnostics=d)
        for d in trackers
    ]
    alone, owner, other = trackers
    g = torch.Generator().manual_seed(0)
    outputs = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(5)]

    def prox_step(t):
        W, X = outputs[t] + 0.1, outputs[t + 1]
        return ProxStep(
            name="w", shape=(4, 3), prox=SoftThreshold(), tau=0.1, rank_target=None, lam=1.0,
            lr=0.1, W=W, Y=W, X=X, S=torch.linalg.svdvals(W), S_new=torch.linalg.svdvals(X),
            error_bound=torch.tensor(0.0), method="exact", weight_dtype=torch.float64,
        )

    for t in range(3):  # "other" owns the matrix at step 0, "owner" at steps 1 and 2
        step = prox_step(t)
        alone.record(step)
        measurer, recorder = (other, owner) if t == 0 else (owner, other)
        measured = measurer.measure(step)
        measurer.record(step, measured)
        recorder.record(replace(step, W=None, Y=None, X=None), measured)
        for d in trackers:
            d.end_step()
    assert repr(alone.snapshot()) == repr(owner.snapshot()) == repr(other.snapshot())
    assert owner.snapshot().layers[0].relative_step > 0
    step = prox_step(3)
    assert not owner.measure(step).norms[3].isnan()
    assert other.measure(step).norms[3].isnan()
    assert len(opts) == 3


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = _mlp()
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=LR), model, lam=LAM)
    _train(model, opt, _data()[:1])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt.step_count == 1


def test_state_survives_get_state_dict(tmp_path):
    """``get_state_dict`` keeps only ``state`` and ``param_groups``: proxrank's state rides in
    the last group, and ``set_state_dict`` restores it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _mlp()
    opt = proxrank.ProxRank(torch.optim.AdamW(model.parameters(), lr=LR), model, lam=LAM)
    _train(model, opt, _data()[:2])
    plain = opt.state_dict()
    assert plain["param_groups"][0]["proxrank"] == Checkpointed(plain["proxrank"])
    _, osd = get_state_dict(model, opt)
    assert "proxrank" not in osd and isinstance(osd["param_groups"][0]["proxrank"], Checkpointed)

    model2 = _mlp()
    opt2 = proxrank.ProxRank(torch.optim.AdamW(model2.parameters(), lr=LR), model2, lam=LAM)
    osd = copy.deepcopy(osd)  # as from a file: not the live tensors of opt
    set_state_dict(model2, opt2, model_state_dict=model.state_dict(), optim_state_dict=osd)
    assert opt2.step_count == opt.step_count == 2
    assert "proxrank" not in opt2.param_groups[0]
    for a, b in zip(opt.matrices(), opt2.matrices(), strict=True):
        assert a.backend_state.keys() == b.backend_state.keys()
    _train(model, opt, _data()[2:4])
    _train(model2, opt2, _data()[2:4])
    assert _same(_weights(model), _weights(model2))

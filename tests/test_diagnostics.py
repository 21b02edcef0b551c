"""Convergence diagnostics: every figure against an independent float64 numpy computation,
the verdict on a convex problem with a closed-form answer, bounded history, loggers, plot."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import proxrank
from proxrank.backends import Backend, SVDResult
from proxrank.diagnostics import History, format_report


# -- a problem with a closed form: f(W) = 0.5 ||W - Y||_F^2 --------------------------------------
def quadratic(Y: torch.Tensor, W0: torch.Tensor, lr: float, lam: float, **kw):
    """SGD + prox on f(W) = 0.5||W - Y||^2; minimiser svt(Y, lam)."""
    w = torch.nn.Parameter(W0.clone())
    opt = proxrank.ProxRank(torch.optim.SGD([w], lr=lr), [("w", w)], lam=lam, **kw)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (w - Y).square().sum()
        loss.backward()
        return loss

    return w, opt, closure


def np_prox(W: np.ndarray, tau: float, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference prox in float64 numpy: (X, s, s_new)."""
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    s_new = np.maximum(s - tau, 0) if kind == "soft" else np.where(s > np.sqrt(2 * tau), s, 0)
    return (U * s_new) @ Vt, s, s_new


def np_erank(s: np.ndarray) -> float:
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@settings(max_examples=15, deadline=None)
@given(
    m=st.integers(2, 7),
    n=st.integers(2, 7),
    lam=st.floats(0.05, 3.0),
    lr=st.floats(0.1, 1.0),
    kind=st.sampled_from(["soft", "hard"]),
    seed=st.integers(0, 2**16),
)
def test_every_figure_matches_numpy(m, n, lam, lr, kind, seed):
    g = torch.Generator().manual_seed(seed)
    Y = torch.randn(m, n, generator=g, dtype=torch.float64) * 2
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    w, opt, closure = quadratic(Y, W0, lr, lam, prox=kind, diagnostics=True)
    tau = lam * lr
    Yn, W = Y.numpy(), W0.numpy()
    prev, prev_reg, ranks = None, None, []
    for _ in range(3):
        loss = 0.5 * ((W - Yn) ** 2).sum()
        W_in = W - lr * (W - Yn)
        X, _, s_new = np_prox(W_in, tau, kind)
        opt.step(closure)
        snap = opt.diagnostics()
        (lay,) = snap.layers
        rank = int((s_new > 0).sum())
        ranks.append(rank)
        assert lay.name == "w" and lay.shape == (m, n)
        assert lay.rank == rank
        assert lay.tau == pytest.approx(tau)
        assert lay.effective_rank == pytest.approx(np_erank(s_new), rel=1e-9, abs=1e-12)
        assert lay.nuclear_norm == pytest.approx(s_new.sum(), rel=1e-9, abs=1e-12)
        removed = 1 - (s_new**2).sum() / (W_in**2).sum()
        assert lay.energy_removed == pytest.approx(removed, rel=1e-9, abs=1e-12)
        assert lay.prox_residual == pytest.approx(np.linalg.norm(X - W_in), rel=1e-9, abs=1e-12)
        if prev is None:
            assert math.isnan(lay.grad_mapping_norm) and math.isnan(lay.relative_step)
        else:
            step = np.linalg.norm(X - prev)
            assert lay.grad_mapping_norm == pytest.approx(step / lr, rel=1e-7, abs=1e-12)
            scale = max(np.linalg.norm(X), np.linalg.norm(prev))
            expected_rel = step / scale if scale > 0 else 0.0
            assert lay.relative_step == pytest.approx(expected_rel, rel=1e-7, abs=1e-12)
        since = 0
        while since + 1 < len(ranks) and ranks[-since - 2] == ranks[-1]:
            since += 1
        assert lay.steps_since_rank_change == since
        assert lay.factorized_params == rank * (m + n) and lay.dense_params == m * n
        assert (lay.backend, lay.error_bound) == ("exact", 0.0)
        assert snap.dense_params == m * n
        assert snap.factorized_params == min(m * n, rank * (m + n))
        f_params = min(m * n, rank * (m + n))
        assert snap.compression_ratio == (m * n / f_params if f_params else math.inf)
        assert snap.loss == pytest.approx(loss)
        if prev_reg is None:
            assert snap.objective is None
        else:
            assert snap.objective == pytest.approx(loss + prev_reg, rel=1e-9)
        prev_reg = lam * (s_new.sum() if kind == "soft" else rank)
        prev, W = X, X
    np.testing.assert_allclose(w.detach().numpy(), W, atol=1e-10)


def test_conv_weight_is_diagnosed_as_its_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = proxrank.ProxRank(
        torch.optim.SGD(conv.parameters(), lr=0.1), conv, lam=1.0, diagnostics=True
    )
    conv(torch.randn(2, 3, 6, 6)).sum().backward()
    W_in = (conv.weight - 0.1 * conv.weight.grad).detach().reshape(8, 27).double().numpy()
    opt.step()
    (lay,) = opt.diagnostics().layers
    _, _, s_new = np_prox(W_in, 0.1, "soft")
    assert lay.shape == (8, 27) and lay.rank == int((s_new > 0).sum())
    assert lay.nuclear_norm == pytest.approx(s_new.sum(), rel=1e-4)
    # conv bias stays dense: 8 parameters beside the 216 of the kernel
    assert opt.diagnostics().dense_params == 8 * 27 + 8


# -- the verdict ---------------------------------------------------------------------------------
def test_converges_on_convex_problem_with_closed_form():
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(12, 9, generator=g, dtype=torch.float64)
    lam, lr = 0.8, 0.5
    rule = proxrank.ConvergenceRule(patience=20, tol=1e-9)
    w, opt, closure = quadratic(
        Y,
        torch.zeros(12, 9, dtype=torch.float64),
        lr,
        lam,
        diagnostics=proxrank.Diagnostics(rule=rule),
    )
    opt.step(closure)
    assert not opt.diagnostics().converged
    for _ in range(10):
        opt.step(closure)
    assert not opt.diagnostics().converged  # still moving: linear rate (1 - lr) per step
    for _ in range(150):
        opt.step(closure)
    snap = opt.diagnostics()
    (lay,) = snap.layers
    W_star = proxrank.functional.svt(Y, lam)
    torch.testing.assert_close(w.detach(), W_star, atol=1e-12, rtol=0)
    assert lay.grad_mapping_norm < 1e-12  # the stationarity measure goes to zero
    # the prox residual goes to lr ||grad f(W*)|| = lr ||W* - Y||, not to zero
    assert lay.prox_residual == pytest.approx(lr * float(torch.linalg.norm(W_star - Y)))
    assert lay.rank == int(torch.linalg.matrix_rank(W_star))
    assert lay.converged and snap.converged
    # objective: F(W*) = f(W*) + lam ||W*||_*
    F_star = 0.5 * float((W_star - Y).square().sum()) + lam * float(
        torch.linalg.svdvals(W_star).sum()
    )
    assert snap.objective == pytest.approx(F_star, rel=1e-10)


def test_gradient_mapping_decreases_monotonically_on_convex_problem():
    g = torch.Generator().manual_seed(2)
    Y = torch.randn(10, 10, generator=g, dtype=torch.float64)
    _, opt, closure = quadratic(
        Y, torch.zeros(10, 10, dtype=torch.float64), 0.3, 0.5, diagnostics=True
    )
    for _ in range(40):
        opt.step(closure)
    traj = opt.tracker.trajectories()["w"]["grad_mapping_norm"][1:]
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(traj))
    objective = opt.tracker.trajectories()["model"]["objective"][1:]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(objective))


def test_stays_unconverged_on_a_noisy_run():
    torch.manual_seed(0)
    Y = torch.randn(8, 6, dtype=torch.float64)
    rule = proxrank.ConvergenceRule(patience=10, tol=1e-3)
    w = torch.nn.Parameter(torch.zeros(8, 6, dtype=torch.float64))
    opt = proxrank.ProxRank(
        torch.optim.SGD([w], lr=0.1),
        [("w", w)],
        lam=0.3,
        diagnostics=proxrank.Diagnostics(rule=rule),
    )
    for _ in range(300):
        opt.zero_grad()
        noisy = Y + 0.5 * torch.randn_like(Y)  # a stochastic gradient: never settles
        (0.5 * (w - noisy).square().sum()).backward()
        opt.step()
        assert not opt.diagnostics().converged
    assert opt.diagnostics().layers[0].relative_step > rule.tol


def test_rank_change_resets_the_counter():
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(6, 6, generator=g, dtype=torch.float64)
    rule = proxrank.ConvergenceRule(patience=5, tol=1.0)  # rank is the only criterion here
    _, opt, closure = quadratic(
        Y,
        torch.zeros(6, 6, dtype=torch.float64),
        1.0,
        0.1,
        diagnostics=proxrank.Diagnostics(rule=rule),
    )
    for _ in range(7):
        opt.step(closure)
    assert opt.diagnostics().layers[0].steps_since_rank_change == 6
    assert opt.diagnostics().converged
    for group in opt.param_groups:
        group["lam"] = 100.0  # kills every singular value: the rank changes
    opt.step(closure)
    lay = opt.diagnostics().layers[0]
    assert lay.rank == 0 and lay.steps_since_rank_change == 0 and not lay.converged


# -- backends that report partial spectra ----------------------------------------------------------
class TopKBackend(Backend):
    """Returns only the triplets above the cutoff and reports itself in the matrix state."""

    name = "topk"

    def svd(self, Y, cutoff, state, min_rank=0):
        """The optimizer calls backends on a batch ``(b, m, n)`` with one state dict each."""
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        k = max(int((S > cutoff.unsqueeze(-1)).sum(-1).max()), min_rank, 1)
        for entry in state:
            entry["backend"], entry["error_bound"] = "topk-test", 0.25
        bound = torch.zeros(Y.shape[:-2], dtype=Y.dtype)
        return SVDResult(U[..., :k], S[..., :k], Vh[..., :k, :], bound)


def test_partial_backend_state_and_full_spectrum_on_request():
    g = torch.Generator().manual_seed(4)
    Y = torch.randn(9, 7, generator=g, dtype=torch.float64)
    diag = proxrank.Diagnostics(full_spectrum_every=2)
    _, opt, closure = quadratic(
        Y, torch.zeros(9, 7, dtype=torch.float64), 1.0, 1.0, backend=TopKBackend(), diagnostics=diag
    )
    opt.step(closure)  # step 0: full spectrum computed
    lay = opt.diagnostics().layers[0]
    assert (lay.backend, lay.error_bound) == ("topk-test", 0.25)
    s = np.linalg.svd(Y.numpy(), compute_uv=False)
    s_new = np.maximum(s - 1.0, 0)
    assert lay.effective_rank == pytest.approx(np_erank(s_new), rel=1e-9)
    before, _ = diag.spectra()["w"]
    np.testing.assert_allclose(before, s, rtol=1e-10)
    opt.step(closure)  # step 1: only what the backend returned
    before, _ = diag.spectra()["w"]
    assert len(before) == lay.rank < 7


# -- history ---------------------------------------------------------------------------------------
def test_history_memory_is_bounded_over_1e5_steps():
    h = History(capacity=100)
    for step in range(100_000):
        if h.wants():
            h.offer(step, step)
        else:
            h.offer(step)
        assert len(h) < 100
    steps = [s for s, _ in h.items()]
    assert [item for _, item in h.items()] == steps
    assert steps[0] == 0 and steps[-1] >= 100_000 - h.stride
    gaps = set(np.diff(steps).tolist())
    assert gaps == {h.stride}  # evenly spaced over the whole run
    assert h.stride <= 2 * 100_000 / 100


@settings(max_examples=20, deadline=None)
@given(capacity=st.integers(2, 40), n=st.integers(0, 3000))
def test_history_is_bounded_and_evenly_spaced(capacity, n):
    h = History(capacity)
    for step in range(n):
        h.offer(step, step if h.wants() else None)
    steps = [s for s, _ in h.items()]
    assert len(h) < capacity and [item for _, item in h.items()] == steps
    assert steps == list(range(0, n, h.stride))[: len(steps)]
    if n:
        assert steps[-1] > n - 1 - h.stride  # the most recent stride is covered


def test_objective_needs_a_known_regularizer_and_a_loss():
    class Shrink(proxrank.prox.ProxMap):  # a thresholding map with no R known to diagnostics
        name = "shrink"

        def cutoff(self, tau):
            return tau

        def __call__(self, s, tau):
            return torch.where(s > tau, 0.5 * s, torch.zeros_like(s))

    Y = torch.eye(3, dtype=torch.float64)
    _, opt, closure = quadratic(Y, Y, 0.5, 0.1, prox=Shrink(), diagnostics=True)
    for _ in range(2):
        opt.step(closure)
    snap = opt.diagnostics()
    assert snap.loss is not None and snap.objective is None
    assert "objective -" in opt.report()
    opt.zero_grad()
    (0.5 * (opt.targets[0].param - Y).square().sum()).backward()
    opt.step()  # no closure: no loss, no objective
    assert opt.diagnostics().loss is None and opt.diagnostics().objective is None


def test_tracker_history_is_bounded_and_state_roundtrips():
    g = torch.Generator().manual_seed(5)
    Y = torch.randn(5, 4, generator=g, dtype=torch.float64)
    _, opt, closure = quadratic(
        Y,
        torch.zeros(5, 4, dtype=torch.float64),
        0.5,
        0.2,
        diagnostics=proxrank.Diagnostics(history=8),
    )
    for _ in range(50):
        opt.step(closure)
    assert len(opt.tracker.history) < 8
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)  # plain tensors, numbers and strings only
    before = opt.diagnostics()
    _, opt2, _ = quadratic(
        Y,
        torch.zeros(5, 4, dtype=torch.float64),
        0.5,
        0.2,
        diagnostics=proxrank.Diagnostics(history=8),
    )
    opt2.load_state_dict(sd)
    after = opt2.diagnostics()
    assert after.layers == before.layers and after.step == before.step
    np.testing.assert_equal(opt2.tracker.trajectories(), opt.tracker.trajectories())


def test_bad_diagnostics_state_changes_nothing():
    Y = torch.eye(3, dtype=torch.float64)
    _, opt, closure = quadratic(Y, 2 * Y, 0.5, 0.1, diagnostics=True)
    opt.step(closure)
    good = opt.state_dict()
    opt.step(closure)
    before_state, before_diag = opt.state_dict(), opt.diagnostics()
    assert before_diag.step == 2
    for corrupt in (
        {**good["proxrank"]["diagnostics"], "history": {}},
        {**good["proxrank"]["diagnostics"], "layers": {"other.weight": {}}},
    ):
        groups = [{**g, "lr": 0.123} for g in good["param_groups"]]
        bad = {
            **good,
            "param_groups": groups,
            "proxrank": {**good["proxrank"], "diagnostics": corrupt},
        }
        with pytest.raises(ValueError, match=r"malformed|does not select"):
            opt.load_state_dict(bad)
        assert opt.diagnostics() == before_diag and opt.step_count == 2
        assert opt.param_groups[0]["lr"] == 0.5  # the base optimizer was not loaded either
    opt.load_state_dict(good)
    assert opt.diagnostics().step == 1
    # a plain base state dict leaves the diagnostics alone
    plain = {k: v for k, v in before_state.items() if k != "proxrank"}
    plain["param_groups"] = [  # the last group carries proxrank's state for DCP too
        {k: v for k, v in g.items() if k != "proxrank"} for g in plain["param_groups"]
    ]
    opt.load_state_dict(plain)
    assert opt.diagnostics().step == 1


# -- outputs ---------------------------------------------------------------------------------------
def mlp_run(tmp_path, steps=6, **diag_kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    diag = proxrank.Diagnostics(**diag_kw)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.5, diagnostics=diag
    )
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    snaps = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        snaps.append(opt.diagnostics())
    diag.close()
    return opt, snaps


def test_csv_and_jsonl_read_back(tmp_path):
    loggers = [proxrank.CSVLogger(tmp_path / "d.csv"), proxrank.JSONLinesLogger(tmp_path / "d.jl")]
    _, snaps = mlp_run(tmp_path, loggers=loggers, log_every=2)
    logged = [s for s in snaps if s.step % 2 == 0]
    with open(tmp_path / "d.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(logged)
    for row, (snap, lay) in zip(rows, [(s, lay) for s in logged for lay in s.layers], strict=True):
        assert int(row["step"]) == snap.step and row["layer"] == lay.name
        assert int(row["rank"]) == lay.rank
        assert float(row["nuclear_norm"]) == pytest.approx(lay.nuclear_norm)
        assert float(row["model_compression_ratio"]) == pytest.approx(snap.compression_ratio)
        assert int(row["dense_params"]) == lay.dense_params  # the layer's, not the model's
        assert int(row["model_dense_params"]) == snap.dense_params
        assert float(row["model_loss"]) == pytest.approx(snap.loss)
        assert row["model_converged"] == str(snap.converged)
    with open(tmp_path / "d.csv", newline="") as f:
        header = next(csv.reader(f))
    assert len(set(header)) == len(header), header  # DictReader reads every column back
    lines = (tmp_path / "d.jl").read_text().splitlines()
    assert len(lines) == len(logged)
    for line, snap in zip(lines, logged, strict=True):
        obj = json.loads(line)
        assert obj["step"] == snap.step and obj["converged"] == snap.converged
        assert [lay["rank"] for lay in obj["layers"]] == [lay.rank for lay in snap.layers]
        assert obj["objective"] == pytest.approx(snap.objective)


def test_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, snaps = mlp_run(tmp_path, loggers=[proxrank.TensorBoardLogger(tmp_path / "tb")])
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    ranks = acc.Scalars("proxrank/0.weight/rank")
    assert [e.step for e in ranks] == [s.step for s in snaps]
    assert [e.value for e in ranks] == [s.layers[0].rank for s in snaps]
    ratio = acc.Scalars("proxrank/model/compression_ratio")
    assert ratio[-1].value == pytest.approx(snaps[-1].compression_ratio, rel=1e-6)


def test_report_lists_every_layer(tmp_path):
    opt, snaps = mlp_run(tmp_path)
    text = opt.report()
    lines = text.splitlines()
    assert "converged: no" in lines[0]
    for lay in snaps[-1].layers:
        (line,) = [ln for ln in lines if ln.startswith(lay.name + " ")]
        assert f" {lay.rank} " in line and f"{lay.shape[0]}x{lay.shape[1]}" in line
    assert f"{snaps[-1].dense_params} dense" in lines[-2]


def test_plot_is_written(tmp_path):
    opt, _ = mlp_run(tmp_path)
    path = opt.tracker.plot(tmp_path / "diag.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no recorded diagnostics"):
        opt.tracker.plot(tmp_path / "x.png", layers=["nope"])


def test_half_precision_weights(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).to(torch.bfloat16)
    opt = proxrank.ProxRank(
        torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.5, diagnostics=True
    )
    outputs = []
    for _ in range(2):
        opt.zero_grad()
        lin(torch.randn(4, 6, dtype=torch.bfloat16)).sum().backward()
        opt.step()
        outputs.append(lin.weight.detach().double().clone())
    lay = opt.diagnostics().layers[0]
    step = float(torch.linalg.norm(outputs[1] - outputs[0]))
    assert lay.grad_mapping_norm == pytest.approx(step / 0.1, rel=1e-5, abs=1e-6)


def test_realised_step_when_the_prox_returns_its_input(monkeypatch):
    """A prox whose output aliases the weight (here: the identity) must not make the kept
    previous weight follow the parameter."""
    import proxrank.optimizer as optimizer_module
    from proxrank.functional import ProxResult

    def identity_prox(Y, tau, prox=None, backend=None, state=None):
        U, S, Vh = torch.linalg.svd(Y, full_matrices=False)
        return ProxResult(Y, SVDResult(U, S, Vh, torch.zeros(Y.shape[:-2])), S)

    monkeypatch.setattr(optimizer_module, "prox_step", identity_prox)
    w = torch.nn.Parameter(torch.ones(3, 2))
    opt = proxrank.ProxRank(torch.optim.SGD([w], lr=0.5), [("w", w)], lam=1.0, diagnostics=True)
    for _ in range(2):
        w.grad = torch.ones(3, 2)
        opt.step()
    assert opt.diagnostics().layers[0].grad_mapping_norm == pytest.approx(math.sqrt(6))


# -- errors ----------------------------------------------------------------------------------------
def test_errors():
    lin = torch.nn.Linear(3, 3)
    opt = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.1)
    with pytest.raises(ValueError, match="diagnostics=True"):
        opt.diagnostics()
    with pytest.raises(ValueError, match="diagnostics=True"):
        opt.report()
    with pytest.raises(TypeError, match="diagnostics must be"):
        proxrank.ProxRank(
            torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.1, diagnostics="yes"
        )
    diag = proxrank.Diagnostics()
    proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.1, diagnostics=diag)
    keep = proxrank.ProxRank(torch.optim.SGD(lin.parameters(), lr=0.1), lin, lam=0.1)
    diag2 = proxrank.Diagnostics()
    owner = proxrank.ProxRank(keep.optimizer, lin, lam=0.1, diagnostics=diag2)
    with pytest.raises(ValueError, match="already tracks another"):
        diag2.bind(keep)
    diag2.bind(owner)  # binding to its own optimizer again is fine
    with pytest.raises(RuntimeError, match="not attached"):
        proxrank.Diagnostics().snapshot()
    for kw, exc in [
        ({"patience": 0}, ValueError),
        ({"patience": 1.5}, TypeError),
        ({"tol": -1.0}, ValueError),
        ({"tol": float("nan")}, ValueError),
        ({"tol": "x"}, TypeError),
    ]:
        with pytest.raises(exc, match="ConvergenceRule"):
            proxrank.ConvergenceRule(**kw)
    for kw in [{"history": 1}, {"log_every": 0}, {"full_spectrum_every": -1}]:
        with pytest.raises(ValueError, match=next(iter(kw)).split("_")[0]):
            proxrank.Diagnostics(**kw)
    with pytest.raises(TypeError, match="rule must be a ConvergenceRule"):
        proxrank.Diagnostics(rule=100)
    with pytest.raises(TypeError, match="loggers"):
        proxrank.Diagnostics(loggers=[print])
    with pytest.raises(TypeError, match="SummaryWriter"):
        proxrank.TensorBoardLogger(3)


def test_figures_under_a_metric_are_in_the_regularised_matrix_space():
    """Under metric="fisher": energy removed and nuclear norm are those of A^{1/2} W (what the
    prox thresholds); the relative step is measured on the weight itself."""
    from proxrank.metrics import FisherMetric

    torch.manual_seed(4)
    lin = torch.nn.Linear(6, 9, bias=False).double()
    after_base, outputs = [], []

    class Recording(torch.optim.SGD):  # keeps the weight the base step leaves
        def step(self, closure=None):
            super().step(closure)
            after_base.append(lin.weight.detach().clone())

    opt = proxrank.ProxRank(
        Recording(lin.parameters(), lr=0.1), lin, lam=2.0, metric="fisher", diagnostics=True
    )
    x = torch.randn(20, 6, dtype=torch.float64) * torch.logspace(-1, 1, 6, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        lin(x).pow(2).sum().backward()
        opt.step()
        outputs.append(lin.weight.detach().clone())
    state = opt.matrix("weight").metric_state
    Y = FisherMetric().weighting(state, {}, (9, 6)).to_metric(after_base[-1])
    s_new = (torch.linalg.svdvals(Y) - 0.2).clamp_min(0)
    (layer,) = opt.diagnostics().layers
    assert layer.energy_removed == pytest.approx(float(1 - s_new.square().sum() / Y.square().sum()))
    assert layer.nuclear_norm == pytest.approx(float(s_new.sum()))
    step = float(torch.dist(outputs[1], outputs[0]))
    scale = max(float(outputs[1].norm()), float(outputs[0].norm()))
    assert layer.relative_step == pytest.approx(step / scale)
    assert layer.grad_mapping_norm == pytest.approx(step / 0.1)


def test_loggers_create_their_folder(tmp_path):
    for cls, name in (
        (proxrank.CSVLogger, "a/b/log.csv"),
        (proxrank.JSONLinesLogger, "c/log.jsonl"),
    ):
        logger = cls(tmp_path / name)
        assert (tmp_path / name).exists()
        logger.close()


# -- truthful reports ------------------------------------------------------------------------------
def test_rank_uses_the_factorize_tolerance_and_agrees_with_factorize():
    """A decayed threshold leaves rounding-noise singular values: they are not rank, and the
    diagnostics' "if factorized now" matches what factorize finds."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40, bias=False))
    U, V = torch.randn(40, 4, dtype=torch.float64), torch.randn(4, 48, dtype=torch.float64)
    W = U @ V
    noise = torch.randn(40, 48, dtype=torch.float64)
    W = W + 1e-9 * torch.linalg.matrix_norm(W, 2) * noise / torch.linalg.matrix_norm(noise, 2)
    with torch.no_grad():
        model[0].weight.copy_(W.float())
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=1e-6), model, lam=1e-6, diagnostics=True
    )
    opt.zero_grad()
    (0 * model(torch.randn(2, 48)).sum()).backward()
    opt.step()
    s_new = torch.linalg.svdvals(model[0].weight.double())
    assert int((s_new > 0).sum()) == 40  # the prox left every value nonzero (the old count)
    snap = opt.diagnostics()
    _, summary = proxrank.factorize(model)
    assert snap.layers[0].rank == summary.layers[0].rank == 4
    assert snap.factorized_params == summary.model_params_after


def test_reasons_name_layer_condition_and_margin(tmp_path):
    opt, snaps = mlp_run(tmp_path, steps=4, rule=proxrank.ConvergenceRule(patience=10, tol=1e-9))
    snap = snaps[-1]
    reasons = snap.reasons()
    assert not snap.converged and len(reasons) == len(snap.layers)
    for reason, lay in zip(reasons, snap.layers, strict=True):
        assert reason.startswith(f"{lay.name}: ")
        assert f"held {lay.steps_since_rank_change} of 10 steps" in reason
        assert f"relative step {lay.relative_step:.3g} > tol 1e-09" in reason
    report = opt.report()
    assert all(f"not converged: {r}" in report for r in reasons)
    # a loose rule: only the matrices that fail it are named
    _, snaps = mlp_run(tmp_path, steps=8, rule=proxrank.ConvergenceRule(patience=1, tol=1.0))
    snap = snaps[-1]
    failing = [lay.name for lay in snap.layers if not lay.converged]
    assert [r.split(": ")[0] for r in snap.reasons()] == failing
    assert ("not converged" in format_report(snap)) == bool(failing)


def test_reasons_when_only_the_step_count_is_short():
    rule = proxrank.ConvergenceRule(patience=3, tol=1.0)
    lay = proxrank.diagnostics.LayerDiagnostics(
        name="w",
        shape=(2, 2),
        step=5,
        rank=1,
        effective_rank=1.0,
        nuclear_norm=1.0,
        tau=0.1,
        cutoff=0.1,
        energy_removed=0.0,
        prox_residual=0.0,
        grad_mapping_norm=0.0,
        relative_step=0.5,
        steps_since_rank_change=9,
        steps_below_tol=2,
        factorized_params=4,
        dense_params=4,
        backend="exact",
        error_bound=0.0,
        converged=False,
    )
    snap = proxrank.diagnostics.ModelDiagnostics(5, [lay], 4, 4, 1.0, None, None, False, rule)
    assert snap.reasons() == ["w: relative step <= tol 1 for 2 of 3 steps"]
    lay.relative_step = math.nan
    assert "relative step unknown" in snap.reasons()[0]
    assert proxrank.diagnostics.ModelDiagnostics(0, [], 0, 0, 1.0, None, None, False).reasons()


def test_observe_loss_gives_loss_and_objective_without_closure():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.3, diagnostics=True
    )
    x = torch.randn(8, 5)
    for _ in range(3):
        opt.zero_grad()
        losses = [model(x[:4]).square().mean(), model(x[4:]).square().mean()]
        for loss in losses:
            (loss / 2).backward()
            opt.tracker.observe_loss(loss)
        nuclear = torch.linalg.matrix_norm(model.weight.detach(), "nuc")
        opt.step()
        snap = opt.diagnostics()
        mean = float(sum(loss.detach() for loss in losses) / 2)
        assert snap.loss == pytest.approx(mean)
    assert snap.objective == pytest.approx(mean + 0.3 * float(nuclear), rel=1e-5)
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()  # nothing observed: no loss, as before
    assert opt.diagnostics().loss is None
    with pytest.raises(ValueError, match="scalar"):
        opt.tracker.observe_loss(torch.ones(2))
    with pytest.raises(TypeError, match="number"):
        opt.tracker.observe_loss("1.0")


def test_figure_legends_match_what_is_drawn_and_threshold_lines():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(18)])
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.5, diagnostics=True
    )
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
    fig = opt.tracker.figure()
    ax_rank, ax_spec = fig.axes
    (matrix_legend,) = fig.legends
    names = [t.name for t in opt.targets]
    assert [t.get_text() for t in matrix_legend.get_texts()] == names
    assert matrix_legend._ncols == 2  # 18 names: two columns of at most 16
    colours = {tuple(line.get_color()) for line in ax_rank.get_lines()}
    assert len(colours) == 18  # a colour map, not 10 colours cycled
    style = [t.get_text() for t in ax_spec.get_legend().get_texts()]
    assert style == ["before prox", "after prox (kept)", "threshold"]
    dotted = [ln for ln in ax_spec.get_lines() if ln.get_linestyle() == ":"]
    assert len(dotted) == 18 and all(ln.get_ydata()[0] == pytest.approx(0.05) for ln in dotted)
    solid = [ln for ln in ax_spec.get_lines() if ln.get_linestyle() == "-"]
    ranks = [lay.rank for lay in opt.diagnostics().layers]
    assert [len(ln.get_xdata()) for ln in solid] == ranks


@pytest.mark.slow
def test_trainer_callback_logs_diagnostics_and_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    from proxrank.hf import ProxRankCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 16, (8, 8))
    data = [{"input_ids": row, "labels": row} for row in ids]
    opt = proxrank.ProxRank(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model, lam=0.1, diagnostics=True
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(opt, None),
        callbacks=[ProxRankCallback(opt)],
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["proxrank/loss"] == pytest.approx(entry["proxrank/loss"])  # a number
        assert math.isfinite(entry["proxrank/objective"])
        assert entry["proxrank/objective"] > entry["proxrank/loss"]
        assert entry["proxrank/compression_ratio"] >= 1
        assert any(k.startswith("proxrank/rank/") for k in entry)
    with torch.no_grad():  # the hook is gone after training; evaluation forwards never counted
        model(input_ids=ids[:2], labels=ids[:2])
    assert opt.tracker._observed == []
    with pytest.raises(TypeError, match="ProxRank"):
        ProxRankCallback(torch.optim.SGD(model.parameters(), lr=0.1))
    bare = proxrank.ProxRank(torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1)
    with pytest.raises(ValueError, match="diagnostics=True"):
        ProxRankCallback(bare)


def test_an_optimizer_with_file_loggers_copies_and_pickles(tmp_path):
    """``copy.deepcopy`` / ``pickle`` of a ProxRank whose diagnostics log to files: the copy
    appends to the same files (no second header) and the original keeps logging."""
    import copy
    import pickle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    loggers = [proxrank.CSVLogger(tmp_path / "d.csv"), proxrank.JSONLinesLogger(tmp_path / "d.jl")]
    diag = proxrank.Diagnostics(loggers=loggers, log_every=1)
    opt = proxrank.ProxRank(
        torch.optim.SGD(model.parameters(), lr=0.1), model, lam=0.1, prox="l1", diagnostics=diag
    )

    def step(o):
        o.zero_grad()
        model(torch.randn(4, 6)).pow(2).sum().backward()
        o.step()

    step(opt)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]  # with copies of the weights
    step(opt)
    for o in copies:
        o.step()  # the copied gradients
    with open(tmp_path / "d.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "1", "2", "2", "2", "2", "2", "2"]
    lines = (tmp_path / "d.jl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2, 2]


def test_log_figures_gives_ranks_or_the_sparsity_of_maps_on_the_entries():
    pytest.importorskip("transformers")
    from proxrank.hf import log_figures

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    groups = [
        {"params": model[0].parameters(), "prox": proxrank.sparsity.Magnitude(0.25)},
        {"params": model[2].parameters()},
    ]
    opt = proxrank.ProxRank(torch.optim.SGD(groups, lr=0.1), model, lam=0.1, diagnostics=True)
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    figures = log_figures(opt.diagnostics())
    assert figures["proxrank/sparsity/0.weight"] == 0.75
    assert "proxrank/rank/2.weight" in figures and "proxrank/rank/0.weight" not in figures

"""The main job: ``python -m proxrank demo`` end to end in its --quick mode, and its options."""

from __future__ import annotations

import json

import pytest
import torch

import proxrank
from proxrank.cli import build_parser, main
from proxrank.cli.demo import (
    CONV_FALLBACK,
    QUICK,
    accuracy,
    build_cnn,
    inference_ms,
    load_digits_split,
    make_optimizer,
    prepare,
)
from proxrank.factorize import Factorized


def demo_parser():
    return build_parser()._subparsers._group_actions[0].choices["demo"]


def run_quick(out, *argv):
    report = main(["demo", "--quick", "--no-progress", "--out", str(out), "--seed", "1", *argv])
    return report, json.loads((out / "summary.json").read_text())


def check_report(out, report, printed):
    """What every run writes and prints, and how its figures fit together."""
    assert {p.name for p in out.iterdir()} == {
        "model.pt",
        "summary.json",
        "ranks.png",
        "spectra.png",
    }
    for png in ("ranks.png", "spectra.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = report["results"]
    assert list(results) == ["dense AdamW", "ProxRank (dense)", "factorized", "+ fine-tuned"]
    layers = report["factorize"]["layers"]
    assert results["factorized"]["params"] == report["factorize"]["model_params_after"]
    assert results["ProxRank (dense)"]["params"] == results["dense AdamW"]["params"]
    assert results["factorized"]["params"] == sum(lay["params_after"] for lay in layers)
    # the diagnostics' last recorded rank of every layer is the rank factorize found
    diag = {lay["name"]: lay for lay in report["diagnostics"]["layers"]}
    for lay in layers:
        if lay["name"] in diag:
            assert report["ranks_per_step"][lay["name"]]["rank"][-1] == lay["rank"]
            assert diag[lay["name"]]["rank"] == lay["rank"]
        else:  # no prox ever ran on it (a rank ramp that kept it whole): still full rank
            assert lay["name"] not in report["ranks_per_step"]
            assert lay["rank"] == lay["full_rank"]
    assert diag, "no layer was ever proxed"
    assert report["diagnostics"]["loss"] > 0  # the training closure's loss reached them
    # the factorized model computes what the dense ProxRank model did (same test accuracy)
    assert results["factorized"]["accuracy"] == pytest.approx(
        results["ProxRank (dense)"]["accuracy"], abs=1 / 450 + 1e-9
    )
    model = torch.load(out / "model.pt", weights_only=False)
    assert any(isinstance(m, Factorized) for m in model.modules())
    _, _, Xte, yte = load_digits_split(1)
    assert accuracy(model, Xte, yte) == pytest.approx(results["+ fine-tuned"]["accuracy"])
    # the library's own report and the verdict are printed after training
    assert "rank held" in printed and f"step {report['diagnostics']['step']}" in printed
    verdict = "yes" if report["diagnostics"]["converged"] else "no"
    assert f"converged: {verdict} by the rule" in printed
    diag = report["diagnostics"]
    for lay in diag["layers"]:  # every layer that fails the rule is named with its reason
        if not lay["converged"]:
            assert f"  {lay['name']}: " in printed
    for name, result in results.items():
        assert result["inference_ms"] > 0 and result["inference_iqr_ms"] >= 0, name
    assert "ms (IQR" in printed
    assert "factorized" in printed and "fewer parameters" in printed


@pytest.mark.slow
def test_demo_quick_writes_its_report(tmp_path, capsys):
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    report, saved = run_quick(out, "--lam", "3")
    assert torch.get_num_threads() == threads  # the demo's --threads setting is undone
    check_report(out, saved, capsys.readouterr().out)
    assert report["results"] == saved["results"]
    assert saved["settings"]["epochs"] == QUICK["epochs"] and saved["settings"]["lam"] == 3
    # without a schedule the prox runs at every step, and the diagnostics kept every step
    batches = -(-len(load_digits_split(1)[0]) // 64)
    for name, traj in saved["ranks_per_step"].items():
        assert traj["step"] == list(range(QUICK["epochs"] * batches)), name


@pytest.mark.slow
def test_demo_budget_reaches_the_budget(tmp_path, capsys):
    """--budget with the Fisher metric, a hard threshold and the backend passed through: the
    factorized weights fit in the budget, and the warm-up steps have no prox."""
    out = tmp_path / "report"
    _, saved = run_quick(
        out, "--budget", "0.25", "--metric", "fisher", "--prox", "hard", "--backend", "exact"
    )
    check_report(out, saved, capsys.readouterr().out)
    settings = saved["settings"]
    assert settings["metric"] == "fisher" and settings["backend"] == "exact"
    assert settings["warmup"] == pytest.approx(QUICK["epochs"] / 6)
    assert settings["lam"] is None
    layers = saved["factorize"]["layers"]
    weights = [lay["shape"][0] * (lay["params_before"] // lay["shape"][0]) for lay in layers]
    biases = sum(lay["params_before"] - w for lay, w in zip(layers, weights, strict=True))
    after = sum(lay["params_after"] for lay in layers) - biases
    dense_weights = sum(torch.Size(lay["shape"]).numel() for lay in layers)
    assert after <= 0.25 * dense_weights
    batches = -(-len(load_digits_split(1)[0]) // 64)
    warmup_steps = round(QUICK["epochs"] / 6 * batches)
    for traj in saved["ranks_per_step"].values():  # the rank ramp starts after the warm-up
        assert traj["step"][0] >= warmup_steps
    assert all(lay["backend"] == "exact" for lay in saved["diagnostics"]["layers"])


@pytest.mark.slow
def test_demo_activation_metric_on_a_conv_net(tmp_path, capsys):
    """--metric two_sided weights the Linear layers; the convolutions get its row side (fisher)
    in their own param group; --warmup delays a constant --lam."""
    out = tmp_path / "report"
    _, saved = run_quick(out, "--metric", "two_sided", "--warmup", "1", "--lam", "2")
    check_report(out, saved, capsys.readouterr().out)
    batches = -(-len(load_digits_split(1)[0]) // 64)
    for traj in saved["ranks_per_step"].values():
        assert traj["step"][0] == batches


def parsed(*argv: str):
    args = demo_parser().parse_args(["--quick", *argv])
    prepare(args)
    return args


@pytest.mark.parametrize("metric", sorted(CONV_FALLBACK))
def test_input_metrics_fall_back_on_the_convolutions(metric):
    model = build_cnn()
    opt = make_optimizer(model, parsed("--metric", metric), steps_per_epoch=22)
    convs = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)}
    metric_of = {id(p): g["metric"] for g in opt.param_groups for p in g["params"]}
    assert {metric_of[i] for i in convs} == {CONV_FALLBACK[metric]}
    assert {v for k, v in metric_of.items() if k not in convs} == {metric}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    opt.close()


@pytest.mark.parametrize(
    ("argv", "warmup", "ramp_end"),
    [
        (["--budget", "0.3"], 0.5, 2.0),  # defaults: epochs/6 and 2 epochs/3 (3 epochs)
        (["--budget", "0.3", "--warmup", "1", "--ramp-end", "2.5"], 1.0, 2.5),
    ],
)
def test_budget_schedule_in_steps(argv, warmup, ramp_end):
    args = parsed(*argv)
    opt = make_optimizer(build_cnn(), args, steps_per_epoch=22)
    schedule = opt.schedule
    assert isinstance(schedule, proxrank.Schedule)
    assert schedule.budget == 0.3 and schedule.threshold == "soft"
    assert schedule.warmup == round(warmup * 22) and schedule.ramp_end == round(ramp_end * 22)
    assert opt.tracker is not None


def test_no_schedule_without_budget_or_warmup():
    opt = make_optimizer(build_cnn(), parsed(), steps_per_epoch=22)
    assert opt.schedule is None and opt.defaults["lam"] == 1.0


def test_help_lists_the_options():
    text = demo_parser().format_help()
    for option in (
        "--lam",
        "--epochs",
        "--out",
        "--seed",
        "--quick",
        "--prox",
        "--metric",
        "--budget",
        "--warmup",
        "--ramp-end",
        "--backend",
    ):
        assert option in text


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--epochs", "0"], ["--epochs", ">= 1"]),
        (["--epochs", "two"], ["--epochs", "'two'"]),
        (["--lam", "-1"], ["--lam", ">= 0"]),
        (["--lr", "nan"], ["--lr"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--finetune-lr", "0"], ["--finetune-lr", "> 0"]),
        (["--threads", "-1"], ["--threads"]),
        (["--budget", "0"], ["--budget", "> 0"]),
        (["--budget", "1.5"], ["--budget", "<= 1"]),
        (["--budget", "0.001"], ["budget"]),  # below every layer at rank 1: Schedule says so
        (["--metric", "cosine"], ["--metric", "invalid choice"]),
        (["--backend", "nope"], ["backend", "'nope'"]),
        (["--budget", "0.2", "--lam", "1"], ["--lam", "--budget"]),
        (["--ramp-end", "3"], ["--ramp-end", "--budget"]),
        (["--budget", "0.2", "--warmup", "5", "--ramp-end", "2"], ["--ramp-end", "--warmup"]),
        (["--warmup", "40"], ["--warmup", "--epochs"]),
    ],
)
def test_bad_options_are_usage_errors(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--no-progress", "--out", str(tmp_path / "r"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    for word in words:
        assert word in err
    assert not (tmp_path / "r").exists()


def test_inference_timing_is_interleaved_and_restores_modes():
    calls = []

    class Probe(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append((self.name, self.training))
            return x

    models = {"a": Probe("a"), "b": Probe("b"), "c": Probe("c").eval()}
    out = inference_ms(models, torch.ones(1), rounds=6, warmup=2)
    assert set(out) == {"a", "b", "c"}
    assert all(med > 0 and iqr >= 0 for med, iqr in out.values())
    timed = [name for name, _ in calls[6:]]
    assert [timed[3 * r] for r in range(6)] == ["a", "b", "c", "a", "b", "c"]  # rotating start
    assert all(sorted(timed[3 * r : 3 * r + 3]) == ["a", "b", "c"] for r in range(6))
    assert not any(training for _, training in calls)  # timed in eval mode
    assert models["a"].training and models["b"].training and not models["c"].training

"""The main job: ``python -m proxrank demo`` end to end in its --quick mode."""

from __future__ import annotations

import json

import pytest
import torch

from proxrank import Factorized
from proxrank.__main__ import build_parser, main
from proxrank.demo import QUICK, accuracy, load_digits_split


@pytest.mark.slow
def test_demo_quick_writes_its_report(tmp_path, capsys):
    out = tmp_path / "report"
    threads = torch.get_num_threads()
    main(["demo", "--quick", "--no-progress", "--out", str(out), "--seed", "1", "--lam", "3"])
    assert torch.get_num_threads() == threads  # the demo's --threads setting is undone
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "model.pt",
        "summary.json",
        "ranks.png",
        "spectra.png",
    }
    for png in ("ranks.png", "spectra.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "summary.json").read_text())
    assert report["settings"]["epochs"] == QUICK["epochs"] and report["settings"]["lam"] == 3
    results = report["results"]
    assert list(results) == ["dense AdamW", "ProxRank (dense)", "factorized", "+ fine-tuned"]
    layers = report["factorize"]["layers"]
    assert results["factorized"]["params"] == report["factorize"]["model_params_after"]
    assert results["ProxRank (dense)"]["params"] == results["dense AdamW"]["params"]
    assert results["factorized"]["params"] == sum(lay["params_after"] for lay in layers)
    # ranks recorded after every step, for every layer, and the last one is what was factorized
    batches = -(-len(load_digits_split(1)[0]) // 64)
    for lay in layers:
        name = lay["name"].removesuffix(".weight")
        assert len(report["ranks_per_step"][name]) == QUICK["epochs"] * batches
        assert report["ranks_per_step"][name][-1] == lay["rank"]
    # the factorized model computes what the dense ProxRank model did (same test accuracy)
    assert results["factorized"]["accuracy"] == pytest.approx(
        results["ProxRank (dense)"]["accuracy"], abs=1 / 450 + 1e-9
    )
    model = torch.load(out / "model.pt", weights_only=False)
    assert any(isinstance(m, Factorized) for m in model.modules())
    _, _, Xte, yte = load_digits_split(1)
    assert accuracy(model, Xte, yte) == pytest.approx(results["+ fine-tuned"]["accuracy"])
    assert "factorized" in printed and "fewer parameters" in printed


def test_help_lists_the_options():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    text = demo.format_help()
    for option in ("--lam", "--epochs", "--out", "--seed", "--quick", "--prox"):
        assert option in text


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--lam", "-1"], "--lam"),
        (["--batch-size", "0"], "--batch-size"),
        (["--finetune-lr", "0"], "--finetune-lr"),
        (["--threads", "-1"], "--threads"),
    ],
)
def test_bad_options_raise_before_training(argv, word, tmp_path):
    with pytest.raises(ValueError, match=word):
        main(["demo", "--no-progress", "--out", str(tmp_path / "r"), *argv])
    assert not (tmp_path / "r").exists()

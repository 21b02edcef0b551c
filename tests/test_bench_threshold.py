"""``benchmarks/threshold_semantics.py --quick``: each ``tau_lr`` gives its threshold (``lam lr_t``
decaying to ~0 with the rate, ``lam lr_0`` constant, ``lam sum lr`` growing), ranks in range,
and the table, JSON and figure are written."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SPEC = importlib.util.spec_from_file_location(
    "bench_threshold",
    Path(__file__).resolve().parents[1] / "benchmarks" / "threshold_semantics.py",
)
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench
SPEC.loader.exec_module(bench)


def test_quick_run_thresholds_follow_their_semantics(tmp_path):
    lam = 2.0
    figure = tmp_path / "fig.png"
    report = bench.main(
        ["--quick", "--lams", str(lam), "--out", str(tmp_path), "--figure", str(figure)]
    )
    peak = report["args"]["lr"]
    runs = report["records"]["2"]
    assert set(runs) == set(bench.SEMANTICS)
    lr = report["dense"]["lr"]
    assert max(lr) == pytest.approx(peak) and lr[-1] < 1e-3 * peak  # warm-up, cosine to ~0
    for rec in runs.values():
        assert rec["lr"] == lr and len(rec["tau"]) == len(lr)
    current, initial, cumulative = (runs[name]["tau"] for name in bench.SEMANTICS)
    assert current == pytest.approx([lam * r for r in lr], rel=1e-6)
    assert current[-1] < 1e-3 * max(current)  # follows the rate to ~0
    assert initial == pytest.approx([lam * peak] * len(lr), rel=1e-6)  # constant
    sums = list(itertools.accumulate(lr))
    assert cumulative == pytest.approx([lam * s for s in sums], rel=1e-6)  # keeps growing
    hidden = bench.QUICK["hidden"]
    full = [hidden, hidden, 10]
    for rec in runs.values():
        assert all(0 <= r <= f for ranks in rec["ranks"] for r, f in zip(ranks, full, strict=True))
    assert report["rows"][0]["acc_end"] > 0.5  # three epochs already learn the digits
    table = (tmp_path / "threshold_semantics_quick.md").read_text()
    for row in report["rows"][1:]:
        assert f"| {lam:g} | {row['tau_lr']} | " in table
        assert f"({row['rank_end']}) | {row['loss_end']:.4f} | {row['acc_end']:.4f} |" in table
    saved = json.loads((tmp_path / "threshold_semantics_quick.json").read_text())
    assert saved["rows"] == report["rows"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

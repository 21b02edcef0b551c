"""``benchmarks/pruning_tt.py --quick``: every method gives a row, sizes are what the methods
keep, and the printed table is the rows."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

SPEC = importlib.util.spec_from_file_location(
    "bench_pruning_tt", Path(__file__).resolve().parents[1] / "benchmarks" / "pruning_tt.py"
)
bench = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = bench  # dataclasses look their module up
SPEC.loader.exec_module(bench)


@pytest.mark.slow
def test_quick_run_gives_one_row_per_method(tmp_path):
    report = bench.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows, dense = report["rows"], report["dense_params"]
    assert len(rows) == len(bench.METHODS)
    assert rows[0]["method"] == "dense AdamW" and rows[0]["params"] == dense
    hidden = bench.QUICK["hidden"]
    shapes = [(hidden, 64), (hidden, hidden), (10, hidden)]
    bias = 2 * hidden + 10
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["seconds"] >= 0 and math.isfinite(r["seconds"])
        if "prune" in r["method"]:  # at most round(keep * m n) weights per layer
            assert r["params"] <= sum(round(bench.KEEP * m * n) for m, n in shapes) + bias
        assert r["params"] <= dense, r
        if r["method"].startswith("NN-BCD"):
            assert r["params"] < dense / 2, r
    assert rows[0]["accuracy"] > 0.5  # two epochs already learn the digits
    table = (tmp_path / "pruning_tt_quick.md").read_text()
    for r in rows:
        assert f"| {r['method']} | {r['accuracy']:.3f} | {r['params']:,}" in table
    assert json.loads((tmp_path / "pruning_tt_quick.json").read_text()) == report

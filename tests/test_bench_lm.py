"""``benchmarks/lm.py --quick``: every method runs at both budgets at equal steps, the dense
model is cached, and the report's table is what the rows say."""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import pytest

pytest.importorskip("transformers")
if not Path("/usr/share/common-licenses").is_dir():  # pragma: no cover - Debian data
    pytest.skip("needs /usr/share/common-licenses", allow_module_level=True)

SPEC = importlib.util.spec_from_file_location(
    "bench_lm", Path(__file__).resolve().parents[1] / "benchmarks" / "lm.py"
)
lm = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lm)


@pytest.mark.slow
def test_quick_run_covers_every_method_and_caches_the_dense_model(tmp_path):
    report = lm.main(["--quick", "--out", str(tmp_path)])
    assert report["cached"] is False
    rows = report["rows"]
    expected = {("dense", 1.0)} | {(m, b) for m in lm.METHODS for b in lm.BUDGETS}
    assert {(r["method"], r["budget"]) for r in rows} == expected
    for r in rows:
        assert math.isfinite(r["val"]) and r["val"] > 0, r
        assert 0 < r["kept"] <= 1 and 0 <= r["step_share"] <= 1, r
        if r["method"].startswith(("trunc", "isvt", "magnitude", "tt")):  # the budget plus biases
            assert r["kept"] <= r["budget"] * 1.25, r
        if r["method"].startswith("trunc"):
            assert math.isfinite(r["zero_shot"])
    # the summary is the median over seeds of the rows, and the table shows it
    table = (tmp_path / "quick.md").read_text()
    for entry in report["summary"]:
        vals = [
            r["val"]
            for r in rows
            if r["method"] == entry["method"] and r["budget"] == entry["budget"]
        ]
        assert entry["val"] == pytest.approx(statistics.median(vals))
        assert f"| {entry['method']} | {entry['val']:.3f}" in table
    # the dense model is pretrained once: a second call finds it on disk
    data = lm.Data(lm.QUICK["seq"], lm.QUICK["eval_windows"])
    model, cached = lm.pretrained(dict(lm.QUICK), data, tmp_path)
    assert cached and lm.val_loss(model, data) == pytest.approx(report["pretrained_val"])

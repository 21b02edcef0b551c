"""The README's runnable example runs as written and does what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_lowers_rank():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if b.startswith("import torch")]
    assert len(runnable) == 1
    out = subprocess.run(
        [sys.executable, "-c", runnable[0]], capture_output=True, text=True, check=True, timeout=300
    )
    ranks = [int(r) for r in re.findall(r"\d+", out.stdout.strip().splitlines()[-1])]
    assert len(ranks) == 2 and ranks[0] <= 16 and ranks[1] <= 4

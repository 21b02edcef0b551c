#!/usr/bin/env bash
# PyTorch's own test_optim.py against the bare optim_db optimizers and wrapped in ProxRank.
# Usage: tools/torch_suite/run.sh [CONFIG...]   CONFIG: bare, or a lam (default: bare 0 1e-3)
# Environment: PYTHON (default .venv/bin/python, else python3), PROXRANK_EMPTY (see conftest.py),
# OUT (folder for the full logs, default a temporary folder). Extra pytest arguments: PYTEST_ARGS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
if [[ ! -f "$here/test_optim.py" ]]; then
  echo "missing $here/test_optim.py: see $here/README.md for how to get it" >&2
  exit 2
fi
py="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$py" ]] || py=python3
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
configs=("$@")
[[ ${#configs[@]} -gt 0 ]] || configs=(bare 0 1e-3)
cd "$here"
for lam in "${configs[@]}"; do
  log="$out/torch_suite_$lam.txt"
  start=$(date +%s)
  # shellcheck disable=SC2086
  PYTHONPATH="$root" PROXRANK_LAM="$lam" "$py" -m pytest test_optim.py -q -p no:cacheprovider \
    -rf ${PYTEST_ARGS:-} >"$log" 2>&1 || true
  echo "PROXRANK_LAM=$lam ($(($(date +%s) - start)) s): $(grep -E '(passed|failed)' "$log" | tail -1)"
  grep -E '^FAILED' "$log" | sed 's/ - .*//' || true
done
echo "full logs in $out"

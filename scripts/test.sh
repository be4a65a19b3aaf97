#!/usr/bin/env bash
# Set everything up (first run: a few minutes) and run every test: the package, the real engines
# (each in its own subprocess), the tutorials (executed), the strict site build and the
# headless-Chromium checks. A skipped test fails the run (REQUIRE_ALL=1).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh --browser
# shellcheck disable=SC1091
. .venv/bin/activate
export REQUIRE_ALL=1 NO_MKDOCS_2_WARNING=1 PYTHONHASHSEED=0
# one OpenMP thread per process: steady timings on 2 cores with engine subprocesses around
export OMP_NUM_THREADS=1
nbstripout --verify tutorials/*/*.ipynb
ruff check .   # rules and scope in pyproject.toml ([tool.ruff])
python -m pytest tests "$@"
elapsed=$(( $(date +%s) - start ))
mkdir -p .artifacts && printf '{"seconds": %s, "pytest_args": "%s"}\n' "$elapsed" "$*" > .artifacts/test_timing.json
echo "[test] total wall time: ${elapsed} s"

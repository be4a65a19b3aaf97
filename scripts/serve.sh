#!/usr/bin/env bash
# Preview the documentation site with live reload: http://127.0.0.1:8000/ (English), /zh/ (Chinese).
# Sets everything up first (scripts/setup.sh, idempotent), executes changed notebooks, then serves.
# DOCS_ADDR overrides the address (default 127.0.0.1:8000); extra arguments go to `mkdocs serve`.
# While serving, edits to docs_en/, docs_zh/, tutorials/ or reference_impl/ rebuild the site, and
# changed notebooks are re-executed (docs_hooks/staging.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/execute_notebooks.py
NO_MKDOCS_2_WARNING=1 exec mkdocs serve -a "${DOCS_ADDR:-127.0.0.1:8000}" "$@"

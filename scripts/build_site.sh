#!/usr/bin/env bash
# Build the bilingual documentation site into site/ (English at /, Chinese at /zh/).
# Executes the tutorial notebooks that changed into .executed/ first, then one strict MkDocs build.
# Extra arguments go to `mkdocs build` (e.g. --site-dir /tmp/site).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "build_site: .venv is missing; run: bash scripts/setup.sh" >&2
  exit 1
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/execute_notebooks.py
NO_MKDOCS_2_WARNING=1 mkdocs build --strict "$@"

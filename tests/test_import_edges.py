"""The package's allowed import edges, read from the sources (no import needed to check them).

* the reference rollout engine (``reference_impl.rollout``) is imported only by the trainer and the
  CLI inside the package (benchmarks, examples and tests may use it; the exchange format lives in
  ``reference_impl.batch``, log-probs in ``reference_impl.logprobs``);
* ``reference_impl.metrics`` imports nothing private (``_name``) from another module;
* the vLLM client side, and the package's top level, import with no vLLM, megatron-core or
  transformers installed (checked in a subprocess that blocks those imports).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "reference_impl"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import statement of a package module."""
    here = _module_name(path).split(".")
    return _imports_of_source(path.read_text(encoding="utf-8"), here if path.name == "__init__.py" else here[:-1])


def _imports_of_source(source: str, package: list[str]) -> list[tuple[str, list[str]]]:
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            if not node.module:  # `from . import x`: each name is a module
                out += [(f"{mod}.{n}", []) for n in names]
            else:
                out.append((mod, names))
    return out


PACKAGE_MODULES = sorted(PKG.rglob("*.py"))


def test_the_sources_were_found():
    assert len(PACKAGE_MODULES) > 15


def test_only_the_trainer_and_the_cli_import_the_reference_engine():
    allowed = {"reference_impl.trainer", "reference_impl.__main__", "reference_impl.rollout"}
    offenders = sorted(
        _module_name(p) for p in PACKAGE_MODULES if any(m == "reference_impl.rollout" for m, _ in _imports(p)) and _module_name(p) not in allowed
    )
    assert offenders == [], f"these modules import the reference engine (use reference_impl.batch / .logprobs): {offenders}"


def test_metrics_imports_nothing_private_from_another_module():
    private = [(m, n) for m, names in _imports(PKG / "metrics.py") if m.startswith("reference_impl") for n in names if n.startswith("_")]
    assert private == []


def test_the_edge_checker_resolves_relative_imports():
    src = "from .objectives import _clip_mask\nfrom ..rollout import RolloutEngine\nfrom . import rollout\n"
    found = _imports_of_source(src, ["reference_impl", "integrations"])
    assert ("reference_impl.integrations.objectives", ["_clip_mask"]) in found
    assert ("reference_impl.rollout", ["RolloutEngine"]) in found
    assert ("reference_impl.integrations.rollout", []) in found


_BLOCK_ENGINES = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'vllm', 'megatron', 'transformers'}:
            raise ImportError('blocked for the test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize(
    "statement",
    [
        "import reference_impl",
        "from reference_impl.integrations.vllm_client import VllmSample, to_rollout_batch, EXTENSION",
        "import reference_impl.integrations.megatron",
        "import reference_impl.integrations.megatron_cpu",
    ],
)
def test_client_side_modules_import_without_the_engines(statement):
    code = _BLOCK_ENGINES + statement + "\nassert not any(m.split('.')[0] in {'vllm', 'megatron', 'transformers'} for m in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_worker_side_needs_vllm():
    code = _BLOCK_ENGINES + "import reference_impl.integrations.vllm_worker\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs vLLM 0.32" in result.stderr

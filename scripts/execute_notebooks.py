#!/usr/bin/env python
"""Execute the tutorial notebooks into ``.executed/tutorials/{en,zh}/`` for the docs site.

The notebooks in ``tutorials/`` are stored without outputs (nbstripout). The site renders executed
copies, written here to a gitignored folder so that running this never dirties the work tree.

* ``tutorials/en/X.ipynb`` and ``tutorials/zh/X.ipynb`` must both exist and have identical code
  cells (only the narrative is translated). The English notebook is executed once; its outputs are
  copied into the Chinese copy code cell by code cell.
* A cell that raises fails the run (no ``allow_errors``): a notebook's assertions are its claims.
* A notebook is skipped when its fingerprint (both language sources and this script; the
  ``reference_impl`` sources) equals the one stored in the sidecar ``X.ipynb.sha256`` of the last
  successful execution. ``--force`` re-executes everything.

Usage: ``python scripts/execute_notebooks.py [--force] [--timeout SECONDS] [--check]``.
``--check`` executes nothing and exits 1 if an executed copy is missing or stale.
The docs build (``docs_hooks/staging.py``) refuses copies whose *notebook sources* are stale.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
EXECUTED = ROOT / ".executed" / "tutorials"
LANGUAGES = ("en", "zh")
SOURCE_LANGUAGE = "en"  # executed; the other languages receive its outputs


def notebook_names() -> list[str]:
    """Notebook file names, checked to be the same set in every language folder."""
    names = {lang: sorted(p.name for p in (TUTORIALS / lang).glob("*.ipynb")) for lang in LANGUAGES}
    reference = names[SOURCE_LANGUAGE]
    for lang, found in names.items():
        if found != reference:
            raise SystemExit(
                f"execute_notebooks: tutorials/{lang}/ has {found} but tutorials/{SOURCE_LANGUAGE}/ has "
                f"{reference}; every notebook must exist in every language"
            )
    return reference


def _digest(parts: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for label, data in parts:
        h.update(f"{label} {len(data)}\n".encode())
        h.update(data)
    return h.hexdigest()


def fingerprint(name: str) -> dict[str, str]:
    """What an executed notebook depends on, as two hashes.

    ``source``: both language versions of the notebook and this script. A change here makes the
    rendered page wrong (old narrative or code), so ``mkdocs build`` refuses stale copies.
    ``dependencies``: the ``reference_impl`` sources. A change here re-executes the notebook when
    this script runs, but does not by itself stop a build.
    """
    source = [(f"notebook {lang}", (TUTORIALS / lang / name).read_bytes()) for lang in LANGUAGES]
    source.append(("executor", Path(__file__).read_bytes()))
    deps = [
        (f"source {path.relative_to(ROOT).as_posix()}", path.read_bytes())
        for path in sorted((ROOT / "reference_impl").rglob("*.py"))
    ]
    return {"source": _digest(source), "dependencies": _digest(deps)}


def _sidecar(lang: str, name: str) -> Path:
    return EXECUTED / lang / (name + ".sha256")


def _recorded(lang: str, name: str) -> dict[str, str]:
    try:
        return json.loads(_sidecar(lang, name).read_text())
    except (OSError, ValueError):
        return {}


def is_up_to_date(name: str, *, check_dependencies: bool = True) -> bool:
    current = fingerprint(name)
    keys = ("source", "dependencies") if check_dependencies else ("source",)
    for lang in LANGUAGES:
        if not (EXECUTED / lang / name).is_file():
            return False
        recorded = _recorded(lang, name)
        if any(recorded.get(k) != current[k] for k in keys):
            return False
    return True


def stale_notebooks(*, check_dependencies: bool = True) -> list[str]:
    return [name for name in notebook_names() if not is_up_to_date(name, check_dependencies=check_dependencies)]


def _code_sources(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def execute_one(name: str, timeout: int) -> None:
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    digest = fingerprint(name)  # before reading: an edit made while executing leaves the copy stale
    sources = {lang: nbformat.read(TUTORIALS / lang / name, as_version=4) for lang in LANGUAGES}
    reference_code = _code_sources(sources[SOURCE_LANGUAGE])
    for lang, nb in sources.items():
        code = _code_sources(nb)
        if code != reference_code:
            first = next((i for i, (a, b) in enumerate(zip(code, reference_code)) if a != b), min(len(code), len(reference_code)))
            raise SystemExit(
                f"execute_notebooks: code cells of tutorials/{lang}/{name} differ from tutorials/{SOURCE_LANGUAGE}/{name} "
                f"(first difference at code cell {first}); translate the narrative only"
            )

    executed = copy.deepcopy(sources[SOURCE_LANGUAGE])
    # Run in a scratch directory so files a notebook writes (e.g. a saved trace) never land in the repo.
    with tempfile.TemporaryDirectory(prefix="nbexec-") as scratch:
        # IPC transport: the kernel listens on unix sockets in the scratch folder, not on TCP.
        km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(scratch, "kernel"))
        client = NotebookClient(
            executed,
            km=km,
            timeout=timeout,
            kernel_name="python3",
            coalesce_streams=True,  # one line per progress bar: \r updates are applied, not listed
            allow_errors=False,
            resources={"metadata": {"path": scratch}},
        )
        try:
            client.execute()
        finally:
            if km.has_kernel:
                km.shutdown_kernel(now=False)

    outputs = [(cell.get("execution_count"), cell.get("outputs", [])) for cell in executed.cells if cell.cell_type == "code"]
    for lang, nb in sources.items():
        if lang == SOURCE_LANGUAGE:
            result = executed
        else:
            result = copy.deepcopy(nb)
            code_cells = [cell for cell in result.cells if cell.cell_type == "code"]
            for cell, (count, outs) in zip(code_cells, outputs):
                cell.execution_count = count
                cell.outputs = copy.deepcopy(outs)
            result.metadata["language_info"] = copy.deepcopy(executed.metadata.get("language_info", {}))
        _write_atomic(EXECUTED / lang / name, nbformat.writes(result))
    # Sidecars last: an interrupted run leaves the notebook stale, never falsely fresh.
    for lang in LANGUAGES:
        _write_atomic(_sidecar(lang, name), json.dumps(digest, indent=1) + "\n")


def remove_orphans(names: list[str]) -> None:
    for lang in LANGUAGES:
        folder = EXECUTED / lang
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            base = path.name.removesuffix(".sha256")
            if base not in names:
                path.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="re-execute even if nothing changed")
    parser.add_argument("--timeout", type=int, default=300, help="per-cell timeout in seconds (default 300)")
    parser.add_argument("--check", action="store_true", help="execute nothing; exit 1 if a copy is stale")
    args = parser.parse_args(argv)

    names = notebook_names()
    if args.check:
        stale = [n for n in names if not is_up_to_date(n)]
        for n in stale:
            print(f"[notebooks] stale: {n}")
        return 1 if stale else 0

    remove_orphans(names)
    for name in names:
        if not args.force and is_up_to_date(name):
            print(f"[notebooks] up to date: {name}")
            continue
        start = time.perf_counter()
        print(f"[notebooks] executing {name} ...", flush=True)
        try:
            execute_one(name, args.timeout)
        except SystemExit:
            raise
        except Exception as exc:  # CellExecutionError, timeouts, kernel death
            print(f"[notebooks] FAILED: tutorials/{SOURCE_LANGUAGE}/{name}\n{exc}", file=sys.stderr)
            return 1
        print(f"[notebooks] executed {name} in {time.perf_counter() - start:.1f}s -> .executed/tutorials/{{{','.join(LANGUAGES)}}}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

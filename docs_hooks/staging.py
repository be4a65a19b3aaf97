"""MkDocs hook: stage the two language trees (and the executed notebooks) into ``.staging/``.

mkdocs-static-i18n's ``folder`` structure wants ``<docs_dir>/en/`` and ``<docs_dir>/zh/``. The
sources live in ``docs_en/``, ``docs_zh/`` and ``tutorials/{en,zh}/`` (rendered from the executed
copies in ``.executed/tutorials/{en,zh}/``), so ``on_config`` builds, with symlinks only::

    .staging/en/<every entry of docs_en>   -> ../../docs_en/<entry>
    .staging/en/tutorials                  -> ../../.executed/tutorials/en
    .staging/zh/...                           (same from docs_zh and .executed/tutorials/zh)

and points ``docs_dir`` there. The i18n plugin re-runs the whole build (``on_config`` included)
once per language, so this is idempotent: links already right are left alone.

It also refuses to build from stale notebook outputs: if ``tutorials/`` changed since
``scripts/execute_notebooks.py`` last ran, ``mkdocs build`` fails with the command to run
(``scripts/build_site.sh`` runs it, and it also re-executes after ``reference_impl/`` changes);
``mkdocs serve`` re-executes the notebooks itself. Finally it points
``pymdownx.snippets``' ``base_path`` at the repository root whatever the working directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("staging")

ROOT = Path(__file__).resolve().parent.parent
STAGING = ROOT / ".staging"
EXECUTED = ROOT / ".executed" / "tutorials"
SOURCES = {"en": ROOT / "docs_en", "zh": ROOT / "docs_zh"}
_COMMAND_ENV = "REFERENCE_IMPL_DOCS_COMMAND"  # survives serve's config reloads (hook modules do not)


def on_startup(command: str, dirty: bool) -> None:
    os.environ[_COMMAND_ENV] = command


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "scripts" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ensure_notebooks_fresh() -> None:
    executor = _executor()
    serving = os.environ.get(_COMMAND_ENV) == "serve"
    try:
        # serve re-executes after package edits too; build only insists on the notebooks' own sources
        stale = executor.stale_notebooks(check_dependencies=serving)
    except SystemExit as exc:  # language folders disagree
        raise PluginError(str(exc)) from None
    if not stale:
        return
    if serving:
        log.info(f"executing stale notebooks: {', '.join(stale)}")
        if executor.main([]) != 0:
            raise PluginError("notebook execution failed (see above)")
        return
    raise PluginError(
        f"executed notebooks are missing or stale ({', '.join(stale)}): "
        "run `python scripts/execute_notebooks.py` first (scripts/build_site.sh does)"
    )


def _link(link: Path, target: Path) -> None:
    """Make ``link`` a relative symlink to ``target`` unless it already is one."""
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise PluginError(f"staging: {link} exists and is not a symlink; delete {STAGING} and rebuild")
    link.symlink_to(rel, target_is_directory=target.is_dir())


def stage() -> Path:
    for lang, source in SOURCES.items():
        if not source.is_dir():
            raise PluginError(f"staging: {source} is missing")
        wanted = {entry.name: entry for entry in source.iterdir() if not entry.name.startswith(".")}
        if "tutorials" in wanted:
            raise PluginError(f"staging: {source}/tutorials would hide the notebooks of tutorials/{lang}/")
        wanted["tutorials"] = EXECUTED / lang
        folder = STAGING / lang
        folder.mkdir(parents=True, exist_ok=True)
        for existing in folder.iterdir():
            if existing.name not in wanted:
                if not existing.is_symlink():
                    raise PluginError(f"staging: unexpected {existing}; delete {STAGING} and rebuild")
                existing.unlink()
        for name, target in wanted.items():
            _link(folder / name, target)
    return STAGING


def on_config(config):
    _ensure_notebooks_fresh()
    config.docs_dir = str(stage())
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(ROOT)]
    return config

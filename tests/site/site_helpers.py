"""Shared constants and helpers of the documentation-site tests (imported by site_fixtures and the tests).

Not named after the folder: a module called ``site`` would shadow Python's own ``site``; fixtures
are in ``site_fixtures.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / ".artifacts" / "screenshots"
LANGS = ("en", "zh")
DEFAULT_LANG = "en"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def require_all() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("REQUIRE_ALL") == "1"


def missing(reason: str) -> None:
    """Skip on a developer machine, fail in CI / with REQUIRE_ALL=1."""
    if require_all():
        pytest.fail(f"{reason} (CI / REQUIRE_ALL=1: missing tools fail instead of skipping)")
    pytest.skip(reason)


def lang_prefix(lang: str) -> str:
    return "" if lang == DEFAULT_LANG else f"{lang}/"


def page_urls() -> list[str]:
    """Site-relative URLs (directory style) of every page of the default language, from the sources."""
    urls = []
    for md in sorted((ROOT / "docs_en").rglob("*.md")):
        rel = md.relative_to(ROOT / "docs_en").with_suffix("").as_posix()
        if rel == "index":
            urls.append("")
        elif rel.endswith("/index"):
            urls.append(rel[: -len("index")])
        else:
            urls.append(rel + "/")
    for nb in sorted((ROOT / "tutorials" / "en").glob("*.ipynb")):
        urls.append(f"tutorials/{nb.stem}/")
    return urls


def notebook_urls() -> list[str]:
    return [u for u in page_urls() if u.startswith("tutorials/")]

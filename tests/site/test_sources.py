"""Checks on the documentation sources that `mkdocs build --strict` cannot make.

* every page exists in both languages, with the same explicit heading ids in the same order;
* both languages include the same code (snippets, mkdocstrings directives);
* tutorial notebooks are stored without outputs, exist in both languages and share their code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from site_helpers import ROOT

pytestmark = pytest.mark.docs

DOCS = {"en": ROOT / "docs_en", "zh": ROOT / "docs_zh"}
TUTORIALS = {"en": ROOT / "tutorials" / "en", "zh": ROOT / "tutorials" / "zh"}
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
EXPLICIT_ID = re.compile(r"\{\s*#([A-Za-z0-9_.:-]+)\s*\}\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
CJK = re.compile(r"[\u4e00-\u9fff]")


def _pages(lang: str) -> list[str]:
    return sorted(p.relative_to(DOCS[lang]).as_posix() for p in DOCS[lang].rglob("*.md"))


def _outside_fences(text: str):
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def _headings(path: Path) -> list[tuple[int, str, str | None]]:
    """(level, text, explicit id or None) of every Markdown heading outside code fences."""
    out = []
    for line in _outside_fences(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            ident = EXPLICIT_ID.search(m.group(2))
            out.append((len(m.group(1)), m.group(2), ident.group(1) if ident else None))
    return out


def _code_references(path: Path) -> list[str]:
    """Lines that pull code into a page: snippet includes and mkdocstrings directives."""
    return [
        line.strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith(("--8<--", ":::"))
    ]


def test_every_page_exists_in_both_languages():
    en, zh = _pages("en"), _pages("zh")
    assert en, "docs_en/ has no pages"
    assert en == zh, f"only in docs_en: {sorted(set(en) - set(zh))}; only in docs_zh: {sorted(set(zh) - set(en))}"


@pytest.mark.parametrize("page", _pages("en"))
def test_every_heading_has_an_explicit_id_equal_in_both_languages(page):
    en, zh = _headings(DOCS["en"] / page), _headings(DOCS["zh"] / page)
    for lang, headings in (("en", en), ("zh", zh)):
        without = [text for _, text, ident in headings if ident is None]
        assert not without, f"docs_{lang}/{page}: headings without {{ #id }}: {without}"
    assert [(lvl, ident) for lvl, _, ident in en] == [(lvl, ident) for lvl, _, ident in zh], (
        f"{page}: heading levels/ids differ between docs_en and docs_zh"
    )


@pytest.mark.parametrize("page", _pages("en"))
def test_both_languages_include_the_same_code(page):
    """Same includes, except that a Chinese page includes the Chinese twin ``X.zh.md`` of a generated
    table ``X.md`` (written by the same script)."""
    zh = [line.replace('.zh.md"', '.md"') for line in _code_references(DOCS["zh"] / page)]
    assert _code_references(DOCS["en"] / page) == zh


@pytest.mark.parametrize("page", _pages("zh"))
def test_chinese_sources_are_written_in_chinese(page):
    prose = "\n".join(
        line for line in _outside_fences((DOCS["zh"] / page).read_text(encoding="utf-8")) if not line.startswith(":::")
    )
    assert len(CJK.findall(prose)) >= 20, f"docs_zh/{page} has almost no Chinese text: untranslated?"


# ----------------------------------------------------------------------------- notebooks
def _notebooks(lang: str) -> list[str]:
    return sorted(p.name for p in TUTORIALS[lang].glob("*.ipynb"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_notebook_exists_in_both_languages():
    assert _notebooks("en"), "tutorials/en/ has no notebook"
    assert _notebooks("en") == _notebooks("zh")


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_notebooks_are_stored_without_outputs(lang):
    for name in _notebooks(lang):
        nb = _load(TUTORIALS[lang] / name)
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] != "code":
                continue
            assert cell.get("outputs") == [], f"tutorials/{lang}/{name} cell {i} has outputs: run nbstripout"
            assert cell.get("execution_count") is None, f"tutorials/{lang}/{name} cell {i} has an execution count: run nbstripout"


@pytest.mark.parametrize("name", _notebooks("en"))
def test_notebooks_share_code_cells_across_languages(name):
    def code(lang):
        return ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
                for c in _load(TUTORIALS[lang] / name)["cells"] if c["cell_type"] == "code"]

    assert code("en") == code("zh"), f"{name}: code cells differ between tutorials/en and tutorials/zh"


@pytest.mark.parametrize("name", _notebooks("en"))
def test_notebooks_keep_the_same_headings_across_languages(name):
    def levels(lang):
        out = []
        for cell in _load(TUTORIALS[lang] / name)["cells"]:
            if cell["cell_type"] == "markdown":
                source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                out += [len(m.group(1)) for m in map(HEADING.match, _outside_fences(source)) if m]
        return out

    assert levels("en") == levels("zh"), f"{name}: heading structure differs (ids are matched by position)"


@pytest.mark.parametrize("name", _notebooks("zh"))
def test_chinese_notebooks_are_written_in_chinese(name):
    text = "".join(
        "".join(c["source"]) for c in _load(TUTORIALS["zh"] / name)["cells"] if c["cell_type"] == "markdown"
    )
    assert len(CJK.findall(text)) >= 50, f"tutorials/zh/{name} narrative is not in Chinese"


def test_notebooks_assert_their_claims():
    """Each tutorial checks its key mechanical claim in a code cell, so execution fails if it breaks."""
    for name in _notebooks("en"):
        code = "".join("".join(c["source"]) for c in _load(TUTORIALS["en"] / name)["cells"] if c["cell_type"] == "code")
        assert re.search(r"^\s*assert\b", code, re.M), f"tutorials/en/{name} asserts nothing"

"""What the documentation says, checked on its sources (Markdown pages, notebooks, READMEs).

* parity: docs_en/ and docs_zh/ have the same pages; every heading carries an explicit
  ``{ #id }`` and the ids match; each page has as many display formulas, fenced code blocks and
  snippet includes in both languages; every ``file:section`` include names a section that exists;
* citations: every arXiv ID is a verified one; the three wrong IDs of the seed review appear
  nowhere; R3 is attributed to Ma et al.; the IS decomposition is never credited to GSPO;
* code: a fenced Python block that defines a function of ``reference_impl`` must be a snippet
  include of the package instead of a pasted copy.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from site_helpers import ROOT

pytestmark = pytest.mark.docs

DOCS = {"en": ROOT / "docs_en", "zh": ROOT / "docs_zh"}
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
EXPLICIT_ID = re.compile(r"\{\s*#([A-Za-z0-9_.:-]+)\s*\}\s*$")
SNIPPET = re.compile(r"^\s*--8<--\s+\"([^\"]+)\"")
ARXIV = re.compile(r"(?<![\d.])(\d{4}\.\d{4,5})(?![\d])")

#: Checked against the papers' own arXiv pages (see docs_en/references.md, "Notes on citations").
VERIFIED_ARXIV = {
    "2510.11370",  # R3: Ma et al., 2025
    "2512.01374",  # Formulation (MiniRL, IS decomposition Eq. 5): Zheng et al., 2025
    "2507.18071",  # GSPO: origin of vanilla Routing Replay (R2)
    "2510.23027",  # RSPO
    "2510.18855",  # IcePop (Ring-1T)
    "2506.13585",  # CISPO (MiniMax-M1)
    "2503.14476",  # DAPO
    "2110.00641",  # Decoupled PPO
    "2402.03300",  # GRPO (DeepSeekMath)
    "2503.20783",  # Dr. GRPO
    "1707.06347",  # PPO
    "2507.20673",  # GMPO: the e^{±0.4} clip range of the RSPO-style defaults
}
#: The seed review's "corrections" (24xx) of the three 2025 papers; spelled in two pieces so that
#: a plain search of the repository finds them nowhere, this file included.
WRONG_ARXIV = {"24" + "10.11370", "24" + "07.18071", "24" + "12.01374"}


# --------------------------------------------------------------------------------- sources
def _pages(lang: str) -> list[str]:
    return sorted(p.relative_to(DOCS[lang]).as_posix() for p in DOCS[lang].rglob("*.md"))


def _notebooks() -> list[Path]:
    return sorted((ROOT / "tutorials").glob("*/*.ipynb"))


def _notebook_text(path: Path) -> str:
    """All cell sources of a notebook (outputs are stripped in the repository anyway)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells)


def _prose_sources() -> dict[str, str]:
    """Every text a reader sees: both doc trees, the notebooks, the READMEs."""
    out = {}
    for lang, root in DOCS.items():
        for page in _pages(lang):
            out[f"docs_{lang}/{page}"] = (root / page).read_text(encoding="utf-8")
    for nb in _notebooks():
        out[nb.relative_to(ROOT).as_posix()] = _notebook_text(nb)
    for readme in sorted(ROOT.glob("README*.md")):
        out[readme.name] = readme.read_text(encoding="utf-8")
    return out


def _all_sources() -> dict[str, str]:
    """Prose plus the code people read: the package, the examples, the benchmarks, the experiments."""
    out = _prose_sources()
    for folder in ("reference_impl", "examples", "benchmarks", "experiments"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".md", ".json"} and path.is_file():
                out[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------- parity
def _blocks(text: str):
    """Yield (kind, payload) for the page's structure: ("heading", (level, text)), ("fence", info)
    per fenced code block, ("snippet", target) per include (inside fences too: that is where code
    is included) and ("math", count) with the number of ``$$`` delimiters on a line outside fences."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            if not fenced:
                yield "fence", line.strip().lstrip("`~").strip()
            fenced = not fenced
            continue
        snippet = SNIPPET.match(line)
        if snippet:
            yield "snippet", snippet.group(1)
            continue
        if fenced:
            continue
        if "$$" in line:
            yield "math", line.count("$$")
            continue
        m = HEADING.match(line)
        if m:
            yield "heading", (len(m.group(1)), m.group(2))


def _structure(lang: str, page: str) -> dict:
    text = (DOCS[lang] / page).read_text(encoding="utf-8")
    items = list(_blocks(text))
    headings = [payload for kind, payload in items if kind == "heading"]
    return {
        "headings": headings,
        "ids": [(level, (EXPLICIT_ID.search(t).group(1) if EXPLICIT_ID.search(t) else None)) for level, t in headings],
        "display": sum(n for kind, n in items if kind == "math") // 2,  # $$ opens and closes a block
        "fences": sum(1 for kind, _ in items if kind == "fence"),
        "snippets": [payload for kind, payload in items if kind == "snippet"],
    }


def test_both_languages_have_the_same_pages():
    assert _pages("en") == _pages("zh"), (
        f"only in docs_en: {sorted(set(_pages('en')) - set(_pages('zh')))}; "
        f"only in docs_zh: {sorted(set(_pages('zh')) - set(_pages('en')))}"
    )


@pytest.mark.parametrize("page", _pages("en"))
def test_every_heading_has_an_explicit_id_and_the_ids_match(page):
    en, zh = _structure("en", page), _structure("zh", page)
    for lang, s in (("en", en), ("zh", zh)):
        missing = [text for (level, text), (_, ident) in zip(s["headings"], s["ids"]) if ident is None]
        assert not missing, f"docs_{lang}/{page}: headings without {{ #id }}: {missing}"
    assert en["ids"] == zh["ids"], f"{page}: heading levels/ids differ between languages:\n{en['ids']}\n{zh['ids']}"


@pytest.mark.parametrize("page", _pages("en"))
def test_both_languages_have_the_same_formulas_code_blocks_and_includes(page):
    en, zh = _structure("en", page), _structure("zh", page)
    assert en["display"] == zh["display"], f"{page}: {en['display']} display formulas in English, {zh['display']} in Chinese"
    assert en["fences"] == zh["fences"], f"{page}: {en['fences']} fenced code blocks in English, {zh['fences']} in Chinese"
    zh_paired = [_english_twin(target) for target in zh["snippets"]]
    assert en["snippets"] == zh_paired, f"{page}: snippet includes differ:\n{en['snippets']}\n{zh['snippets']}"


def _english_twin(target: str) -> str:
    """A Chinese page includes ``X.zh.md`` where the English one includes ``X.md``."""
    return target[: -len(".zh.md")] + ".md" if target.endswith(".zh.md") else target


#: Tables written by a script: each has a Chinese twin X.zh.md written by the same script.
GENERATED_TABLES = ["benchmarks/results/mismatch.md", "benchmarks/results/performance.md", "experiments/results/summary.md"]
_TABLE_ROW = re.compile(r"^\|.*\|\s*$", re.M)


@pytest.mark.parametrize("table", GENERATED_TABLES)
def test_every_generated_table_has_a_chinese_twin_with_the_same_rows(table):
    en = (ROOT / table).read_text(encoding="utf-8")
    zh_path = ROOT / (table[: -len(".md")] + ".zh.md")
    assert zh_path.is_file(), f"{table} has no Chinese twin {zh_path.relative_to(ROOT)}; re-run its generator"
    zh = zh_path.read_text(encoding="utf-8")
    en_rows, zh_rows = _TABLE_ROW.findall(en), _TABLE_ROW.findall(zh)
    assert len(en_rows) == len(zh_rows), f"{table}: {len(en_rows)} table rows in English, {len(zh_rows)} in Chinese"
    headers = [row for i, row in enumerate(zh_rows) if i + 1 < len(zh_rows) and zh_rows[i + 1].startswith("|---")]
    assert headers and all(re.search(r"[\u4e00-\u9fff]", h) for h in headers), f"{zh_path.name}: English table header {headers}"
    numbers = lambda text: re.findall(r"\d+\.\d+(?:e[-+]\d+)?%?", text)  # noqa: E731
    assert numbers(en) == numbers(zh), f"{table} and its twin hold different numbers; regenerate both"


@pytest.mark.parametrize("table", GENERATED_TABLES)
def test_chinese_pages_include_the_chinese_twin(table):
    for page in _pages("zh"):
        targets = _structure("zh", page)["snippets"]
        assert table not in targets, f"docs_zh/{page} includes the English {table}; include {table[:-3]}.zh.md"


def _section_names(path: Path) -> set[str]:
    return set(re.findall(r"--8<--\s*\[start:([\w.-]+)\]", path.read_text(encoding="utf-8")))


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_every_snippet_include_names_an_existing_file_and_section(lang):
    problems = []
    for page in _pages(lang):
        for target in _structure(lang, page)["snippets"]:
            name, _, section = target.partition(":")
            path = ROOT / name
            if not path.is_file():
                problems.append(f"{page}: {name} does not exist")
            elif section and not section[0].isdigit() and section not in _section_names(path):
                problems.append(f"{page}: {name} has no section {section!r}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------- citations
def _listed_on_references_page() -> set[str]:
    return set(ARXIV.findall((DOCS["en"] / "references.md").read_text(encoding="utf-8")))


def test_the_references_page_lists_the_routing_papers():
    listed = _listed_on_references_page()
    assert {"2510.11370", "2512.01374", "2507.18071"} <= listed, f"docs_en/references.md lists {sorted(listed)}"
    assert not listed & WRONG_ARXIV


@pytest.mark.parametrize("name", sorted(_prose_sources()))
def test_every_arxiv_id_is_a_verified_one(name):
    allowed = VERIFIED_ARXIV | _listed_on_references_page()
    unknown = sorted(set(ARXIV.findall(_prose_sources()[name])) - allowed)
    assert not unknown, f"{name} cites arXiv IDs that are not on the verified list / references page: {unknown}"


def test_the_wrong_24xx_ids_appear_nowhere():
    found = {name: sorted(i for i in WRONG_ARXIV if i in text) for name, text in _all_sources().items()}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"the seed review's wrong arXiv IDs (all three papers are from 2025: 25xx): {found}"


ET_AL = re.compile(r"([A-Z][\w-]+)\s+et\s+al\.?")


@pytest.mark.parametrize("name", sorted(_prose_sources()))
def test_r3_is_attributed_to_ma_et_al(name):
    text = _prose_sources()[name]
    assert not re.search(r"Luo\s+et\s+al|Luo,\s*Fuli", text), f"{name}: R3's first author is Wenhan Ma (Fuli Luo is last): cite Ma et al., 2025"
    wrong = []
    for m in ET_AL.finditer(text):
        before, after = text[max(0, m.start() - 60) : m.start()], text[m.end() : m.end() + 40]
        # "R3 (Ma et al.", "**R3** (Ma et al.", "R3 paper (Ma et al.", or "... et al., 2025, arXiv 2510.11370"
        about_r3 = re.search(r"\bR3\b\W{0,4}(\s*paper|\s*论文)?\s*[(（]\s*$", before) or "2510.11370" in after
        if about_r3 and m.group(1) != "Ma":
            wrong.append(text[max(0, m.start() - 60) : m.end() + 40].replace("\n", " "))
    assert not wrong, f"{name}: R3 cited with another first author than Ma: {wrong}"


def _sentences(text: str) -> list[str]:
    """Sentences of prose: paragraphs and list items joined across line breaks, table rows apart."""
    units = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if lines and all(line.lstrip().startswith("|") for line in lines if line.strip()):
            units += lines
            continue
        units += re.split(r"\n(?=\s*(?:[-*+]|\d+\.)\s)", paragraph)
    out = []
    for unit in units:
        flat = " ".join(unit.split())
        out += [s for s in re.split(r"(?<=[.!?])\s+|(?<=[。！？])", flat) if s.strip()]
    return out


@pytest.mark.parametrize("name", sorted(_prose_sources()))
def test_the_is_decomposition_is_not_credited_to_gspo(name):
    bad = [
        s
        for s in _sentences(_prose_sources()[name])
        if re.search(r"decompos|分解", s, re.I) and "2507.18071" in s
    ]
    assert not bad, f"{name}: the IS decomposition is Eq. 5 of arXiv 2512.01374, not GSPO (2507.18071): {bad}"


# ------------------------------------------------------------------------------------ code
def _package_functions() -> set[str]:
    """Names of functions and methods defined anywhere in reference_impl (dunders aside)."""
    names = set()
    for path in (ROOT / "reference_impl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("__"):
                names.add(node.name)
    return names


def _python_blocks(text: str) -> list[str]:
    blocks, current, lang = [], None, None
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            if current is None:
                lang = line.strip().lstrip("`~").strip().split(" ")[0].lower()
                current = []
            else:
                if lang in ("python", "py", "pycon"):
                    blocks.append("\n".join(current))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_package_code_is_included_not_pasted(lang):
    package = _package_functions()
    pasted = []
    for page in _pages(lang):
        for block in _python_blocks((DOCS[lang] / page).read_text(encoding="utf-8")):
            for name in re.findall(r"^\s*(?:async\s+)?def\s+(\w+)\s*\(", block, re.M):
                if name in package:
                    pasted.append(f"docs_{lang}/{page}: def {name}(...) is pasted; include it from reference_impl with --8<--")
    assert not pasted, "\n".join(pasted)


# ------------------------------------------------------------------------------- zh terms
#: Forms the Chinese pages must not use (GLOSSARY: one term per concept), with the term to use.
ZH_AVOID = {
    "重算": "重新计算 (recompute; 激活重计算 stays)",
    "接近平局": "接近持平 (near-tie)",
    "几乎持平": "接近持平 (near-tie)",
    "转换器": "转换函数 (converter)",
    "坑": "常见陷阱 (pitfall)",
    "不除以 $1/": "不乘 1/|y_i| (multiplying by 1/|y_i| is what is left out)",
}
_ZH_CODE = re.compile(r"`[^`]*`|\$\$.*?\$\$|\$[^$\n]*\$|\]\([^)]*\)|<[^>]*>", re.S)


def _zh_prose(text: str) -> str:
    """A Chinese page without fenced code, inline code, math, link targets and HTML tags."""
    lines, fence = [], False
    for line in text.split("\n"):
        if FENCE.match(line):
            fence = not fence
        elif not fence:
            lines.append(line)
    return _ZH_CODE.sub(" ", "\n".join(lines))


def _zh_sources() -> dict[str, str]:
    """Chinese pages (the glossary names the avoided forms on purpose) and zh notebooks' Markdown cells."""
    out = {
        k: v for k, v in _prose_sources().items()
        if (k.startswith("docs_zh/") and k != "docs_zh/glossary.md") or k == "README.zh-CN.md"
    }
    for nb in sorted((ROOT / "tutorials" / "zh").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        out[nb.relative_to(ROOT).as_posix()] = "\n\n".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
        )
    return out


@pytest.mark.parametrize("name", sorted(_zh_sources()))
def test_chinese_pages_use_the_glossary_terms(name):
    text = _zh_sources()[name]
    prose = _zh_prose(text)
    found = {bad: use for bad, use in ZH_AVOID.items() if bad in (text if "$" in bad else prose).replace("激活重计算", "")}
    assert not found, f"{name} uses {sorted(found)}; write {sorted(found.values())}"
    assert not re.search(r"(?<![A-Za-z_])prompts?(?![A-Za-z_])", prose), f"{name}: write 提示词 for prompt in prose (code keeps prompt)"

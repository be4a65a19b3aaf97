"""Checks on the built site that `mkdocs build --strict` passes without noticing.

* every page is built in both languages, with the same heading ids;
* /zh/ pages are Chinese (no silent English fallback), /en/ pages are not;
* notebook pages are rendered HTML, not the notebook's raw JSON, and /zh/ shows the Chinese narrative;
* the language switcher leads to the same page in the other language;
* the search index segments Chinese into words (jieba);
* math and assets are local: MathJax is in the site and no page loads anything from another host.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from bs4 import BeautifulSoup

from site_fixtures import site_dir  # noqa: F401 - pytest fixtures
from site_helpers import LANGS, ROOT, lang_prefix, notebook_urls, page_urls

pytestmark = pytest.mark.site

CJK = re.compile(r"[\u4e00-\u9fff]")
PAGES = page_urls()
BASE = "http://site.test/"


def _html(site_dir: Path, url: str) -> str:
    path = site_dir / url / "index.html"
    assert path.is_file(), f"{url or '/'} was not built ({path} missing)"
    return path.read_text(encoding="utf-8")


def _soup(site_dir: Path, url: str) -> BeautifulSoup:
    return BeautifulSoup(_html(site_dir, url), "html.parser")


def _article(soup: BeautifulSoup):
    article = soup.select_one("article.md-content__inner")
    assert article is not None, "no <article class=md-content__inner>"
    return article


def _heading_ids(soup: BeautifulSoup) -> list[str]:
    return [h["id"] for h in _article(soup).find_all(re.compile(r"^h[1-6]$")) if h.get("id")]


def _prose(article) -> list[str]:
    """Text of paragraphs and list items that are prose: not code, tables or API docstrings."""
    out = []
    for el in article.find_all(["p", "li"]):
        if el.find_parent(["pre", "code", "table"]) or el.find_parent(class_="doc") or el.find_parent(class_="jp-OutputArea"):
            continue
        text = " ".join(el.get_text(" ").split())
        if len(text) >= 8:
            out.append(text)
    return out


# ------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("url", PAGES)
def test_page_is_built_in_both_languages_with_the_same_heading_ids(site_dir, url):
    en = _heading_ids(_soup(site_dir, url))
    zh = _heading_ids(_soup(site_dir, "zh/" + url))
    assert en, f"{url or '/'} has no headings with ids"
    assert en == zh, f"{url or '/'}: heading ids differ\n en: {en}\n zh: {zh}"


def test_no_page_is_built_in_one_language_only(site_dir):
    def built(root: Path, skip_zh: bool) -> set[str]:
        pages = set()
        for p in root.rglob("index.html"):
            rel = p.parent.relative_to(root).as_posix()
            rel = "" if rel == "." else rel + "/"
            if skip_zh and rel.startswith("zh/"):
                continue
            pages.add(rel)
        return pages

    en = built(site_dir, skip_zh=True)
    zh = built(site_dir / "zh", skip_zh=False)
    assert en == zh == set(PAGES), f"en only: {sorted(en - zh)}; zh only: {sorted(zh - en)}; expected {PAGES}"


# ------------------------------------------------------------------------------ language
@pytest.mark.parametrize("url", PAGES)
def test_chinese_pages_are_chinese(site_dir, url):
    soup = _soup(site_dir, "zh/" + url)
    assert soup.html.get("lang") == "zh", f"zh/{url}: <html lang={soup.html.get('lang')!r}>"
    article = _article(soup)
    h1 = article.find("h1")
    assert h1 is not None and CJK.search(h1.get_text()), f"zh/{url}: title is not Chinese: {h1 and h1.get_text()!r}"
    prose = _prose(article)
    chinese = [t for t in prose if CJK.search(t)]
    assert len(prose) >= 1 and len(chinese) >= 0.8 * len(prose), (
        f"zh/{url}: only {len(chinese)} of {len(prose)} paragraphs are Chinese (English fallback?): "
        f"{[t for t in prose if not CJK.search(t)][:3]}"
    )
    en_text = _article(_soup(site_dir, url)).get_text()
    assert article.get_text() != en_text


@pytest.mark.parametrize("url", PAGES)
def test_english_pages_are_english(site_dir, url):
    soup = _soup(site_dir, url)
    assert soup.html.get("lang") == "en"
    prose = _prose(_article(soup))
    chinese = [t for t in prose if CJK.search(t)]
    assert not chinese, f"{url or '/'}: Chinese text on an English page: {chinese[:3]}"


def test_chinese_navigation_is_translated(site_dir):
    soup = _soup(site_dir, "zh/")
    labels = [" ".join(a.get_text().split()) for a in soup.select("nav.md-nav--primary a.md-nav__link")]
    assert labels and all(CJK.search(label) or label.startswith("API") for label in labels if label), labels


@pytest.mark.parametrize("lang", LANGS)
def test_home_page_includes_the_package_source(site_dir, lang):
    """The snippet include shows the package file as it is now, in every language."""
    source = (ROOT / "reference_impl" / "__init__.py").read_text(encoding="utf-8")
    blocks = [" ".join(pre.get_text().split()) for pre in _article(_soup(site_dir, lang_prefix(lang))).find_all("pre")]
    assert " ".join(source.split()) in blocks, f"{lang}: reference_impl/__init__.py is not included verbatim"


# ----------------------------------------------------------------------------- notebooks
def _notebook_narrative(lang: str, name: str) -> list[str]:
    """Sentences of a notebook's first Markdown paragraph (as plain text, math removed)."""
    nb = json.loads((ROOT / "tutorials" / lang / f"{name}.ipynb").read_text(encoding="utf-8"))
    first = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    paragraph = [line for line in first.split("\n\n") if line and not line.startswith("#")][0]
    paragraph = re.sub(r"`([^`]*)`", r"\1", paragraph.replace("\n", " " if lang == "en" else ""))
    return [s for s in re.split(r"[。：:.]", paragraph) if len(s) >= 8]


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("url", notebook_urls())
def test_notebook_pages_are_rendered_html(site_dir, url, lang):
    html = _html(site_dir, lang_prefix(lang) + url)
    for raw in ('"cell_type"', '"nbformat"', '"execution_count"'):
        assert raw not in html, f"{lang}/{url}: raw notebook JSON in the page ({raw})"
    soup = BeautifulSoup(html, "html.parser")
    wrapper = _article(soup).select_one(".jupyter-wrapper")
    assert wrapper is not None, f"{lang}/{url}: no rendered notebook (.jupyter-wrapper)"
    assert len(wrapper.select(".jp-CodeCell")) >= 3
    outputs = " ".join(o.get_text() for o in wrapper.select(".jp-OutputArea-output"))
    assert outputs.strip(), f"{lang}/{url}: the notebook was rendered without outputs (not executed?)"
    assert not wrapper.select(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"), "stderr output"
    assert "Traceback" not in outputs and "Error" not in outputs


@pytest.mark.parametrize("url", notebook_urls())
def test_chinese_notebook_page_shows_the_chinese_narrative(site_dir, url):
    name = url.rstrip("/").split("/")[-1]
    zh_text = "".join(_article(_soup(site_dir, "zh/" + url)).get_text().split())
    en_text = " ".join(_article(_soup(site_dir, url)).get_text().split())
    for sentence in _notebook_narrative("zh", name):
        assert "".join(sentence.split()) in zh_text, f"zh/{url} lacks the Chinese narrative: {sentence!r}"
    for sentence in _notebook_narrative("en", name):
        assert " ".join(sentence.split()) in en_text, f"{url} lacks the English narrative: {sentence!r}"
        assert " ".join(sentence.split()) not in " ".join(zh_text.split()), f"zh/{url} shows English narrative"


def test_the_only_notebook_files_are_the_downloads_next_to_their_pages(site_dir):
    """Notebooks are rendered as pages; the .ipynb files in the site are the source notebooks,
    copied to ``tutorials/`` (``zh/tutorials/``) for each page's download link."""
    found = sorted(p.relative_to(site_dir).as_posix() for p in site_dir.rglob("*.ipynb"))
    expected = sorted(f"{lang_prefix(lang)}tutorials/{nb.name}" for lang in LANGS for nb in (ROOT / "tutorials" / lang).glob("*.ipynb"))
    assert found == expected
    for rel in found:
        lang = "zh" if rel.startswith("zh/") else "en"
        assert (site_dir / rel).read_bytes() == (ROOT / "tutorials" / lang / Path(rel).name).read_bytes()


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("url", notebook_urls())
def test_notebook_pages_link_their_notebook_for_download(site_dir, url, lang):
    here = BASE + lang_prefix(lang) + url
    link = _soup(site_dir, lang_prefix(lang) + url).select_one("p.notebook-download a[download]")
    assert link is not None, f"{here}: no download link"
    target = urlsplit(urljoin(here, link["href"])).path.lstrip("/")
    assert (site_dir / target).is_file(), f"{here}: the download link leads to {target}, which is not in the site"
    assert ("下载" in link.get_text()) == (lang == "zh")


# ----------------------------------------------------------------------- language switch
@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("url", PAGES)
def test_language_switcher_stays_on_the_same_page(site_dir, url, lang):
    here = BASE + lang_prefix(lang) + url
    soup = _soup(site_dir, lang_prefix(lang) + url)
    links = {a["hreflang"]: a["href"] for a in soup.select("a.md-select__link[hreflang]")}
    assert set(links) == set(LANGS), f"{here}: switcher offers {sorted(links)}"
    for target, href in links.items():
        assert urljoin(here, href).rstrip("/") == (BASE + lang_prefix(target) + url).rstrip("/"), (
            f"{here}: the {target} link {href!r} leads to {urljoin(here, href)}"
        )


# -------------------------------------------------------------------------------- search
def _zh_index(site_dir: Path) -> tuple[dict, list[dict]]:
    """The Chinese search index, with locations made site-relative again (``zh/...``)."""
    index = json.loads((site_dir / "zh" / "search" / "search_index.json").read_text(encoding="utf-8"))
    return index, [dict(d, location="zh/" + d["location"]) for d in index["docs"]]


def test_search_index_segments_chinese_words(site_dir):
    index, zh_docs = _zh_index(site_dir)
    separator = re.compile(index["config"]["separator"])
    indexed_pages = {d["location"].split("#")[0] for d in zh_docs}
    assert {"zh/" + u for u in PAGES} <= indexed_pages, f"zh pages missing from the index: {set('zh/' + u for u in PAGES) - indexed_pages}"

    # "推理引擎" sits inside a sentence of the Chinese home page; without jieba the index holds the
    # whole run of Chinese characters as one "word" and a search for 引擎 finds nothing.
    source = (ROOT / "docs_zh" / "index.md").read_text(encoding="utf-8")
    assert re.search(r"[\u4e00-\u9fff]推理引擎[\u4e00-\u9fff（]", source), "test premise: 推理引擎 inside a sentence"
    home = [d for d in zh_docs if d["location"] == "zh/"]
    tokens = {t for d in home for t in separator.split(re.sub(r"<[^>]+>", " ", d["text"])) if t}
    assert "引擎" in tokens and "推理" in tokens, sorted(t for t in tokens if CJK.search(t))[:40]
    assert not any("推理引擎" in t for t in tokens)

    notebook = [d for d in zh_docs if d["location"].startswith("zh/tutorials/")]
    assert notebook and any("\u200b" in d["text"] for d in notebook), "the zh notebook page is not segmented"


# ------------------------------------------------------------------------- local assets
def test_mathjax_is_served_from_the_site(site_dir):
    mathjax = site_dir / "assets" / "javascripts" / "mathjax" / "tex-svg.js"
    assert mathjax.is_file() and mathjax.stat().st_size > 1_000_000
    assert (site_dir / "assets" / "javascripts" / "mathjax-config.js").is_file()


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("url", PAGES)
def test_pages_load_nothing_from_other_hosts(site_dir, url, lang):
    here = BASE + lang_prefix(lang) + url
    soup = _soup(site_dir, lang_prefix(lang) + url)
    scripts = [s["src"] for s in soup.find_all("script", src=True)]
    has_math = bool(soup.select(".arithmatex")) or (url.startswith("tutorials/") and _notebook_has_math(lang, url))
    loads_mathjax = any(s.endswith("mathjax/tex-svg.js") for s in scripts)
    assert loads_mathjax == has_math, f"{here}: MathJax {'not ' if has_math else ''}loaded on a page {'with' if has_math else 'without'} math"
    assert not any(s.strip() == "" for s in scripts), f"{here}: <script src=''>"
    loaded = scripts
    loaded += [l["href"] for l in soup.find_all("link", href=True) if set(l.get("rel", [])) & {"stylesheet", "icon", "preload", "modulepreload", "manifest"}]
    loaded += [t["src"] for t in soup.find_all(["img", "iframe", "source", "audio", "video", "embed"], src=True)]
    foreign = [u for u in loaded if urlsplit(urljoin(here, u)).netloc not in ("site.test", "")]
    assert not foreign, f"{here} loads from other hosts: {foreign}"
    css = " ".join(s.get_text() for s in soup.find_all("style"))
    assert not re.search(r"@import\s+url\(\s*['\"]?https?:|url\(\s*['\"]?https?://", css), f"{here}: inline CSS loads a remote URL"


@pytest.mark.parametrize("url", ["", "concepts/", "routing-trace/"])
def test_markdown_math_is_marked_for_mathjax(site_dir, url):
    for lang in LANGS:
        article = _article(_soup(site_dir, lang_prefix(lang) + url))
        assert article.select(".arithmatex"), f"{lang}/{url}: no arithmatex math"
        # every $...$ of the source must have become an arithmatex span; none may stay in the text
        text = " ".join(el.get_text() for el in article.find_all(["p", "li", "td"]) if not el.find_parent(["pre", "code"]) and not el.find_parent(class_="arithmatex") and not el.select(".arithmatex"))
        assert not re.search(r"\$[^$\s][^$]*\$", text), f"{lang}/{url}: unconverted $...$ math"


def _notebook_has_math(lang: str, url: str) -> bool:
    cells = json.loads((ROOT / "tutorials" / lang / (url.strip("/").split("/")[-1] + ".ipynb")).read_text(encoding="utf-8"))["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return "$" in text or "\\(" in text


# ---------------------------------------------------------------- search per language
def test_each_language_has_its_own_search_index(site_dir):
    en = json.loads((site_dir / "search" / "search_index.json").read_text(encoding="utf-8"))["docs"]
    _, zh = _zh_index(site_dir)
    assert en and zh
    assert not [d["location"] for d in en if d["location"].startswith("zh/")], "Chinese pages in the English index"
    assert {d["location"].split("#")[0] for d in en} >= set(PAGES)
    assert sum(bool(CJK.search(d["title"] + d["text"])) for d in zh) > 0.8 * len(zh)


@pytest.mark.parametrize("url", ["", "concepts/", "engines/vllm/", "tutorials/01_record_and_replay/"])
def test_chinese_pages_search_the_chinese_index(site_dir, url):
    here = BASE + "zh/" + url
    config = json.loads(_soup(site_dir, "zh/" + url).select_one("script#__config").get_text())
    assert urljoin(here, config["base"] + "/").rstrip("/") == (BASE + "zh").rstrip("/"), f"{here}: base {config['base']!r}"
    config = json.loads(_soup(site_dir, url).select_one("script#__config").get_text())
    assert urljoin(BASE + url, config["base"] + "/") == BASE


def test_glossary_terms_are_indexed_whole(site_dir):
    """路由回放 is one indexed word (jieba user dictionary), so the query 路由回放 matches it."""
    index, zh = _zh_index(site_dir)
    separator = re.compile(index["config"]["separator"])
    tokens = {t for d in zh for t in separator.split(re.sub(r"<[^>]+>", " ", d["text"])) if t}
    assert {"路由回放", "训推不一致", "策略陈旧性"} <= tokens


# ------------------------------------------------------------------ sitemap, 404 pages
def test_sitemaps_never_contain_none(site_dir):
    sitemaps = list(site_dir.rglob("sitemap.xml"))
    for path in sitemaps:
        text = path.read_text(encoding="utf-8")
        assert "None" not in text, f"{path.relative_to(site_dir)} holds 'None' URLs"
        assert all(loc.startswith("https://") for loc in re.findall(r"<loc>([^<]*)</loc>", text))


@pytest.mark.parametrize("lang", LANGS)
def test_each_language_has_a_404_page_in_its_language(site_dir, lang):
    path = site_dir / lang_prefix(lang) / "404.html"
    assert path.is_file(), f"{path.relative_to(site_dir)} missing"
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    assert soup.html.get("lang", "").startswith(lang), f"{path.name}: <html lang={soup.html.get('lang')!r}>"
    article = soup.select_one("article") or soup.body
    assert bool(CJK.search(article.get_text())) == (lang == "zh")


# ------------------------------------------------------------------------ API cross-links
@pytest.mark.parametrize("lang", LANGS)
def test_pages_link_api_names_to_existing_api_anchors(site_dir, lang):
    api_ids = {el["id"] for el in _soup(site_dir, lang_prefix(lang) + "api/").find_all(id=True)}
    checked = 0
    for url in ("", "routing-trace/", "routing-replay/", "engines/reference.md".replace(".md", "/")):
        here = BASE + lang_prefix(lang) + url
        for a in _article(_soup(site_dir, lang_prefix(lang) + url)).select("a[href*='api/#'] > code"):
            target = urljoin(here, a.parent["href"])
            assert urlsplit(target).path.rstrip("/") == urlsplit(BASE + lang_prefix(lang) + "api/").path.rstrip("/"), f"{here}: {target}"
            assert urlsplit(target).fragment in api_ids, f"{here}: {a.get_text()} links to a missing anchor {target}"
            checked += 1
    assert checked >= 5, f"{lang}: only {checked} API links found"


@pytest.mark.parametrize("lang", LANGS)
def test_notebook_figures_are_full_width_and_zoomable(site_dir, lang):
    css = (site_dir / "assets" / "stylesheets" / "notebooks.css").read_text(encoding="utf-8")
    assert "width: 100%" in css and "notebook-zoomed" in css
    assert (site_dir / "assets" / "javascripts" / "notebooks.js").is_file()
    url = notebook_urls()[1]
    soup = _soup(site_dir, lang_prefix(lang) + url)
    here = BASE + lang_prefix(lang) + url
    sheets = [urlsplit(urljoin(here, l["href"])).path for l in soup.find_all("link", rel="stylesheet")]
    assert "/assets/stylesheets/notebooks.css" in sheets, sheets
    assert soup.select(".jupyter-wrapper .jp-OutputArea-output img"), f"{here}: no figure to check"


def test_chinese_api_reference_has_chinese_labels(site_dir):
    zh = _soup(site_dir, "zh/api/")
    titles = {el.get_text(strip=True) for el in zh.select(".doc-section-title")}
    headers = {th.get_text(strip=True) for th in zh.select(".doc table th")}
    assert titles and not titles & {"Parameters:", "Returns:", "Raises:", "Attributes:"}, titles
    assert "参数：" in titles and not headers & {"Name", "Type", "Description", "Default"}, headers
    en = {el.get_text(strip=True) for el in _soup(site_dir, "api/").select(".doc-section-title")}
    assert "Parameters:" in en

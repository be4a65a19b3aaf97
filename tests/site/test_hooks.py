"""The docs hooks' own logic, without a build: site/repository URLs from one setting, edit paths,
per-language search indexes, and where MathJax is loaded."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest

from site_helpers import ROOT

pytestmark = pytest.mark.site


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs_hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


site_links = _hook("site_links")
search_scope = _hook("search_scope")
mathjax = _hook("mathjax")


def test_one_setting_gives_site_url_and_repo_url(monkeypatch):
    monkeypatch.delenv("GITHUB_REPOSITORY", raising=False)
    assert site_links.derived_urls("Example/moe-replay") == (
        "https://example.github.io/moe-replay/",
        "https://github.com/Example/moe-replay",
    )
    config = SimpleNamespace(extra={"repository": ""}, site_url=None, repo_url=None, repo_name=None, edit_uri=None)
    site_links.on_config(config)
    assert config.site_url is None and config.repo_url is None  # nothing known: nothing invented
    monkeypatch.setenv("GITHUB_REPOSITORY", "Example/moe-replay")  # what GitHub Actions sets
    site_links.on_config(config)
    assert config.site_url == "https://example.github.io/moe-replay/"
    assert config.repo_url == "https://github.com/Example/moe-replay"
    with pytest.raises(ValueError, match="owner/name"):
        site_links.repository(SimpleNamespace(extra={"repository": "https://github.com/x/y"}))


def test_mkdocs_yml_has_the_one_line_to_set():
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert "\nextra:\n" in text and '\n  repository: ""\n' in text
    assert "\nsite_url:" not in text and "\nrepo_url:" not in text  # derived, never set twice


def test_edit_links_point_at_the_real_sources():
    assert site_links.source_path(str(ROOT / "docs_zh" / "concepts.md")) == "docs_zh/concepts.md"
    assert site_links.source_path(str(ROOT / ".executed" / "tutorials" / "zh" / "x.ipynb")) == "tutorials/zh/x.ipynb"
    assert site_links.source_path("/elsewhere/page.md") is None


def test_notebook_pages_start_with_a_download_link_in_their_language():
    for dest, label in (("tutorials/01_x/index.html", "Download this notebook"), ("zh/tutorials/01_x/index.html", "下载此 notebook")):
        page = SimpleNamespace(file=SimpleNamespace(src_uri="tutorials/01_x.ipynb", dest_uri=dest))
        out = site_links.on_page_content("<h1>T</h1>", page, None, None)
        assert out.startswith('<p class="notebook-download"><a href="../01_x.ipynb" download>' + label)
    page = SimpleNamespace(file=SimpleNamespace(src_uri="concepts.md", dest_uri="concepts/index.html"))
    assert site_links.on_page_content("<p>x</p>", page, None, None) == "<p>x</p>"


def test_sitemaps_are_removed_without_a_site_url(tmp_path):
    (tmp_path / "zh").mkdir()
    (tmp_path / "sitemap.xml").write_text("<loc>None/</loc>")
    (tmp_path / "sitemap.xml.gz").write_bytes(b"x")
    (tmp_path / "zh" / "sitemap.xml").write_text("<loc>None/zh/</loc>")
    site_links.on_post_build(SimpleNamespace(site_dir=str(tmp_path), site_url=None))
    assert not list(tmp_path.rglob("sitemap.xml*"))


def test_search_index_is_split_by_language_and_chinese_pages_search_the_chinese_one():
    index = {"config": {"separator": "x"}, "docs": [
        {"location": "", "title": "Home", "text": "a"},
        {"location": "zh/", "title": "首页", "text": "b"},
        {"location": "zh/concepts/#kl", "title": "KL", "text": "c"},
    ]}
    rest, zh = search_scope.split_index(index, "zh")
    assert [d["location"] for d in rest["docs"]] == [""]
    assert [d["location"] for d in zh["docs"]] == ["", "concepts/#kl"]
    assert zh["config"] == index["config"]
    page = '<script id="__config" type="application/json">{"base": "../..", "search": "w.js"}</script>'
    assert json.loads(search_scope.rebase(page, "..").split(">", 1)[1].rsplit("<", 1)[0]) == {"base": "..", "search": "w.js"}


def test_mathjax_is_dropped_from_pages_without_math(tmp_path):
    scripts = '<script src="../assets/javascripts/mathjax-config.js"></script>\n<script src="../assets/javascripts/mathjax/tex-svg.js"></script>\n'
    plain = SimpleNamespace(file=SimpleNamespace(src_uri="faq.md", abs_src_path=""))
    assert "mathjax" not in mathjax.on_post_page("<p>no math</p>" + scripts, plain, None)
    with_math = '<p><span class="arithmatex">\\(x\\)</span></p>' + scripts
    assert mathjax.on_post_page(with_math, plain, None) == with_math
    nb = tmp_path / "n.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": ["ratio $r_t$"]}]}))
    notebook = SimpleNamespace(file=SimpleNamespace(src_uri="tutorials/n.ipynb", abs_src_path=str(nb)))
    assert "tex-svg.js" in mathjax.on_post_page("<div>x</div>" + scripts, notebook, None)


api_links = _hook("api_links")


def test_api_names_come_from_the_documented_modules():
    anchors = api_links.anchors()
    assert anchors["RoutingTrace"] == "reference_impl.routing.RoutingTrace"
    assert anchors["replay_routing"] == "reference_impl.replay.replay_routing"
    assert anchors["minirl_loss"] == "reference_impl.objectives.minirl_loss"
    assert all(anchor.startswith("reference_impl.") for anchor in anchors.values())


def test_inline_code_mentions_link_to_the_api_page_except_in_links_headings_and_code():
    href = lambda name, attr: {"RoutingTrace": "../api/#r.RoutingTrace"}.get(name) and "../api/#r.RoutingTrace" + attr  # noqa: E731
    page = (
        "<h2>The <code>RoutingTrace</code></h2><p>Use <code>RoutingTrace.agreement</code> or <code>RoutingTrace()</code>, "
        '<a href="x"><code>RoutingTrace</code></a>, not <code>other</code>.</p><pre><code>RoutingTrace</code></pre>'
    )
    out = api_links.link_mentions(page, href)
    assert "<code>RoutingTrace.agreement</code></a>" in out
    assert '<a href="../api/#r.RoutingTrace"><code>RoutingTrace()</code></a>' in out
    assert out.count("<a ") == 3  # the heading, the existing link and the code block are untouched
    assert "<code>other</code>" in out and "<h2>The <code>RoutingTrace</code></h2>" in out

"""The built site in headless Chromium, served by http.server on 127.0.0.1.

For the home, concepts and notebook pages in both languages: nothing is requested from any host
but the local server (Chrome performance log, i.e. the DevTools Network events), MathJax typesets
every formula (``mjx-container`` elements, no ``$$`` or ``\\(`` left in the visible text), Chinese
glyphs render (not as the missing-glyph box), and Chinese search finds a word inside a sentence.
Screenshots go to ``.artifacts/screenshots/`` (gitignored) for a human to look at.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

import pytest

from site_fixtures import browser, screenshots, site_dir, site_url  # noqa: F401 - pytest fixtures
from site_helpers import lang_prefix, notebook_urls

pytestmark = pytest.mark.site

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
NETWORK_SCHEMES = {"http", "https", "ws", "wss", "ftp"}
BROWSER_PAGES = ["", "concepts/", *notebook_urls()]
# Material looks for a sitemap.xml next to each <link rel=alternate> target (a language root in its
# own i18n); with per-page alternates those probes 404 on the local server. Harmless and local.
ALLOWED_404 = re.compile(r"/sitemap\.xml$")

WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
const deadline = Date.now() + 20000;
(function poll() {
  if (!document.querySelector('script[src$="mathjax/tex-svg.js"]')) { done("ready: no math on this page"); return; }
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise && typeof mj.typesetPromise === "function") {
    mj.startup.promise.then(() => setTimeout(() => done("ready"), 200), (e) => done("error: " + e));
  } else if (Date.now() > deadline) {
    done("MathJax never loaded");
  } else {
    setTimeout(poll, 50);
  }
})();
"""

GLYPHS = """
const canvas = document.createElement("canvas");
canvas.width = 64; canvas.height = 64;
const g = canvas.getContext("2d");
const font = getComputedStyle(document.querySelector(".md-typeset")).fontFamily;
function draw(ch) {
  g.clearRect(0, 0, 64, 64);
  g.font = "48px " + font;
  g.fillStyle = "#000";
  g.fillText(ch, 4, 52);
  return Array.from(g.getImageData(0, 0, 64, 64).data).join(",");
}
return {zhong: draw("中"), lu: draw("路"), missing: draw(String.fromCodePoint(0x10FFFD)), font: font};
"""


def _network_events(driver) -> list[dict]:
    return [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]


def _load(browser, url: str) -> list[dict]:
    _network_events(browser)  # drop what came before (the start page, the previous test)
    browser.get(url)
    state = browser.execute_async_script(WAIT_FOR_MATH)
    assert state.startswith("ready"), f"{url}: {state}"
    return _network_events(browser)


def _visible_text(browser) -> str:
    return browser.execute_script("return document.querySelector('article.md-content__inner').innerText")


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("page", BROWSER_PAGES)
def test_page_renders_math_and_stays_local(browser, site_url, screenshots, page, lang):
    url = site_url + lang_prefix(lang) + page
    events = _load(browser, url)

    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    requested += [e["params"]["url"] for e in events if e["method"] == "Network.webSocketCreated"]
    assert requested and requested[0].rstrip("/") == url.rstrip("/"), f"the performance log missed the page load: {requested[:3]}"
    foreign = [u for u in requested if urlsplit(u).scheme in NETWORK_SCHEMES and urlsplit(u).hostname not in LOCAL_HOSTS]
    assert not foreign, f"{url} requested other hosts: {foreign}"
    failed = [
        (e["params"]["response"]["url"], e["params"]["response"]["status"])
        for e in events
        if e["method"] == "Network.responseReceived"
        and e["params"]["response"]["status"] >= 400
        and not ALLOWED_404.search(urlsplit(e["params"]["response"]["url"]).path)
    ]
    assert not failed, f"{url}: failed requests {failed}"

    counts = browser.execute_script(
        """
        const article = document.querySelector("article.md-content__inner");
        const math = Array.from(article.querySelectorAll(".arithmatex"));
        return {
          arithmatex: math.length,
          untypeset: math.filter(el => !el.querySelector("mjx-container")).map(el => el.textContent.slice(0, 60)),
          notebook: article.querySelectorAll(".jupyter-wrapper mjx-container").length,
          display: article.querySelectorAll("mjx-container[display='true']").length,
          total: article.querySelectorAll("mjx-container").length,
          errors: article.querySelectorAll("mjx-merror, [data-mjx-error]").length,
        };
        """
    )
    browser.save_screenshot(str(screenshots / f"{lang}-{page.strip('/').replace('/', '-') or 'home'}.png"))
    assert counts["total"] > 0, f"{url}: no mjx-container: math not rendered"
    assert not counts["untypeset"], f"{url}: formulas left untypeset: {counts['untypeset']}"
    assert counts["errors"] == 0, f"{url}: MathJax reported TeX errors"
    if page.startswith("tutorials/"):
        assert counts["notebook"] > 0 and counts["display"] > 0, f"{url}: notebook math not rendered: {counts}"
    text = _visible_text(browser)
    for raw in ("$$", "\\(", "\\)", "\\[", "\\]", "\\frac", "\\sum", "\\theta"):
        assert raw not in text, f"{url}: raw TeX {raw!r} in the visible text"
    assert not re.search(r"\$[^$\n]{1,80}\$", text), f"{url}: raw $...$ math in the visible text"


def test_chinese_glyphs_render(browser, site_url):
    _load(browser, site_url + "zh/")
    glyphs = browser.execute_script(GLYPHS)
    boxes = glyphs["zhong"] == glyphs["missing"] or glyphs["zhong"] == glyphs["lu"]
    assert not boxes, (
        "Chinese characters render as missing-glyph boxes: no CJK font is installed for Chromium "
        f"(font-family {glyphs['font']}). Install the Debian package fonts-noto-cjk."
    )


def test_chinese_search_finds_a_word_inside_a_sentence(browser, site_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _load(browser, site_url + "zh/concepts/")
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys("引擎")  # only ever appears inside longer runs of Chinese text (推理引擎, 训练引擎)
    WebDriverWait(browser, 20).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    )
    results = browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")
    hrefs = [r.get_attribute("href") for r in results]
    assert any("/zh/" in h for h in hrefs), f"no Chinese page found for 引擎: {hrefs}"


def _search(browser, url: str, query: str) -> tuple[list[str], list[str]]:
    """Type ``query`` into the search box of ``url``; (result hrefs, "missing term" notes)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _load(browser, url)
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.click()
    box.send_keys(query)
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item"))
    hrefs = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")]
    missing = [p.text for p in browser.find_elements(By.CSS_SELECTOR, ".md-search-result__terms")]
    return hrefs, missing


@pytest.mark.parametrize(
    "lang, query",
    [("zh", "路由回放"), ("zh", "训推不一致"), ("en", "replay")],
)
def test_search_stays_in_the_page_language(browser, site_url, lang, query):
    hrefs, missing = _search(browser, site_url + lang_prefix(lang) + "concepts/", query)
    assert hrefs, f"no result for {query!r}"
    in_zh = [h for h in hrefs if "/zh/" in h]
    if lang == "zh":
        assert in_zh == hrefs, f"{query!r} on a Chinese page found English pages: {sorted(set(hrefs) - set(in_zh))[:5]}"
    else:
        assert not in_zh, f"{query!r} on an English page found Chinese pages: {in_zh[:5]}"


@pytest.mark.parametrize(
    "lang, query",
    [
        # open (issue 15): the theme's query tokenizer splits 路由回放 and one result shows "缺少: 路由*"
        pytest.param("zh", "路由回放", marks=pytest.mark.xfail(strict=True, reason="issue 15: Chinese query segmentation in the search box")),
        ("zh", "训推不一致"),
        ("en", "replay"),
    ],
)
def test_search_results_match_every_query_term(browser, site_url, lang, query):
    _, missing = _search(browser, site_url + lang_prefix(lang) + "concepts/", query)
    assert not [m for m in missing if m.strip()], f"{query!r}: results marked with missing terms: {missing[:3]}"

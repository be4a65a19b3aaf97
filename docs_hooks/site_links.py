"""MkDocs hook: the site's own URLs from one setting, edit and download links, no broken sitemap.

* **One setting.** ``extra.repository`` in ``mkdocs.yml`` (``owner/name`` on GitHub), or the
  ``GITHUB_REPOSITORY`` environment variable when it is empty (GitHub Actions sets it, so the Pages
  job needs nothing). From it ``on_config`` derives ``repo_url`` (``https://github.com/owner/name``)
  and, unless ``site_url`` is set explicitly, ``site_url`` (``https://owner.github.io/name/``).
  Nothing is known yet, so by default neither is set.
* **Edit links.** With a repository, every page gets ``page.edit_url`` pointing at its real source
  (``docs_en/x.md``, ``docs_zh/x.md``, ``tutorials/<lang>/x.ipynb``), not at the staging folder
  the build reads (``docs_hooks/staging.py``); the theme shows its edit button.
* **Download links.** Each notebook page starts with a link to its notebook, copied next to the
  page's folder (``tutorials/x.ipynb``, ``zh/tutorials/x.ipynb``) from ``tutorials/<lang>/``.
* **Notebook figures.** ``assets/stylesheets/notebooks.css`` and ``assets/javascripts/notebooks.js``
  (from ``docs_hooks/assets/``, listed in ``mkdocs.yml``) show output figures at full width and
  zoom one to full screen on click.
* **404 pages.** mkdocs-static-i18n renders ``404.html`` once per language, each time to the
  site root, so the last language's overwrote the others. ``on_post_template`` keeps the default
  language's page at ``404.html`` and writes each other language's to ``<lang>/404.html``
  (``docs_hooks/overrides/404.html`` words it in the build's language).
* **Sitemap.** MkDocs writes ``None/...`` URLs into ``sitemap.xml`` without a ``site_url``; then
  the sitemaps are removed instead.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parent.parent
BRANCH = "main"
DOWNLOAD_LABEL = {"en": "Download this notebook", "zh": "下载此 notebook"}


def repository(config) -> str:
    """``owner/name`` from ``extra.repository``, else ``$GITHUB_REPOSITORY``, else ``""``."""
    value = (config.extra.get("repository") or os.environ.get("GITHUB_REPOSITORY") or "").strip().strip("/")
    if value and value.count("/") != 1:
        raise ValueError(f"extra.repository must be 'owner/name' (a GitHub repository), got {value!r}")
    return value


def derived_urls(repo: str) -> tuple[str, str]:
    """(site_url, repo_url) of a GitHub repository published with GitHub Pages."""
    owner, name = repo.split("/")
    return f"https://{owner.lower()}.github.io/{name}/", f"https://github.com/{owner}/{name}"


def source_path(abs_src_path: str) -> str | None:
    """The repository path of a staged page: ``.staging/zh/x.md`` -> ``docs_zh/x.md``, a staged
    (executed) notebook -> ``tutorials/<lang>/x.ipynb``; None outside the repository."""
    real = Path(abs_src_path).resolve()
    try:
        rel = real.relative_to(ROOT)
    except ValueError:
        return None
    parts = rel.parts
    if parts[:2] == (".executed", "tutorials"):
        return Path("tutorials", *parts[2:]).as_posix()
    return rel.as_posix()


def page_language(dest_uri: str) -> str:
    return "zh" if dest_uri.startswith("zh/") else "en"


def on_config(config):
    repo = repository(config)
    if repo:
        site_url, repo_url = derived_urls(repo)
        if not config.site_url:
            config.site_url = site_url
        config.repo_url = repo_url
        config.repo_name = repo
        config.edit_uri = ""  # page.edit_url is set per page below
    return config


def on_page_context(context, page, config, nav):
    if config.repo_url:
        path = source_path(page.file.abs_src_path)
        page.edit_url = f"{config.repo_url.rstrip('/')}/edit/{BRANCH}/{path}" if path else None
    else:
        page.edit_url = None
    return context


def on_page_content(html_text, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html_text
    lang = page_language(page.file.dest_uri)
    name = Path(page.file.src_uri).name
    link = (
        f'<p class="notebook-download"><a href="../{html.escape(name)}" download>'
        f"{DOWNLOAD_LABEL[lang]} ({html.escape(name)})</a></p>\n"
    )
    return link + html_text


_DEFAULT_404: dict[str, str] = {}


def on_post_template(output, template_name, config):
    if template_name != "404.html":
        return output
    lang = config.theme.get("language") or "en"
    if lang == "en":
        _DEFAULT_404[config.site_dir] = output
        return output
    target = Path(config.site_dir) / lang / "404.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(output, encoding="utf-8")
    return _DEFAULT_404.get(config.site_dir, output)


@event_priority(-200)  # after the i18n plugin's builds of every language (-100)
def on_post_build(config):
    site = Path(config.site_dir)
    assets = Path(__file__).resolve().parent / "assets"
    for name, folder in (("notebooks.css", "stylesheets"), ("notebooks.js", "javascripts")):
        (site / "assets" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(assets / name, site / "assets" / folder / name)
    for lang, prefix in (("en", ""), ("zh", "zh/")):
        source = ROOT / "tutorials" / lang
        target = site / prefix / "tutorials"
        if source.is_dir() and target.is_dir():
            for notebook in sorted(source.glob("*.ipynb")):
                shutil.copyfile(notebook, target / notebook.name)
    if not config.site_url:
        for sitemap in list(site.glob("sitemap.xml*")) + list(site.glob("*/sitemap.xml*")):
            sitemap.unlink()

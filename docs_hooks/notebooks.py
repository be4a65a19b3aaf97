"""MkDocs hook: make mkdocs-jupyter and mkdocs-static-i18n work together.

1. ``on_files`` (after the i18n plugin, priority -110). The i18n plugin rebuilds every file object,
   which drops mkdocs-jupyter's notebook wrappers: notebooks then count as static assets and are
   copied as raw JSON while ``--strict`` still passes. Each ``.ipynb`` is turned back into a
   documentation page at the URL a Markdown page of the same name would get (``tutorials/x/``,
   ``zh/tutorials/x/``), with its language alternates restored so that the language switcher
   stays on the notebook.

2. ``on_page_content``. Notebook headings get ids from their text, which drops Chinese entirely.
   Headings are matched by position with the default language's copy of the same notebook, which
   must have the same heading levels in the same order, and take its ids; the page's table of
   contents is rebuilt with those ids, so that ``#anchors`` are equal in every language.
   nbconvert's MathJax 2 loader (an empty ``<script src="">``) is dropped: the site loads MathJax 3.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import nbformat
from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File
from mkdocs.structure.toc import get_toc

_HEADING = re.compile(r'<h([1-6])\s+id="([^"]*)"\s*>(.*?)</h\1>', re.S)
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_TAG = re.compile(r"<[^>]+>")
# nbconvert's MathJax 2 loader: an empty <script src=""> plus a config block MathJax 3 ignores.
# The site loads MathJax 3 itself (docs_hooks/mathjax.py), so the block is dropped.
_NBCONVERT_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S)


class NotebookPage(File):
    """A notebook rendered as a page (what mkdocs-jupyter's wrapper provides before i18n)."""

    def is_documentation_page(self) -> bool:
        return True


def _i18n(config):
    plugin = config.plugins.get("i18n")
    if plugin is None:
        raise PluginError("notebooks hook: the i18n plugin is not configured")
    return plugin


def _prefix(lang: str, default: str) -> str:
    """Where a language's pages go: the default language at the root, the others under ``<lang>/``."""
    return "" if lang == default else f"{lang}/"


def _page_dest(dest_uri: str, use_directory_urls: bool) -> str:
    """``tutorials/x.ipynb`` -> ``tutorials/x/index.html`` (what ``tutorials/x.md`` would give)."""
    stem = dest_uri.removesuffix(".ipynb")
    return f"{stem}/index.html" if use_directory_urls else f"{stem}.html"


def _notebook_page(src_path: str, dest_uri: str, config) -> NotebookPage:
    return NotebookPage(
        src_path,
        config.docs_dir,
        config.site_dir,
        config.use_directory_urls,
        dest_uri=_page_dest(dest_uri, config.use_directory_urls),
    )


@event_priority(-110)
def on_files(files, config):
    i18n = _i18n(config)
    default, current = i18n.default_language, i18n.current_language
    docs_dir = Path(config.docs_dir)
    for old in [f for f in files if f.src_uri.endswith(".ipynb") and not f.is_documentation_page()]:
        norm = getattr(old, "norm_src_uri", old.src_uri)
        page = _notebook_page(old.src_path, _prefix(current, default) + norm, config)
        page.inclusion = old.inclusion
        for attr in ("locale", "locale_alternate_of", "localization", "norm_src_uri"):
            if hasattr(old, attr):
                setattr(page, attr, getattr(old, attr))
        page.alternates = {}
        for lang in i18n.build_languages:
            if lang == current:
                page.alternates[lang] = page
            elif (docs_dir / lang / norm).is_file():
                page.alternates[lang] = _notebook_page(f"{lang}/{norm}", _prefix(lang, default) + norm, config)
        files.remove(old)
        files.append(page)
    # the i18n sitemap lists each language's pages; it was computed before the notebooks became pages
    i18n.i18n_files_per_language[current] = files.documentation_pages()
    return files


def _notebook_headings(path: Path) -> list[tuple[int, str]]:
    """(level, text) of the Markdown headings of a notebook, in order (fenced code skipped)."""
    nb = nbformat.read(path, as_version=4)
    out = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        fenced = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            m = None if fenced else _MD_HEADING.match(line)
            if m:
                out.append((len(m.group(1)), m.group(2)))
    return out


def _slug(text: str) -> str:
    from mkdocs_jupyter.utils import slugify  # the slug mkdocs-jupyter gives English headings

    return slugify(text)


def _ids_from(headings: list[tuple[int, str]]) -> list[str]:
    ids, seen = [], {}
    for _, text in headings:
        base = _slug(re.sub(r"[$\\{}^_]", " ", text)) or "section"
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}_{n}")
    return ids


def _nest(flat: list[dict]) -> list[dict]:
    root: list[dict] = []
    stack: list[dict] = []
    for item in flat:
        while stack and stack[-1]["level"] >= item["level"]:
            stack.pop()
        (stack[-1]["children"] if stack else root).append(item)
        stack.append(item)
    return root


def on_page_content(html_out, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html_out
    i18n = _i18n(config)
    norm = getattr(page.file, "norm_src_uri", page.file.src_uri)
    reference = Path(config.docs_dir) / i18n.default_language / norm
    if not reference.is_file():
        raise PluginError(f"notebooks hook: {norm} has no {i18n.default_language} version")
    ref_headings = _notebook_headings(reference)
    ref_ids = _ids_from(ref_headings)
    found = list(_HEADING.finditer(html_out))
    levels = [int(m.group(1)) for m in found]
    if levels != [lvl for lvl, _ in ref_headings]:
        raise PluginError(
            f"notebooks hook: {page.file.src_uri} has heading levels {levels} but its "
            f"{i18n.default_language} version has {[lvl for lvl, _ in ref_headings]}; "
            "translated notebooks must keep the same headings in the same order"
        )
    toc, pieces, last = [], [], 0
    for m, new_id in zip(found, ref_ids):
        level, old_id, inner = int(m.group(1)), m.group(2), m.group(3)
        inner = inner.replace(f'href="#{old_id}"', f'href="#{new_id}"')
        pieces.append(html_out[last : m.start()])
        pieces.append(f'<h{level} id="{new_id}">{inner}</h{level}>')
        last = m.end()
        text = html.unescape(_TAG.sub("", inner)).replace("¶", "").strip()
        toc.append({"level": level, "id": new_id, "name": html.escape(text), "children": []})
    pieces.append(html_out[last:])
    page.toc = get_toc(_nest(toc))
    return _NBCONVERT_MATHJAX.sub("", "".join(pieces))

"""MkDocs hook: link every mention of a documented function or class to the API reference.

The API page (``api.md``, both languages) documents the modules named by its ``::: module``
lines; each public name (the module's ``__all__``, read statically, no import) gets the anchor
``module.Name`` from mkdocstrings. In every other page, inline code that is exactly such a name
(``RoutingTrace``, ``replay_routing()``, ``RoutingTrace.agreement``) becomes a link to the API page
of the same language, unless it already sits in a link or a code block. Names defined by two
documented modules are left alone.

``on_config`` also gives mkdocstrings the language of the build: it picks its locale from
``theme.language`` in its own ``on_config``, which runs before mkdocs-static-i18n sets the language
of the current build (priority -100), so the Chinese API page got English labels ("Parameters:").
"""

from __future__ import annotations

import ast
import html
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = "api.md"
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)
_SKIP = re.compile(r"(<pre\b.*?</pre>|<a\b.*?</a>|<h[1-6]\b.*?</h[1-6]>)", re.S)
_CODE = re.compile(r"<code>([A-Za-z_][\w]*)((?:\.[A-Za-z_]\w*)*)(\(\))?</code>")


def documented_modules(api_md: Path = ROOT / "docs_en" / API_PAGE) -> list[str]:
    return _DIRECTIVE.findall(api_md.read_text(encoding="utf-8"))


def public_names(module: str) -> list[str]:
    """``__all__`` of a package module, read from its source."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names: list[str] = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and isinstance(node.value, (ast.List, ast.Tuple)):
                # string entries only (a starred re-export of another module's names is that module's)
                names += [e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return names


def anchors() -> dict[str, str]:
    """Public name -> mkdocstrings anchor (``module.Name``), names defined twice left out."""
    seen: dict[str, list[str]] = {}
    for module in documented_modules():
        for name in public_names(module):
            seen.setdefault(name, []).append(f"{module}.{name}")
    return {name: targets[0] for name, targets in seen.items() if len(targets) == 1}


def link_mentions(page_html: str, href_of) -> str:
    """Wrap ``<code>name</code>`` outside links, headings and code blocks in a link ``href_of(name)``."""

    def code(match: re.Match) -> str:
        href = href_of(match.group(1), match.group(2))
        return match.group(0) if href is None else f'<a href="{html.escape(href, quote=True)}">{match.group(0)}</a>'

    parts = _SKIP.split(page_html)
    return "".join(part if i % 2 else _CODE.sub(code, part) for i, part in enumerate(parts))


_ANCHORS: dict[str, str] | None = None


@event_priority(-200)
def on_config(config):
    plugin = config.plugins.get("mkdocstrings")
    handlers = getattr(plugin, "_handlers", None)
    if handlers is not None and hasattr(handlers, "_locale"):
        handlers._locale = str(config.theme.get("language") or "en").replace("_", "-")
    return config


def on_page_content(page_html, page, config, files):
    global _ANCHORS
    if Path(page.file.src_uri).name == API_PAGE:
        return page_html
    if _ANCHORS is None:
        _ANCHORS = anchors()
    lang_prefix = "zh/" if page.file.dest_uri.startswith("zh/") else ""
    api_url = get_relative_url(f"{lang_prefix}api/", page.url)

    def href_of(name: str, attribute: str) -> str | None:
        anchor = _ANCHORS.get(name)
        if anchor is None:
            return None
        return f"{api_url}#{anchor}"  # members are not all rendered with anchors: link the object

    return link_mentions(page_html, href_of)

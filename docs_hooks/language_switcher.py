"""MkDocs hook: keep the language switcher relative on the home pages.

mkdocs-static-i18n points the switcher of every page at the same page in the other language,
except on the home pages, where it keeps the configured absolute links ``/`` and ``/zh/``. Those
break as soon as the site is served below a sub-path (a project page, a preview folder), so they
are replaced by the home pages' site-relative URLs, which the theme turns into relative links.
Runs after the i18n plugin's ``on_page_context`` (priority 50).
"""

from __future__ import annotations

from mkdocs.plugins import event_priority


@event_priority(0)
def on_page_context(context, page, config, nav):
    i18n = config.plugins.get("i18n")
    if i18n is None:
        return context
    # the i18n plugin assigns the per-page list as an attribute, which is what the theme reads
    alternates = getattr(config.extra, "alternate", None) or []
    for alternate in alternates:
        link = alternate.get("link", "")
        if link.startswith("/") and not link.startswith("//"):
            lang = alternate.get("lang")
            alternate["link"] = "" if lang == i18n.default_language else f"{lang}/"
    return context

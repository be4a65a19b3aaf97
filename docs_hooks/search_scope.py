"""MkDocs hook: one search index per language, so a search on a page finds pages of its language.

mkdocs-static-i18n merges both languages into one ``search/search_index.json`` (Chinese entries
under ``zh/``), and the theme's search reads ``<base>/search/search_index.json``, so every page
searches both languages. After the i18n plugin's last ``on_post_build`` (priority -100) this hook

* splits the merged index: the English entries stay in ``search/search_index.json``; the Chinese
  ones go to ``zh/search/search_index.json`` with their ``zh/`` prefix removed (same config, so
  the same separator for the jieba-segmented words);
* points the theme's ``base`` on every Chinese page at the Chinese root (``zh/``), which is where
  the theme looks for the index and what it resolves result links against.

It is idempotent: the i18n plugin's nested builds also run it, on partial indexes, and the last
call works on the final one. Chinese words the glossary defines (路由回放, 训推不一致, ...) are
kept whole by jieba through ``search.jieba_dict_user`` (``docs_hooks/assets/jieba_user_dict.txt``),
so a query for the term matches the indexed word.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority

OTHER_LANGUAGES = ("zh",)
_CONFIG = re.compile(r'(<script id="__config" type="application/json">)(.*?)(</script>)', re.S)


def split_index(index: dict, lang: str) -> tuple[dict, dict]:
    """(index without ``lang``'s entries, ``lang``'s entries with the ``lang/`` prefix removed)."""
    prefix = f"{lang}/"
    own = [d for d in index["docs"] if d["location"].startswith(prefix)]
    rest = [d for d in index["docs"] if not d["location"].startswith(prefix)]
    scoped = [dict(d, location=d["location"][len(prefix):]) for d in own]
    return dict(index, docs=rest), dict(index, docs=scoped)


def rebase(page_html: str, base: str) -> str:
    """Set ``base`` in the theme's ``__config`` JSON of a page."""

    def replace(match: re.Match) -> str:
        config = json.loads(match.group(2))
        config["base"] = base
        return match.group(1) + json.dumps(config, ensure_ascii=False) + match.group(3)

    return _CONFIG.sub(replace, page_html, count=1)


@event_priority(-200)
def on_post_build(config):
    site = Path(config.site_dir)
    merged_path = site / "search" / "search_index.json"
    if not merged_path.is_file():
        return
    index = json.loads(merged_path.read_text(encoding="utf-8"))
    for lang in OTHER_LANGUAGES:
        root = site / lang
        if not root.is_dir():
            continue
        rest, own = split_index(index, lang)
        if own["docs"]:  # the merged index of this build still holds them: move them out
            (root / "search").mkdir(parents=True, exist_ok=True)
            (root / "search" / "search_index.json").write_text(json.dumps(own, ensure_ascii=False), encoding="utf-8")
            merged_path.write_text(json.dumps(rest, ensure_ascii=False), encoding="utf-8")
            index = rest
        not_found = root / "404.html"  # served anywhere below /<lang>/: its URLs are absolute
        if not_found.is_file():
            text = not_found.read_text(encoding="utf-8")
            rebased = rebase(text, f"/{lang}")
            if rebased != text:
                not_found.write_text(rebased, encoding="utf-8")
        for page in root.rglob("index.html"):
            base = os.path.relpath(root, page.parent).replace(os.sep, "/")
            text = page.read_text(encoding="utf-8")
            rebased = rebase(text, base)
            if rebased != text:
                page.write_text(rebased, encoding="utf-8")

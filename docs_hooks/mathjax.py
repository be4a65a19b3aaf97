"""MkDocs hook: serve MathJax from the site itself (no CDN).

``scripts/setup.sh`` fetches MathJax 3.2.2 from the npm registry into ``.cache/npm/`` (gitignored).
``on_config`` fails the build if it is missing; ``on_post_build`` copies ``tex-svg.js`` (one
self-contained file, SVG output, no web fonts) and our configuration script
(``docs_hooks/assets/mathjax-config.js``) to ``assets/javascripts/`` of the built site, where
``extra_javascript`` in ``mkdocs.yml`` lists them for every page; ``on_post_page`` removes both
script tags from pages without math (no ``arithmatex`` element, and for a notebook page no ``$``
or ``\\(`` in its Markdown cells), so MathJax loads only where a page has math.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
MATHJAX = ROOT / ".cache" / "npm" / "node_modules" / "mathjax" / "es5" / "tex-svg.js"
CONFIG_JS = Path(__file__).resolve().parent / "assets" / "mathjax-config.js"
DEST = Path("assets") / "javascripts"


def on_config(config):
    if not MATHJAX.is_file():
        raise PluginError(
            f"MathJax is missing: expected {MATHJAX.relative_to(ROOT)}. Run `bash scripts/setup.sh` "
            "(it runs `npm install --prefix .cache/npm mathjax@3.2.2`); the site never loads math from a CDN."
        )
    return config


def on_post_build(config):
    dest = Path(config.site_dir) / DEST
    (dest / "mathjax").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MATHJAX, dest / "mathjax" / "tex-svg.js")
    shutil.copyfile(CONFIG_JS, dest / "mathjax-config.js")


_MATHJAX_TAG = re.compile(r'<script[^>]*src="[^"]*(?:mathjax-config\.js|mathjax/tex-svg\.js)"[^>]*>\s*</script>\s*')


def _notebook_has_math(path: str) -> bool:
    try:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return True  # unknown: keep MathJax
    text = "\n".join("".join(c["source"]) for c in cells if c.get("cell_type") == "markdown")
    return "$" in text or "\\(" in text or "\\[" in text


def has_math(output: str, page) -> bool:
    if 'class="arithmatex"' in output:
        return True
    return page.file.src_uri.endswith(".ipynb") and _notebook_has_math(page.file.abs_src_path)


def on_post_page(output, page, config):
    return output if has_math(output, page) else _MATHJAX_TAG.sub("", output)

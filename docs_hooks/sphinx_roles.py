"""MkDocs hook: render Sphinx cross-reference roles in docstrings as plain code.

The package docstrings use Sphinx roles (``:class:`RoutingTrace```), which mkdocstrings (Google
style) leaves as literal text before the code span: ``:class:<code>RoutingTrace</code>``. The
role prefix is removed so that the API reference reads as code names.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")


def on_page_content(html, page, config, files):
    return _ROLE.sub("", html)

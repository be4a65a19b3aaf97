"""Display helpers for the tutorial notebooks: one code cell, labels in the page's language.

The notebooks in ``tutorials/en`` and ``tutorials/zh`` have identical code cells.
``scripts/execute_notebooks.py`` executes each language with ``REFERENCE_IMPL_DOCS_LANG`` set to
``en`` or ``zh``; these helpers read it, so table headers and plot labels come out in the language
of the page that shows them (English when the variable is unset, e.g. in a local Jupyter).

* :func:`t` picks the label: ``t("reward", "奖励")``;
* :func:`table` returns a :class:`Table`, which notebooks render as an HTML table (and a terminal
  as aligned text);
* :func:`show` displays a matplotlib figure as a full-width image with alt text.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

LANG_ENV = "REFERENCE_IMPL_DOCS_LANG"
LANGUAGES = ("en", "zh")
CJK_FONTS = ["Noto Sans CJK SC", "Noto Serif CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei"]


def language() -> str:
    """``en`` or ``zh`` from ``$REFERENCE_IMPL_DOCS_LANG`` (``en`` if unset); anything else is an error."""
    lang = os.environ.get(LANG_ENV, "en") or "en"
    if lang not in LANGUAGES:
        raise ValueError(f"{LANG_ENV} must be one of {LANGUAGES}, got {lang!r}")
    return lang


def t(en: str, zh: str) -> str:
    """The label in the current language."""
    return zh if language() == "zh" else en


@dataclass
class Table:
    """Column headers and rows of already formatted cells (strings or numbers)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str | None = None

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table row {i} has {len(row)} cells, expected {len(self.columns)} ({list(self.columns)})")

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in self.rows)
        caption = f"<caption>{html.escape(self.caption)}</caption>" if self.caption else ""
        return f'<table class="notebook-table">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[str(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join(([self.caption] if self.caption else []) + lines)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str | None = None) -> Table:
    """A :class:`Table`; make it the last expression of a cell (or ``display`` it)."""
    return Table(list(columns), [list(r) for r in rows], caption)


def use_language_fonts() -> None:
    """Let matplotlib draw Chinese labels (a CJK font first in the sans-serif list) on ``zh``."""
    if language() != "zh":
        return
    import matplotlib

    matplotlib.rcParams["font.sans-serif"] = CJK_FONTS + list(matplotlib.rcParams["font.sans-serif"])
    matplotlib.rcParams["axes.unicode_minus"] = False


class Figure:
    """A rendered figure: HTML ``<img>`` at full width with alt text (PNG for other front ends)."""

    def __init__(self, png: bytes, alt: str) -> None:
        self.png, self.alt = png, alt

    def _repr_html_(self) -> str:
        data = base64.b64encode(self.png).decode()
        return (
            f'<img class="notebook-figure" src="data:image/png;base64,{data}" alt="{html.escape(self.alt, quote=True)}" '
            'style="width:100%;height:auto">'
        )

    def _repr_png_(self) -> bytes:
        return self.png


def show(fig, alt: str, dpi: int = 110) -> Figure:
    """Close ``fig`` and return it as a :class:`Figure` with ``alt`` text; make it the cell's last expression."""
    import matplotlib.pyplot as plt

    if not alt.strip():
        raise ValueError("show: a figure needs alt text describing what it shows")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Figure(buf.getvalue(), alt)

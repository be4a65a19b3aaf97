"""reference_impl.notebook: labels follow REFERENCE_IMPL_DOCS_LANG, tables render as HTML tables,
figures as full-width images with alt text."""

from __future__ import annotations

import pytest

from reference_impl import notebook


def test_labels_follow_the_language_setting(monkeypatch):
    monkeypatch.delenv(notebook.LANG_ENV, raising=False)
    assert notebook.language() == "en" and notebook.t("reward", "奖励") == "reward"
    monkeypatch.setenv(notebook.LANG_ENV, "zh")
    assert notebook.t("reward", "奖励") == "奖励"
    monkeypatch.setenv(notebook.LANG_ENV, "fr")
    with pytest.raises(ValueError, match="REFERENCE_IMPL_DOCS_LANG"):
        notebook.language()


def test_table_renders_as_an_html_table_and_as_text():
    tab = notebook.table(["engine", "KL <k3>"], [["bf16", "6.9e-05"], ["fp8", 1.5]])
    html = tab._repr_html_()
    assert html.startswith('<table class="notebook-table"><thead><tr><th>engine</th><th>KL &lt;k3&gt;</th>')
    assert html.count("<tr>") == 3 and "<td>1.5</td>" in html
    assert repr(tab).splitlines()[1].split() == ["bf16", "6.9e-05"]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        notebook.table(["a", "b"], [["x"]])


def test_figure_is_a_full_width_image_with_alt_text():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = notebook.show(fig, alt='reward falls "fast"')
    html = out._repr_html_()
    assert 'alt="reward falls &quot;fast&quot;"' in html and "width:100%" in html
    assert out._repr_png_().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="alt text"):
        notebook.show(plt.figure(), alt=" ")

"""Draw the model-parallel slicing figure of docs_*/model-parallel.md from the rule itself.

    python scripts/make_slicing_figure.py

Every cell's colour is the rank (and micro-batch) that :func:`reference_impl.slicing.slice_routes`
gives it: the figure is computed, not drawn by hand. Writes
``docs_en/assets/figures/model-parallel-slicing.svg`` and the Chinese-labelled
``docs_zh/assets/figures/model-parallel-slicing.svg``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from reference_impl.layers import LayerMap
from reference_impl.slicing import ParallelLayout, slice_routes

ROOT = Path(__file__).resolve().parents[1]
S, B, L = 16, 4, 4
CELL, GAP = 22, 4
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f"]

TEXT = {
    "en": {
        "title": "One global trace [S=16 positions × B=4 sequences × L=4 MoE layers], cut per rank and micro-batch",
        "dp": "DP=2 × 2 micro-batches: rows arange(B).chunk(dp)[d].chunk(M)[m] (strided in the s-major [S·B])",
        "cp": "CP=2: zigzag, rank c gets chunks c and 2·cp−1−c",
        "sp": "CP=2 + TP=2 with sequence parallelism: then the TP chunk of the CP-local sequence",
        "pp": "PP=2: each stage gets its own MoE layers (LayerMap.stage)",
        "pos": "position s →", "row": "sequence b", "layer": "MoE layer",
        "owner_dp": "dp rank {d}, micro-batch {m}", "owner_cp": "cp rank {c}", "owner_sp": "cp {c}, tp {t}", "owner_pp": "stage {p}",
    },
    "zh": {
        "title": "一份全局轨迹 [S=16 个位置 × B=4 条序列 × L=4 个 MoE 层]，按 rank 与 micro-batch 切分",
        "dp": "DP=2 × 2 个 micro-batch：行 arange(B).chunk(dp)[d].chunk(M)[m]（在 s-major 的 [S·B] 中是跨步的）",
        "cp": "CP=2：之字形（zigzag），rank c 取第 c 块与第 2·cp−1−c 块",
        "sp": "CP=2 + TP=2 且开启序列并行：再取 CP 本地序列中的第 tp 块",
        "pp": "PP=2：每个流水线阶段只取自己的 MoE 层（LayerMap.stage）",
        "pos": "位置 s →", "row": "序列 b", "layer": "MoE 层",
        "owner_dp": "dp rank {d}，micro-batch {m}", "owner_cp": "cp rank {c}", "owner_sp": "cp {c}，tp {t}", "owner_pp": "阶段 {p}",
    },
}


def coded_grid() -> torch.Tensor:
    s, b, l = torch.meshgrid(torch.arange(S), torch.arange(B), torch.arange(L), indexing="ij")
    return (s * 100 + b * 10 + l)[..., None]  # [S, B, L, 1], the code names the cell


def owners(layouts: list[tuple[str, ParallelLayout, int]]) -> dict[tuple[int, int, int], int]:
    """(s, b, l) -> index of the (layout, micro-batch) that reads it, through slice_routes."""
    lm = LayerMap.from_config(L)
    grid = coded_grid()
    out = {}
    for i, (_, lay, m) in enumerate(layouts):
        for code in slice_routes(grid, lay, m, lm).reshape(-1).tolist():
            out[(code // 100, code // 10 % 10, code % 10)] = i
    return out


def panel(x0: float, y0: float, heading: str, layouts, labels, by_layer: bool, t: dict) -> tuple[list[str], float]:
    own = owners(layouts)
    rows = L if by_layer else B
    parts = [f'<text x="{x0}" y="{y0}" class="h">{heading}</text>']
    top = y0 + 14
    for r in range(rows):
        parts.append(f'<text x="{x0 - 6}" y="{top + r * CELL + CELL * 0.68}" class="s" text-anchor="end">{r}</text>')
        for s in range(S):
            key = (s, 0, r) if by_layer else (s, r, 0)
            color = COLORS[own[key] % len(COLORS)]
            parts.append(f'<rect x="{x0 + s * CELL}" y="{top + r * CELL}" width="{CELL - 2}" height="{CELL - 2}" fill="{color}"/>')
    for s in range(S):
        parts.append(f'<text x="{x0 + s * CELL + CELL / 2 - 1}" y="{top + rows * CELL + 12}" class="s" text-anchor="middle">{s}</text>')
    parts.append(f'<text x="{x0 - 26}" y="{top + rows * CELL / 2}" class="s" transform="rotate(-90 {x0 - 26} {top + rows * CELL / 2})" '
                 f'text-anchor="middle">{t["layer"] if by_layer else t["row"]}</text>')
    lx = x0 + S * CELL + 16
    for i, label in enumerate(labels):
        parts.append(f'<rect x="{lx}" y="{top + i * 18}" width="12" height="12" fill="{COLORS[i % len(COLORS)]}"/>')
        parts.append(f'<text x="{lx + 18}" y="{top + i * 18 + 10}" class="s">{label}</text>')
    height = max(rows * CELL + 20, len(labels) * 18) + 14
    return parts, y0 + height + 24


def figure(lang: str) -> str:
    t = TEXT[lang]
    dp = [(f"d{d}m{m}", ParallelLayout(dp=2, dp_rank=d, num_microbatches=2), m) for d, m in itertools.product(range(2), range(2))]
    cp = [(f"c{c}", ParallelLayout(cp=2, cp_rank=c), 0) for c in range(2)]
    sp = [(f"c{c}t{u}", ParallelLayout(cp=2, cp_rank=c, tp=2, tp_rank=u, sequence_parallel=True), 0) for c, u in itertools.product(range(2), range(2))]
    pp = [(f"p{p}", ParallelLayout(pp=2, pp_rank=p), 0) for p in range(2)]
    x0, y = 60, 48
    body = [f'<text x="{x0 - 40}" y="22" class="t">{t["title"]}</text>']
    for heading, lays, labels, by_layer in (
        (t["dp"], dp, [t["owner_dp"].format(d=d, m=m) for d, m in itertools.product(range(2), range(2))], False),
        (t["cp"], cp, [t["owner_cp"].format(c=c) for c in range(2)], False),
        (t["sp"], sp, [t["owner_sp"].format(c=c, t=u) for c, u in itertools.product(range(2), range(2))], False),
        (t["pp"], pp, [t["owner_pp"].format(p=p) for p in range(2)], True),
    ):
        parts, y = panel(x0, y, heading, lays, labels, by_layer, t)
        body += parts
    body.append(f'<text x="{x0 + S * CELL / 2}" y="{y - 6}" class="s" text-anchor="middle">{t["pos"]}</text>')
    width = 800  # the longest heading (about 100 characters at 12.5 px)
    style = ("<style>text{font-family:sans-serif;fill:#333}.t{font-size:14px;font-weight:bold}"
             ".h{font-size:12.5px;font-weight:bold}.s{font-size:11px}</style>")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{y + 4}" viewBox="0 0 {width} {y + 4}">'
            f'{style}<rect width="100%" height="100%" fill="white"/>' + "".join(body) + "</svg>\n")


def main() -> None:
    for lang in ("en", "zh"):
        path = ROOT / f"docs_{lang}" / "assets" / "figures" / "model-parallel-slicing.svg"
        path.write_text(figure(lang), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Run every benchmark and write the performance table the docs include.

    python benchmarks/run_all.py            # all benchmarks (~10 min on 2 cores), then the table
    python benchmarks/run_all.py --table    # only re-render the table from the committed JSON files

Each benchmark is its own script, run in its own process, writing JSON into
``benchmarks/results/``; the table ``benchmarks/results/performance.md`` is rendered from those
files only, so every number on the performance page comes from a committed result. Notebook wall
times come from a forced re-execution of the tutorials; the full test-run wall time from the
timing file ``scripts/test.sh`` leaves in ``.artifacts/test_timing.json`` (if present).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCRIPTS = ["replay_overhead.py", "logprob_memory.py", "megatron_replay.py", "rollout_throughput.py", "vllm_capture.py", "mismatch_table.py"]


def run_benchmarks() -> None:
    for script in SCRIPTS:
        t0 = time.perf_counter()
        print(f"[run_all] {script} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / script)], check=True, cwd=ROOT)
        print(f"[run_all] {script} done in {time.perf_counter() - t0:.0f} s", flush=True)


def time_notebooks() -> None:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "execute_notebooks.py"), "--force"], check=True, cwd=ROOT, capture_output=True, text=True
    )
    per = {m.group(1): float(m.group(2)) for m in re.finditer(r"executed (\S+\.ipynb) in ([\d.]+)s", proc.stdout)}
    (RESULTS / "notebook_timing.json").write_text(json.dumps({"total_seconds": time.perf_counter() - t0, "per_notebook_seconds": per}, indent=2) + "\n")


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def render(lang: str = "en") -> str:
    """The table in English (``performance.md``) or Chinese (``performance.zh.md``), same rows."""
    t = (lambda en, zh: zh if lang == "zh" else en)  # noqa: E731
    rows = []
    ro = _load("replay_overhead.json")
    if ro:
        s, layer, model, tb = ro["settings"], ro["moe_layer_fwd_bwd"], ro["model_fwd_bwd"], ro["trace_bytes"]
        rows.append((t("reference model, one MoE layer fwd+bwd ", "参考模型，单个 MoE 层前向+反向")
                     + t(f"({s['tokens']} tokens, hidden {s['hidden']}, {s['experts']} experts, top-{s['top_k']})",
                         f"（{s['tokens']} 个 token，hidden {s['hidden']}，{s['experts']} 个专家，top-{s['top_k']}）"),
                     t("replay/native", "回放/原生") + f" {layer['replay_over_native']:.3f}" + t(", record/native", "，记录/原生")
                     + f" {layer['record_over_native']:.3f}"
                     + t(f" (native {layer['median_seconds']['native'] * 1e3:.0f} ms)", f"（原生 {layer['median_seconds']['native'] * 1e3:.0f} ms）")))
        rows.append((t("reference model, 2-layer model fwd+bwd (8×256 tokens)", "参考模型，2 层模型前向+反向（8×256 个 token）"),
                     t("replay/native", "回放/原生") + f" {model['replay_over_native']:.3f}" + t(", record/native", "，记录/原生")
                     + f" {model['record_over_native']:.3f}"))
        rows.append((t(f"trace size, {tb['num_layers']} layers × top-{tb['top_k']}, {tb['num_experts']} experts",
                       f"轨迹大小，{tb['num_layers']} 层 × top-{tb['top_k']}，{tb['num_experts']} 个专家"),
                     t(f"{tb['bytes_per_token']:.2f} B/token saved (ids {tb['ids_bytes_per_token']} B/token); int32 would be "
                       f"{tb['int32_bytes_per_token']} B/token; information bound {tb['information_bound_bytes_per_token']:.1f} B/token "
                       f"(⌈log2 C({tb['num_experts']},{tb['top_k']})⌉ = {tb['information_bound_bits_per_token_layer']} bits per token and layer)",
                       f"保存 {tb['bytes_per_token']:.2f} B/token（id {tb['ids_bytes_per_token']} B/token）；int32 需要 "
                       f"{tb['int32_bytes_per_token']} B/token；信息下界 {tb['information_bound_bytes_per_token']:.1f} B/token"
                       f"（每个 token 每层 ⌈log2 C({tb['num_experts']},{tb['top_k']})⌉ = {tb['information_bound_bits_per_token_layer']} 比特）")))
    mr = _load("megatron_replay.json")
    if mr:
        for key, label in (("no_recompute", t("no recompute", "不做激活重计算")), ("recompute_full", t("full activation recompute", "完整激活重计算"))):
            r = mr[key]
            rows.append((t(f"megatron-core fwd+bwd, {label}", f"megatron-core 前向+反向，{label}"),
                         t("replay/native", "回放/原生") + f" {r['replay_over_native']:.3f}" + t(", record/native", "，记录/原生")
                         + f" {r['record_over_native']:.3f}"))
    rt = _load("rollout_throughput.json")
    if rt:
        ref, v = rt["reference_engine"], rt["vllm"]
        rows.append((t(f"rollout tokens/s, tiny Qwen3-MoE, batch {rt['settings']['batch']}, fp32",
                       f"rollout 吞吐（token/s），微型 Qwen3-MoE，批大小 {rt['settings']['batch']}，fp32"),
                     t(f"reference engine {ref['tokens_per_s']:.0f}; vLLM {v['version']} {v['tokens_per_s_no_capture']:.0f} "
                       f"(with route capture {v['tokens_per_s_capture']:.0f}, ratio {v['ratio_capture_over_no_capture']:.3f})",
                       f"参考引擎 {ref['tokens_per_s']:.0f}；vLLM {v['version']} {v['tokens_per_s_no_capture']:.0f}"
                       f"（开启路由捕获 {v['tokens_per_s_capture']:.0f}，比值 {v['ratio_capture_over_no_capture']:.3f}）")))
    lm = _load("logprob_memory.json")
    if lm:
        for r in lm["results"]:
            rows.append((t(f"token log-prob peak memory, {r['task']} {r['phase']} "
                           f"({lm['settings']['tokens']} tokens, vocab {lm['settings']['vocab']}, {lm['settings']['logits_dtype']} logits)",
                           f"token 对数概率峰值显存，{r['task']} {r['phase']}"
                           f"（{lm['settings']['tokens']} 个 token，词表 {lm['settings']['vocab']}，{lm['settings']['logits_dtype']} logits）"),
                         t(f"naive {r['naive']['peak_extra_mib']:.0f} MiB, chunked {r['chunked']['peak_extra_mib']:.0f} MiB "
                           f"(naive/chunked {r['memory_ratio_naive_over_chunked']:.1f}×)",
                           f"朴素实现 {r['naive']['peak_extra_mib']:.0f} MiB，分块实现 {r['chunked']['peak_extra_mib']:.0f} MiB"
                           f"（朴素/分块 {r['memory_ratio_naive_over_chunked']:.1f}×）")))
    nb = _load("notebook_timing.json")
    if nb:
        per = t(", ", "，").join(f"{k.split('_')[0]}: {v:.0f} s" for k, v in sorted(nb["per_notebook_seconds"].items()))
        rows.append((t("tutorial notebooks, executed once for both languages", "教程 notebook，两种语言共执行一次"),
                     t(f"total {nb['total_seconds']:.0f} s ({per})", f"共 {nb['total_seconds']:.0f} s（{per}）")))
    ci = _load("test_timing.json")
    if ci:
        rows.append((t("full test command from a fresh clone (`bash .ci/run`: new .venv, pip install from the pip cache, every test)",
                       "在全新克隆上运行完整测试命令（`bash .ci/run`：新建 .venv，从 pip 缓存安装，运行全部测试）"),
                     t(f"{ci['seconds']:.0f} s wall", f"墙钟时间 {ci['seconds']:.0f} s")))
    lines = ["<!-- generated by benchmarks/run_all.py from the JSON files in benchmarks/results/ -->", "",
             t("| measurement | result |", "| 测量项 | 结果 |"), "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", action="store_true", help="only re-render the table")
    p.add_argument("--no-notebooks", action="store_true", help="keep the committed notebook timings")
    args = p.parse_args()
    if not args.table:
        run_benchmarks()
        if not args.no_notebooks:
            time_notebooks()
    timing = ROOT / ".artifacts" / "test_timing.json"
    if timing.exists():
        (RESULTS / "test_timing.json").write_text(timing.read_text())
    table = render()
    (RESULTS / "performance.md").write_text(table)
    (RESULTS / "performance.zh.md").write_text(render("zh"))
    print(table)


if __name__ == "__main__":
    main()

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
SCRIPTS = ["replay_overhead.py", "trace_packing.py", "logprob_memory.py", "megatron_replay.py", "megatron_parallel_parity.py", "megatron_parallel_replay.py", "rollout_throughput.py", "vllm_capture.py", "vllm_rl_loop.py", "mismatch_table.py"]


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
        rows.append((t(f"trace size, version-1 (uint8) file, {tb['num_layers']} layers × top-{tb['top_k']}, {tb['num_experts']} experts",
                       f"轨迹大小，第 1 版（uint8）文件，{tb['num_layers']} 层 × top-{tb['top_k']}，{tb['num_experts']} 个专家"),
                     t(f"{tb['bytes_per_token']:.2f} B/token saved (ids {tb['ids_bytes_per_token']} B/token); int32 would be "
                       f"{tb['int32_bytes_per_token']} B/token; information bound {tb['information_bound_bytes_per_token']:.1f} B/token "
                       f"(⌈log2 C({tb['num_experts']},{tb['top_k']})⌉ = {tb['information_bound_bits_per_token_layer']} bits per token and layer)",
                       f"保存 {tb['bytes_per_token']:.2f} B/token（id {tb['ids_bytes_per_token']} B/token）；int32 需要 "
                       f"{tb['int32_bytes_per_token']} B/token；信息下界 {tb['information_bound_bytes_per_token']:.1f} B/token"
                       f"（每个 token 每层 ⌈log2 C({tb['num_experts']},{tb['top_k']})⌉ = {tb['information_bound_bits_per_token_layer']} 比特）")))
    tp = _load("trace_packing.json")
    if tp:
        big = tp["big_file"]
        rows.append((t(f"packed trace file (version 2), {big['tokens']:,} tokens × {big['num_layers']} layers, top-{big['top_k']} of {big['num_experts']}",
                       f"打包轨迹文件（第 2 版），{big['tokens']:,} 个 token × {big['num_layers']} 层，{big['num_experts']} 选 top-{big['top_k']}"),
                     t(f"{big['packed']['bytes_per_token']:.2f} B/token, {100 * (big['packed']['over_bound'] - 1):.2f} % above the bound "
                       f"(uint8: {big['uint8']['bytes_per_token']:.2f} B/token); load {big['packed']['load']['seconds']:.1f} s vs "
                       f"{big['uint8']['load']['seconds']:.1f} s (see [the packed layout](routing-trace.md#packed))",
                       f"{big['packed']['bytes_per_token']:.2f} B/token，比下界高 {100 * (big['packed']['over_bound'] - 1):.2f} %"
                       f"（uint8：{big['uint8']['bytes_per_token']:.2f} B/token）；加载 {big['packed']['load']['seconds']:.1f} s，uint8 为 "
                       f"{big['uint8']['load']['seconds']:.1f} s（见[打包布局](routing-trace.md#packed)）")))
    mr = _load("megatron_replay.json")
    if mr:
        for key, label in (("no_recompute", t("no recompute", "不做激活重计算")), ("recompute_full", t("full activation recompute", "完整激活重计算"))):
            r = mr[key]
            rows.append((t(f"megatron-core fwd+bwd, {label}", f"megatron-core 前向+反向，{label}"),
                         t("replay/native", "回放/原生") + f" {r['replay_over_native']:.3f}" + t(", record/native", "，记录/原生")
                         + f" {r['record_over_native']:.3f}"))
    mpr = _load("megatron_parallel_replay.json")
    if mpr:
        st = mpr["settings"]
        for name, r in mpr["layouts"].items():
            rows.append((t(f"megatron-core fwd+bwd under model parallelism, {name} (2 gloo ranks, {st['microbatches']} micro-batches, "
                           f"{st['batch']}×{st['seq']} tokens)",
                           f"模型并行下的 megatron-core 前向+反向，{name}（2 个 gloo rank，{st['microbatches']} 个 micro-batch，"
                           f"{st['batch']}×{st['seq']} 个 token）"),
                         t("replay/native", "回放/原生") + f" {r['replay_over_native']:.3f}" + t(", record/native", "，记录/原生")
                         + f" {r['record_over_native']:.3f}"
                         + t(f" (native {r['median_seconds']['native'] * 1e3:.0f} ms)", f"（原生 {r['median_seconds']['native'] * 1e3:.0f} ms）")))
    rt = _load("rollout_throughput.json")
    if rt:
        ref, v = rt["reference_engine"], rt["vllm"]
        rows.append((t(f"rollout tokens/s, tiny Qwen3-MoE, batch {rt['settings']['batch']}, fp32",
                       f"rollout 吞吐（token/s），微型 Qwen3-MoE，批大小 {rt['settings']['batch']}，fp32"),
                     t(f"reference engine {ref['tokens_per_s']:.0f}; vLLM {v['version']} {v['tokens_per_s_no_capture']:.0f} "
                       f"(with route capture {v['tokens_per_s_capture']:.0f}, ratio {v['ratio_capture_over_no_capture']:.3f})",
                       f"参考引擎 {ref['tokens_per_s']:.0f}；vLLM {v['version']} {v['tokens_per_s_no_capture']:.0f}"
                       f"（开启路由捕获 {v['tokens_per_s_capture']:.0f}，比值 {v['ratio_capture_over_no_capture']:.3f}）")))
    rl = _load("vllm_rl_loop.json")
    if rl:
        for name, label, label_zh in (("tiny", "tiny Qwen3-MoE", "微型 Qwen3-MoE"), ("big", "hidden 512, 8 layers, 64 experts, top-8", "hidden 512，8 层，64 个专家，top-8")):
            c = rl["capture"][name]
            rows.append((t(f"vLLM {rl['vllm']} route capture, {label}, batch {c['batch']}, fp32 (medians)",
                           f"vLLM {rl['vllm']} 路由捕获，{label_zh}，批大小 {c['batch']}，fp32（中位数）"),
                         t("capture/no capture", "捕获/不捕获") + f" {c['ratio_capture_over_no_capture']:.3f} "
                         + t(f"({c['median_tokens_per_s_capture']:.0f} vs {c['median_tokens_per_s_no_capture']:.0f} tok/s)",
                             f"（{c['median_tokens_per_s_capture']:.0f} 对 {c['median_tokens_per_s_no_capture']:.0f} tok/s）")))
        pc = rl["prefix_caching"]
        on = pc["info"]["caching_on"]
        rows.append((t(f"vLLM prefix caching + capture, 8 prompts × 8 samples of {pc['prompt_len']} tokens (medians)",
                       f"vLLM 前缀缓存 + 捕获，8 个提示词 × 8 个样本，每个提示词 {pc['prompt_len']} 个 token（中位数）"),
                     t(f"caching on/off {pc['ratio_on_over_off']:.2f}× ({pc['median_tokens_per_s_on']:.0f} vs {pc['median_tokens_per_s_off']:.0f} tok/s); "
                       f"{on['rows_from_cache']} rows from the route cache, {on['invalid_rows']} invalid; identical tokens: {pc['identical_tokens']}",
                       f"开/关缓存 {pc['ratio_on_over_off']:.2f}×（{pc['median_tokens_per_s_on']:.0f} 对 {pc['median_tokens_per_s_off']:.0f} tok/s）；"
                       f"{on['rows_from_cache']} 行来自路由缓存，{on['invalid_rows']} 行无效；token 完全相同：{pc['identical_tokens']}")))
        st = rl["rl_step"]
        m = st["median_seconds"]
        cfg = st["config"]
        rows.append((t(f"one RL step, vLLM bf16 rollouts + fp32 trainer, R3, {cfg['num_prompts']}×{cfg['group_size']} (medians)",
                       f"一个 RL 步，vLLM bf16 rollout + fp32 训练器，R3，{cfg['num_prompts']}×{cfg['group_size']}（中位数）"),
                     t(f"{m['step']:.2f} s: sample {m['sample']:.3f}, sync {m['sync']:.3f}, recompute {m['recompute']:.3f}, update {m['update']:.3f} s",
                       f"{m['step']:.2f} s：采样 {m['sample']:.3f}，同步 {m['sync']:.3f}，重新计算 {m['recompute']:.3f}，更新 {m['update']:.3f} s")))
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


def render_trace_packing() -> str | None:
    """Bytes per token, codec speed and the 1M-token file of ``benchmarks/trace_packing.py``."""
    tp = _load("trace_packing.json")
    if not tp:
        return None
    layers = tp["settings"]["num_layers"]
    lines = ["<!-- generated by benchmarks/run_all.py from benchmarks/results/trace_packing.json -->", "",
             f"Bytes per token at {layers} MoE layers; codec speed on one core over {tp['settings']['codec_rows']:,} random sets "
             "(a row is one (token, layer) set).", "",
             "| E | k | uint8 | int16 | int32 | packed | bound ⌈log2 C(E,k)⌉ | exact log2 C(E,k) | packed layout | encode (M rows/s) | decode (M rows/s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in tp["layouts"]:
        b = r["bytes_per_token"]
        lines.append(f"| {r['num_experts']} | {r['top_k']} | {b['uint8']} | {b['int16']} | {b['int32']} | {b['packed']:.2f} | "
                     f"{b['bound']:.2f} ({r['bound_bits']} bits) | {b['exact_log2']:.2f} ({r['exact_log2_bits']:.2f} bits) | "
                     f"{r['scheme']}, {r['bits_per_row']} bits | {r['encode_rows_per_s'] / 1e6:.1f} | {r['decode_rows_per_s'] / 1e6:.1f} |")
    big = tp["big_file"]
    lines += ["", f"One trace of {big['tokens']:,} tokens × {big['num_layers']} layers (E = {big['num_experts']}, k = {big['top_k']}, "
              f"{big['sequences']} sequences, {big['invalid_rows']:,} invalid rows), whole files (header, sequence lengths and "
              f"invalid-row indices included); load = `RoutingTrace.load` in a fresh process, warm page cache, best of two, one thread.", "",
              "| file | bytes | bytes/token | vs bound | vs exact log2 | load (s) | peak memory above start (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for name, label in (("packed", "version 2 (packed, default)"), ("uint8", "version 1 (uint8)")):
        f = big[name]
        lines.append(f"| {label} | {f['file_bytes']:,} | {f['bytes_per_token']:.2f} | {f['over_bound']:.4f}× | {f['over_exact_log2']:.4f}× | "
                     f"{f['load']['seconds']:.2f} | {f['load']['peak_rss_increase_mib']:.0f} |")
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
    packing = render_trace_packing()
    if packing:
        (RESULTS / "trace_packing.md").write_text(packing)
    print(table)


if __name__ == "__main__":
    main()

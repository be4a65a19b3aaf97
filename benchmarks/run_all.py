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


def render() -> str:
    rows = []
    ro = _load("replay_overhead.json")
    if ro:
        s, layer, model, tb = ro["settings"], ro["moe_layer_fwd_bwd"], ro["model_fwd_bwd"], ro["trace_bytes"]
        rows.append(("reference model, one MoE layer fwd+bwd "
                     f"({s['tokens']} tokens, hidden {s['hidden']}, {s['experts']} experts, top-{s['top_k']})",
                     f"replay/native {layer['replay_over_native']:.3f}, record/native {layer['record_over_native']:.3f} "
                     f"(native {layer['median_seconds']['native'] * 1e3:.0f} ms)"))
        rows.append(("reference model, 2-layer model fwd+bwd (8×256 tokens)",
                     f"replay/native {model['replay_over_native']:.3f}, record/native {model['record_over_native']:.3f}"))
        rows.append((f"trace size, version-1 (uint8) file, {tb['num_layers']} layers × top-{tb['top_k']}, {tb['num_experts']} experts",
                     f"{tb['bytes_per_token']:.2f} B/token saved (ids {tb['ids_bytes_per_token']} B/token); int32 would be "
                     f"{tb['int32_bytes_per_token']} B/token; information bound {tb['information_bound_bytes_per_token']:.1f} B/token "
                     f"(⌈log2 C({tb['num_experts']},{tb['top_k']})⌉ = {tb['information_bound_bits_per_token_layer']} bits per token and layer)"))
    tp = _load("trace_packing.json")
    if tp:
        big = tp["big_file"]
        rows.append((f"packed trace file (version 2), {big['tokens']:,} tokens × {big['num_layers']} layers, top-{big['top_k']} of {big['num_experts']}",
                     f"{big['packed']['bytes_per_token']:.2f} B/token, {100 * (big['packed']['over_bound'] - 1):.2f} % above the bound "
                     f"(uint8: {big['uint8']['bytes_per_token']:.2f} B/token); load {big['packed']['load']['seconds']:.1f} s vs "
                     f"{big['uint8']['load']['seconds']:.1f} s (see [the packed layout](routing-trace.md#packed))"))
    mr = _load("megatron_replay.json")
    if mr:
        for key, label in (("no_recompute", "no recompute"), ("recompute_full", "full activation recompute")):
            r = mr[key]
            rows.append((f"megatron-core fwd+bwd, {label}",
                         f"replay/native {r['replay_over_native']:.3f}, record/native {r['record_over_native']:.3f}"))
    mpr = _load("megatron_parallel_replay.json")
    if mpr:
        st = mpr["settings"]
        for name, r in mpr["layouts"].items():
            rows.append((f"megatron-core fwd+bwd under model parallelism, {name} (2 gloo ranks, {st['microbatches']} micro-batches, "
                         f"{st['batch']}×{st['seq']} tokens)",
                         f"replay/native {r['replay_over_native']:.3f}, record/native {r['record_over_native']:.3f} "
                         f"(native {r['median_seconds']['native'] * 1e3:.0f} ms)"))
    rt = _load("rollout_throughput.json")
    if rt:
        ref, v = rt["reference_engine"], rt["vllm"]
        rows.append((f"rollout tokens/s, tiny Qwen3-MoE, batch {rt['settings']['batch']}, fp32",
                     f"reference engine {ref['tokens_per_s']:.0f}; vLLM {v['version']} {v['tokens_per_s_no_capture']:.0f} "
                     f"(with route capture {v['tokens_per_s_capture']:.0f}, ratio {v['ratio_capture_over_no_capture']:.3f})"))
    rl = _load("vllm_rl_loop.json")
    if rl:
        for name, label in (("tiny", "tiny Qwen3-MoE"), ("big", "hidden 512, 8 layers, 64 experts, top-8")):
            c = rl["capture"][name]
            rows.append((f"vLLM {rl['vllm']} route capture, {label}, batch {c['batch']}, fp32 (medians)",
                         f"capture/no capture {c['ratio_capture_over_no_capture']:.3f} "
                         f"({c['median_tokens_per_s_capture']:.0f} vs {c['median_tokens_per_s_no_capture']:.0f} tok/s)"))
        pc = rl["prefix_caching"]
        rows.append((f"vLLM prefix caching + capture, 8 prompts × 8 samples of {pc['prompt_len']} tokens (medians)",
                     f"caching on/off {pc['ratio_on_over_off']:.2f}× ({pc['median_tokens_per_s_on']:.0f} vs {pc['median_tokens_per_s_off']:.0f} tok/s); "
                     f"{pc['info']['caching_on']['rows_from_cache']} rows from the route cache, {pc['info']['caching_on']['invalid_rows']} invalid; "
                     f"identical tokens: {pc['identical_tokens']}"))
        st = rl["rl_step"]
        m = st["median_seconds"]
        cfg = st["config"]
        rows.append((f"one RL step, vLLM bf16 rollouts + fp32 trainer, R3, {cfg['num_prompts']}×{cfg['group_size']} (medians)",
                     f"{m['step']:.2f} s: sample {m['sample']:.3f}, sync {m['sync']:.3f}, recompute {m['recompute']:.3f}, update {m['update']:.3f} s"))
    lm = _load("logprob_memory.json")
    if lm:
        for r in lm["results"]:
            rows.append((f"token log-prob peak memory, {r['task']} {r['phase']} "
                         f"({lm['settings']['tokens']} tokens, vocab {lm['settings']['vocab']}, {lm['settings']['logits_dtype']} logits)",
                         f"naive {r['naive']['peak_extra_mib']:.0f} MiB, chunked {r['chunked']['peak_extra_mib']:.0f} MiB "
                         f"(naive/chunked {r['memory_ratio_naive_over_chunked']:.1f}×)"))
    nb = _load("notebook_timing.json")
    if nb:
        per = ", ".join(f"{k.split('_')[0]}: {v:.0f} s" for k, v in sorted(nb["per_notebook_seconds"].items()))
        rows.append(("tutorial notebooks, executed once for both languages", f"total {nb['total_seconds']:.0f} s ({per})"))
    ci = _load("test_timing.json")
    if ci:
        rows.append(("full test command from a fresh clone (`bash .ci/run`: new .venv, pip install from the pip cache, every test)", f"{ci['seconds']:.0f} s wall"))
    lines = ["<!-- generated by benchmarks/run_all.py from the JSON files in benchmarks/results/ -->", "",
             "| measurement | result |", "|---|---|"]
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
    packing = render_trace_packing()
    if packing:
        (RESULTS / "trace_packing.md").write_text(packing)
    print(table)


if __name__ == "__main__":
    main()

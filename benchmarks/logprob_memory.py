"""Peak memory of token log-probs (and entropy) from bf16 logits: naive log_softmax vs chunked.

    naive:   logq = log_softmax(logits.float(), -1); logp = logq.gather(-1, targets)
             (+ entropy = -(logq.exp() * logq).sum(-1))
    chunked: reference_impl.metrics.token_logprobs_and_entropy(logits, targets)

Each (method, task, phase) runs in a fresh subprocess that builds the bf16 logits ``[N, V]`` row
chunk by row chunk (no fp32 spike), resets the kernel's peak-RSS counter (``/proc/self/clear_refs``
← 5, Linux), runs the computation once after a small warm-up, and reports the peak resident set
above the resident set just before it (``VmHWM − VmRSS``, /proc/self/status). torch's CPU
allocator returns large blocks to the OS, so RSS tracks the tensors that were actually touched.
Where clear_refs is not writable the worker falls back to ``ru_maxrss`` (peak since process
start) minus the RSS before the call, which is the same here since nothing larger came before.
Workers run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc otherwise raises its mmap threshold
after the first large free and keeps later chunk buffers on the heap, which adds allocator caching
noise (tens of MiB, run to run) to the chunked method's peak. Time: the fastest of ``--repeats``
runs (the machine is shared; treat times as rough).

    python benchmarks/logprob_memory.py [--tokens 4096 --vocab 32000 --chunk-size 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> dict:
    import torch

    from reference_impl.logprobs import token_logprobs_and_entropy

    torch.set_num_threads(args.threads)
    n, v = args.tokens, args.vocab
    g = torch.Generator().manual_seed(0)
    logits = torch.empty(n, v, dtype=torch.bfloat16)
    for start in range(0, n, 256):
        logits[start : start + 256] = (3 * torch.randn(min(256, n - start), v, generator=g)).to(torch.bfloat16)
    targets = torch.randint(v, (n,), generator=g)
    entropy = args.task == "logp+entropy"
    backward = args.phase == "fwd+bwd"
    chunk = args.chunk_size or None

    def run(x, y):
        if backward:
            x = x.detach().requires_grad_(True)
        if args.method == "naive":
            logq = torch.log_softmax(x.float(), dim=-1)
            logp = logq.gather(-1, y[:, None]).squeeze(-1)
            ent = -(logq.exp() * logq).sum(-1) if entropy else None
        else:
            logp, ent = token_logprobs_and_entropy(x, y, chunk_size=chunk, return_entropy=entropy)
        if backward:
            logp.sum().backward()
            return logp.detach(), ent, x.grad
        return logp, ent, None

    run(logits[:8], targets[:8])  # warm-up: kernels, thread pool
    reset = _reset_peak()
    rss_before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = run(logits, targets)
    seconds = time.perf_counter() - t0
    if reset:
        peak = _status_kib("VmHWM")
        how = "VmHWM after clear_refs"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        how = "ru_maxrss"
    checksum = float(out[0].double().sum())
    del out
    times = [seconds]
    for _ in range(args.repeats - 1):
        t0 = time.perf_counter()
        run(logits, targets)
        times.append(time.perf_counter() - t0)
    return {
        "peak_extra_mib": (peak - rss_before) / 1024,
        "seconds": min(times),
        "measure": how,
        "logp_sum": checksum,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-size", type=int, default=0, help="rows per chunk; 0 = the function's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per worker (the first also measures memory)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "logprob_memory.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="naive", help=argparse.SUPPRESS)
    p.add_argument("--task", default="logp", help=argparse.SUPPRESS)
    p.add_argument("--phase", default="fwd", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    from reference_impl.logprobs import _default_chunk_rows

    chunk_rows = args.chunk_size or _default_chunk_rows(args.vocab)
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    results = []
    for task in ("logp", "logp+entropy"):
        for phase in ("fwd", "fwd+bwd"):
            row = {"task": task, "phase": phase}
            for method in ("naive", "chunked"):
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--task", task, "--phase", phase,
                       "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                       "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
                       "--repeats", str(args.repeats)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                row[method] = json.loads(out.strip().splitlines()[-1])
            row["memory_ratio_naive_over_chunked"] = row["naive"]["peak_extra_mib"] / max(row["chunked"]["peak_extra_mib"], 1e-9)
            row["time_ratio_chunked_over_naive"] = row["chunked"]["seconds"] / row["naive"]["seconds"]
            row["same_logp_sum"] = abs(row["naive"]["logp_sum"] - row["chunked"]["logp_sum"]) <= 1e-6 * abs(row["naive"]["logp_sum"])
            results.append(row)

    n, v = args.tokens, args.vocab
    report = {
        "settings": {
            "tokens": n,
            "vocab": v,
            "logits_dtype": "bfloat16",
            "chunk_rows": chunk_rows,
            "threads": args.threads,
            "repeats": args.repeats,
            "malloc_mmap_threshold": 131072,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "reference_sizes_mib": {
            "logits_bf16": n * v * 2 / MIB,
            "one_fp32_NxV": n * v * 4 / MIB,
            "one_fp32_chunk": chunk_rows * v * 4 / MIB,
        },
        "results": results,
    }
    print(f"N={n} tokens, V={v}, bf16 logits ({n * v * 2 / MIB:.0f} MiB); one fp32 [N, V] = {n * v * 4 / MIB:.0f} MiB; "
          f"chunk = {chunk_rows} rows")
    print(f"{'task':<14}{'phase':<9}{'naive MiB':>11}{'chunked MiB':>13}{'ratio':>8}{'naive s':>9}{'chunked s':>11}")
    for r in results:
        print(f"{r['task']:<14}{r['phase']:<9}{r['naive']['peak_extra_mib']:>11.0f}{r['chunked']['peak_extra_mib']:>13.0f}"
              f"{r['memory_ratio_naive_over_chunked']:>8.1f}{r['naive']['seconds']:>9.2f}{r['chunked']['seconds']:>11.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

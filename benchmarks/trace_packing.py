"""Packed routing traces against plain id storage: bytes per token, codec speed, a 1M-token file.

Three measurements, one core (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``):

1. for E in {64, 128, 256} and k in {2, 8}: bytes per token at 48 MoE layers for uint8, int16 and
   int32 ids, for the packed layout (file version 2), against ⌈log2 C(E, k)⌉ bits per (token,
   layer) and against the exact log2 C(E, k); encode and decode rows per second (a row is one
   (token, layer) set) on 2**20 uniformly random sets;
2. a 1M-token, 48-layer trace (E = 256, k = 8; 1000 sequences, 1 % invalid rows) saved packed
   and as version 1 (uint8): file sizes, headers and masks included, against the bound;
3. ``RoutingTrace.load`` of both files in a fresh process, warm page cache (the file was just
   written and is read once before timing), best of two, with the process's peak resident memory
   above its resident memory before loading (``VmHWM`` after resetting it, Linux).

The 1M-token trace tiles a block of 2**20 random sets (fixed-width packing does not depend on the
values, and building 48M random sets would dominate the run). Writes
``benchmarks/results/trace_packing.json``; ``benchmarks/run_all.py`` renders the tables.

    python benchmarks/trace_packing.py [--tokens 1000000 --layers 48]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference_impl import RoutingTrace  # noqa: E402
from reference_impl import trace_packing as tp  # noqa: E402

BLOCK = 1 << 20


def random_sets(rows: int, top_k: int, num_experts: int, seed: int = 0) -> torch.Tensor:
    """``[rows, k]`` uniformly random k-sets (uniform ranks, unranked), in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.randint(0, 2**62, (rows,), generator=g) % math.comb(num_experts, top_k)
    ids = tp._unrank(ranks, tp._binomials(num_experts, top_k), top_k)
    return ids.gather(1, torch.rand(rows, top_k, generator=g).argsort(dim=1))


def best_seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_layouts(num_layers: int) -> list[dict]:
    out = []
    for num_experts in (64, 128, 256):
        for top_k in (2, 8):
            layout = tp.packed_layout(num_experts, top_k)
            ids = random_sets(BLOCK, top_k, num_experts).to(torch.uint8)
            payload = tp.encode_sets(ids, layout)
            decoded = tp.decode_sets(payload, layout, BLOCK, torch.uint8, "bench")
            assert torch.equal(decoded, ids.sort(dim=1).values)
            enc = best_seconds(lambda: tp.encode_sets(ids, layout))
            dec = best_seconds(lambda: tp.decode_sets(payload, layout, BLOCK, torch.uint8, "bench"))
            exact = math.log2(math.comb(num_experts, top_k))
            out.append({
                "num_experts": num_experts,
                "top_k": top_k,
                "scheme": layout.scheme,
                "bits_per_row": layout.bits_per_row,
                "bound_bits": tp.information_bound_bits(num_experts, top_k),
                "exact_log2_bits": exact,
                "bytes_per_token": {
                    "uint8": num_layers * top_k,
                    "int16": 2 * num_layers * top_k,
                    "int32": 4 * num_layers * top_k,
                    "packed": num_layers * layout.bits_per_row / 8,
                    "bound": num_layers * tp.information_bound_bits(num_experts, top_k) / 8,
                    "exact_log2": num_layers * exact / 8,
                },
                "encode_rows_per_s": BLOCK / enc,
                "decode_rows_per_s": BLOCK / dec,
            })
            print(f"E={num_experts:3d} k={top_k}: {layout.bits_per_row} bits/row, encode {BLOCK / enc / 1e6:.1f} M rows/s, "
                  f"decode {BLOCK / dec / 1e6:.1f} M rows/s", flush=True)
    return out


LOAD_CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from reference_impl import RoutingTrace
def status(key):  # kB, from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
times = []
for _ in range(2):
    t0 = time.perf_counter()
    trace = RoutingTrace.load(sys.argv[1])
    times.append(time.perf_counter() - t0)
    del trace
print(json.dumps({"seconds": min(times), "all_seconds": times, "peak_rss_increase_mib": (status("VmHWM") - base) / 1024}))
"""


def load_in_child(path: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(path), str(ROOT)], check=True, capture_output=True, text=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_big_file(tokens: int, num_layers: int, num_experts: int, top_k: int) -> dict:
    block = random_sets(BLOCK, top_k, num_experts, seed=1).sort(dim=1).values.to(torch.uint8)  # sorted: == is cheap
    rows = tokens * num_layers
    ids = block.repeat(-(-rows // BLOCK), 1)[:rows].view(tokens, num_layers, top_k)
    g = torch.Generator().manual_seed(2)
    valid = torch.rand(tokens, generator=g) >= 0.01
    num_seq = 1000
    rows_per_seq = [tokens // num_seq] * (num_seq - 1) + [tokens - (tokens // num_seq) * (num_seq - 1)]
    trace = RoutingTrace(ids, num_experts, valid=valid, rows_per_seq=rows_per_seq)
    del ids
    result = {"tokens": tokens, "num_layers": num_layers, "num_experts": num_experts, "top_k": top_k,
              "sequences": num_seq, "invalid_rows": int((~valid).sum())}
    with tempfile.TemporaryDirectory() as d:
        paths = {"packed": Path(d) / "packed.safetensors", "uint8": Path(d) / "uint8.safetensors"}
        t0 = time.perf_counter()
        trace.save(paths["packed"])
        result["save_packed_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        trace.save(paths["uint8"], packed=False)
        result["save_uint8_seconds"] = time.perf_counter() - t0
        assert RoutingTrace.load(paths["packed"]) == trace  # also warms the page cache
        RoutingTrace.load(paths["uint8"])
        del trace
        bound = tokens * num_layers * tp.information_bound_bits(num_experts, top_k) / 8
        exact = tokens * num_layers * math.log2(math.comb(num_experts, top_k)) / 8
        for name, path in paths.items():
            size = os.path.getsize(path)
            result[name] = {"file_bytes": size, "bytes_per_token": size / tokens, "over_bound": size / bound,
                            "over_exact_log2": size / exact, "load": load_in_child(path)}
            print(f"{name}: {size / tokens:.2f} B/token ({size / bound:.5f} x bound), load {result[name]['load']}", flush=True)
    result["bound_bytes"], result["exact_log2_bytes"] = bound, exact
    result["packed_load_over_uint8_load"] = result["packed"]["load"]["seconds"] / result["uint8"]["load"]["seconds"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trace_packing.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = {
        "settings": {"tokens": args.tokens, "num_layers": args.layers, "codec_rows": BLOCK, "threads": 1, "torch": torch.__version__},
        "layouts": bench_layouts(args.layers),
        "big_file": bench_big_file(args.tokens, args.layers, 256, 8),
    }
    result["settings"]["wall_seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out} in {result['settings']['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

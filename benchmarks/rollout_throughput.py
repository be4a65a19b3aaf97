"""Rollout tokens/s: the reference engine vs vLLM on the same tiny model, measured in one run.

Both sample ``--batch`` prompts of ``--prompt-len`` tokens, ``--max-tokens`` new tokens each (no EOS
stop), fp32, one OpenMP thread each (vLLM's CPU worker serves on one thread). The vLLM side is
:mod:`benchmarks.vllm_capture`'s throughput child on the same checkpoint settings (vocab 64,
hidden 64, 2 layers, 8 experts, top-2, seed 1), with and without route capture.

    python benchmarks/rollout_throughput.py [--batch 32 --prompt-len 16 --max-tokens 64 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def reference_engine_tokens_per_s(args) -> dict:
    import torch

    from reference_impl.model import MoEConfig
    from reference_impl.checkpoint import load_hf_checkpoint
    from reference_impl.rollout import RolloutEngine
    from reference_impl.tiny_checkpoint import build_tiny_checkpoint

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(Path(tmp) / "tput", MoEConfig(vocab_size=64, router_initializer_range=0.5, initializer_range=0.1), seed=1)
        model = load_hf_checkpoint(ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = torch.cat([torch.ones(args.batch, 1, dtype=torch.long), torch.randint(4, 64, (args.batch, args.prompt_len - 1), generator=g)], 1)
    engine = RolloutEngine(numerics="fp32", seed=0)
    engine.sync_weights(model)

    def once() -> tuple[float, int]:
        t0 = time.perf_counter()
        batch = engine.generate(prompts, group_size=1, max_new_tokens=args.max_tokens, eos_id=-1)
        return time.perf_counter() - t0, int(batch.response_lengths.sum())

    once()  # warm-up
    runs = [once() for _ in range(args.repeats)]
    tokens = runs[0][1]
    seconds = [s for s, _ in runs]
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / min(seconds), "median_tokens_per_s": tokens / statistics.median(seconds)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout_throughput.json")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "reference_engine": reference_engine_tokens_per_s(args)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "vllm_capture.py"), "--no-kl", "--batch", str(args.batch),
             "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--out", str(out)],
            check=True, cwd=ROOT,
        )
        vllm = json.loads(out.read_text())
    result["vllm"] = {"version": vllm["vllm"], **vllm["throughput"]}
    ref, v = result["reference_engine"], result["vllm"]
    result["vllm_over_reference"] = v["tokens_per_s_no_capture"] / ref["tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"reference engine {ref['tokens_per_s']:.0f} tok/s; vLLM {v['tokens_per_s_no_capture']:.0f} tok/s without capture, "
        f"{v['tokens_per_s_capture']:.0f} with (capture/no-capture {v['ratio_capture_over_no_capture']:.3f}); "
        f"vLLM/reference {result['vllm_over_reference']:.2f}"
    )


if __name__ == "__main__":
    main()

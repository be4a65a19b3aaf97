"""What route capture costs inside vLLM, and what bf16 vLLM rollouts do to routing and KL.

Two parts, each vLLM engine in its own child process (vLLM's state is process-wide):

1. **Throughput** on a tiny Qwen3-MoE (vocab 64, hidden 64, 2 layers, 8 experts, top-2): one
   engine, a batch of ``--batch`` prompts, alternating ``llm.generate`` (no capture: router
   callbacks unbound, the step hook idle) and
   :func:`reference_impl.integrations.vllm.generate_with_routes` (capture on), same sampling
   parameters (``logprobs=0`` in both), ``--repeats`` times each after one warm-up of each.
   Reports generated tokens/s of both (best of N, and median) and their ratio.
2. **bf16 rollouts vs the fp32 reference** (skip with ``--no-kl``): for a few near-tie models
   (router std 0.02; random or briefly trained with ``cold_start`` on the sort task), vLLM samples
   ``--kl-prompts`` sort prompts in bf16; the fp32 reference model recomputes π_old natively and
   with R3 (replaying vLLM's trace). Reports routing disagreement and k3 KL(μ_old‖π_old).

    python benchmarks/vllm_capture.py [--batch 32 --max-tokens 64 --repeats 9] [--no-kl]

CPU timings on a shared machine are noisy; the load average before and after is recorded, and the
children run with ``OMP_NUM_THREADS=1`` (unless set), which removed most of the noise.
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

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------ child processes
def child_throughput(args) -> None:
    import torch
    from vllm import SamplingParams

    from reference_impl.integrations.vllm import generate_with_routes, make_llm

    llm = make_llm(args.ckpt, dtype=args.dtype, seed=0, max_model_len=args.prompt_len + args.max_tokens + 8)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 64, (args.prompt_len - 1,), generator=g).tolist() for _ in range(args.batch)]
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True, logprobs=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def plain() -> int:
        outs = llm.generate(inputs, sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def capture() -> int:
        samples = generate_with_routes(llm, prompts, sp)
        assert all(s.trace.num_invalid == 0 and s.trace.num_tokens == s.prompt_len + s.gen_len - 1 for s in samples)
        return sum(s.gen_len for s in samples)

    plain(), capture()  # warm-up
    times: dict[str, list[float]] = {"no_capture": [], "capture": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, fn in (("no_capture", plain), ("capture", capture)):
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    Path(args.child_out).write_text(json.dumps({"seconds": times, "generated_tokens": tokens}))


def child_rollout(args) -> None:
    import torch
    from vllm import SamplingParams

    from reference_impl.integrations.vllm import generate_with_routes, make_llm, to_rollout_batch
    from reference_impl.tasks import make_task

    task = make_task("sort")
    llm = make_llm(args.ckpt, dtype="bfloat16", seed=0, max_model_len=64)
    prompts = task.sample_prompts(args.kl_prompts, torch.Generator().manual_seed(0)).tolist()
    samples = generate_with_routes(llm, prompts, SamplingParams(max_tokens=task.max_new_tokens, temperature=1.0, seed=0))
    to_rollout_batch(samples).save(args.child_out)


def run_child(mode: str, ckpt: Path, out: Path, args) -> None:
    cmd = [sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--child-out", str(out)]
    for flag in ("batch", "prompt_len", "max_tokens", "repeats", "dtype", "kl_prompts"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # One OpenMP thread: vLLM serves on one torch thread anyway, and on a busy 2-core machine the
    # default OpenMP team spun against other processes (seen: the same 2048-token batch took 0.3 s
    # or 10 s at random; with OMP_NUM_THREADS=1 every repeat took 0.27-0.31 s).
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-4000:]}")


# --------------------------------------------------------------------------------- parent
def throughput(args, tmp: Path) -> dict:
    from reference_impl.model import MoEConfig
    from reference_impl.tiny_checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp / "tput", MoEConfig(vocab_size=64, router_initializer_range=0.5, initializer_range=0.1), seed=1)
    run_child("throughput", ckpt, tmp / "tput.json", args)
    raw = json.loads((tmp / "tput.json").read_text())
    # Best of N is the headline (noise on a shared machine only ever adds time); medians beside it.
    best = {k: min(v) for k, v in raw["seconds"].items()}
    med = {k: statistics.median(v) for k, v in raw["seconds"].items()}
    tps = {k: raw["generated_tokens"][k] / best[k] for k in best}
    tps_med = {k: raw["generated_tokens"][k] / med[k] for k in med}
    return {
        "model": "tiny Qwen3-MoE: vocab 64, hidden 64, 2 layers, 8 experts, top-2, head_dim 32",
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "repeats": args.repeats,
        "seconds": raw["seconds"],
        "generated_tokens_per_call": raw["generated_tokens"]["capture"],
        "tokens_per_s_no_capture": tps["no_capture"],
        "tokens_per_s_capture": tps["capture"],
        "ratio_capture_over_no_capture": tps["capture"] / tps["no_capture"],
        "median_tokens_per_s_no_capture": tps_med["no_capture"],
        "median_tokens_per_s_capture": tps_med["capture"],
        "median_ratio_capture_over_no_capture": tps_med["capture"] / tps_med["no_capture"],
    }


def kl_variant(name: str, args, tmp: Path, *, init: float, train_steps: int, seed: int = 0) -> dict:
    import torch

    from reference_impl import RoutingTrace, load_hf_checkpoint, replay_routing
    from reference_impl.model import MoEConfig, MoEForCausalLM
    from reference_impl.batch import RolloutBatch
    from reference_impl.logprobs import next_token_logprobs
    from reference_impl.tasks import cold_start, make_task
    from reference_impl.tiny_checkpoint import build_tiny_checkpoint

    torch.manual_seed(seed)
    model = MoEForCausalLM(MoEConfig(vocab_size=16, router_initializer_range=0.02, initializer_range=init))
    losses = cold_start(model, make_task("sort"), steps=train_steps) if train_steps else []
    ckpt = build_tiny_checkpoint(tmp / name, model=model.eval())
    run_child("rollout", ckpt, tmp / f"{name}.safetensors", args)
    batch = RolloutBatch.load(tmp / f"{name}.safetensors")
    lengths = batch.seq_lengths.tolist()
    reference = load_hf_checkpoint(ckpt).eval()
    with torch.no_grad():
        native = reference(batch.tokens)
        with replay_routing(reference, batch.rollout_trace, seq_lengths=lengths):
            replayed = reference(batch.tokens)
    agreement = batch.rollout_trace.agreement(RoutingTrace.from_padded(native.routes, lengths, 8))

    def k3(logits) -> float:
        log_ratio = (next_token_logprobs(logits, batch.tokens) - batch.rollout_logp)[batch.mask > 0].double()
        return float((log_ratio.exp() - 1 - log_ratio).mean())

    return {
        "model": f"router std 0.02, other weights std {init}, cold_start steps {train_steps}, seed {seed}",
        "final_train_loss": losses[-1] if losses else None,
        "sequences": batch.num_sequences,
        "generated_tokens": int(batch.mask.sum()),
        **agreement.as_dict(),
        "k3_kl_native": k3(native.logits),
        "k3_kl_r3": k3(replayed.logits),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kl-prompts", type=int, default=128)
    p.add_argument("--no-kl", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_capture.json"))
    p.add_argument("--child", choices=["throughput", "rollout"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "throughput":
        return child_throughput(args)
    if args.child == "rollout":
        return child_rollout(args)

    import torch
    import vllm

    # The reference forwards and cold_start on one thread: two OpenMP threads spinning against
    # each other on a busy 2-core machine made them ~100x slower.
    torch.set_num_threads(1)
    result = {
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["throughput"] = tput = throughput(args, tmp)
        print(
            f"throughput: {tput['tokens_per_s_no_capture']:.0f} tok/s without capture, "
            f"{tput['tokens_per_s_capture']:.0f} with; ratio {tput['ratio_capture_over_no_capture']:.3f}"
        )
        if not args.no_kl:
            result["bf16_vs_fp32_reference"] = kl = {}
            for name, init, steps in (("random_init0.2", 0.2, 0), ("trained_init0.2", 0.2, 60), ("trained_init0.02", 0.02, 60)):
                kl[name] = r = kl_variant(name, args, tmp, init=init, train_steps=steps)
                print(
                    f"{name}: router disagreement {r['router_disagreement']:.4%}, token {r['token_disagreement']:.4%}; "
                    f"k3 native {r['k3_kl_native']:.3e}, R3 {r['k3_kl_r3']:.3e}"
                )
    result["load_average_after"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

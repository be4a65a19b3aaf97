"""The real RL loop's costs: route capture in vLLM, prefix caching with capture, one RL step by phase.

Each part runs its vLLM engine in a child process (vLLM's state is process-wide):

1. **capture ÷ no capture**, generated tokens/s, on the tiny Qwen3-MoE (hidden 64, 2 layers,
   8 experts, top-2) and on a bigger one (hidden 512, 8 layers, 64 experts, top-8), fp32,
   ``--batch`` prompts; plain ``llm.generate`` and :func:`generate_with_routes` interleaved,
   ``--repeats`` times each after a warm-up; medians.
2. **prefix caching + capture ÷ caching off (with capture)**: 8 prompts × 8 samples of
   ``--long-prompt`` (≥ 400) tokens, 32 new tokens, tiny model, fp32, one engine per setting,
   both engines in one child, repeats interleaved; medians; tokens compared. Rows from the route cache and invalid
   rows are reported.
3. **seconds per RL step** of ``Trainer(TrainConfig(rollout_engine="vllm", numerics="bf16",
   replay="r3"))`` split into sample / sync / recompute / update (medians over the steps after the
   first, which builds the engine).

    python benchmarks/vllm_rl_loop.py [--repeats 5]

CPU timings on a shared 2-core machine are noisy (other jobs run beside it): the load average
before and after is recorded, children run with ``OMP_NUM_THREADS=1``.
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
MODELS = {
    "tiny": dict(vocab_size=64, router_initializer_range=0.5, initializer_range=0.1),
    "big": dict(
        vocab_size=64, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        moe_intermediate_size=128, num_experts=64, num_experts_per_tok=8, router_initializer_range=0.5, initializer_range=0.05,
    ),
}


# ------------------------------------------------------------------------ child processes
def child_capture(job: dict) -> dict:
    import torch
    from vllm import SamplingParams

    from reference_impl.integrations.vllm_client import generate_with_routes, make_llm

    llm = make_llm(job["ckpt"], dtype="float32", seed=0, max_model_len=job["prompt_len"] + job["max_tokens"] + 8)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 64, (job["prompt_len"] - 1,), generator=g).tolist() for _ in range(job["batch"])]
    sp = SamplingParams(max_tokens=job["max_tokens"], temperature=1.0, seed=0, ignore_eos=True, logprobs=0)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def plain() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(inputs, sp, use_tqdm=False))

    def capture() -> int:
        samples = generate_with_routes(llm, prompts, sp)
        assert all(s.trace.num_invalid == 0 for s in samples)
        return sum(s.gen_len for s in samples)

    return _interleave({"no_capture": plain, "capture": capture}, job["repeats"])


def child_prefix(job: dict) -> dict:
    """Both engines live in this one process, their repeats interleaved (machine load hits both alike)."""
    import torch
    from vllm import SamplingParams

    from reference_impl.integrations.vllm_client import generate_with_routes, make_llm, reset_prefix_cache

    kwargs = dict(dtype="float32", seed=0, max_model_len=512, enable_chunked_prefill=False, max_num_batched_tokens=8192)
    engines = {"caching_on": make_llm(job["ckpt"], enable_prefix_caching=True, **kwargs), "caching_off": make_llm(job["ckpt"], enable_prefix_caching=False, **kwargs)}
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 64, (job["prompt_len"] - 1,), generator=g).tolist() for _ in range(8)]
    requests = [p for p in prompts for _ in range(8)]
    params = [SamplingParams(max_tokens=32, temperature=1.0, seed=i, ignore_eos=True, logprobs=0) for i in range(len(requests))]
    info: dict[str, dict] = {}

    def runner(name: str):
        llm, caching = engines[name], name == "caching_on"

        def run() -> int:
            if caching:
                reset_prefix_cache(llm)  # every repeat starts cold: the hits are the group's shared prompt blocks
            samples = generate_with_routes(llm, requests, params, on_missing_rows="invalid", route_cache=caching)
            info[name] = {
                "invalid_rows": sum(s.trace.num_invalid for s in samples),
                "rows_from_cache": sum(s.stats["rows_from_cache"] for s in samples),
                "cached_tokens": sum(s.num_cached_tokens for s in samples),
                "tokens": [s.token_ids for s in samples],
            }
            return sum(s.gen_len for s in samples)

        return run

    result = _interleave({name: runner(name) for name in engines}, job["repeats"])
    result["identical_tokens"] = info["caching_on"].pop("tokens") == info["caching_off"].pop("tokens")
    result["info"] = info
    return result


def child_rl(job: dict) -> dict:
    from reference_impl.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**job["config"]))
    phases: dict[str, list[float]] = {"recompute": [], "update": []}
    for name in phases:
        original = getattr(trainer, {"recompute": "recompute_old", "update": "update"}[name])

        def timed(*args, _original=original, _name=name, **kwargs):
            t0 = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                phases[_name].append(time.perf_counter() - t0)

        setattr(trainer, {"recompute": "recompute_old", "update": "update"}[name], timed)
    history = trainer.train()
    per_step = [
        {
            "sync": h["engine/seconds_sync"],
            "sample": h["engine/seconds_sample"],
            "recompute": phases["recompute"][i],
            "update": phases["update"][i],
            "step": h["seconds_step"],
        }
        for i, h in enumerate(history)
    ]
    return {"per_step": per_step, "first_sync_builds_engine": history[0]["engine/seconds_build"], "invalid_rows": sum(h["engine/invalid_rows"] for h in history)}


def _interleave(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    tokens = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
    return {"seconds": seconds, "generated_tokens": tokens}


def run_child(job: dict, tmp: Path) -> dict:
    path = tmp / f"job_{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {job['kind']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(path.with_suffix(".out.json").read_text())


def _tps(raw: dict, name: str) -> float:
    return raw["generated_tokens"][name] / statistics.median(raw["seconds"][name])


# --------------------------------------------------------------------------------- parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=408)
    p.add_argument("--rl-steps", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm_rl_loop.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job = json.loads(Path(args.child).read_text())
        out = {"capture": child_capture, "prefix": child_prefix, "rl": child_rl}[job["kind"]](job)
        Path(args.child).with_suffix(".out.json").write_text(json.dumps(out))
        sys.stdout.flush()
        os._exit(0)

    import torch
    import vllm

    from reference_impl.model import MoEConfig
    from reference_impl.tiny_checkpoint import build_tiny_checkpoint

    torch.set_num_threads(1)
    result = {"vllm": vllm.__version__, "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpts = {name: build_tiny_checkpoint(tmp / name, MoEConfig(**kw), seed=1) for name, kw in MODELS.items()}
        result["capture"] = {}
        for name, ckpt in ckpts.items():
            raw = run_child({"kind": "capture", "ckpt": str(ckpt), "batch": args.batch, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "repeats": args.repeats}, tmp)
            r = result["capture"][name] = {
                "model": MODELS[name],
                "batch": args.batch,
                "prompt_len": args.prompt_len,
                "max_tokens": args.max_tokens,
                **raw,
                "median_tokens_per_s_no_capture": _tps(raw, "no_capture"),
                "median_tokens_per_s_capture": _tps(raw, "capture"),
            }
            r["ratio_capture_over_no_capture"] = r["median_tokens_per_s_capture"] / r["median_tokens_per_s_no_capture"]
            print(f"capture/{name}: {r['median_tokens_per_s_no_capture']:.0f} tok/s without, {r['median_tokens_per_s_capture']:.0f} with; ratio {r['ratio_capture_over_no_capture']:.3f}")
        raw = run_child({"kind": "prefix", "ckpt": str(ckpts["tiny"]), "prompt_len": args.long_prompt, "repeats": args.repeats}, tmp)
        result["prefix_caching"] = pc = {
            "prompts": "8 prompts x 8 samples, capture on in both",
            "prompt_len": args.long_prompt,
            "max_tokens": 32,
            **raw,
            "median_tokens_per_s_on": _tps(raw, "caching_on"),
            "median_tokens_per_s_off": _tps(raw, "caching_off"),
        }
        pc["ratio_on_over_off"] = pc["median_tokens_per_s_on"] / pc["median_tokens_per_s_off"]
        print(f"prefix caching + capture: {pc['median_tokens_per_s_on']:.0f} tok/s vs {pc['median_tokens_per_s_off']:.0f} off; ratio {pc['ratio_on_over_off']:.3f}; {raw['info']}; identical tokens {raw['identical_tokens']}")
        config = {"rollout_engine": "vllm", "numerics": "bf16", "replay": "r3", "steps": args.rl_steps, "num_prompts": 32, "group_size": 8, "progress": False, "seed": 0}
        rl = run_child({"kind": "rl", "config": config}, tmp)
        later = rl["per_step"][1:]
        result["rl_step"] = {
            "config": config,
            **rl,
            "median_seconds": {k: statistics.median(s[k] for s in later) for k in ("sample", "sync", "recompute", "update", "step")},
        }
        print(f"RL step (median of steps 2..{args.rl_steps}): {result['rl_step']['median_seconds']}")
    result["load_average_after"] = os.getloadavg()
    result["wall_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What routing replay costs under megatron-core model parallelism: fwd+bwd time per layout, 2 gloo ranks.

For each layout of :data:`reference_impl.integrations.megatron_parity.LAYOUTS`, 2 ranks are forked
(torch and megatron imported once) and run megatron's own schedule (``get_forward_backward_func``,
2 micro-batches, forward and backward) in three modes, interleaved round by round so machine noise
hits them alike: ``native`` (megatron's top-k), ``record`` (RECORD, R2's pi_old pass) and ``replay``
(REPLAY_FORWARD of a global trace through :class:`MegatronReplay`, sliced per rank and micro-batch;
REPLAY_BACKWARD under recompute). Medians of ``--repeats`` rounds (the slower rank's time, after a
barrier); ratios are taken within the run.

    python benchmarks/megatron_parallel_replay.py [--batch 8 --seq 64 --repeats 12]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import megatron.core.models.gpt  # noqa: E402,F401 - imported once, before the forks
import megatron.core.pipeline_parallel  # noqa: E402,F401

from reference_impl.integrations import megatron_parity as mp  # noqa: E402
from reference_impl.integrations.megatron_cpu_shims import apply_cpu_shims  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "megatron_parallel_replay.json"


def rank_bench(name: str, ref_model, ref, repeats: int, tmp: str, rank: int, port: int) -> None:
    import torch.distributed as dist

    from reference_impl.integrations.megatron import MegatronReplay
    from reference_impl.slicing import ParallelLayout

    mp.init_rank(rank, port)
    mp.init_layout(name)
    model = mp.build_layout_model(name, ref_model)
    layout = ParallelLayout.from_megatron(model.config, 2)
    rep = MegatronReplay(model)
    modes = {
        "native": lambda: None,
        "record": lambda: rep.record(layout),
        "replay": lambda: rep.replay_forward(ref.grad_trace, layout=layout),
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeats + 1):  # round 0 warms up
        for mode, ctx in modes.items():
            model.zero_grad()
            dist.barrier()
            t0 = time.perf_counter()
            cm = ctx()
            if cm is None:
                mp.schedule_step(model, ref, layout, forward_only=False)
            else:
                with cm:
                    mp.schedule_step(model, ref, layout, forward_only=False)
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            rep.check_drained()
            if i:
                times[mode].append(float(elapsed))
    if rank == 0:
        med = {m: statistics.median(v) for m, v in times.items()}
        res = {"median_seconds": med, "replay_over_native": med["replay"] / med["native"],
               "record_over_native": med["record"] / med["native"], "ranks": {k: getattr(layout, k) for k in ("dp", "pp", "cp", "tp")},
               "ep": model.config.expert_model_parallel_size, "dispatcher": model.config.moe_token_dispatcher_type,
               "recompute": model.config.recompute_granularity}
        Path(tmp, f"{name}.json").write_text(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    apply_cpu_shims()
    ref_model = mp.tiny_reference_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (args.batch, args.seq), generator=g)
    lengths = [args.seq] * args.batch
    ref = mp.parity_reference(ref_model, tokens, lengths)
    tmp = tempfile.mkdtemp(prefix="megatron_parallel_bench_")
    results = {}
    for name in mp.LAYOUTS:
        t0 = time.perf_counter()
        codes = mp.fork_ranks(lambda rank, port, name=name: rank_bench(name, ref_model, ref, args.repeats, tmp, rank, port), 2, 300)
        if codes != [0, 0]:
            raise SystemExit(f"{name}: ranks exited with {codes}")
        results[name] = json.loads(Path(tmp, f"{name}.json").read_text())
        r = results[name]
        print(f"{name:<14} replay/native {r['replay_over_native']:.3f}  record/native {r['record_over_native']:.3f}  "
              f"native {r['median_seconds']['native'] * 1e3:.0f} ms  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = {
        "settings": {"batch": args.batch, "seq": args.seq, "repeats": args.repeats, "microbatches": 2, "world_size": 2,
                     "model": "tiny Qwen3-MoE: 4 layers, hidden 64, 8 experts, top-2, fp32", "backend": "gloo (CPU)",
                     "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()},
        "layouts": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

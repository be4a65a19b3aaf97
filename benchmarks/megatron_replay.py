"""What routing replay costs in megatron-core: forward+backward time with RouterReplay against native routing.

One process, one model, modes interleaved so that machine noise hits them alike; medians of
``--repeats`` rounds. Every step is ``megatron_logprobs(...)`` (right-padded batch, next-token
log-probs) + ``backward()`` of their mean:

* ``native``: Megatron's own top-k;
* ``record``: RECORD (R2's pi_old pass), trace returned;
* ``replay``: REPLAY_FORWARD of a trace (R3), through :class:`MegatronReplay` (whose router pre-hook
  also computes the native top-k of the rows the trace does not cover: last position, padding);
* ``replay_raw``: Megatron's bare API on a second copy of the model (``set_target_indices`` with the
  filler ``0..k-1`` on uncovered rows, ``REPLAY_FORWARD``), i.e. the floor our controller adds to.

Each is measured without activation recompute and with ``recompute_granularity="full"``, where replay
runs REPLAY_FORWARD then REPLAY_BACKWARD (the recompute pops the forward's routes).

    python benchmarks/megatron_replay.py [--batch 8 --seq 256 --hidden 128 --experts 32 --top-k 4 --repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from reference_impl import MoEConfig, MoEForCausalLM  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "megatron_replay.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import megatron.core

    from reference_impl.integrations.megatron import (
        MegatronReplay,
        build_megatron_model,
        megatron_logprobs,
        megatron_replay_targets,
    )

    torch.manual_seed(0)
    cfg = MoEConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(512, args.seq),
    )
    reference = MoEForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    # right-padded batch: lengths from seq/2 to seq
    lengths = [args.seq - (i * args.seq) // (2 * args.batch) for i in range(args.batch)]

    load_before = os.getloadavg()[0]
    results = {}
    for recompute in (False, True):
        model = build_megatron_model(reference, recompute=recompute)
        with torch.no_grad():
            trace = megatron_logprobs(model, tokens, lengths, mode="record").trace
        # A second copy driven through Megatron's bare API (no controller hooks on it).
        raw = build_megatron_model(reference, recompute=recompute)
        raw_instances = [layer.mlp.router.router_replay for layer in raw.decoder.layers]
        raw_targets, _ = megatron_replay_targets(trace, args.seq)
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        from reference_impl.integrations.megatron import megatron_forward
        from reference_impl.logprobs import next_token_logprobs

        mask = torch.arange(args.seq - 1)[None] < torch.tensor(lengths)[:, None] - 1

        def step(mode, model=model):
            res = megatron_logprobs(model, tokens, lengths, trace if mode == "replay" else None, mode=mode)
            (-(res.logprobs.sum() / res.mask.sum())).backward()
            model.zero_grad(set_to_none=True)

        def step_raw():
            for rr, t in zip(raw_instances, raw_targets):
                rr.set_target_indices(t)
                rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            logits = megatron_forward(raw, tokens)
            if recompute:
                for rr in raw_instances:
                    rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            else:
                for rr in raw_instances:
                    rr.replay_backward_list.clear()
            logp = torch.where(mask, next_token_logprobs(logits, tokens), 0.0)
            (-(logp.sum() / mask.sum())).backward()
            for rr in raw_instances:
                rr.clear_indices()
                rr.clear_router_replay_action()
            raw.zero_grad(set_to_none=True)

        modes = {
            "native": lambda: step("native"),
            "record": lambda: step("record"),
            "replay": lambda: step("replay"),
            "replay_raw": step_raw,
        }
        for fn in modes.values():  # warm-up
            fn()
        assert MegatronReplay.of(model).pending_backward() == [0] * cfg.num_hidden_layers
        times = {name: [] for name in modes}
        for _ in range(args.repeats):
            for name, fn in modes.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results["recompute_full" if recompute else "no_recompute"] = {
            "median_seconds": med,
            "replay_over_native": med["replay"] / med["native"],
            "record_over_native": med["record"] / med["native"],
            "replay_raw_over_native": med["replay_raw"] / med["native"],
            "replay_over_replay_raw": med["replay"] / med["replay_raw"],
            "tokens": int(sum(lengths)),
            "positions": args.batch * args.seq,
        }

    out = {
        "settings": vars(args)
        | {
            "out": os.path.relpath(args.out, Path(__file__).resolve().parent.parent),
            "lengths": lengths,
            "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "unknown"),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU only",
            "precision": "fp32",
            "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
            "note": "shared 2-core machine; 1 thread avoids OpenMP oversubscription stalls; ratios within ~5% are noise",
        },
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))

    print("| megatron-core fwd+bwd | native (s) | record/native | replay/native | bare-API replay/native |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        print(
            f"| {key} ({args.batch}x{args.seq}, E={args.experts}, k={args.top_k}) | {r['median_seconds']['native']:.4f} "
            f"| {r['record_over_native']:.3f} | {r['replay_over_native']:.3f} | {r['replay_raw_over_native']:.3f} |"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

"""What routing replay and recording cost: time ratios against native routing, and trace bytes per token.

Measured in one run, interleaving the three modes so that machine noise hits them alike:

* one MoE layer (default: 4096 tokens, hidden 512, 64 experts, top-8) forward + backward, with the
  routing policy objects the model uses (native top-k, native + route recording, replay of a trace);
* the same through a whole 2-layer model (attention included);
* bytes per token of a saved trace, against ``num_layers * top_k`` bytes (uint8 ids).

    python benchmarks/replay_overhead.py [--tokens 4096 --hidden 512 --experts 64 --top-k 8 --repeats 15]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from reference_impl import MoEConfig, MoEForCausalLM, RoutingTrace, record_routing, replay_routing
from reference_impl.replay import NativeRouting, ReplayRouting, RouteRecorder


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_moe_layer(args) -> dict:
    torch.manual_seed(0)
    cfg = MoEConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=64,
    )
    block = MoEForCausalLM(cfg).model.layers[0].mlp
    x = torch.randn(1, args.tokens, args.hidden, requires_grad=True)
    top_k = args.top_k

    native = NativeRouting()
    with torch.no_grad():
        logits = block.gate(x.view(-1, args.hidden))
    trace = RoutingTrace(torch.topk(logits, top_k).indices[:, None], args.experts, rows_per_seq=(args.tokens,))
    # one sequence of tokens+1 tokens has exactly `tokens` routed rows
    replay = ReplayRouting(trace, num_layers=1, top_k=top_k, num_experts=args.experts)
    recorder = RouteRecorder(args.experts)

    def step(policy, record=False):
        routing = policy.start_forward(batch=1, seq_len=args.tokens, offset=0, top_k=top_k)
        out, ids, _ = block(x, lambda lg: routing.select(0, lg))
        if record:
            recorder.chunks.clear()
            recorder._length = 0
            recorder.add(ids.view(1, args.tokens, 1, -1), offset=0)
        out.square().mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    modes = {"native": lambda: step(native), "record": lambda: step(native, record=True), "replay": lambda: step(replay)}
    for fn in modes.values():  # warm-up
        fn()
    times = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            times[name] += _time(fn, 1)
    return _summarize(times)


def bench_model(args) -> dict:
    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=256, hidden_size=128, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4)
    model = MoEForCausalLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (8, 256))
    lengths = [256] * 8
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    trace = rec.trace(lengths)

    def native():
        model(x).logits.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def record():
        with record_routing(model) as r:
            model(x).logits.float().square().mean().backward()
        r.trace(lengths)
        model.zero_grad(set_to_none=True)

    def replay():
        with replay_routing(model, trace):
            model(x).logits.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    modes = {"native": native, "record": record, "replay": replay}
    for fn in modes.values():
        fn()
    times = {name: [] for name in modes}
    for _ in range(max(3, args.repeats // 2)):
        for name, fn in modes.items():
            times[name] += _time(fn, 1)
    return _summarize(times)


def _summarize(times: dict[str, list[float]]) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "median_seconds": med,
        "replay_over_native": med["replay"] / med["native"],
        "record_over_native": med["record"] / med["native"],
    }


def bench_trace_bytes(args) -> dict:
    g = torch.Generator().manual_seed(0)
    num_layers, tokens = 48, args.tokens
    scores = torch.rand(tokens, num_layers, args.experts, generator=g)
    ids = scores.topk(args.top_k, dim=-1).indices
    valid = torch.ones(tokens, dtype=torch.bool)
    valid[:16] = False  # e.g. positions an engine could not report
    trace = RoutingTrace(ids, args.experts, valid=valid, rows_per_seq=(tokens // 2, tokens - tokens // 2))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "trace.safetensors"
        trace.save(path)
        size = os.path.getsize(path)
    ideal = num_layers * args.top_k
    # information bound: a top-k *set* of E experts needs ceil(log2 C(E, k)) bits per (token, layer)
    bound_bits = math.ceil(math.log2(math.comb(args.experts, args.top_k)))
    return {
        "num_layers": num_layers,
        "top_k": args.top_k,
        "num_experts": args.experts,
        "tokens": tokens,
        "invalid_rows": 16,
        "file_bytes": size,
        "bytes_per_token": size / tokens,
        "ids_bytes_per_token": ideal,
        "overhead_bytes": size - ideal * tokens,
        "int32_bytes_per_token": 4 * ideal,
        "information_bound_bits_per_token_layer": bound_bits,
        "information_bound_bytes_per_token": bound_bits * num_layers / 8,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replay_overhead.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    result = {
        "settings": vars(args) | {"out": str(args.out), "torch": torch.__version__},
        "moe_layer_fwd_bwd": bench_moe_layer(args),
        "model_fwd_bwd": bench_model(args),
        "trace_bytes": bench_trace_bytes(args),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    layer, model, tb = result["moe_layer_fwd_bwd"], result["model_fwd_bwd"], result["trace_bytes"]
    print("| measurement | native (s) | record/native | replay/native |")
    print("|---|---|---|---|")
    print(
        f"| one MoE layer fwd+bwd ({args.tokens} tok, h={args.hidden}, E={args.experts}, k={args.top_k}) "
        f"| {layer['median_seconds']['native']:.4f} | {layer['record_over_native']:.3f} | {layer['replay_over_native']:.3f} |"
    )
    print(
        f"| 2-layer model fwd+bwd (8x256 tok) | {model['median_seconds']['native']:.4f} "
        f"| {model['record_over_native']:.3f} | {model['replay_over_native']:.3f} |"
    )
    print(
        f"\ntrace: {tb['bytes_per_token']:.2f} bytes/token for {tb['num_layers']} layers x top-{tb['top_k']} "
        f"(ids {tb['ids_bytes_per_token']} B/token, int32 would be {tb['int32_bytes_per_token']} B/token); "
        f"constant overhead {tb['overhead_bytes']} B for {tb['tokens']} tokens incl. {tb['invalid_rows']} invalid rows; "
        f"information bound {tb['information_bound_bytes_per_token']:.1f} B/token "
        f"({tb['information_bound_bits_per_token_layer']} bits per token and layer)"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

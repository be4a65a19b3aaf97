"""What a softmax-only replay gets wrong on a GLM-4.5-style router, with the right expert ids.

A tiny GLM-4.5-style model (the one of tests/engines/test_router_families_engines.py: sigmoid
router with a selection bias, 16 experts in 4 groups of which 2 are kept, top-4,
``routed_scaling_factor`` 2.5, a shared expert, a dense first layer) records its own routes on
random sequences. The same trace is then replayed with gate weights computed the wrong ways, and
the next-token log-probs compared with the correct replay (:func:`reference_impl.routers.gate_weights`):

* ``softmax_weights``: softmax over all router logits at the replayed ids, renormalised, no scaling
  (a Qwen3-MoE replay path);
* ``no_scaling``: the right sigmoid weights without ``routed_scaling_factor``;
* ``biased_weights``: ``s + b`` (the selection scores) as weights, renormalised and scaled.

And, for natively routed rows (R2 recording, invalid rows, the last position), the share of
(token, MoE layer) rows whose top-k set differs from the true biased, group-limited choice when the
bias is dropped (groups kept), and when routing is plain softmax top-k (no bias, no groups).

    python experiments/softmax_only_replay.py [--seeds 0 1 2] [--out experiments/results]

Writes ``softmax_only_replay.json`` and ``softmax_only_replay.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

import reference_impl.model as model_module
from reference_impl import MoEConfig, MoEForCausalLM, RoutingTrace, record_routing, replay_routing
from reference_impl.logprobs import next_token_logprobs
from reference_impl.routers import RouterSpec, gate_weights, native_select

CONFIG = MoEConfig(
    num_hidden_layers=3, num_experts=16, num_experts_per_tok=4, score_function="sigmoid", expert_bias=True,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
    intermediate_size=96, router_initializer_range=0.1, bias_initializer_range=0.1, initializer_range=0.1,
)
BATCH, SEQ = 16, 24


def replay_logprobs(model: MoEForCausalLM, tokens: torch.Tensor, trace: RoutingTrace) -> torch.Tensor:
    with torch.no_grad(), replay_routing(model, trace):
        return next_token_logprobs(model(tokens).logits, tokens)


def with_config(model: MoEForCausalLM, **changes) -> MoEForCausalLM:
    """The same weights under another router configuration (the bias dropped when the new one has none)."""
    other = MoEForCausalLM(replace(model.config, **changes)).eval()
    state = {k: v for k, v in model.state_dict().items() if other.config.expert_bias or not k.endswith("e_score_correction_bias")}
    other.load_state_dict(state)
    return other


def biased_weight_logprobs(model: MoEForCausalLM, tokens: torch.Tensor, trace: RoutingTrace) -> torch.Tensor:
    """Replay with ``(s + b)[ids]`` as weights: patch the gate-weight rule, layer by layer."""
    current: dict = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda mod, args: current.__setitem__("bias", mod.gate.e_score_correction_bias))
        for layer in model.model.layers
        if layer.is_moe
    ]

    def biased(router_logits: torch.Tensor, ids: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
        w = (torch.sigmoid(router_logits.float()) + current["bias"]).gather(1, ids)
        return w / w.sum(-1, keepdim=True) * spec.routed_scaling_factor

    try:
        with mock.patch.object(model_module, "gate_weights", biased):
            return replay_logprobs(model, tokens, trace)
    finally:
        for h in hooks:
            h.remove()


def measure(seed: int) -> dict:
    torch.manual_seed(seed)
    model = MoEForCausalLM(CONFIG).eval()
    tokens = torch.randint(4, CONFIG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + seed))
    with torch.no_grad(), record_routing(model) as rec:
        out = model(tokens, output_router_logits=True)
    trace = rec.trace([SEQ] * BATCH)
    right = replay_logprobs(model, tokens, trace)
    assert torch.allclose(right, next_token_logprobs(out.logits, tokens), atol=0, rtol=0)

    softmax_model = with_config(model, score_function="softmax", expert_bias=False, n_group=1, topk_group=1, routed_scaling_factor=1.0)
    relabelled = RoutingTrace(trace.expert_ids, trace.num_experts, trace.valid, trace.rows_per_seq, router_family="softmax")
    wrong = {
        "softmax_weights": replay_logprobs(softmax_model, tokens, relabelled),
        "no_scaling": replay_logprobs(with_config(model, routed_scaling_factor=1.0), tokens, trace),
        "biased_weights": biased_weight_logprobs(model, tokens, trace),
    }
    result = {name: {"max_abs": float((lp - right).abs().max()), "mean_abs": float((lp - right).abs().mean())} for name, lp in wrong.items()}

    spec = CONFIG.router_spec
    rows = differ_no_bias = differ_softmax = 0
    for j, decoder_layer in enumerate(CONFIG.layer_map.moe_layers):
        z = out.router_logits[j]
        bias = model.model.layers[decoder_layer].mlp.gate.e_score_correction_bias
        truth = native_select(z, spec, bias).sort(-1).values
        no_bias = native_select(z, spec, None).sort(-1).values
        plain = z.topk(spec.top_k, dim=-1).indices.sort(-1).values
        rows += z.shape[0]
        differ_no_bias += int((truth != no_bias).any(-1).sum())
        differ_softmax += int((truth != plain).any(-1).sum())
    result["native_rows_differ_without_bias"] = differ_no_bias / rows
    result["native_rows_differ_plain_softmax_topk"] = differ_softmax / rows
    result["rows"] = rows
    # The correct weights at the replayed ids sum to the scaling factor (the formula, checked).
    w = gate_weights(out.router_logits[0], out.routes[:, :, 0].reshape(-1, spec.top_k), spec)
    result["weights_sum"] = float(w.sum(-1).mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {str(s): measure(s) for s in args.seeds}
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"config": CONFIG.to_dict(), "batch": BATCH, "seq_len": SEQ, "seeds": args.seeds, "runs": runs}
    (args.out / "softmax_only_replay.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "| what the replay gets wrong (same replayed ids) | " + " | ".join(f"seed {s}" for s in args.seeds) + " |",
        "|---|" + "---|" * len(args.seeds),
    ]
    for name, label in (("softmax_weights", "softmax weights over all logits: max abs log-prob error"),
                        ("no_scaling", "`routed_scaling_factor` dropped: max abs log-prob error"),
                        ("biased_weights", "biased scores s + b as weights: max abs log-prob error")):
        lines.append(f"| {label} | " + " | ".join(f"{runs[str(s)][name]['max_abs']:.2e}" for s in args.seeds) + " |")
    lines.append("| native rows without the bias: share of top-k sets that differ | "
                 + " | ".join(f"{runs[str(s)]['native_rows_differ_without_bias']:.1%}" for s in args.seeds) + " |")
    lines.append("| native rows as plain softmax top-k: share that differ | "
                 + " | ".join(f"{runs[str(s)]['native_rows_differ_plain_softmax_topk']:.1%}" for s in args.seeds) + " |")
    (args.out / "softmax_only_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

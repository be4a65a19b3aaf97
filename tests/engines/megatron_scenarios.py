"""Megatron-core scenarios for tests/engines/test_megatron.py, each run in a process of its own.

    python tests/engines/megatron_scenarios.py SCENARIO OUT.json

Megatron's state is process-wide (the CPU shims patch ``torch.cuda``, ``RouterReplay`` keeps a
class-level instance list, the gloo group lives until exit), so the test runs every scenario in a
fresh interpreter and asserts on the JSON of measurements written here. Scenarios:

* ``parity``: forward, RECORD, REPLAY_FORWARD (reference and perturbed traces, invalid rows), then a
  second model with activation recompute: REPLAY_FORWARD + REPLAY_BACKWARD forward and backward,
  gradients against the reference model's.
* ``lifecycle``: a second model built without clearing Megatron's instance list, int16 traces and
  Megatron's own refusal of them, mode errors.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from reference_impl import MoEConfig, MoEForCausalLM, RoutingTrace, record_routing, replay_routing  # noqa: E402
from reference_impl.logprobs import next_token_logprobs  # noqa: E402
from reference_impl.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

VOCAB, NUM_EXPERTS = 64, 8


def reference_model() -> MoEForCausalLM:
    """Tiny Qwen3-MoE with well-separated router logits (std 0.5): fp32 rounding flips no route."""
    torch.manual_seed(0)
    return MoEForCausalLM(MoEConfig(vocab_size=VOCAB, num_experts=NUM_EXPERTS, router_initializer_range=0.5, initializer_range=0.1)).eval()


def batch(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (len(lengths), max(lengths)), generator=g)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0  # right padding
    return tokens


def ref_record(ref, tokens, lengths):
    with torch.no_grad(), record_routing(ref) as rec:
        out = ref(tokens)
    return out, rec.trace(lengths)


def ref_replay_logprobs(ref, tokens, lengths, trace):
    with torch.no_grad(), replay_routing(ref, trace, seq_lengths=lengths):
        out = ref(tokens)
    return next_token_logprobs(out.logits, tokens), out


def masked_max_diff(a, b, mask):
    return float(((a - b).abs() * mask).max())


def perturb(trace: RoutingTrace, seed: int, experts: int = NUM_EXPERTS) -> RoutingTrace:
    """Every valid row, every layer: a random top-k set drawn from experts 0..experts-1."""
    g = torch.Generator().manual_seed(seed)
    n, L, k = trace.expert_ids.shape
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n * L)]).view(n, L, k)
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq)


def valid_routes_equal(routes, trace, lengths) -> bool:
    """Megatron's dispatched routes at every traced (valid) row equal the trace's ids as sets."""
    got = RoutingTrace.from_padded(routes, lengths, trace.num_experts)
    want = trace.expert_ids.long().sort(-1).values
    have = got.expert_ids.long().sort(-1).values
    return bool((want == have).all(-1).all(-1)[trace.valid].all())


def expected_raise(fn, exc=Exception) -> str:
    try:
        fn()
    except exc as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return ""


# --------------------------------------------------------------------------------- parity
def scenario_parity(out: dict) -> None:
    from reference_impl.integrations.megatron import (
        MegatronReplay,
        load_megatron_model,
        megatron_forward,
        megatron_logprobs,
    )

    ref = reference_model()
    ckpt = tempfile.mkdtemp(prefix="megatron_ckpt_")
    build_tiny_checkpoint(ckpt, model=ref)
    t0 = time.perf_counter()
    model = load_megatron_model(ckpt)
    out["load_seconds"] = time.perf_counter() - t0

    cases = {"single": [16], "padded": [16, 11, 6]}
    for name, lengths in cases.items():
        tokens = batch(lengths)
        mask = (torch.arange(tokens.shape[1] - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()
        ref_out, ref_trace = ref_record(ref, tokens, lengths)
        with torch.no_grad():
            logits = megatron_forward(model, tokens)
        out[f"{name}_logits_max_diff"] = float((logits - ref_out.logits).abs().max())

        # RECORD: the trace Megatron chose equals the reference model's native routes.
        with torch.no_grad():
            rec = megatron_logprobs(model, tokens, lengths, mode="record")
        out[f"{name}_record_equals_reference"] = rec.trace == ref_trace
        out[f"{name}_record_dtype"] = str(rec.trace.expert_ids.dtype)
        out[f"{name}_native_logprobs_max_diff"] = masked_max_diff(rec.logprobs, next_token_logprobs(ref_out.logits, tokens), mask)

        # REPLAY_FORWARD of the reference's own trace, then of a perturbed trace.
        for label, trace in (("replay_ref", ref_trace), ("replay_perturbed", perturb(ref_trace, seed=3))):
            ref_lp, ref_rep = ref_replay_logprobs(ref, tokens, lengths, trace)
            with torch.no_grad():
                res = megatron_logprobs(model, tokens, lengths, trace)
            out[f"{name}_{label}_logprobs_max_diff"] = masked_max_diff(res.logprobs, ref_lp, mask)
            out[f"{name}_{label}_routing_map_is_trace"] = valid_routes_equal(res.routes, trace, lengths)
            out[f"{name}_{label}_routes_equal_reference_replay"] = bool(torch.equal(res.routes, ref_rep.routes))
            out[f"{name}_{label}_stats"] = res.stats
            if label == "replay_perturbed":
                differing = trace.agreement(ref_trace).router_disagreement
                out[f"{name}_perturbed_router_disagreement_with_native"] = differing
                # A later RECORD (no replay) is back to the native routes: nothing leaked.
                with torch.no_grad():
                    again = megatron_logprobs(model, tokens, lengths, mode="record")
                out[f"{name}_record_after_replay_is_native"] = again.trace == ref_trace

    # Invalid rows inside sequences (e.g. prefix-cached positions an engine could not report):
    # routed natively within the same forward, exactly as the reference replay controller does.
    lengths = [16, 11, 6]
    tokens = batch(lengths)
    mask = (torch.arange(tokens.shape[1] - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()
    _, ref_trace = ref_record(ref, tokens, lengths)
    pert = perturb(ref_trace, seed=5)
    valid = torch.ones(pert.num_tokens, dtype=torch.bool)
    valid[[0, 1, 2, 17, 20]] = False
    holes = RoutingTrace(pert.expert_ids, NUM_EXPERTS, valid, pert.rows_per_seq)
    ref_lp, ref_rep = ref_replay_logprobs(ref, tokens, lengths, holes)
    with torch.no_grad():
        res = megatron_logprobs(model, tokens, lengths, holes)
    out["invalid_rows_logprobs_max_diff"] = masked_max_diff(res.logprobs, ref_lp, mask)
    out["invalid_rows_routes_equal_reference_replay"] = bool(torch.equal(res.routes, ref_rep.routes))
    out["invalid_rows_stats"] = res.stats
    out["invalid_rows_error_mode"] = expected_raise(
        lambda: megatron_logprobs(model, tokens, lengths, holes, invalid_rows="error"), ValueError
    )

    # ------------------------------------------------------------ recompute: REPLAY_BACKWARD
    # A second model in the same process: load_megatron_model clears Megatron's instance list first.
    t0 = time.perf_counter()
    rmodel = load_megatron_model(ckpt, recompute=True)
    out["second_load_seconds"] = time.perf_counter() - t0
    from megatron.core.transformer.moe.router_replay import RouterReplay

    out["instances_after_second_build"] = len(RouterReplay.global_router_replay_instances)
    rep = MegatronReplay.of(rmodel)
    out["recompute_config"] = rmodel.config.recompute_granularity
    # Routes restricted to experts 0..3 on every traced row: experts 4..7 serve no scored token.
    trace = perturb(ref_trace, seed=7, experts=4)
    res = megatron_logprobs(rmodel, tokens, lengths, trace)
    out["recompute_pending_after_forward"] = rep.pending_backward()
    out["recompute_action_after_forward"] = [str(rr.router_replay_action) for rr in rep.instances]
    loss = -(res.logprobs * res.mask).sum() / res.mask.sum()
    loss.backward()
    out["recompute_pending_after_backward"] = rep.pending_backward()
    out["recompute_routes_equal_forward_routes"] = bool(torch.equal(rep.last_recompute_routes(), res.routes))
    ref_lp, _ = ref_replay_logprobs(ref, tokens, lengths, trace)
    out["recompute_logprobs_max_diff"] = masked_max_diff(res.logprobs.detach(), ref_lp, mask)

    router_grad, unused_grad, used_grad = [], [], []
    for layer in rmodel.decoder.layers:
        router_grad.append(float(layer.mlp.router.weight.grad.abs().sum()))
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            g = [p.grad for p in expert.parameters()]
            total = sum(0.0 if x is None else float(x.abs().sum()) for x in g)
            (unused_grad if e >= 4 else used_grad).append(total)
    out["recompute_router_grad_abs_sum"] = router_grad
    out["recompute_unused_expert_grad_abs_sum"] = unused_grad
    out["recompute_used_expert_grad_abs_sum"] = used_grad

    # The same loss on the reference model (replay + its own activation checkpointing).
    ref.zero_grad()
    ref.gradient_checkpointing = True
    with replay_routing(ref, trace, seq_lengths=lengths):
        ref_logits = ref(tokens).logits
    ref_lp = next_token_logprobs(ref_logits, tokens)
    (-(ref_lp * mask).sum() / mask.sum()).backward()
    ref.gradient_checkpointing = False
    out["recompute_router_grad_max_diff"] = max(
        float((layer.mlp.router.weight.grad - ref.model.layers[i].mlp.gate.weight.grad).abs().max())
        for i, layer in enumerate(rmodel.decoder.layers)
    )
    out["recompute_router_grad_max_abs"] = max(float(l.mlp.gate.weight.grad.abs().max()) for l in ref.model.layers)
    diffs = []
    for i, layer in enumerate(rmodel.decoder.layers):
        for e, expert in enumerate(layer.mlp.experts.local_experts):
            ours = ref.model.layers[i].mlp.experts[e]
            fc1 = torch.cat([ours.gate_proj.weight.grad if ours.gate_proj.weight.grad is not None else torch.zeros_like(ours.gate_proj.weight),
                             ours.up_proj.weight.grad if ours.up_proj.weight.grad is not None else torch.zeros_like(ours.up_proj.weight)])
            diffs.append(float((expert.linear_fc1.weight.grad - fc1).abs().max()))
    out["recompute_expert_fc1_grad_max_diff"] = max(diffs)

    # R2 under recompute: RECORD with grad pins the recompute to the recorded routes too.
    rmodel.zero_grad()
    res = megatron_logprobs(rmodel, tokens, lengths, mode="record")
    out["record_recompute_pending_after_forward"] = rep.pending_backward()
    (-(res.logprobs * res.mask).sum()).backward()
    out["record_recompute_pending_after_backward"] = rep.pending_backward()
    out["record_recompute_routes_equal"] = bool(torch.equal(rep.last_recompute_routes(), res.routes))
    out["record_recompute_trace_equals_reference"] = res.trace == ref_trace

    # Two forwards in one block wait for their backwards in order (Megatron's FIFO of recompute
    # targets); a new block while targets are pending is refused instead of mixing steps.
    rmodel.zero_grad()
    t1 = perturb(ref_trace, seed=11)
    with rep.replay_forward(t1, lengths):
        a = megatron_forward(rmodel, tokens)
        routes_a = rep.last_routes()
        b = megatron_forward(rmodel, tokens)
    out["fifo_pending_after_two_forwards"] = rep.pending_backward()
    out["fifo_new_block_refused"] = expected_raise(lambda: _enter_exit(rep.record()), RuntimeError)
    a.sum().backward()
    out["fifo_pending_after_first_backward"] = rep.pending_backward()
    b.sum().backward()
    out["fifo_pending_after_second_backward"] = rep.pending_backward()
    out["fifo_recompute_routes_equal"] = bool(torch.equal(rep.last_recompute_routes(), routes_a))
    out["fifo_actions_after"] = [str(rr.router_replay_action) for rr in rep.instances]
    with torch.no_grad():
        again = megatron_logprobs(rmodel, tokens, lengths, mode="record")
    out["fifo_then_record_is_native"] = again.trace == ref_trace


# ------------------------------------------------------------------------------ lifecycle
def scenario_lifecycle(out: dict) -> None:
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from reference_impl.integrations.megatron import (
        MegatronReplay,
        load_megatron_model,
        megatron_logprobs,
        megatron_replay_targets,
    )

    from reference_impl.integrations.megatron_cpu_shims import apply_cpu_shims, shims_applied

    ref = reference_model()
    ckpt = tempfile.mkdtemp(prefix="megatron_ckpt_")
    build_tiny_checkpoint(ckpt, model=ref)
    lengths = [12, 9]
    tokens = batch(lengths, seed=2)
    _, ref_trace = ref_record(ref, tokens, lengths)
    pert = perturb(ref_trace, seed=21)
    ref_lp, _ = ref_replay_logprobs(ref, tokens, lengths, pert)
    mask = (torch.arange(tokens.shape[1] - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()

    first = load_megatron_model(ckpt)
    with torch.no_grad():
        megatron_logprobs(first, tokens, lengths, pert)  # binds a controller to the first model

    # Rebuild WITHOUT clearing the class-level instance list (the orphaned-replay pitfall).
    original = RouterReplay.clear_global_router_replay_instances
    RouterReplay.clear_global_router_replay_instances = staticmethod(lambda: None)
    try:
        second = load_megatron_model(ckpt)
    finally:
        RouterReplay.clear_global_router_replay_instances = original
    L = ref.config.num_hidden_layers
    # The CPU shims: five, applied once (a second call changes nothing), only without CUDA.
    current_device = torch.cuda.current_device
    out["cuda_available"] = torch.cuda.is_available()
    out["shims"] = list(shims_applied())
    out["shims_second_call"] = list(apply_cpu_shims())
    out["shims_idempotent"] = torch.cuda.current_device is current_device
    out["instances_after_unclean_rebuild"] = len(RouterReplay.global_router_replay_instances)
    targets, _ = megatron_replay_targets(pert, tokens.shape[1])
    # Megatron's own static API is now broken for the second model:
    out["megatron_set_replay_data_refuses"] = expected_raise(lambda: RouterReplay.set_replay_data(targets), ValueError)
    # ... and addressing the first L instances (what a framework holding the stale list does) drives the OLD model:
    stale = RouterReplay.global_router_replay_instances[:L]
    out["stale_instances_belong_to_first_model"] = all(
        rr is layer.mlp.router.router_replay for rr, layer in zip(stale, first.decoder.layers)
    )

    # Our controller binds to the second model's own routers and replay takes effect there.
    with torch.no_grad():
        res = megatron_logprobs(second, tokens, lengths, pert)
    out["second_model_replay_routing_map_is_trace"] = valid_routes_equal(res.routes, pert, lengths)
    out["second_model_replay_logprobs_max_diff"] = masked_max_diff(res.logprobs, ref_lp, mask)
    registry = RouterReplay.global_router_replay_instances
    out["registry_is_second_model_after_replay"] = len(registry) == L and all(
        rr is layer.mlp.router.router_replay for rr, layer in zip(registry, second.decoder.layers)
    )
    # The first model still works too (its controller re-binds it).
    with torch.no_grad():
        res1 = megatron_logprobs(first, tokens, lengths, pert)
    out["first_model_replay_routing_map_is_trace"] = valid_routes_equal(res1.routes, pert, lengths)
    # Outside a mode the model routes natively (no action left behind).
    with torch.no_grad():
        native = megatron_logprobs(second, tokens, lengths, mode="native")
    rep2 = MegatronReplay.of(second)
    out["actions_after_modes"] = [str(rr.router_replay_action) for rr in rep2.instances]
    out["indices_cleared_after_modes"] = all(
        rr.target_topk_idx is None and rr.recorded_topk_idx is None and not rr.replay_backward_list for rr in rep2.instances
    )
    with torch.no_grad():
        rec = megatron_logprobs(second, tokens, lengths, mode="record")
    out["native_after_replay_equals_reference_native"] = rec.trace == ref_trace and masked_max_diff(
        native.logprobs, rec.logprobs, mask
    ) == 0.0

    # int16 / uint8 traces become torch.long targets; Megatron itself refuses int16 indices.
    big = RoutingTrace(pert.expert_ids.long() + 290, 300, pert.valid, pert.rows_per_seq)
    big_targets, big_valid = megatron_replay_targets(big, tokens.shape[1])
    out["int16_trace_dtype"] = str(big.expert_ids.dtype)
    out["int16_targets_dtype"] = str(big_targets[0].dtype)
    out["int16_targets_values_ok"] = bool(
        torch.equal(big_targets[0][big_valid], megatron_replay_targets(pert, tokens.shape[1])[0][0][big_valid] + 290)
    )
    out["uint8_targets_dtype"] = str(targets[0].dtype)
    rr = rep2.instances[0]
    rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    rr.set_target_indices(targets[0].to(torch.int16))
    scores = torch.randn(targets[0].shape[0], NUM_EXPERTS)
    out["megatron_rejects_int16_targets"] = expected_raise(
        lambda: rr.get_replay_topk(scores, 2, default_compute_topk=None), RuntimeError
    )
    rr.set_target_indices(targets[0])
    out["megatron_accepts_long_targets"] = tuple(rr.get_replay_topk(scores, 2, default_compute_topk=None)[1].shape) == tuple(targets[0].shape)
    rep2.clear()
    out["clear_empties"] = rep2.pending_backward() == [0] * L and all(r.router_replay_action is None for r in rep2.instances)

    # Errors that must not be silent.
    out["replay_without_forward_raises"] = expected_raise(lambda: _enter_exit(rep2.replay_forward(pert, lengths)), RuntimeError)
    out["nested_modes_raise"] = expected_raise(lambda: _nested(rep2, pert, lengths), RuntimeError)
    out["misaligned_trace_raises"] = expected_raise(lambda: megatron_logprobs(second, tokens, [12, 8], pert), ValueError)
    out["batch_mismatch_raises"] = expected_raise(lambda: _forward_in_replay(rep2, second, tokens[:1], pert), ValueError)
    out["registry_after_errors"] = len(RouterReplay.global_router_replay_instances)
    with torch.no_grad():
        ok = megatron_logprobs(second, tokens, lengths, pert)
    out["replay_after_errors_routing_map_is_trace"] = valid_routes_equal(ok.routes, pert, lengths)


def _enter_exit(cm):
    with cm:
        pass


def _nested(rep, trace, lengths):
    with rep.replay_forward(trace, lengths, strict=False):
        with rep.record():
            pass


def _forward_in_replay(rep, model, tokens, trace):
    from reference_impl.integrations.megatron import megatron_forward

    with torch.no_grad(), rep.replay_forward(trace):
        megatron_forward(model, tokens)


SCENARIOS = {"parity": scenario_parity, "lifecycle": scenario_lifecycle}


def main() -> int:
    name, path = sys.argv[1], sys.argv[2]
    out: dict = {"scenario": name}
    t0 = time.perf_counter()
    try:
        SCENARIOS[name](out)
        out["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test through the JSON
        out["ok"] = False
        out["error"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

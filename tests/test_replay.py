"""The replay semantics of DESIGN.md, on the tiny Qwen3-MoE model."""

import pytest
import torch

from conftest import tiny_model
from reference_impl import RoutingTrace, record_routing, replay_routing
from reference_impl.model import KVCache
from reference_impl.model import gate_weights


def record(model, input_ids, seq_lengths=None):
    seq_lengths = seq_lengths or [input_ids.shape[1]] * input_ids.shape[0]
    with torch.no_grad(), record_routing(model) as rec:
        out = model(input_ids)
    return out, rec.trace(seq_lengths)


def perturbed(trace: RoutingTrace, rows, seed=0) -> RoutingTrace:
    """Replace layer-0 routes of the given rows by a different, valid top-k set."""
    ids = trace.expert_ids.long().clone()
    g = torch.Generator().manual_seed(seed)
    for r in rows:
        while True:
            new = torch.randperm(trace.num_experts, generator=g)[: trace.top_k]
            if set(new.tolist()) != set(ids[r, 0].tolist()):
                break
        ids[r, 0] = new
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq)


def test_record_then_replay_is_bit_identical(model):
    x = torch.randint(0, model.config.vocab_size, (3, 16))
    out, trace = record(model, x)
    with torch.no_grad(), replay_routing(model, trace) as stats:
        replayed = model(x)
    assert torch.equal(out.logits, replayed.logits)
    assert torch.equal(out.routes, replayed.routes)
    # (token, layer) pairs: every routed row replayed, the last position of each sequence native
    assert stats.replayed_rows == 3 * 15 * model.num_layers
    assert stats.native_rows == 3 * 1 * model.num_layers


def test_replaying_another_trace_changes_exactly_the_selected_experts(model):
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    out, trace = record(model, x)
    other = perturbed(trace, rows=[0, 5, 13])
    with torch.no_grad(), replay_routing(model, other):
        replayed = model(x)
    routes_as_trace = RoutingTrace.from_padded(replayed.routes, [12, 12], model.config.num_experts)
    assert routes_as_trace.agreement(other).router_disagreement == 0.0
    changed = (out.routes != replayed.routes).any(-1)  # [b, t, L]
    assert changed[0, 0, 0] and changed[0, 5, 0] and changed[1, 2, 0]  # row 13 = sequence 1, position 2
    assert not changed[..., 1][:, :1].any()  # layer 1 before the first change is untouched
    assert not torch.equal(out.logits, replayed.logits)


def test_gate_weights_are_recomputed_from_live_logits_over_replayed_ids():
    torch.manual_seed(0)
    model = tiny_model(router_initializer_range=0.5)
    block = model.model.layers[0].mlp
    x = torch.randn(1, 5, model.config.hidden_size)
    ids = torch.tensor([[0, 7], [3, 1], [2, 6], [5, 4], [1, 0]])
    out, used, logits = block(x, select=lambda _: ids)
    p = torch.softmax(block.gate(x[0]), dim=-1)
    expected = torch.zeros_like(x[0])
    for n in range(5):
        w = p[n, ids[n]] / p[n, ids[n]].sum()
        for j in range(2):
            expected[n] += w[j] * block.experts[int(ids[n, j])](x[0, n])
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(used, ids.sort(-1).values)


def test_replayed_ids_outside_the_native_top_k_still_give_the_router_gradient():
    logits = torch.tensor([[3.0, 2.0, 0.1, -1.0]], requires_grad=True)
    replayed = torch.tensor([[2, 3]])  # the two *least* likely experts
    w = gate_weights(logits, replayed, norm_topk_prob=True)
    (w * torch.tensor([[1.0, -1.0]])).sum().backward()
    assert logits.grad[0, 2] != 0 and logits.grad[0, 3] != 0


def test_router_gets_gradient_and_unused_experts_get_exactly_none_under_replay():
    model = tiny_model(router_initializer_range=0.5)
    cfg = model.config
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    _, trace = record(model, x)
    # Replay a routing that never uses experts 6 and 7 in any routed row.
    ids = torch.stack([torch.tensor([t % 3, 3 + (t % 3)]) for t in range(trace.num_tokens)])[:, None].expand(-1, cfg.num_hidden_layers, -1)
    restricted = RoutingTrace(ids.contiguous(), cfg.num_experts, rows_per_seq=trace.rows_per_seq)
    with replay_routing(model, restricted):
        out = model(x)
    out.logits.square().mean().backward()
    for i, layer in enumerate(model.model.layers):
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
        used = set(out.routes[:, :, i].unique().tolist())
        for e, expert in enumerate(layer.mlp.experts):
            grads = [p.grad for p in expert.parameters()]
            if e in used:
                assert all(g is not None and g.abs().sum() > 0 for g in grads)
            else:
                assert all(g is None or not g.any() for g in grads), f"layer {i} unused expert {e} got gradient"
        assert {6, 7}.isdisjoint(set(out.routes[:, :-1, i].unique().tolist()))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_replay", [False, True])
def test_recompute_under_checkpointing_keeps_the_forward_routes_even_when_logits_would_flip(use_replay):
    model = tiny_model(router_initializer_range=0.5).train()
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    _, trace = record(model, x)

    def run(checkpointing):
        model.zero_grad(set_to_none=True)
        model.gradient_checkpointing = checkpointing
        if use_replay:
            with replay_routing(model, trace):
                out = model(x)
        else:
            out = model(x)
        out.logits.square().mean().backward()
        return out.routes, _grads(model)

    ref_routes, ref_grads = run(checkpointing=False)

    # Make the *recompute* see different router logits: every token's top-1 would flip to an
    # expert it did not pick in the forward.
    gate = model.model.layers[0].mlp.gate
    calls, recompute_logits = [], []

    def flip_on_recompute(module, inputs, output):
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():  # the hook itself must save nothing for backward
                live = output.detach()
                chosen = ref_routes[:, :, 0].reshape(-1, 2)
                bonus = torch.zeros_like(live)
                spread = live.max(-1).values - live.min(-1).values + 1.0
                unchosen = [[e for e in range(8) if e not in row][0] for row in chosen.tolist()]
                bonus[torch.arange(live.shape[0]), unchosen] = spread
                recompute_logits.append(live + bonus)
            return output + bonus

    handle = gate.register_forward_hook(flip_on_recompute)
    try:
        routes, grads = run(checkpointing=True)
    finally:
        handle.remove()
        model.gradient_checkpointing = False
    assert len(calls) == 2, "layer 0 should be run twice: forward and recompute"
    native_on_recompute = recompute_logits[0].topk(2, dim=-1).indices.sort(-1).values
    assert (native_on_recompute != ref_routes[:, :, 0].reshape(-1, 2)).any(-1).all(), "the hook must flip every route"
    assert torch.equal(routes, ref_routes)
    for name, g in ref_grads.items():
        if name.startswith("model.layers.0.mlp.gate"):
            continue  # its live logits were perturbed on purpose; only the routes must stay
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_top_k_order_does_not_matter(model):
    x = torch.randint(0, model.config.vocab_size, (2, 11))
    out, trace = record(model, x)
    flipped = RoutingTrace(trace.expert_ids.flip(-1), trace.num_experts, trace.valid, trace.rows_per_seq)
    with torch.no_grad(), replay_routing(model, flipped):
        replayed = model(x)
    assert torch.equal(out.logits, replayed.logits)


def test_more_than_256_experts_record_save_load_replay(tmp_path):
    model = tiny_model(num_experts=300, num_experts_per_tok=4, moe_intermediate_size=8, router_initializer_range=0.5).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 20))
    out, trace = record(model, x)
    assert trace.expert_ids.dtype == torch.int16 and int(trace.expert_ids.max()) > 255
    trace.save(tmp_path / "t.safetensors")
    with torch.no_grad(), replay_routing(model, RoutingTrace.load(tmp_path / "t.safetensors")):
        replayed = model(x)
    assert torch.equal(out.logits, replayed.logits)


def test_invalid_rows_fall_back_to_native_routing_and_are_counted(model):
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    out, trace = record(model, x)
    garbage = perturbed(trace, rows=[1, 2, 9])
    valid = torch.ones(trace.num_tokens, dtype=torch.bool)
    valid[[1, 2, 9]] = False
    masked = RoutingTrace(garbage.expert_ids, trace.num_experts, valid, trace.rows_per_seq)
    with torch.no_grad(), replay_routing(model, masked) as stats:
        replayed = model(x)
    assert torch.equal(out.logits, replayed.logits)  # the invalid rows were routed natively
    L = model.num_layers
    assert stats.native_rows == (3 + 2) * L  # 3 invalid rows + the last position of 2 sequences
    assert stats.replayed_rows == (trace.num_tokens - 3) * L


def test_replay_with_a_trace_of_the_wrong_shape_is_refused(model):
    x = torch.randint(0, model.config.vocab_size, (2, 8))
    _, trace = record(model, x)
    with pytest.raises(ValueError, match="batch 3 but the trace holds 2 sequences"):
        with replay_routing(model, trace):
            model(torch.randint(0, 8, (3, 8)))
    wrong_k = RoutingTrace(torch.zeros(7, 2, 3, dtype=torch.long) + torch.arange(3), 8)
    with pytest.raises(ValueError, match="top_k=3 but the model routes top_k=2"):
        with replay_routing(model, wrong_k):
            pass
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens, so 8 routed rows are expected"):
        with replay_routing(model, trace, seq_lengths=[8, 9]):
            pass


def test_a_replay_that_drives_no_forward_raises(model):
    x = torch.randint(0, model.config.vocab_size, (1, 6))
    _, trace = record(model, x)
    rebuilt = tiny_model(router_initializer_range=0.5)  # e.g. the model was rebuilt after the replay was set up
    with pytest.raises(RuntimeError, match="nothing was replayed"):
        with replay_routing(model, trace):
            rebuilt(x)


def test_kv_cache_decoding_matches_a_full_forward_and_captures_each_steps_routes(model):
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.num_layers)
        with record_routing(model) as rec:
            pieces = [model(x[:, :7], cache=cache)]
            for t in range(7, 12):
                pieces.append(model(x[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat([p.logits for p in pieces], 1), full.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(rec.routes, full.routes)
    assert rec.trace([12, 12]) == RoutingTrace.from_padded(full.routes, [12, 12], model.config.num_experts)


def test_incremental_replay_with_a_kv_cache_matches_full_replay(model):
    x = torch.randint(0, model.config.vocab_size, (1, 10))
    _, trace = record(model, x)
    other = perturbed(trace, rows=[2, 8])
    with torch.no_grad():
        with replay_routing(model, other):
            full = model(x)
        cache = KVCache(model.num_layers)
        with replay_routing(model, other):
            first = model(x[:, :6], cache=cache)
            rest = model(x[:, 6:], cache=cache)
    assert torch.equal(torch.cat([first.routes, rest.routes], 1), full.routes)


def test_left_padding_with_an_attention_mask_does_not_change_real_tokens(model):
    seq = torch.randint(0, model.config.vocab_size, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), seq], dim=1)
    mask = torch.tensor([[0, 0, 0] + [1] * 7])
    with torch.no_grad():
        alone = model(seq)
        batched = model(padded, attention_mask=mask)
    torch.testing.assert_close(batched.logits[:, 3:], alone.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.routes[:, 3:], alone.routes)

"""Routing capture and replay in transformers MoE models (Qwen3-MoE, Mixtral, OLMoE)."""

import pytest
import torch

from conftest import tiny_model
from reference_impl import RoutingTrace, record_routing, replay_routing, save_hf_checkpoint

transformers = pytest.importorskip("transformers")
from reference_impl.integrations.transformers import attach_routing  # noqa: E402

pytestmark = pytest.mark.engine


def qwen3(tmp_path, seed=0):
    ours = tiny_model(seed=seed, router_initializer_range=0.5, initializer_range=0.1).eval()
    save_hf_checkpoint(ours, tmp_path)
    return ours, transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()


def mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, initializer_range=0.2,
    )
    return transformers.MixtralForCausalLM(cfg).eval()


def olmoe():
    torch.manual_seed(0)
    cfg = transformers.OlmoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, initializer_range=0.2,
    )
    return transformers.OlmoeForCausalLM(cfg).eval()


def record(routing, model, x):
    with torch.no_grad(), record_routing(routing) as rec:
        logits = model(x).logits
    return logits, rec.trace([x.shape[1]] * x.shape[0])


def perturb(trace, rows):
    ids = trace.expert_ids.long().clone()
    for r in rows:
        ids[r, 0] = (ids[r, 0] + 1 + ids[r, 0].max()) % trace.num_experts
        if ids[r, 0].unique().numel() < trace.top_k:
            ids[r, 0] = torch.arange(trace.top_k)
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq)


def test_captured_hf_qwen3_routes_equal_the_reference_models(tmp_path):
    ours, hf = qwen3(tmp_path)
    x = torch.randint(0, 64, (3, 14))
    routing = attach_routing(hf)
    _, hf_trace = record(routing, hf, x)
    with torch.no_grad(), record_routing(ours) as rec:
        ours(x)
    ours_trace = rec.trace([14] * 3)
    assert hf_trace.rows_per_seq == ours_trace.rows_per_seq
    assert hf_trace.agreement(ours_trace).router_disagreement == 0.0  # top-k order aside, identical


@pytest.mark.parametrize("build", [mixtral, olmoe], ids=["mixtral", "olmoe"])
def test_record_then_replay_is_bit_identical_in_other_moe_families(build):
    model = build()
    routing = attach_routing(model)
    x = torch.randint(0, 64, (2, 10))
    logits, trace = record(routing, model, x)
    with torch.no_grad(), replay_routing(routing, trace, seq_lengths=[10, 10]):
        replayed = model(x).logits
    assert torch.equal(logits, replayed)
    other = perturb(trace, rows=[0, 4, 11])
    with torch.no_grad(), record_routing(routing) as rec, replay_routing(routing, other):
        moved = model(x).logits
    assert rec.trace([10, 10]).agreement(other).router_disagreement == 0.0
    assert not torch.equal(moved, logits)


def test_replaying_a_trace_in_hf_matches_the_reference_model_under_the_same_trace(tmp_path):
    ours, hf = qwen3(tmp_path, seed=4)
    x = torch.randint(0, 64, (2, 12))
    routing = attach_routing(hf)
    _, trace = record(routing, hf, x)
    other = perturb(trace, rows=[1, 2, 15])
    with torch.no_grad():
        with replay_routing(routing, other):
            hf_logits = hf(x).logits
        with replay_routing(ours, other):
            our_logits = ours(x).logits
    assert (hf_logits - our_logits).abs().max() <= 1e-5


def test_replay_under_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, hf = qwen3(tmp_path)
    routing = attach_routing(hf)
    x = torch.randint(0, 64, (2, 12))
    _, trace = record(routing, hf, x)
    other = perturb(trace, rows=[3, 7])

    def grads(checkpointing):
        hf.zero_grad(set_to_none=True)
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_disable()
        hf.train()
        with record_routing(routing) as rec, replay_routing(routing, other):
            hf(x).logits.square().mean().backward()
        hf.eval()
        return rec, {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}

    rec_plain, plain = grads(False)
    rec_ckpt, ckpt = grads(True)
    hf.gradient_checkpointing_disable()
    assert rec_ckpt.trace([12, 12]).agreement(other).router_disagreement == 0.0
    assert set(plain) == set(ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
    assert plain["model.layers.0.mlp.gate.weight"].abs().sum() > 0


def test_invalid_rows_route_natively_in_hf(tmp_path):
    _, hf = qwen3(tmp_path)
    routing = attach_routing(hf)
    x = torch.randint(0, 64, (1, 9))
    logits, trace = record(routing, hf, x)
    garbage = perturb(trace, rows=[2, 5])
    valid = torch.ones(trace.num_tokens, dtype=torch.bool)
    valid[[2, 5]] = False
    masked = RoutingTrace(garbage.expert_ids, trace.num_experts, valid, trace.rows_per_seq)
    with torch.no_grad(), replay_routing(routing, masked) as stats:
        replayed = hf(x).logits
    assert torch.equal(replayed, logits)
    assert stats.native_rows == (2 + 1) * 2  # 2 invalid rows + last position, 2 layers


def test_attach_is_idempotent_and_detach_restores_native_routers(tmp_path):
    _, hf = qwen3(tmp_path)
    routing = attach_routing(hf)
    assert attach_routing(hf) is routing
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        before = hf(x).logits
    routing.detach()
    with torch.no_grad():
        after = hf(x).logits
    assert torch.equal(before, after)
    assert attach_routing(hf) is not routing


def test_models_without_a_supported_router_are_refused():
    from reference_impl.integrations.transformers import HFRouting

    with pytest.raises(ValueError, match="no supported MoE router"):
        HFRouting(torch.nn.Linear(2, 2))

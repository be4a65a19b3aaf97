"""Capture and replay in transformers' GLM-4.5 and DeepSeek-V3 routers (sigmoid, bias, groups, scaling, dense layers).

GLM-4.5: the reference model's GLM export loads in ``Glm4MoeForCausalLM``; routes, log-probs,
replay and gradients agree with the reference model. DeepSeek-V3 (MLA attention, no reference-model
twin): the adapter's native routes and weights equal the router's own, record → replay is exact,
a perturbed trace moves the routing exactly, also under gradient checkpointing.
"""

from __future__ import annotations

import pytest
import torch

from conftest import hf_forward_with_routes
from reference_impl import RoutingTrace, record_routing, replay_routing, save_hf_checkpoint
from reference_impl.errors import ConfigError
from reference_impl.logprobs import next_token_logprobs
from reference_impl.model import MoEConfig, MoEForCausalLM

transformers = pytest.importorskip("transformers")
from reference_impl.integrations.transformers import attach_routing  # noqa: E402

pytestmark = pytest.mark.engine

GLM = dict(
    num_hidden_layers=3, score_function="sigmoid", expert_bias=True, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1, intermediate_size=96,
    router_initializer_range=0.1, bias_initializer_range=0.1,
)


def glm_pair(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    ours = MoEForCausalLM(MoEConfig(**GLM)).eval()
    save_hf_checkpoint(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Glm4MoeForCausalLM"
    return ours, hf


def deepseek_v3(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
        kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        initializer_range=0.1,
    )
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def record(routing, model, x):
    with torch.no_grad(), record_routing(routing) as rec:
        logits = model(x).logits
    return logits, rec.trace([x.shape[1]] * x.shape[0])


def shifted(trace: RoutingTrace, every: int = 3) -> RoutingTrace:
    """Move the second MoE layer's experts on every ``every``-th row to other distinct ids."""
    ids = trace.expert_ids.long().clone()
    rows = ids[::every, 1]
    rows = (rows + 3) % trace.num_experts
    rows = torch.where(rows[:, :1] == rows[:, 1:], torch.tensor([0, 1]), rows)
    ids[::every, 1] = rows
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq, router_family=trace.router_family)


def test_glm_hf_routes_logits_and_replay_agree_with_the_reference_model(tmp_path):
    ours, hf = glm_pair(tmp_path)
    x = torch.randint(0, 64, (3, 14), generator=torch.Generator().manual_seed(1))
    hf_logits, hf_routes = hf_forward_with_routes(hf, x)
    with torch.no_grad():
        out = ours(x)
    assert torch.equal(hf_routes, out.routes)  # every top-k set, both MoE layers
    torch.testing.assert_close(hf_logits, out.logits, rtol=0, atol=1e-5)

    routing = attach_routing(hf)
    assert routing.routing_shape.num_layers == 2 and routing.routing_shape.router_family == "sigmoid_bias"
    _, hf_trace = record(routing, hf, x)
    with torch.no_grad(), record_routing(ours) as rec:
        ours(x)
    agreement = hf_trace.agreement(rec.trace([14] * 3))
    assert agreement.router_disagreement == 0.0 and agreement.num_tokens == 39
    assert hf_trace.router_family == "sigmoid_bias"

    moved = shifted(hf_trace)
    with torch.no_grad(), replay_routing(routing, moved):
        hf_replayed = hf(x).logits
    with torch.no_grad(), replay_routing(ours, moved):
        ours_replayed = ours(x)
    padded, _ = moved.to_padded(14)
    assert torch.equal(ours_replayed.routes[:, :-1], padded[:, :-1].long().sort(-1).values)
    lp_hf, lp_ours = next_token_logprobs(hf_replayed, x), next_token_logprobs(ours_replayed.logits, x)
    assert (lp_hf - lp_ours).abs().max() <= 1e-5
    assert not torch.allclose(hf_replayed, hf_logits, atol=1e-3)  # the perturbation really moved routing


def test_glm_hf_router_gets_the_reference_gradient_and_the_bias_none_also_under_checkpointing(tmp_path):
    ours, hf = glm_pair(tmp_path)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    routing = attach_routing(hf)
    _, trace = record(routing, hf, x)
    moved = shifted(trace, every=2)
    grads = []
    for ckpt in (False, True):
        hf.zero_grad()
        hf.train()
        if ckpt:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with replay_routing(routing, moved):
            next_token_logprobs(hf(x).logits, x).sum().backward()
        gate = hf.model.layers[2].mlp.gate
        assert gate.e_score_correction_bias.grad is None and not gate.e_score_correction_bias.requires_grad
        grads.append(gate.weight.grad.clone())
    hf.gradient_checkpointing_disable()
    ours.train()
    with replay_routing(ours, moved):
        next_token_logprobs(ours(x).logits, x).sum().backward()
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(ours.model.layers[2].mlp.gate.weight.grad, grads[0], rtol=1e-4, atol=1e-6)


def test_glm_hf_refuses_a_softmax_trace(tmp_path):
    _, hf = glm_pair(tmp_path)
    routing = attach_routing(hf)
    softmax_trace = RoutingTrace(torch.tensor([[[0, 1], [2, 3]]] * 5), 8, router_family="softmax")
    with pytest.raises(ConfigError, match="'softmax' router"):
        with replay_routing(routing, softmax_trace):
            hf(torch.zeros(1, 6, dtype=torch.long))


def test_deepseek_v3_capture_equals_the_routers_own_choice_and_replay_is_exact():
    model = deepseek_v3()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    own_logits, own_routes = hf_forward_with_routes(model, x)  # before attaching: the router's own forward
    own_weights = {}
    gate = model.model.layers[1].mlp.gate
    with torch.no_grad():
        h = torch.randn(5, 64)
        _, own_weights["w"], own_weights["ids"] = gate(h)
    routing = attach_routing(model)
    assert routing.routing_shape.num_layers == 2
    with torch.no_grad():
        _, w, ids = gate(h)
    assert torch.equal(ids.sort(-1).values, own_weights["ids"].sort(-1).values)
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), own_weights["w"].gather(1, own_weights["ids"].argsort(-1)), rtol=0, atol=1e-7)

    logits, trace = record(routing, model, x)
    torch.testing.assert_close(logits, own_logits, rtol=0, atol=1e-6)
    assert torch.equal(trace.to_padded(12)[0][:, :11].long().sort(-1).values, own_routes[:, :11])
    with torch.no_grad(), replay_routing(routing, trace):
        assert torch.equal(model(x).logits, logits)
    moved = shifted(trace)
    with torch.no_grad(), replay_routing(routing, moved), record_routing(routing) as rec:
        model(x)
    assert torch.equal(rec.trace([12, 12]).expert_ids.long().sort(-1).values, moved.expert_ids.long().sort(-1).values)


def test_deepseek_v3_replay_under_gradient_checkpointing_gives_the_same_router_gradient():
    model = deepseek_v3()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
    routing = attach_routing(model)
    _, trace = record(routing, model, x)
    moved = shifted(trace, every=2)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with replay_routing(routing, moved):
            next_token_logprobs(model(x).logits, x).sum().backward()
        grads.append(model.model.layers[2].mlp.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-7)

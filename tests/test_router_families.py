"""Router families in the reference model: sigmoid scores, selection bias, groups, scaling, shared experts, dense layers.

The native choice and the gate weights are checked against an independent per-token
re-implementation of the GLM-4.5 / DeepSeek-V3 rule written out here (``FACTS-families.md``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from reference_impl import RoutingTrace, record_routing, replay_routing
from reference_impl.checkpoint import hf_config_dict, load_hf_checkpoint, save_hf_checkpoint
from reference_impl.converters import from_vllm, routed_experts_to_trace
from reference_impl.errors import ConfigError
from reference_impl.layers import LayerMap
from reference_impl.model import MoEConfig, MoEForCausalLM
from reference_impl.numerics import engine_copy
from reference_impl.routers import RouterSpec, expert_token_counts, gate_weights, update_expert_bias

GLM = dict(
    num_hidden_layers=3, score_function="sigmoid", expert_bias=True, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1, intermediate_size=96,
    router_initializer_range=0.1, bias_initializer_range=0.1,
)


def glm_model(seed: int = 0, **overrides) -> MoEForCausalLM:
    torch.manual_seed(seed)
    return MoEForCausalLM(MoEConfig(**{**GLM, **overrides})).eval()


def reference_choice(logits: torch.Tensor, bias: torch.Tensor, cfg: MoEConfig) -> list[set[int]]:
    """Per token, written out: top-k of s + b inside the topk_group groups with the best top-2 sums."""
    out = []
    per = cfg.num_experts // cfg.n_group
    for z in logits.detach().double():
        c = torch.sigmoid(z) + bias.double()
        group_score = [sorted(c[g * per : (g + 1) * per].tolist())[-2:] for g in range(cfg.n_group)]
        best = sorted(range(cfg.n_group), key=lambda g: -sum(group_score[g]))[: cfg.topk_group]
        allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
        out.append(set(sorted(allowed, key=lambda e: -float(c[e]))[: cfg.num_experts_per_tok]))
    return out


def record(model, x):
    with torch.no_grad(), record_routing(model) as rec:
        out = model(x, output_router_logits=True)
    return out, rec.trace([x.shape[1]] * x.shape[0])


def test_dense_layers_have_no_routes_and_the_shape_counts_moe_layers():
    model = glm_model()
    assert model.routing_shape.num_layers == 2 and model.config.layer_map.moe_layers == (1, 2)
    assert not hasattr(model.model.layers[0].mlp, "gate")
    x = torch.randint(0, 64, (2, 9))
    out = model(x)
    assert out.routes.shape == (2, 9, 2, 2)
    assert model.routing_shape.router_family == "sigmoid_bias"


def test_native_choice_is_the_biased_group_limited_top_k():
    model = glm_model()
    x = torch.randint(0, 64, (3, 12))
    out = model(x, output_router_logits=True)
    for j, decoder_layer in enumerate(model.config.layer_map.moe_layers):
        bias = model.model.layers[decoder_layer].mlp.gate.e_score_correction_bias
        expected = reference_choice(out.router_logits[j], bias, model.config)
        got = [set(r.tolist()) for r in out.routes[:, :, j].reshape(-1, 2)]
        assert got == expected
    # The bias and the group limit both matter on this model: dropping either changes the choice.
    z = out.router_logits[0]
    unbiased = [set(r.tolist()) for r in torch.sigmoid(z).topk(2).indices]
    assert unbiased != [set(r.tolist()) for r in out.routes[:, :, 0].reshape(-1, 2)]


def test_gate_weights_at_replayed_ids_equal_the_formula():
    spec = MoEConfig(**GLM).router_spec
    torch.manual_seed(1)
    z = torch.randn(5, 8)
    ids = torch.tensor([[0, 7], [3, 1], [2, 6], [5, 4], [1, 0]])
    w = gate_weights(z, ids, spec)
    s = torch.sigmoid(z).gather(1, ids)
    torch.testing.assert_close(w, s / (s.sum(-1, keepdim=True) + 1e-20) * 2.5, rtol=0, atol=0)
    torch.testing.assert_close(w.sum(-1), torch.full((5,), 2.5))
    unnormalised = gate_weights(z, ids, RouterSpec(num_experts=8, top_k=2, score_function="sigmoid", norm_topk_prob=False))
    torch.testing.assert_close(unnormalised, s)


def test_replayed_weights_ignore_the_bias_and_the_router_gets_gradient_the_bias_none():
    model = glm_model().train()
    x = torch.randint(0, 64, (2, 10))
    _, trace = record(model, x)
    with replay_routing(model, trace):
        out = model(x)
    out.logits.logsumexp(-1).sum().backward()
    block = model.model.layers[1].mlp
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0
    bias = block.gate.e_score_correction_bias
    assert not bias.requires_grad and bias.grad is None
    assert all("e_score_correction_bias" not in name for name, _ in model.named_parameters())
    # Changing the bias changes nothing under replay (weights use unbiased scores at the replayed ids).
    with torch.no_grad():
        before = model(x).logits
        with replay_routing(model, trace):
            replayed = model(x).logits
            bias.add_(5.0 * torch.randn_like(bias))
            replayed_new_bias = model(x).logits
    # Every replayed position is unchanged (up to the float reordering of expert batches that hold
    # other tokens); the last position is routed natively, so the bias moves it.
    torch.testing.assert_close(replayed[:, :-1], replayed_new_bias[:, :-1], rtol=0, atol=1e-6)
    assert not torch.equal(replayed[:, -1], replayed_new_bias[:, -1])
    assert torch.equal(before, replayed)


def test_record_then_replay_is_bit_identical_and_a_perturbed_trace_moves_routing_exactly():
    model = glm_model()
    x = torch.randint(0, 64, (3, 11))
    out, trace = record(model, x)
    with torch.no_grad(), replay_routing(model, trace) as stats:
        again = model(x)
    assert torch.equal(out.logits, again.logits)
    assert stats.replayed_rows == trace.num_tokens * 2  # MoE layers only: the dense layer is never replayed
    ids = trace.expert_ids.long().clone()
    ids[::3, 1] = (ids[::3, 1] + 3) % 8  # shift the second MoE layer's experts on every third row
    ids[::3, 1] = torch.where(ids[::3, 1, :1] == ids[::3, 1, 1:], torch.tensor([0, 1]), ids[::3, 1])
    moved = RoutingTrace(ids, 8, rows_per_seq=trace.rows_per_seq, router_family=trace.router_family)
    with torch.no_grad(), replay_routing(model, moved):
        replayed = model(x)
    padded, valid = moved.to_padded(x.shape[1])
    assert torch.equal(replayed.routes[:, :-1], padded[:, :-1].long().sort(-1).values)
    assert not torch.equal(replayed.logits, out.logits)


def test_invalid_rows_are_routed_with_the_full_biased_group_limited_choice():
    model = glm_model()
    x = torch.randint(0, 64, (2, 10))
    out, trace = record(model, x)
    valid = torch.ones(trace.num_tokens, dtype=torch.bool)
    valid[::2] = False
    garbage = (trace.expert_ids.long() + 1) % 8
    partial = RoutingTrace(garbage, 8, valid, trace.rows_per_seq, router_family="sigmoid_bias")
    with torch.no_grad(), replay_routing(model, partial) as stats:
        replayed = model(x)
    assert stats.native_rows == int((~valid).sum()) * 2 + 2 * 2  # invalid rows + each sequence's last position
    rows = torch.cat([replayed.routes[b, :9] for b in range(2)])
    native = torch.cat([out.routes[b, :9] for b in range(2)])
    assert torch.equal(rows[~valid], native[~valid])


def test_gradient_checkpointing_reuses_the_routes_and_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = glm_model().train()
        model.gradient_checkpointing = ckpt
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
        model(x).logits.logsumexp(-1).sum().backward()
        grads.append(model.model.layers[2].mlp.gate.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_family_mismatch_is_refused_and_a_trace_without_family_warns(tmp_path):
    softmax = MoEForCausalLM(MoEConfig(num_hidden_layers=2)).eval()
    model = glm_model()
    x = torch.randint(0, 64, (2, 8))
    _, softmax_trace = record(softmax, x)
    assert softmax_trace.router_family == "softmax"
    with pytest.raises(ConfigError, match="'softmax' router.*'sigmoid_bias'"):
        with replay_routing(model, softmax_trace):
            model(x)
    _, trace = record(model, x)
    trace.save(tmp_path / "t.safetensors")
    loaded = RoutingTrace.load(tmp_path / "t.safetensors")
    assert loaded.router_family == "sigmoid_bias" and loaded == trace
    unknown = RoutingTrace(trace.expert_ids, 8, trace.valid, trace.rows_per_seq)
    with pytest.warns(UserWarning, match="does not record its router family"):
        with torch.no_grad(), replay_routing(model, unknown):
            model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad(), replay_routing(model, loaded):
            model(x)


def test_expert_token_counts_come_from_the_routes_used_and_leave_padding_out():
    model = glm_model()
    x = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    out = model(x, attention_mask=mask)
    assert out.tokens_per_expert.shape == (2, 8)
    assert out.tokens_per_expert.sum(-1).tolist() == [12 * 2, 12 * 2]
    for j in range(2):
        used = out.routes[:, :, j][mask.bool()]
        assert out.tokens_per_expert[j].tolist() == torch.bincount(used.reshape(-1), minlength=8).tolist()
    assert torch.equal(expert_token_counts(out.routes, 8, mask), out.tokens_per_expert)


def test_aux_loss_free_bias_update_lowers_overloaded_and_raises_underloaded_experts():
    bias = torch.zeros(4)
    update_expert_bias(bias, torch.tensor([10, 2, 4, 0]), rate=0.01)
    torch.testing.assert_close(bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))


def test_the_bias_travels_with_the_weights_at_every_engine_sync():
    trainer = glm_model()
    x = torch.randint(0, 64, (2, 10))
    for step in range(2):
        with torch.no_grad():
            for layer in trainer.config.layer_map.moe_layers:
                trainer.model.layers[layer].mlp.gate.e_score_correction_bias.add_(0.3 * torch.randn(8))
        for numerics in ("fp32", "bf16"):
            engine = engine_copy(trainer, numerics)
            for layer in trainer.config.layer_map.moe_layers:
                got = engine.model.layers[layer].mlp.gate.e_score_correction_bias
                assert got.dtype == torch.float32
                assert torch.equal(got, trainer.model.layers[layer].mlp.gate.e_score_correction_bias)
        with torch.no_grad():
            assert torch.equal(engine_copy(trainer, "fp32")(x).routes, trainer(x).routes)


def test_glm_checkpoint_round_trip_and_formats(tmp_path):
    model = glm_model()
    save_hf_checkpoint(model, tmp_path / "glm")
    cfg = hf_config_dict(model.config)
    assert cfg["model_type"] == "glm4_moe" and cfg["first_k_dense_replace"] == 1 and cfg["n_routed_experts"] == 8
    loaded = load_hf_checkpoint(tmp_path / "glm")
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert hf_config_dict(MoEConfig())["model_type"] == "qwen3_moe"
    with pytest.raises(ConfigError, match="no Hugging Face format"):
        hf_config_dict(MoEConfig(n_shared_experts=1))


@pytest.mark.parametrize(
    "bad",
    [dict(n_group=3), dict(topk_group=5), dict(score_function="tanh"), dict(routed_scaling_factor=0.0), dict(first_k_dense_replace=3)],
)
def test_bad_router_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        MoEConfig(**{**GLM, **bad})


def test_official_layout_converter_drops_dense_columns_by_config():
    model = glm_model()
    hf_cfg = hf_config_dict(model.config)
    layer_map = LayerMap.from_hf_config(hf_cfg)
    assert layer_map.moe_layers == (1, 2)
    x = torch.randint(0, 64, (1, 9))
    out, trace = record(model, x)
    official = np.zeros((8, 3, 2), dtype=np.uint8)  # [rows, num_hidden_layers, k]: the dense column stays 0
    official[:, 1:] = out.routes[0, :8].numpy()
    converted = routed_experts_to_trace(official, 8, num_tokens=9, layer_map=layer_map, router_family="sigmoid_bias")
    assert converted == trace
    assert from_vllm([official], [9], 8, layer_map=layer_map) == trace
    # Without the map the never-written dense column reads as "expert 0, k times": refused, never replayed.
    with pytest.raises(ValueError, match="duplicate expert ids \\[0, 0\\] at token 0, layer 0"):
        routed_experts_to_trace(official, 8, num_tokens=9)
    with pytest.raises(ConfigError, match="decoder-layer columns"):
        routed_experts_to_trace(official[:, 1:], 8, layer_map=layer_map)


def test_layer_map_reads_every_hf_dense_layer_convention():
    assert LayerMap.from_hf_config({"num_hidden_layers": 4, "mlp_only_layers": [0], "decoder_sparse_step": 1}).moe_layers == (1, 2, 3)
    assert LayerMap.from_hf_config({"num_hidden_layers": 4, "decoder_sparse_step": 2}).moe_layers == (1, 3)
    assert LayerMap.from_hf_config({"num_hidden_layers": 5, "first_k_dense_replace": 1, "moe_layer_freq": 2}).moe_layers == (2, 4)
    assert LayerMap.from_hf_config({"num_hidden_layers": 3}).moe_layers == (0, 1, 2)

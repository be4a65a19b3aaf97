"""A megatron-core ``GPTModel`` from our tiny Qwen3-MoE checkpoints, on CPU: the loader the tests and tutorials use.

* :func:`init_megatron_cpu` makes megatron-core usable in this process on CPU (gloo, the CPU shims
  of :mod:`reference_impl.integrations.megatron_cpu_shims`);
* :func:`megatron_config` / :func:`megatron_state_dict` map a :class:`~reference_impl.MoEConfig` and
  its weights to megatron's ``TransformerConfig`` and parameter names;
* :func:`build_megatron_model` / :func:`load_megatron_model` build the ``GPTModel``.

Replay itself (what you use on your own ``GPTModel``) is :mod:`reference_impl.integrations.megatron`.
All functions import megatron lazily: the module imports without megatron-core installed.
"""

from __future__ import annotations

import os

import torch

from ..model import MoEConfig, MoEForCausalLM
from .megatron import _REF_CONFIG_ATTR

__all__ = ["init_megatron_cpu", "megatron_config", "megatron_state_dict", "build_megatron_model", "load_megatron_model"]


def init_megatron_cpu() -> tuple[str, ...]:
    """Make megatron-core usable in this process: gloo group (world size 1), TP=PP=1, CPU shims.

    Idempotent. Returns the names of the CPU shims applied (see
    :mod:`reference_impl.integrations.megatron_cpu_shims`; none on a CUDA machine). Process-wide:
    run it in a process of its own when other code must see an unpatched ``torch.cuda``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from .megatron_cpu_shims import apply_cpu_shims

    if not dist.is_initialized():
        # A single-rank in-memory store: no port, no file, no rendezvous.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"init_megatron_cpu: expected world size 1, got {dist.get_world_size()}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    return apply_cpu_shims()


def megatron_config(cfg: MoEConfig, *, recompute: bool = False, **overrides):
    """A ``TransformerConfig`` equal in function to the Qwen3-MoE ``cfg`` (fp32, CPU, replay enabled).

    ``recompute=True`` sets ``recompute_granularity="full"`` (every layer recomputed in backward,
    ``recompute_method="uniform"``, one layer per unit). ``overrides`` go to ``TransformerConfig``.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not cfg.norm_topk_prob:
        raise ValueError(
            "megatron_config: norm_topk_prob=False has no megatron equivalent here; "
            "moe_router_pre_softmax=False (softmax over the top-k logits) is norm_topk_prob=True"
        )
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.moe_intermediate_size,
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # softmax over the k selected logits == renormalized top-k probs
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_router_dtype="fp32",
        moe_router_fusion=False,  # the fused router skips RouterReplay silently
        moe_token_dispatcher_type="allgather",  # alltoall needs CUDA streams
        moe_grouped_gemm=False,
        moe_enable_routing_replay=True,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,  # required by the CPU shim that bypasses the CUDA RNG tracker
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is loaded from the checkpoint
        params_dtype=torch.float32,
        transformer_impl="local",
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def megatron_state_dict(state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Map Qwen3-MoE (Hugging Face) tensor names and layouts onto a Megatron ``GPTModel``'s.

    ``linear_qkv`` = per query group ``[q heads of the group; k; v]`` stacked along the output dim;
    ``linear_fc1`` = ``[gate_proj; up_proj]``; ``router.weight`` = ``mlp.gate.weight``;
    ``q_norm``/``k_norm`` -> ``q_layernorm``/``k_layernorm``; ``post_attention_layernorm`` ->
    ``pre_mlp_layernorm``.
    """
    groups, heads, hd, hidden = cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size
    per_group = heads // groups
    out = {"embedding.word_embeddings.weight": state["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = state[src + "self_attn.q_proj.weight"].view(groups, per_group * hd, hidden)
        k = state[src + "self_attn.k_proj.weight"].view(groups, hd, hidden)
        v = state[src + "self_attn.v_proj.weight"].view(groups, hd, hidden)
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        out[dst + "self_attention.linear_proj.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "self_attention.q_layernorm.weight"] = state[src + "self_attn.q_norm.weight"]
        out[dst + "self_attention.k_layernorm.weight"] = state[src + "self_attn.k_norm.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.router.weight"] = state[src + "mlp.gate.weight"]
        for e in range(cfg.num_experts):
            ex = f"{src}mlp.experts.{e}."
            me = f"{dst}mlp.experts.local_experts.{e}."
            out[me + "linear_fc1.weight"] = torch.cat([state[ex + "gate_proj.weight"], state[ex + "up_proj.weight"]], dim=0)
            out[me + "linear_fc2.weight"] = state[ex + "down_proj.weight"]
    out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def build_megatron_model(reference: MoEForCausalLM, *, recompute: bool = False, **config_overrides):
    """A Megatron ``GPTModel`` holding the weights of our :class:`~reference_impl.MoEForCausalLM`.

    Clears Megatron's class-level ``RouterReplay`` instance list first (a rebuilt model must not
    leave orphaned replay objects behind). Initializes the CPU process group and shims if needed.
    The model is returned in train mode (Megatron only recomputes activations in train mode).
    """
    init_megatron_cpu()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    cfg = reference.config
    RouterReplay.clear_global_router_replay_instances()
    tcfg = megatron_config(cfg, recompute=recompute, **config_overrides)
    spec = get_gpt_layer_local_spec(
        num_experts=cfg.num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )
    model = GPTModel(
        tcfg,
        spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        rotary_percent=1.0,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        parallel_output=True,
    )
    state = megatron_state_dict(reference.state_dict(), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"build_megatron_model: weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    setattr(model, _REF_CONFIG_ATTR, cfg)
    return model.train()


def load_megatron_model(path: str | os.PathLike, *, recompute: bool = False, **config_overrides):
    """Load a Qwen3-MoE checkpoint directory (ours or ``save_pretrained``'s) into a Megatron ``GPTModel``."""
    from ..checkpoint import load_hf_checkpoint

    return build_megatron_model(load_hf_checkpoint(path), recompute=recompute, **config_overrides)

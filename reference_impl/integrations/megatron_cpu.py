"""A megatron-core ``GPTModel`` from our tiny Qwen3-MoE or GLM-4.5 checkpoints, on CPU: the loader the tests and tutorials use.

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
from dataclasses import dataclass
import warnings

import torch

from ..errors import ConfigError
from ..model import MoEConfig, MoEForCausalLM
from .megatron import _REF_CONFIG_ATTR

__all__ = [
    "init_megatron_cpu", "megatron_config", "megatron_state_dict", "build_megatron_model", "load_megatron_model",
    "ShardSpec", "shard_specs", "shard_tensor", "unshard_tensors", "shard_state_dict", "gather_full_grads",
]


_PARALLEL_KEYS = {
    "tensor_model_parallel_size": "get_tensor_model_parallel_world_size",
    "pipeline_model_parallel_size": "get_pipeline_model_parallel_world_size",
    "context_parallel_size": "get_context_parallel_world_size",
    "expert_model_parallel_size": "get_expert_model_parallel_world_size",
    "expert_tensor_parallel_size": "get_expert_tensor_parallel_world_size",
}


def init_megatron_cpu(
    tensor_model_parallel_size: int | None = None,
    pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int | None = None,
    expert_model_parallel_size: int | None = None,
    expert_tensor_parallel_size: int | None = None,
) -> tuple[str, ...]:
    """Make megatron-core usable in this process: join (or create) the process group, set the parallel sizes, CPU shims.

    * An existing ``torch.distributed`` group (yours, ``torchrun``'s) is joined as it is, whatever
      its world size; without one, ``WORLD_SIZE``/``RANK``/``MASTER_ADDR`` in the environment
      (``torchrun``) start a gloo group, and otherwise a one-rank in-memory gloo group is created
      (no port, no file, no rendezvous).
    * megatron's ``parallel_state`` is initialized with the given sizes (None = 1; expert TP: megatron's
      default) if it is not yet; if it is, the sizes given must match what it holds (an error names
      the first that differs) and the sizes not given are left as they are.

    Idempotent. Returns the names of the CPU shims applied (see
    :mod:`reference_impl.integrations.megatron_cpu_shims`; none on a CUDA machine). Process-wide:
    run it in a process of its own when other code must see an unpatched ``torch.cuda``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from .megatron_cpu_shims import apply_cpu_shims

    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    sizes = dict(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(**{k: (1 if v is None and k != "expert_tensor_parallel_size" else v) for k, v in sizes.items()})
    for key, getter in _PARALLEL_KEYS.items():
        want, have = sizes[key], getattr(parallel_state, getter)()
        if want is not None and want != have:
            raise RuntimeError(f"init_megatron_cpu: megatron's parallel state has {key}={have}, not {want}")
    return apply_cpu_shims()


def _router_family_config(cfg: MoEConfig, native_group_scoring: str) -> dict:
    """megatron's router options for the family of ``cfg`` (GLM-4.5: sigmoid, expert bias, groups, scaling).

    megatron scores a group by the sum of its top-(k / topk_group) experts, HF and vLLM by the sum
    of its top-2 (``FACTS-families.md``): when groups limit the choice (``topk_group < n_group``) and
    ``k / topk_group != 2``, megatron's *native* routing (R2 recording, invalid rows, the last
    position) differs from the engines'. Replayed rows are unaffected.
    """
    spec = cfg.router_spec
    if spec.score_function == "softmax" and spec.expert_bias:
        raise ConfigError("megatron_config: megatron refuses an expert bias with softmax scores (ERNIE-style routing)")
    if not spec.norm_topk_prob and (spec.score_function == "softmax" or spec.top_k > 1):
        raise ConfigError(
            "megatron_config: norm_topk_prob=False has no megatron equivalent here (softmax: moe_router_pre_softmax=False "
            "is norm_topk_prob=True; sigmoid: megatron always renormalises when k > 1)"
        )
    if spec.topk_group < spec.n_group and spec.top_k != 2 * spec.topk_group:
        message = (
            f"megatron_config: with topk_group={spec.topk_group} < n_group={spec.n_group} and k/topk_group = "
            f"{spec.top_k / spec.topk_group:g} != 2, megatron scores groups by their top-{spec.top_k // spec.topk_group} "
            "experts but HF / vLLM by their top-2: native routing (recording, invalid rows, the last position) differs"
        )
        if native_group_scoring == "refuse":
            raise ConfigError(message + "; pass native_group_scoring='warn' to build it anyway (replay is unaffected)")
        if native_group_scoring != "warn":
            raise ConfigError(f"megatron_config: native_group_scoring must be 'refuse' or 'warn', got {native_group_scoring!r}")
        warnings.warn(message, stacklevel=3)
    kwargs = dict(
        moe_router_score_function=spec.score_function,
        moe_router_pre_softmax=False,  # softmax over the k selected logits == renormalized top-k probs
        moe_router_enable_expert_bias=spec.expert_bias,
    )
    if spec.n_group > 1:
        kwargs.update(moe_router_num_groups=spec.n_group, moe_router_group_topk=spec.topk_group)
    if spec.routed_scaling_factor != 1.0:
        kwargs.update(moe_router_topk_scaling_factor=spec.routed_scaling_factor)
    if cfg.n_shared_experts:
        kwargs.update(moe_shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size)
    return kwargs


def megatron_config(cfg: MoEConfig, *, recompute: bool = False, native_group_scoring: str = "refuse", **overrides):
    """A ``TransformerConfig`` equal in function to ``cfg`` (fp32, CPU, replay enabled).

    Qwen3-MoE maps to a softmax router; GLM-4.5-style configs to ``moe_router_score_function="sigmoid"``,
    ``moe_router_enable_expert_bias`` (``expert_bias`` loaded from ``e_score_correction_bias``),
    ``moe_router_num_groups`` / ``moe_router_group_topk``, ``moe_router_topk_scaling_factor``,
    ``moe_shared_expert_intermediate_size`` and ``moe_layer_freq`` (the :class:`~reference_impl.layers.LayerMap`
    pattern as a 0/1 list). ``native_group_scoring`` (``"refuse"`` | ``"warn"``): what to do when
    megatron's group scoring differs from HF / vLLM (see :func:`_router_family_config`).
    ``recompute=True`` sets ``recompute_granularity="full"`` (every layer recomputed in backward,
    ``recompute_method="uniform"``, one layer per unit). The parallel sizes come from megatron's
    ``parallel_state`` (sequence parallelism on whenever TP > 1: megatron's MoE requires it in
    training). ``overrides`` go to ``TransformerConfig``.
    """
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.intermediate_size or cfg.moe_intermediate_size,  # dense layers
        moe_ffn_hidden_size=cfg.moe_intermediate_size,
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_layer_freq=[int(moe) for moe in cfg.layer_map.pattern],
        **_router_family_config(cfg, native_group_scoring),
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
        # Every weight is loaded from the checkpoint afterwards, but only megatron's init helpers tag
        # TP-sharded weights with `tensor_model_parallel` / `partition_dim` (used to shard and gather).
        perform_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        transformer_impl="local",
        batch_p2p_sync=False,  # True calls torch.cuda.synchronize() around pipeline p2p
    )
    if ps.model_parallel_is_initialized():  # otherwise one process: every size 1
        tp = ps.get_tensor_model_parallel_world_size()
        kwargs.update(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
            context_parallel_size=ps.get_context_parallel_world_size(),
            expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
            expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
            sequence_parallel=tp > 1,
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
    ``pre_mlp_layernorm``; ``mlp.gate.e_score_correction_bias`` -> ``mlp.router.expert_bias``;
    ``mlp.shared_experts.*`` -> ``mlp.shared_experts.linear_fc{1,2}``; a dense layer's
    ``mlp.{gate,up,down}_proj`` -> ``mlp.linear_fc{1,2}``.
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
        if not cfg.layer_map.pattern[i]:
            _swiglu(out, state, src + "mlp.", dst + "mlp.")
            continue
        out[dst + "mlp.router.weight"] = state[src + "mlp.gate.weight"]
        if cfg.expert_bias:
            out[dst + "mlp.router.expert_bias"] = state[src + "mlp.gate.e_score_correction_bias"]
        if cfg.n_shared_experts:
            _swiglu(out, state, src + "mlp.shared_experts.", dst + "mlp.shared_experts.")
        for e in range(cfg.num_experts):
            _swiglu(out, state, f"{src}mlp.experts.{e}.", f"{dst}mlp.experts.local_experts.{e}.")
    out["decoder.final_layernorm.weight"] = state["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def _swiglu(out: dict, state: dict, src: str, dst: str) -> None:
    """``[gate_proj; up_proj]`` -> ``linear_fc1``, ``down_proj`` -> ``linear_fc2``."""
    out[dst + "linear_fc1.weight"] = torch.cat([state[src + "gate_proj.weight"], state[src + "up_proj.weight"]], dim=0)
    out[dst + "linear_fc2.weight"] = state[src + "down_proj.weight"]


def build_megatron_model(reference: MoEForCausalLM, *, recompute: bool = False, parallel_output: bool = True, **config_overrides):
    """A Megatron ``GPTModel`` holding the weights of our :class:`~reference_impl.MoEForCausalLM`.

    Built inside megatron's current parallel state: this rank's pipeline stage (its decoder layers,
    the embedding on the first stage, the output layer on the last), its TP shards and its experts
    (:func:`shard_state_dict`). ``parallel_output=False`` gathers the vocab-parallel logits.

    Clears Megatron's class-level ``RouterReplay`` instance list first (a rebuilt model must not
    leave orphaned replay objects behind). Initializes the CPU process group and shims if needed.
    The model is returned in train mode (Megatron only recomputes activations in train mode).
    """
    init_megatron_cpu()
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from megatron.core import parallel_state as ps

    cfg = reference.config
    RouterReplay.clear_global_router_replay_instances()
    tcfg = megatron_config(cfg, recompute=recompute, **config_overrides)
    # Dense and MoE layers from moe_layer_freq (local, non-Transformer-Engine modules).
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    model = GPTModel(
        tcfg,
        spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        rotary_percent=1.0,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        parallel_output=parallel_output,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )
    state = shard_state_dict(megatron_state_dict(reference.state_dict(), cfg), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"build_megatron_model: weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    setattr(model, _REF_CONFIG_ATTR, cfg)
    return model.train()


def load_megatron_model(path: str | os.PathLike, *, recompute: bool = False, **config_overrides):
    """Load a Qwen3-MoE or GLM-4.5 checkpoint directory (ours or ``save_pretrained``'s) into a Megatron ``GPTModel``."""
    from ..checkpoint import load_hf_checkpoint

    return build_megatron_model(load_hf_checkpoint(path), recompute=recompute, **config_overrides)


# ------------------------------------------------------------------ shards <-> full tensors
@dataclass(frozen=True)
class ShardSpec:
    """Where a local parameter sits in the full (one-process) model.

    ``name``: its full-model name (global decoder layer, global expert index); ``index``/``count``:
    its shard along ``dim`` (count 1: not sharded); ``gated``: a ``linear_fc1`` of a gated MLP, whose
    shard is ``[gate_shard; up_shard]`` (megatron chunks the local output in two halves).
    """

    name: str
    index: int = 0
    count: int = 1
    dim: int = 0
    gated: bool = False


def shard_specs(model) -> dict[str, ShardSpec]:
    """:class:`ShardSpec` of every parameter of a (possibly model-parallel) megatron ``GPTModel``."""
    from megatron.core import parallel_state as ps

    cfg = model.config
    ep_rank = ps.get_expert_model_parallel_rank()
    local_experts = cfg.num_moe_experts // ps.get_expert_model_parallel_world_size() if cfg.num_moe_experts else 0
    out = {}
    for name, param in model.named_parameters():
        parts = _global_name(model, name, ep_rank, local_experts).split(".")
        expert = "local_experts" in parts
        count, index, dim = 1, 0, 0
        if getattr(param, "tensor_model_parallel", False):
            dim = param.partition_dim
            if expert:
                count, index = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
            else:
                count, index = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        gated = bool(cfg.gated_linear_unit) and name.endswith("linear_fc1.weight") and count > 1
        out[name] = ShardSpec(".".join(parts), index, count, dim, gated)
    return out


def _global_name(model, name: str, ep_rank: int, local_experts: int) -> str:
    """A local parameter or buffer name in the one-process model: global decoder layer and expert indices."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    if "local_experts" in parts:
        i = parts.index("local_experts") + 1
        parts[i] = str(int(parts[i]) + ep_rank * local_experts)
    return ".".join(parts)


def shard_tensor(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's shard of a full tensor (the inverse of :func:`unshard_tensors`)."""
    if spec.count == 1:
        return full
    if spec.gated:
        gate, up = full.chunk(2, dim=spec.dim)
        return torch.cat([gate.chunk(spec.count, dim=spec.dim)[spec.index], up.chunk(spec.count, dim=spec.dim)[spec.index]], dim=spec.dim)
    return full.chunk(spec.count, dim=spec.dim)[spec.index].contiguous()


def unshard_tensors(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full tensor from its ``spec.count`` shards in shard order (the inverse of :func:`shard_tensor`)."""
    if len(shards) != spec.count:
        raise ValueError(f"unshard_tensors: {spec.name} needs {spec.count} shards, got {len(shards)}")
    if spec.count == 1:
        return shards[0]
    if spec.gated:
        halves = [s.chunk(2, dim=spec.dim) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves], dim=spec.dim), torch.cat([h[1] for h in halves], dim=spec.dim)], dim=spec.dim)
    return torch.cat(shards, dim=spec.dim)


def shard_state_dict(full: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A full-model state dict (:func:`megatron_state_dict`) cut to this rank's parameters of ``model``."""
    specs = shard_specs(model)
    missing = [s.name for s in specs.values() if s.name not in full]
    if missing:
        raise ValueError(f"shard_state_dict: the full state dict has no {missing[:5]}")
    out = {local: shard_tensor(full[spec.name], spec) for local, spec in specs.items()}
    # persistent buffers (the router's expert_bias) are replicated on every rank: copied whole
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    local_experts = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size() if model.config.num_moe_experts else 0
    for local in model.state_dict():
        name = _global_name(model, local, ep_rank, local_experts)
        if local not in out and name in full:
            out[local] = full[name]
    return out


def gather_full_grads(model, full_shapes: dict[str, torch.Size], group=None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at full (one-process) shape, on every rank (collective over ``group``).

    Each rank writes its shard of each gradient where the shard sits in the full tensor
    (:func:`unshard_tensors` with zeros for the other shards) and one all-reduce sums over ranks:
    shards land side by side, and copies of a replicated parameter add up. Summing copies is the
    full gradient when every copy holds a partial one (data, context and sequence parallelism;
    megatron's DDP and ``finalize_model_grads`` reduce exactly these), which holds here because no
    gradient reduction has run yet. Missing gradients count as zero.
    """
    import torch.distributed as dist

    names = sorted(full_shapes)
    offsets, total = {}, 0
    for n in names:
        offsets[n] = total
        total += int(torch.Size(full_shapes[n]).numel())
    flat = torch.zeros(total, dtype=torch.float32)
    for local, spec in shard_specs(model).items():
        if spec.name not in offsets:
            raise ValueError(f"gather_full_grads: {spec.name} (local {local}) is not in the full model")
        param = dict(model.named_parameters())[local]
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        shards = [torch.zeros_like(grad) for _ in range(spec.count)]
        shards[spec.index] = grad.detach().float()
        full = unshard_tensors(shards, spec)
        o = offsets[spec.name]
        flat[o : o + full.numel()] += full.reshape(-1)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    return {n: flat[offsets[n] : offsets[n] + torch.Size(full_shapes[n]).numel()].view(full_shapes[n]) for n in names}

"""Export to and import from the Hugging Face checkpoint format (``config.json`` + ``model.safetensors``).

The state-dict names of :class:`~reference_impl.model.MoEForCausalLM` already are the Hugging Face
checkpoint names, so export writes the state dict as it is plus a ``config.json`` that
transformers and vLLM read. Two formats, picked from the router family:

* ``qwen3_moe`` (``Qwen3MoeForCausalLM``): softmax router, every layer MoE, no shared expert;
* ``glm4_moe`` (``Glm4MoeForCausalLM``, GLM-4.5): sigmoid router with the selection bias
  ``mlp.gate.e_score_correction_bias``, groups, ``routed_scaling_factor``, shared experts
  (``mlp.shared_experts.*``, ``n_shared_experts`` ≥ 1) and ``first_k_dense_replace`` dense layers
  (``mlp.{gate,up,down}_proj``). Our attention is Qwen3's, which GLM-4.5 expresses with
  ``attention_bias=False``, ``use_qk_norm=True`` and ``partial_rotary_factor=1.0``.

Import reads either kind back, e.g. one written by ``save_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError
from .model import MoEConfig, MoEForCausalLM

__all__ = ["hf_model_type", "hf_config_dict", "config_from_hf_dict", "save_hf_checkpoint", "load_hf_checkpoint"]

_WEIGHTS = "model.safetensors"
_BIAS = ".e_score_correction_bias"


def hf_model_type(cfg: MoEConfig) -> str:
    """``qwen3_moe`` or ``glm4_moe``: the Hugging Face format that represents ``cfg`` exactly (else ConfigError)."""
    qwen_like = (
        cfg.score_function == "softmax"
        and not cfg.expert_bias
        and cfg.n_group == 1
        and cfg.routed_scaling_factor == 1.0
        and cfg.n_shared_experts == 0
        and cfg.layer_map.num_moe_layers == cfg.num_hidden_layers
    )
    if qwen_like:
        return "qwen3_moe"
    glm_pattern = cfg.layer_map.pattern == tuple(i >= cfg.first_k_dense_replace for i in range(cfg.num_hidden_layers))
    if cfg.score_function == "sigmoid" and cfg.n_shared_experts >= 1 and glm_pattern:
        return "glm4_moe"  # GLM's router always adds its bias buffer: expert_bias=False exports a zero bias
    raise ConfigError(
        "checkpoint: no Hugging Face format here represents this router family: qwen3_moe needs softmax, no bias, "
        "no groups, no scaling, no shared or dense layers; glm4_moe needs sigmoid, n_shared_experts >= 1 and dense "
        f"layers only first (got score_function={cfg.score_function!r}, n_shared_experts={cfg.n_shared_experts}, "
        f"layer pattern {cfg.layer_map.pattern})"
    )


def hf_config_dict(cfg: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` contents of the model in the format :func:`hf_model_type` picks."""
    if hf_model_type(cfg) == "glm4_moe":
        return _glm4_moe_config_dict(cfg, dtype)
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe_intermediate_size,  # unused: no dense MLP layers
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "router_aux_loss_coef": 0.0,
        "output_router_logits": False,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _glm4_moe_config_dict(cfg: MoEConfig, dtype: torch.dtype) -> dict:
    """``config.json`` of a GLM-4.5 (``Glm4MoeForCausalLM``) model; ``num_nextn_predict_layers`` 0 (no MTP)."""
    return {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size or cfg.moe_intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": 0,
        "use_qk_norm": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _glm4_moe_config(d: dict) -> MoEConfig:
    """Read a GLM-4.5 ``config.json``; refuse what our attention does not implement."""
    rope = d.get("rope_parameters") or {}
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5))
    if partial != 1.0 or not d.get("use_qk_norm", False) or d.get("attention_bias", False):
        raise ConfigError(
            "checkpoint: this glm4_moe checkpoint needs GLM's own attention (partial_rotary_factor="
            f"{partial}, use_qk_norm={d.get('use_qk_norm', False)}, attention_bias={d.get('attention_bias', False)}); "
            "the reference model implements partial_rotary_factor=1.0, use_qk_norm=True, attention_bias=False"
        )
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"checkpoint: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    num_heads = d["num_attention_heads"]
    return MoEConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=d.get("num_key_value_heads", num_heads),
        head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
        moe_intermediate_size=d["moe_intermediate_size"],
        intermediate_size=d["intermediate_size"],
        num_experts=d["n_routed_experts"],
        num_experts_per_tok=d["num_experts_per_tok"],
        norm_topk_prob=d.get("norm_topk_prob", True),
        score_function="sigmoid",
        expert_bias=True,
        n_group=d.get("n_group", 1),
        topk_group=d.get("topk_group", 1),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        n_shared_experts=d.get("n_shared_experts", 1),
        first_k_dense_replace=d.get("first_k_dense_replace", 1),
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        max_position_embeddings=d.get("max_position_embeddings", 512),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        initializer_range=d.get("initializer_range", 0.02),
    )


def config_from_hf_dict(d: dict) -> MoEConfig:
    """Read a Qwen3-MoE or GLM-4.5 ``config.json`` dict; refuse features this tiny model does not implement."""
    if d.get("model_type") == "glm4_moe":
        return _glm4_moe_config(d)
    if d.get("model_type") != "qwen3_moe":
        raise ConfigError(f"checkpoint: expected model_type 'qwen3_moe' or 'glm4_moe', got {d.get('model_type')!r}")
    if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("checkpoint: dense (mlp_only) layers are not supported; every layer must be MoE")
    if d.get("attention_bias"):
        raise ConfigError("checkpoint: attention_bias=True is not supported")
    rope = d.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"checkpoint: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    num_heads = d["num_attention_heads"]
    return MoEConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=d.get("num_key_value_heads", num_heads),
        head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
        moe_intermediate_size=d["moe_intermediate_size"],
        num_experts=d["num_experts"] if "num_experts" in d else d["num_local_experts"],  # transformers 5 writes the latter
        num_experts_per_tok=d["num_experts_per_tok"],
        norm_topk_prob=d.get("norm_topk_prob", False),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        max_position_embeddings=d.get("max_position_embeddings", 512),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        initializer_range=d.get("initializer_range", 0.02),
    )


def save_hf_checkpoint(model: MoEForCausalLM, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (Hugging Face names) into directory ``path``.

    The selection bias stays fp32 whatever ``dtype`` (as GLM-4.5 / DeepSeek-V3 keep it); a GLM-format
    export of a model without a bias writes zeros.
    """
    path = Path(path)
    config = hf_config_dict(model.config, dtype)  # refuses a family no format represents, before writing
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32 if k.endswith(_BIAS) else dtype).contiguous() for k, v in model.state_dict().items()}
    if config["model_type"] == "glm4_moe" and not model.config.expert_bias:
        for i in model.config.layer_map.moe_layers:
            state[f"model.layers.{i}.mlp.gate{_BIAS}"] = torch.zeros(model.config.num_experts)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, path / _WEIGHTS, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_hf_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    """Build a :class:`MoEForCausalLM` from a Qwen3-MoE or GLM-4.5 checkpoint directory (ours or ``save_pretrained``'s)."""
    path = Path(path)
    cfg = config_from_hf_dict(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"checkpoint: no *.safetensors file in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    state = _split_fused_experts(state, cfg)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model = MoEForCausalLM(cfg)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint: tensor names do not match the {cfg.score_function} MoE model of this config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state)
    model = model.to(dtype)
    for name, buf in model.named_buffers():  # the selection bias stays fp32 (as in HF and vLLM)
        if name.endswith(_BIAS):
            buf.data = state[name].to(torch.float32)
    return model


def _split_fused_experts(state: dict[str, torch.Tensor], cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """Accept transformers' in-memory fused layout (``mlp.experts.gate_up_proj [E, 2I, H]``) as well."""
    out = {}
    for name, t in state.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            for e in range(cfg.num_experts):
                gate, up = t[e].chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate
                out[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(cfg.num_experts):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out

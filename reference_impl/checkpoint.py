"""Export to and import from the Hugging Face checkpoint format (``config.json`` + ``model.safetensors``).

The state-dict names of :class:`~reference_impl.model.MoEForCausalLM` already are the Qwen3-MoE
checkpoint names, so export writes the state dict as it is plus a ``config.json`` that
``transformers.Qwen3MoeForCausalLM`` and vLLM read (``model_type: qwen3_moe``). Import reads
either kind of checkpoint back, e.g. one written by ``Qwen3MoeForCausalLM.save_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ConfigError
from .model import MoEConfig, MoEForCausalLM

__all__ = ["hf_config_dict", "config_from_hf_dict", "save_hf_checkpoint", "load_hf_checkpoint"]

_WEIGHTS = "model.safetensors"


def hf_config_dict(cfg: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` contents of a Qwen3-MoE model with every layer sparse."""
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


def config_from_hf_dict(d: dict) -> MoEConfig:
    """Read a Qwen3-MoE ``config.json`` dict; refuse features this tiny model does not implement."""
    if d.get("model_type") != "qwen3_moe":
        raise ConfigError(f"checkpoint: expected model_type 'qwen3_moe', got {d.get('model_type')!r}")
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
    """Write ``config.json`` and ``model.safetensors`` (Qwen3-MoE names) into directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, path / _WEIGHTS, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.config, dtype), indent=2))
    return path


def load_hf_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> MoEForCausalLM:
    """Build a :class:`MoEForCausalLM` from a Qwen3-MoE checkpoint directory (ours or ``save_pretrained``'s)."""
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
            f"checkpoint: tensor names do not match a Qwen3-MoE model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state)
    return model.to(dtype)


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

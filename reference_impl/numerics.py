"""Inference-engine numerics: how the rollout policy μ comes to differ from the trainer's π.

Real engines run the same weights with other kernels and precisions. This module reproduces that
on the reference model, deterministically:

* ``fp32``: identical to the trainer (μ = π up to nothing).
* ``bf16``: the engine copy is cast to bfloat16 (weights and activations); the trainer stays fp32.
* ``fp8_e4m3`` / ``fp8_e5m2``: **simulated** FP8 — fake quantization (per-output-channel scaled
  weights, per-token scaled inputs of every linear layer, router and LM head included) to the FP8
  grid, with bf16 compute. This is the "FP8 inference, BF16 training" stress test of
  arXiv 2512.01374, approximated: real FP8 kernels also accumulate differently.

Separately, :func:`add_router_noise` is a plainly **simulated** mismatch: Gaussian noise on the
engine's router logits. At toy scale the precision effects above are too small to change
training, so experiments that need a visible effect use this dial, and say so.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch

from .errors import ConfigError
from torch import nn

__all__ = ["NUMERICS", "Numerics", "fake_quantize_fp8", "engine_copy", "add_router_noise"]

Numerics = Literal["fp32", "bf16", "fp8_e4m3", "fp8_e5m2"]
NUMERICS: tuple[str, ...] = ("fp32", "bf16", "fp8_e4m3", "fp8_e5m2")
_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# --8<-- [start:fake-quantize]
def fake_quantize_fp8(x: torch.Tensor, fmt: str, dim: int = -1) -> torch.Tensor:
    """Round ``x`` to the FP8 grid of ``fmt`` with an absmax scale along ``dim``; returns ``x``'s dtype.

    ``q = cast_fp8(x * s) / s`` with ``s = fp8_max / max|x|`` per slice (a slice of zeros stays zero).
    """
    if fmt not in _FP8:
        raise ValueError(f"numerics: unknown FP8 format {fmt!r}; choose from {sorted(_FP8)}")
    fp8 = _FP8[fmt]
    fp8_max = torch.finfo(fp8).max
    xf = x.float()
    amax = xf.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12)
    scale = fp8_max / amax
    return ((xf * scale).to(fp8).float() / scale).to(x.dtype)
# --8<-- [end:fake-quantize]


def _quantize_inputs_hook(fmt: str):
    def hook(module: nn.Module, args):
        (x,) = args
        return (fake_quantize_fp8(x, fmt, dim=-1),)

    return hook


# --8<-- [start:engine-copy]
@torch.no_grad()
def engine_copy(model: nn.Module, numerics: str) -> nn.Module:
    """A copy of ``model`` that computes the way an inference engine in ``numerics`` would.

    The copy is independent of ``model`` (call again after each optimizer step to sync weights).
    """
    if numerics not in NUMERICS:
        raise ConfigError(f"numerics: unknown setting {numerics!r}; choose from {NUMERICS}")
    engine = copy.deepcopy(model).eval()
    engine.route_recorders = []
    for p in engine.parameters():
        p.requires_grad_(False)
    if numerics == "fp32":
        return engine.float()
    engine = engine.to(torch.bfloat16)
    for name, buf in engine.named_buffers():  # a router's selection bias stays fp32 (as in vLLM and HF)
        if name.endswith("e_score_correction_bias"):
            buf.data = model.get_buffer(name).detach().to(torch.float32).clone()
    if numerics in _FP8:
        for module in engine.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(fake_quantize_fp8(module.weight, numerics, dim=1))
                module.register_forward_pre_hook(_quantize_inputs_hook(numerics))
    return engine
# --8<-- [end:engine-copy]


# --8<-- [start:router-noise]
def add_router_noise(engine: nn.Module, std: float, generator: torch.Generator) -> list:
    """SIMULATED mismatch: add ``N(0, std^2)`` noise to every router logit of ``engine``.

    Fresh noise per token and layer, drawn from ``generator`` (deterministic given its seed).
    Returns the hook handles. Not a model of any real precision effect: a dial to make the
    training–inference mismatch large enough to matter at toy scale.
    """
    if std < 0:
        raise ConfigError(f"numerics: router noise std must be >= 0, got {std}")
    handles = []
    if std == 0:
        return handles
    for name, module in engine.named_modules():
        if name.endswith("mlp.gate"):

            def hook(mod, args, out):
                noise = torch.randn(out.shape, generator=generator, dtype=torch.float32) * std
                return out + noise.to(out.dtype)

            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError("numerics: no router (module named '*.mlp.gate') found to add noise to")
    return handles
# --8<-- [end:router-noise]

"""Decoder layers ↔ MoE layers: the one mapping every capture path, converter and replay uses.

A trace's layer axis counts **MoE layers only**, in decoder order: ordinal ``j`` is the ``j``-th
decoder layer that routes tokens. Dense layers (DeepSeek-V3 / GLM-4.5's ``first_k_dense_replace``,
megatron's ``moe_layer_freq``) have no routes, and MTP layers are not decoder layers of the main
model. Engines number layers differently (vLLM and transformers by decoder index, megatron by its
per-stage local index, the official vLLM ``routed_experts`` array by decoder index including dense
layers); convert through :class:`LayerMap`, never by inspecting values.

The pattern comes from configuration only:

* ``first_k_dense`` (HF ``first_k_dense_replace``): decoder layers ``0 .. first_k_dense-1`` are dense;
* ``moe_layer_freq``: an int ``f`` (decoder layer ``i ≥ first_k_dense`` is MoE iff ``i % f == 0``,
  the Hugging Face DeepSeek-V3 rule; megatron's int form ``i % f == 0`` is the same with
  ``first_k_dense=0``), or megatron's explicit per-layer list of 0/1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import ConfigError

__all__ = ["LayerMap", "moe_layer_pattern"]


def moe_layer_pattern(num_layers: int, *, first_k_dense: int = 0, moe_layer_freq: int | Sequence[int] = 1) -> tuple[bool, ...]:
    """``pattern[i]`` is True iff decoder layer ``i`` is an MoE layer (see the module docstring)."""
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"moe_layer_pattern: num_layers must be an int >= 1, got {num_layers!r}")
    if not isinstance(first_k_dense, int) or not 0 <= first_k_dense <= num_layers:
        raise ConfigError(f"moe_layer_pattern: first_k_dense must be in [0, {num_layers}], got {first_k_dense!r}")
    if isinstance(moe_layer_freq, int):
        if moe_layer_freq < 1:
            raise ConfigError(f"moe_layer_pattern: moe_layer_freq must be >= 1, got {moe_layer_freq}")
        return tuple(i >= first_k_dense and i % moe_layer_freq == 0 for i in range(num_layers))
    flags = list(moe_layer_freq)
    if len(flags) != num_layers or any(f not in (0, 1) for f in flags):
        raise ConfigError(
            f"moe_layer_pattern: a moe_layer_freq list must hold one 0/1 per decoder layer ({num_layers}), got {flags!r}"
        )
    return tuple(bool(f) and i >= first_k_dense for i, f in enumerate(flags))


@dataclass(frozen=True)
class LayerMap:
    """Which decoder layers route tokens, and their MoE-layer ordinals (the trace's layer axis)."""

    pattern: tuple[bool, ...]  # one flag per decoder layer, True = MoE

    @classmethod
    def from_config(cls, num_layers: int, *, first_k_dense: int = 0, moe_layer_freq: int | Sequence[int] = 1) -> "LayerMap":
        return cls(moe_layer_pattern(num_layers, first_k_dense=first_k_dense, moe_layer_freq=moe_layer_freq))

    @property
    def num_decoder_layers(self) -> int:
        return len(self.pattern)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Decoder indices of the MoE layers, in order (ordinal ``j`` → ``moe_layers[j]``)."""
        return tuple(i for i, moe in enumerate(self.pattern) if moe)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.pattern)

    def ordinal(self, decoder_layer: int) -> int:
        """The MoE ordinal (trace layer index) of a decoder layer; an error for a dense layer."""
        if not 0 <= decoder_layer < len(self.pattern):
            raise ConfigError(f"LayerMap: decoder layer {decoder_layer} out of range [0, {len(self.pattern)})")
        if not self.pattern[decoder_layer]:
            raise ConfigError(f"LayerMap: decoder layer {decoder_layer} is dense (no routes); MoE layers are {list(self.moe_layers)}")
        return sum(self.pattern[:decoder_layer])

    def decoder_layer(self, ordinal: int) -> int:
        """The decoder index of MoE ordinal ``ordinal``."""
        layers = self.moe_layers
        if not 0 <= ordinal < len(layers):
            raise ConfigError(f"LayerMap: MoE ordinal {ordinal} out of range [0, {len(layers)})")
        return layers[ordinal]

    def stage(self, pp_rank: int, pp_size: int) -> tuple[int, ...]:
        """MoE ordinals held by pipeline stage ``pp_rank`` of ``pp_size`` (decoder layers split evenly, in order)."""
        n = len(self.pattern)
        if pp_size < 1 or n % pp_size or not 0 <= pp_rank < pp_size:
            raise ConfigError(f"LayerMap.stage: {n} decoder layers cannot be split into stage {pp_rank} of {pp_size} equal stages")
        per = n // pp_size
        return tuple(self.ordinal(i) for i in range(pp_rank * per, (pp_rank + 1) * per) if self.pattern[i])

"""reference_impl: routing capture, R2/R3 routing replay and MiniRL for MoE reinforcement learning.

The public pieces:

* :class:`RoutingTrace` — captured routing ``[num_tokens, num_layers, top_k]`` + validity mask.
* :func:`record_routing`, :func:`replay_routing` — the replay controller's context managers.
* :class:`MoEForCausalLM`, :class:`MoEConfig` — a tiny Qwen3-MoE model whose routers obey them.
* :func:`save_hf_checkpoint`, :func:`load_hf_checkpoint` — the Hugging Face checkpoint format.
"""

from .checkpoint import load_hf_checkpoint, save_hf_checkpoint
from .model import KVCache, MoEConfig, MoEForCausalLM, MoEOutput
from .replay import NativeRouting, ReplayRouting, ReplayStats, record_routing, replay_routing
from .routing import RoutingAgreement, RoutingTrace, compact_dtype, routed_rows

__version__ = "0.1.0"

__all__ = [
    "RoutingTrace",
    "RoutingAgreement",
    "compact_dtype",
    "routed_rows",
    "record_routing",
    "replay_routing",
    "NativeRouting",
    "ReplayRouting",
    "ReplayStats",
    "MoEConfig",
    "MoEForCausalLM",
    "MoEOutput",
    "KVCache",
    "save_hf_checkpoint",
    "load_hf_checkpoint",
]

"""reference_impl: routing capture, R2/R3 routing replay and MiniRL for MoE reinforcement learning.

Two journeys, one import:

**Routing traces and replay** — capture routes, store them, replay them into a model.

* :class:`RoutingTrace` (``[rows, L, k]`` ids + validity mask; the ``n − 1`` rule :func:`routed_rows`),
  :class:`RoutingAgreement`;
* :func:`record_routing`, :func:`replay_routing`, :class:`ReplayStats`; the interface a model must
  offer, :class:`ReplayHost` with :class:`RoutingShape`; decoder ↔ MoE layers, :class:`LayerMap`;
* converters from the engines' layouts: :func:`from_vllm`, :func:`routed_experts_to_trace`,
  :func:`from_sglang`, :func:`from_slime`, :func:`from_verl`, :func:`from_sentinel_rows`, :func:`from_layer_major`,
  :func:`to_layer_major`;
* a tiny Qwen3-MoE that obeys replay: :class:`MoEConfig`, :class:`MoEForCausalLM`,
  :func:`save_hf_checkpoint`, :func:`load_hf_checkpoint`.

**The RL side** — what goes into and comes out of an update.

* :class:`RolloutBatch` (the format every engine hands the trainer), :func:`next_token_logprobs`;
* objectives by name (:data:`OBJECTIVES`, :func:`compute_loss`) and as functions
  (:func:`minirl_loss` and its relatives), :func:`group_advantages`;
* mismatch and routing metrics: :func:`mismatch_metrics`, :func:`kl_k1`, :func:`kl_k3`,
  :func:`extreme_token_fraction`, :func:`routing_disagreement`, :func:`routing_flip_rate`;
* :func:`compare_batch`, :class:`ComparisonReport`: recompute a batch with another engine and report
  the mismatch;
* errors: :class:`TraceFormatError`, :class:`ConfigError`, :class:`AlignmentError` (all ``ValueError``).

Engines live in :mod:`reference_impl.integrations` (vLLM, megatron-core, transformers), the reference
rollout engine in :mod:`reference_impl.rollout`, the trainer in :mod:`reference_impl.trainer`.
"""

from .advantages import group_advantages
from .batch import RolloutBatch
from .checkpoint import load_hf_checkpoint, save_hf_checkpoint
from .compare import ComparisonReport, compare_batch
from .converters import (
    from_layer_major,
    from_sentinel_rows,
    from_sglang,
    from_slime,
    from_verl,
    from_vllm,
    routed_experts_to_trace,
    to_layer_major,
)
from .errors import AlignmentError, ConfigError, ReferenceImplError, TraceFormatError
from .layers import LayerMap
from .logprobs import next_token_logprobs
from .metrics import (
    extreme_token_fraction,
    kl_k1,
    kl_k3,
    mismatch_metrics,
    routing_disagreement,
    routing_flip_rate,
)
from .model import MoEConfig, MoEForCausalLM
from .objectives import (
    OBJECTIVES,
    cispo_loss,
    compute_loss,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    gspo_loss,
    gspo_token_loss,
    icepop_loss,
    minirl_loss,
    rspo_loss,
    seq_mis_loss,
    seq_tis_loss,
)
from .replay import ReplayHost, ReplayStats, RoutingShape, record_routing, replay_routing
from .routing import RoutingAgreement, RoutingTrace, routed_rows

__version__ = "0.1.0"

__all__ = [
    # routing traces and replay
    "RoutingTrace",
    "RoutingAgreement",
    "routed_rows",
    "record_routing",
    "replay_routing",
    "ReplayStats",
    "ReplayHost",
    "RoutingShape",
    "LayerMap",
    "from_vllm",
    "routed_experts_to_trace",
    "from_sglang",
    "from_slime",
    "from_verl",
    "from_sentinel_rows",
    "from_layer_major",
    "to_layer_major",
    "MoEConfig",
    "MoEForCausalLM",
    "save_hf_checkpoint",
    "load_hf_checkpoint",
    # the RL side
    "RolloutBatch",
    "next_token_logprobs",
    "OBJECTIVES",
    "compute_loss",
    "minirl_loss",
    "grpo_loss",
    "dr_grpo_loss",
    "dapo_loss",
    "cispo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "rspo_loss",
    "icepop_loss",
    "seq_tis_loss",
    "seq_mis_loss",
    "group_advantages",
    "mismatch_metrics",
    "kl_k1",
    "kl_k3",
    "extreme_token_fraction",
    "routing_disagreement",
    "routing_flip_rate",
    "compare_batch",
    "ComparisonReport",
    # errors
    "ReferenceImplError",
    "TraceFormatError",
    "ConfigError",
    "AlignmentError",
]

"""Routing capture and replay in Hugging Face ``transformers`` MoE models (FSDP-style trainers).

:func:`attach_routing` wraps the top-k routers of a loaded model so that the package's own
context managers drive them, exactly as they drive :class:`reference_impl.MoEForCausalLM`::

    routing = attach_routing(hf_model)                # once per model instance
    with record_routing(routing) as rec:              # R2: record e^π_old in the π_old recompute
        hf_model(input_ids)
    old_trace = rec.trace(seq_lengths)
    with replay_routing(routing, trace, seq_lengths=seq_lengths):   # R2 / R3 updates
        hf_model(input_ids).logits.sum().backward()

Supported routers (transformers 5.x; all share ``forward(h) -> (logits, weights, indices)``):

=========================  ==========================================  ======================
router class               gate weights over the selected experts       dtype of the weights
=========================  ==========================================  ======================
``Qwen3MoeTopKRouter``      softmax over all experts, renormalized       router logits' dtype
                            if ``norm_topk_prob``
``OlmoeTopKRouter``         same as Qwen3-MoE                            router logits' dtype
``MixtralTopKRouter``       softmax over all experts, always renormalized fp32
``Glm4MoeTopkRouter``       sigmoid (fp32) at the ids, unbiased,         fp32
                            renormalized if ``norm_topk_prob``,
                            × ``routed_scaling_factor``
``DeepseekV3TopkRouter``    same as GLM-4.5 (DeepSeek-V3, Kimi-K2)       fp32
``Dots1TopkRouter``         same as GLM-4.5 (dots.llm1)                  fp32
=========================  ==========================================  ======================

The rules are :mod:`reference_impl.routers`' (one gate-weight function for every family). For the
sigmoid routers the native choice is the top-k of the biased (``e_score_correction_bias``),
group-limited scores; replayed ids take their weights from the live *unbiased* sigmoid. Replay fixes
the expert ids and recomputes the weights from the live logits with the family's own rule, so
record → replay is bit-identical and the router keeps its gradient. Dense decoder layers have no
router, so the trace's layer axis is the MoE layers in decoder order (checked against the config's
:class:`reference_impl.layers.LayerMap`). Token order is
transformers' ``hidden.reshape(-1, H)`` of a ``[batch, seq]`` input (batch-major), the same as
the reference model, so traces are laid out by :meth:`RoutingTrace.to_padded` (right padding).
Under gradient checkpointing, the backward recomputes each router after the forward returned;
the adapter hands it the ids that layer used in the forward (native, recorded or replayed), so
near-tie routes cannot flip on recompute. This assumes the usual pattern of one forward, then its
backward: a second forward before the first backward replaces the kept ids.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..layers import LayerMap
from ..replay import NativeRouting, RoutingPolicy, RoutingShape
from ..routers import RouterSpec, gate_weights, selection_scores

__all__ = ["HFRouting", "attach_routing", "SUPPORTED_ROUTERS"]


@dataclass(frozen=True)
class _RouterRule:
    spec: Callable[[nn.Module], RouterSpec]  # the router's family rule, read from its attributes
    keep_fp32_weights: bool


def _softmax_spec(renormalize: Callable[[nn.Module], bool]) -> Callable[[nn.Module], RouterSpec]:
    return lambda r: RouterSpec(num_experts=r.num_experts, top_k=r.top_k, norm_topk_prob=renormalize(r))


def _sigmoid_bias_spec(r: nn.Module) -> RouterSpec:
    return RouterSpec(
        num_experts=r.num_experts,
        top_k=r.top_k,
        score_function="sigmoid",
        expert_bias=True,
        n_group=r.num_group,
        topk_group=r.topk_group,
        norm_topk_prob=bool(r.norm_topk_prob),
        routed_scaling_factor=float(r.routed_scaling_factor),
    )


SUPPORTED_ROUTERS: dict[str, _RouterRule] = {
    "Qwen3MoeTopKRouter": _RouterRule(_softmax_spec(lambda r: bool(r.norm_topk_prob)), keep_fp32_weights=False),
    "OlmoeTopKRouter": _RouterRule(_softmax_spec(lambda r: bool(r.norm_topk_prob)), keep_fp32_weights=False),
    "MixtralTopKRouter": _RouterRule(_softmax_spec(lambda r: True), keep_fp32_weights=True),
    "Glm4MoeTopkRouter": _RouterRule(_sigmoid_bias_spec, keep_fp32_weights=True),
    "DeepseekV3TopkRouter": _RouterRule(_sigmoid_bias_spec, keep_fp32_weights=True),
    "Dots1TopkRouter": _RouterRule(_sigmoid_bias_spec, keep_fp32_weights=True),
}


class HFRouting:
    """Adapter that lets :func:`record_routing` and :func:`replay_routing` drive a transformers MoE model.

    It implements :class:`reference_impl.replay.ReplayHost` (``routing_shape``, ``routing``,
    ``route_recorders``), as :class:`reference_impl.MoEForCausalLM` does. Create it with
    :func:`attach_routing`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = getattr(model, "model", model)
        self.routers = [m for m in self.base.modules() if type(m).__name__ in SUPPORTED_ROUTERS]
        if not self.routers:
            found = sorted({type(m).__name__ for m in model.modules() if "Router" in type(m).__name__ or "Gate" in type(m).__name__})
            raise ValueError(
                f"attach_routing: no supported MoE router in {type(model).__name__} "
                f"(supported: {sorted(SUPPORTED_ROUTERS)}; found: {found or 'none'})"
            )
        self.specs = [SUPPORTED_ROUTERS[type(r).__name__].spec(r) for r in self.routers]
        shapes = {(s.num_experts, s.top_k, s.family) for s in self.specs}
        if len(shapes) != 1:
            raise ValueError(f"attach_routing: routers disagree on (num_experts, top_k, family): {sorted(shapes)}")
        (num_experts, top_k, family), = shapes
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "num_hidden_layers", None):
            expected = LayerMap.from_hf_config(config).num_moe_layers
            if expected != len(self.routers):
                raise ConfigError(
                    f"attach_routing: the config's layer pattern has {expected} MoE layers but the model has "
                    f"{len(self.routers)} routers"
                )
        self.routing_shape = RoutingShape(
            num_layers=len(self.routers), top_k=top_k, num_experts=num_experts, router_family=family
        )
        self.routing: RoutingPolicy = NativeRouting()
        self.route_recorders: list = []
        self._step = None
        self._ids: dict[int, torch.Tensor] = {}
        self._shape: tuple[int, int, int] | None = None
        self._handles = [
            self.base.register_forward_pre_hook(self._start_forward, with_kwargs=True),
            self.base.register_forward_hook(self._end_forward),
        ]
        self._original_forwards = []
        for layer, router in enumerate(self.routers):
            self._original_forwards.append(router.forward)
            rule = SUPPORTED_ROUTERS[type(router).__name__]
            router.forward = types.MethodType(self._router_forward(layer, self.specs[layer], rule.keep_fp32_weights), router)

    # ------------------------------------------------------------------ hooks
    def _start_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        batch, seq_len = ref.shape[0], ref.shape[1]
        cache = kwargs.get("past_key_values")
        offset = int(cache.get_seq_length()) if cache is not None else 0
        self._shape = (batch, seq_len, offset)
        self._ids = {}
        self._step = self.routing.start_forward(batch=batch, seq_len=seq_len, offset=offset, top_k=self.routing_shape.top_k)

    def _end_forward(self, module, args, output):
        batch, seq_len, offset = self._shape
        if len(self._ids) == self.routing_shape.num_layers and self.route_recorders:
            routes = torch.stack([self._ids[i].view(batch, seq_len, -1) for i in range(len(self._ids))], dim=2)
            for recorder in self.route_recorders:
                recorder.add(routes, offset=offset)
        # Keep this forward's ids until the next forward starts: a checkpointed backward
        # recomputes the routers after the forward has returned.

    def _router_forward(self, layer: int, spec: RouterSpec, keep_fp32_weights: bool):
        adapter = self

        def forward(router, hidden_states):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            if spec.score_function == "sigmoid":  # GLM-4.5 / DeepSeek-V3 compute router logits in fp32
                logits = F.linear(hidden_states.float(), router.weight.float())
            else:
                logits = F.linear(hidden_states, router.weight)
            if layer in adapter._ids and adapter._ids[layer].shape[0] == logits.shape[0]:
                # A second call for this layer since the forward started is the activation
                # recompute of gradient checkpointing: reuse the forward's ids (REPLAY_BACKWARD).
                ids = adapter._ids[layer]
            else:
                with torch.no_grad():
                    choice = selection_scores(logits.detach(), spec, getattr(router, "e_score_correction_bias", None))
                if adapter._step is None:  # router called outside any model forward: native
                    ids = torch.topk(choice, spec.top_k, dim=-1).indices
                else:
                    ids = adapter._step.select(layer, choice)
                    adapter._ids[layer] = ids
            scores = gate_weights(logits, ids, spec)
            if not keep_fp32_weights:
                scores = scores.to(logits.dtype)
            return logits, scores, ids

        return forward

    def detach(self) -> None:
        """Restore the routers' own forwards and remove the hooks."""
        for router, fwd in zip(self.routers, self._original_forwards):
            router.forward = fwd
        for h in self._handles:
            h.remove()
        if getattr(self.model, "_reference_impl_routing", None) is self:
            del self.model._reference_impl_routing


def attach_routing(model: nn.Module) -> HFRouting:
    """Attach (once) and return the routing adapter of a transformers MoE model."""
    existing = getattr(model, "_reference_impl_routing", None)
    if existing is not None:
        return existing
    adapter = HFRouting(model)
    model._reference_impl_routing = adapter
    return adapter

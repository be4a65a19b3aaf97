"""Routing capture and replay in Hugging Face ``transformers`` MoE models (FSDP-style trainers).

:func:`attach_routing` wraps the top-k routers of a loaded model so that the package's own
context managers drive them, exactly as they drive :class:`reference_impl.MoEForCausalLM`::

    routing = attach_routing(hf_model)                # once per model instance
    with record_routing(routing) as rec:              # R2: record e^π_old in the π_old recompute
        hf_model(input_ids)
    old_trace = rec.trace(seq_lengths)
    with replay_routing(routing, trace, seq_lengths=seq_lengths):   # R2 / R3 updates
        hf_model(input_ids).logits.sum().backward()

Supported routers (transformers 5.x; the three share ``forward(h) -> (logits, scores, indices)``):

=====================  ==========================================  ======================
router class           gate weights over the selected experts       dtype of the weights
=====================  ==========================================  ======================
``Qwen3MoeTopKRouter``  softmax over all experts, renormalized       router logits' dtype
                        if ``norm_topk_prob``
``OlmoeTopKRouter``     same as Qwen3-MoE                            router logits' dtype
``MixtralTopKRouter``   softmax over all experts, always renormalized fp32
=====================  ==========================================  ======================

Replay fixes the expert ids and recomputes the weights from the live logits with the family's
own rule, so record → replay is bit-identical and the router keeps its gradient. Token order is
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

from ..replay import NativeRouting, RoutingPolicy, RoutingShape

__all__ = ["HFRouting", "attach_routing", "SUPPORTED_ROUTERS"]


@dataclass(frozen=True)
class _RouterRule:
    renormalize: Callable[[nn.Module], bool]
    keep_fp32_weights: bool


SUPPORTED_ROUTERS: dict[str, _RouterRule] = {
    "Qwen3MoeTopKRouter": _RouterRule(lambda r: bool(r.norm_topk_prob), keep_fp32_weights=False),
    "OlmoeTopKRouter": _RouterRule(lambda r: bool(r.norm_topk_prob), keep_fp32_weights=False),
    "MixtralTopKRouter": _RouterRule(lambda r: True, keep_fp32_weights=True),
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
        shapes = {(r.num_experts, r.top_k) for r in self.routers}
        if len(shapes) != 1:
            raise ValueError(f"attach_routing: routers disagree on (num_experts, top_k): {sorted(shapes)}")
        (num_experts, top_k), = shapes
        self.routing_shape = RoutingShape(num_layers=len(self.routers), top_k=top_k, num_experts=num_experts)
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
            router.forward = types.MethodType(self._router_forward(layer, SUPPORTED_ROUTERS[type(router).__name__]), router)

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

    def _router_forward(self, layer: int, rule: _RouterRule):
        adapter = self

        def forward(router, hidden_states):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden_states, router.weight)
            if layer in adapter._ids and adapter._ids[layer].shape[0] == logits.shape[0]:
                # A second call for this layer since the forward started is the activation
                # recompute of gradient checkpointing: reuse the forward's ids (REPLAY_BACKWARD).
                ids = adapter._ids[layer]
            elif adapter._step is None:  # router called outside any model forward: native
                ids = torch.topk(logits.detach(), router.top_k, dim=-1).indices
            else:
                ids = adapter._step.select(layer, logits.detach())
                adapter._ids[layer] = ids
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            scores = probs.gather(1, ids)
            if rule.renormalize(router):
                scores = scores / scores.sum(dim=-1, keepdim=True)
            if not rule.keep_fp32_weights:
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

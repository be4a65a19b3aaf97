"""The replay controller: who picks each MoE layer's top-k experts.

A model's routers ask ``model.routing`` (a :class:`RoutingPolicy`) for the expert ids of every
forward. Three behaviours:

* **native** (:class:`NativeRouting`): top-k of the live router logits.
* **record** (:func:`record_routing`): routing stays as it is; every forward's routes are collected
  and turned into a :class:`~reference_impl.routing.RoutingTrace`. R2 records ``old_trace``
  during the π_θold recompute.
* **replay** (:func:`replay_routing`, :class:`ReplayRouting`): the ids come from a trace. R2
  replays ``old_trace`` in the updates; R3 replays the engine's ``rollout_trace`` in the π_θold
  recompute and in the updates. Rows the trace marks invalid (padding, positions an engine could
  not report) are routed natively, per token, and counted.

Activation recompute needs no mode of its own: the model fixes each layer's ids at the first
call, and ``torch.utils.checkpoint``'s recompute reuses them (Megatron's REPLAY_BACKWARD).

Replay fixes expert *identities* only; gate weights are recomputed from live logits
(:func:`reference_impl.model.gate_weights`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import torch

from .routing import RoutingTrace

__all__ = [
    "RoutingShape",
    "ReplayHost",
    "RoutingPolicy",
    "ForwardRouting",
    "NativeRouting",
    "ReplayRouting",
    "ReplayStats",
    "RouteRecorder",
    "record_routing",
    "replay_routing",
]


class ForwardRouting(Protocol):
    """Routing decisions for one forward call."""

    def select(self, layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        """Expert ids ``[tokens, top_k]`` (int64) for ``router_logits`` ``[tokens, num_experts]``."""


class RoutingPolicy(Protocol):
    def start_forward(self, *, batch: int, seq_len: int, offset: int, top_k: int) -> ForwardRouting:
        """Called once per model forward over ``batch x seq_len`` tokens at positions ``offset ..``."""


@dataclass(frozen=True)
class RoutingShape:
    """The routed layers of a model, as a trace stores them: ``L`` MoE layers, top-``k`` of ``E`` experts."""

    num_layers: int  # L: routed (MoE) layers, in the order the trace's layer axis uses
    top_k: int  # k
    num_experts: int  # E


class ReplayHost(Protocol):
    """What a model must offer to be recorded and replayed by :func:`record_routing` / :func:`replay_routing`.

    ==================  ==========================  ============================================================
    attribute           type                        meaning
    ==================  ==========================  ============================================================
    ``routing_shape``   :class:`RoutingShape`       ``L`` routed layers, top-``k``, ``E`` experts; a trace
                                                    replayed into the model has ``[rows, L, k]`` ids < ``E``
    ``routing``         :class:`RoutingPolicy`      settable; at each forward over ``[B, T]`` tokens at
                                                    positions ``offset ..``, the model calls
                                                    ``routing.start_forward(batch=B, seq_len=T, offset=offset,
                                                    top_k=k)`` once, then, for each routed layer ``l`` in
                                                    order, ``select(l, router_logits[B*T, E])`` → ids
                                                    ``[B*T, k]`` int64 (rows batch-major: ``b*T + t``)
    ``route_recorders`` ``list[RouteRecorder]``     after a forward that routed every layer, the model calls
                                                    ``recorder.add(routes[B, T, L, k], offset=offset)`` on each
    ==================  ==========================  ============================================================

    :class:`reference_impl.MoEForCausalLM` implements it natively; transformers models get it from
    :func:`reference_impl.integrations.transformers.attach_routing`.
    """

    routing_shape: RoutingShape
    routing: RoutingPolicy
    route_recorders: list


def native_topk(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The native choice: the ``top_k`` largest router logits (= largest softmax probabilities)."""
    return torch.topk(router_logits, top_k, dim=-1).indices


class _NativeForward:
    def __init__(self, top_k: int) -> None:
        self.top_k = top_k

    def select(self, layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        return native_topk(router_logits, self.top_k)


class NativeRouting:
    """Top-k of the live router logits."""

    def start_forward(self, *, batch: int, seq_len: int, offset: int, top_k: int) -> ForwardRouting:
        return _NativeForward(top_k)


@dataclass
class ReplayStats:
    """What a replay did: forwards driven, (token, layer) rows replayed and rows routed natively."""

    forwards: int = 0
    replayed_rows: int = 0
    native_rows: int = 0


class _ReplayForward:
    def __init__(self, ids: torch.Tensor, valid: torch.Tensor, top_k: int, stats: ReplayStats) -> None:
        # ids [tokens, L, k] int64 for this forward's tokens (batch-major), valid [tokens]
        self.ids, self.valid, self.top_k, self.stats = ids, valid, top_k, stats
        self.num_valid = int(valid.sum())  # once per forward, not once per layer
        self.all_valid = self.num_valid == valid.numel()

    def select(self, layer: int, router_logits: torch.Tensor) -> torch.Tensor:
        if router_logits.shape[0] != self.ids.shape[0]:
            raise ValueError(
                f"replay: layer {layer} routes {router_logits.shape[0]} tokens but the trace covers {self.ids.shape[0]}"
            )
        replayed = self.ids[:, layer].to(router_logits.device)
        self.stats.replayed_rows += self.num_valid
        self.stats.native_rows += self.ids.shape[0] - self.num_valid
        if self.all_valid:
            return replayed
        native = native_topk(router_logits, self.top_k)
        return torch.where(self.valid.to(router_logits.device)[:, None], replayed, native)


class ReplayRouting:
    """Replays a :class:`RoutingTrace` into forwards over a right-padded batch.

    Sequence ``i`` of the trace drives batch row ``i``: its routed rows fill positions
    ``0 .. rows_i - 1`` (the alignment rule of :func:`reference_impl.routing.routed_rows`); the last
    position of each sequence, padding and invalid rows are routed natively. Forwards may be full
    (``offset`` 0) or incremental with a KV cache (``offset`` > 0).
    """

    def __init__(self, trace: RoutingTrace, *, num_layers: int, top_k: int, num_experts: int) -> None:
        trace.check_compatible(num_layers=num_layers, top_k=top_k, num_experts=num_experts)
        self.trace = trace
        self.stats = ReplayStats()
        self._grid: tuple[torch.Tensor, torch.Tensor] | None = None

    def _padded(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grid is None or self._grid[0].shape[1] < seq_len:
            self._grid = self.trace.to_padded(max(seq_len, max(self.trace.rows_per_seq, default=0)))
        return self._grid

    def start_forward(self, *, batch: int, seq_len: int, offset: int, top_k: int) -> ForwardRouting:
        if batch != self.trace.num_sequences:
            raise ValueError(
                f"replay: the forward has batch {batch} but the trace holds {self.trace.num_sequences} sequences"
            )
        ids, valid = self._padded(offset + seq_len)
        self.stats.forwards += 1
        window_ids = ids[:, offset : offset + seq_len].reshape(batch * seq_len, *ids.shape[2:])
        window_valid = valid[:, offset : offset + seq_len].reshape(batch * seq_len)
        return _ReplayForward(window_ids, window_valid, top_k, self.stats)


class RouteRecorder:
    """Collects the routes of every forward of a model (incremental forwards are appended in time)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.chunks: list[torch.Tensor] = []
        self._length = 0

    def add(self, routes: torch.Tensor, offset: int) -> None:
        if offset == 0 and self.chunks:
            raise RuntimeError(
                "record_routing: a second full forward started inside one recording; "
                "record each batch in its own context"
            )
        if offset != self._length:
            raise RuntimeError(f"record_routing: forward at offset {offset} does not continue the {self._length} recorded positions")
        self.chunks.append(routes.detach())
        self._length += routes.shape[1]

    @property
    def routes(self) -> torch.Tensor:
        """All recorded routes ``[batch, positions, num_layers, top_k]``."""
        if not self.chunks:
            raise RuntimeError("record_routing: no forward ran inside the recording")
        return torch.cat(self.chunks, dim=1)

    def trace(self, seq_lengths: Sequence[int], valid: torch.Tensor | None = None) -> RoutingTrace:
        """The recorded routes of a right-padded batch as a trace (``n_i - 1`` rows per sequence)."""
        return RoutingTrace.from_padded(self.routes, seq_lengths, self.num_experts, valid)


def _routing_shape(model: ReplayHost) -> tuple[int, int, int]:
    shape = getattr(model, "routing_shape", None)
    if not isinstance(shape, RoutingShape) or not hasattr(model, "routing") or not hasattr(model, "route_recorders"):
        raise TypeError(
            f"{type(model).__name__} is not a replay host: it needs routing_shape (a RoutingShape), routing and "
            "route_recorders (see reference_impl.replay.ReplayHost); wrap transformers models with "
            "reference_impl.integrations.transformers.attach_routing"
        )
    return shape.num_layers, shape.top_k, shape.num_experts


@contextmanager
def record_routing(model: ReplayHost) -> Iterator[RouteRecorder]:
    """Record the routes of every forward of ``model`` inside the block.

    >>> with record_routing(model) as rec:
    ...     model(input_ids)
    >>> trace = rec.trace(seq_lengths)
    """
    recorder = RouteRecorder(num_experts=_routing_shape(model)[2])
    model.route_recorders.append(recorder)
    try:
        yield recorder
    finally:
        model.route_recorders.remove(recorder)


@contextmanager
def replay_routing(
    model: ReplayHost, trace: RoutingTrace, *, seq_lengths: Sequence[int] | None = None, strict: bool = True
) -> Iterator[ReplayStats]:
    """Replay ``trace`` in every forward of ``model`` inside the block; yields live :class:`ReplayStats`.

    Pass ``seq_lengths`` (tokens per sequence of the batch) to check the alignment rule up front:
    sequence ``i`` must have ``seq_lengths[i] - 1`` rows.

    With ``strict`` (default), leaving the block without a single replayed forward raises: a replay
    that silently did nothing (e.g. the model was rebuilt and the forward ran on another instance)
    is the failure real frameworks hit with orphaned replay objects.
    """
    num_layers, top_k, num_experts = _routing_shape(model)
    if seq_lengths is not None:
        trace.check_alignment(seq_lengths)
    policy = ReplayRouting(trace, num_layers=num_layers, top_k=top_k, num_experts=num_experts)
    previous = model.routing
    model.routing = policy
    ok = False
    try:
        yield policy.stats
        ok = True
    finally:
        model.routing = previous
    if ok and strict and policy.stats.forwards == 0:
        raise RuntimeError(
            "replay_routing: no forward of this model ran inside the block, so nothing was replayed "
            "(was the forward run on another model instance?)"
        )

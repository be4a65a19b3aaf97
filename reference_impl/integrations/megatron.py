"""Drive megatron-core's ``RouterReplay`` (R2 record, R3 replay, replay under recompute) from a `RoutingTrace`.

Tested with megatron-core 0.16.1 on CPU (gloo, world size 1); the replay primitive is
``megatron.core.transformer.moe.router_replay`` and Megatron has no trainer wiring of its own.

Two pieces here, and one beside them:

* (:mod:`reference_impl.integrations.megatron_cpu`) :func:`load_megatron_model` reads one of our Hugging Face-format Qwen3-MoE checkpoints
  (:func:`reference_impl.save_hf_checkpoint`, :func:`reference_impl.tiny_checkpoint.build_tiny_checkpoint`)
  into a Megatron ``GPTModel`` with MoE layers (local spec, RoPE, GQA, q/k RMSNorm, SwiGLU experts,
  softmax top-k routing with ``moe_router_pre_softmax=False``, which is Qwen3's
  ``norm_topk_prob=True``) and ``moe_enable_routing_replay=True``.
* :class:`MegatronReplay` is the one place that touches Megatron's replay state: the class-level list
  of ``RouterReplay`` instances, the per-router action, the target and recorded indices and the
  FIFO of targets kept for activation recompute. ``record()`` (R2), ``replay_forward(trace)`` (R3, or
  R2's updates) and ``replay_backward()`` (recompute reuses the forward's routes).
* :func:`megatron_logprobs` is one call: forward a right-padded batch, natively, recording, or
  replaying a trace, and return next-token log-probs (and the recorded trace).

Layout. Megatron's hidden states are ``[S, B, H]``, so its router sees tokens in s-major order:
row ``s * B + b`` is position ``s`` of batch row ``b``. Replay targets are per layer
``[S * B, top_k]`` ``torch.long`` (``torch.gather`` rejects int16; compact uint8/int16 traces are
widened). :func:`megatron_replay_targets` builds them from a trace.

Rows without a trace row. A forward over a sequence of ``n`` tokens has ``n`` positions, its trace
``n - 1`` rows (the alignment rule of :func:`reference_impl.routing.routed_rows`): the last
position, right padding and the rows a trace marks invalid have no replayed ids. Megatron's
``RouterReplay`` replays *every* row of its target and has no per-row fallback, so those rows need
well-formed ids. With ``invalid_rows="native"`` (default) they get the model's own native choice
**from the same forward**: just before each router runs, a forward pre-hook computes that layer's
router logits on the layer's actual input (``router.gating``, the router's own code, no gradient),
takes their top-k and writes ``where(valid, trace_ids, native_topk)`` into the router's
``RouterReplay`` with ``set_target_indices``. This is exactly the native fallback of
:mod:`reference_impl.replay` (invalid rows routed natively given the replayed context), costs one
small ``[S*B, H] x [H, E]`` matmul per layer, and needs no extra forward pass. With
``invalid_rows="error"`` a trace with invalid rows is refused (the last position and padding, which
never influence a scored log-prob under a causal mask, are still routed natively).

Life cycle. ``RouterReplay.global_router_replay_instances`` is a class-level list that every router
built with ``moe_enable_routing_replay=True`` appends to; a model built after another one without
``clear_global_router_replay_instances()`` leaves the first model's instances in it, and Megatron's
static helpers (``set_replay_data``, ``set_global_router_replay_action``) then address the wrong or too
many routers. :func:`load_megatron_model` clears the list before building, and
:class:`MegatronReplay` drives its own model's routers directly and re-registers exactly them in the
global list each time a mode starts. Indices are cleared (``clear_indices``) when a mode starts and
ends, so nothing leaks from one step into the next; the one exception is a forward that will be
recomputed in a backward that has not run yet (its targets wait in ``replay_backward_list`` with the
routers on REPLAY_BACKWARD, and starting another mode before that backward raises instead of mixing
steps; :meth:`MegatronReplay.clear` drops them).

Precision: fp32 only (``params_dtype=torch.float32``); bf16 would need Megatron's ``Float16Module``.

All functions here import megatron lazily: the module imports without megatron-core installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..model import MoEConfig
from ..converters import from_layer_major, to_layer_major
from ..replay import ReplayStats
from ..routing import RoutingTrace

__all__ = [
    "causal_attention_mask",
    "megatron_forward",
    "megatron_replay_targets",
    "recorded_to_trace",
    "MegatronReplay",
    "MegatronRecording",
    "MegatronLogprobs",
    "megatron_logprobs",
]

# The tiny-model CPU loader moved to :mod:`reference_impl.integrations.megatron_cpu`; its names stay
# importable from here (old import path) without this module importing the loader.
_LOADER_NAMES = ("init_megatron_cpu", "megatron_config", "megatron_state_dict", "build_megatron_model", "load_megatron_model")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from . import megatron_cpu

        return getattr(megatron_cpu, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_REPLAY_ATTR = "_reference_impl_megatron_replay"
_REF_CONFIG_ATTR = "_reference_impl_moe_config"


def _moe_config(model) -> MoEConfig:
    cfg = getattr(model, _REF_CONFIG_ATTR, None)
    if cfg is None:
        raise TypeError("expected a GPTModel built by build_megatron_model / load_megatron_model")
    return cfg


# ------------------------------------------------------------------------------------- forward
def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's attention mask ``[1, 1, S, S]`` bool, True = masked (key after query).

    Right padding needs nothing more: under a causal mask a real token never sees a later padding
    token, and padding positions are never scored.
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


def megatron_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, S, V]`` of a Megatron ``GPTModel`` over right-padded ``tokens`` ``[B, S]``.

    Passes an explicit causal ``attention_mask`` and positions ``0 .. S-1`` (the default mask is
    built on CUDA in megatron-core 0.16.1).
    """
    if tokens.dim() != 2:
        raise ValueError(f"megatron_forward: tokens must be [batch, seq], got {tuple(tokens.shape)}")
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).expand(b, s)
    return model(input_ids=tokens, position_ids=position_ids, attention_mask=causal_attention_mask(s, tokens.device))


# -------------------------------------------------------------------------------------- layout
def megatron_replay_targets(trace: RoutingTrace, seq_len: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A trace in Megatron's layout for a forward over ``[B, seq_len]`` (``B = trace.num_sequences``).

    Returns ``(targets, valid)``: ``targets[l]`` ``[seq_len * B, top_k]`` ``torch.long`` for MoE layer
    ``l``, row ``s * B + b`` = position ``s`` of sequence ``b`` (s-major, as Megatron's ``[S, B, H]``
    hidden states); ``valid`` ``[seq_len * B]`` bool, False where the trace has no valid row (each
    sequence's last position, right padding, rows the trace marks invalid). Rows that are not valid
    hold the well-formed filler ``0 .. k-1``; :class:`MegatronReplay` replaces them with the native
    choice before Megatron sees them.
    """
    return to_layer_major(trace, seq_len, order="s-major")


def recorded_to_trace(
    recorded: Sequence[torch.Tensor], seq_lengths: Sequence[int], num_experts: int
) -> RoutingTrace:
    """Megatron's per-layer recorded top-k (``[S * B, k]``, s-major) as a trace of ``n_i - 1`` rows per sequence.

    Ids are sorted ascending within each row (the package's convention; top-k order never matters).
    """
    return from_layer_major([ids.sort(dim=-1).values for ids in recorded], seq_lengths, num_experts, order="s-major")


def _sb_to_routes(per_layer: Sequence[torch.Tensor], batch: int) -> torch.Tensor:
    """Per-layer ``[S * B, k]`` s-major ids -> routes ``[B, S, L, k]`` int64, ids sorted ascending."""
    layers = []
    for ids in per_layer:
        if ids is None:
            raise RuntimeError("megatron: a router recorded nothing (did the forward run on this model?)")
        n, k = ids.shape
        layers.append(ids.detach().to(torch.int64).view(n // batch, batch, k).transpose(0, 1))
    return torch.stack(layers, dim=2).sort(dim=-1).values


# ------------------------------------------------------------------------------ replay control
@dataclass
class MegatronRecording:
    """What :meth:`MegatronReplay.record` captured: Megatron's recorded top-k of the last forward."""

    num_experts: int
    recorded: list[torch.Tensor] | None = None  # per layer [S*B, k] as Megatron recorded them
    batch: int = 0
    forwards: int = 0

    def routes(self) -> torch.Tensor:
        """Recorded routes ``[B, S, L, k]`` (int64, ids sorted ascending)."""
        if self.recorded is None:
            raise RuntimeError("MegatronReplay.record: no forward ran inside the recording")
        return _sb_to_routes(self.recorded, self.batch)

    def trace(self, seq_lengths: Sequence[int]) -> RoutingTrace:
        """The recorded routes of a right-padded batch as a trace (``n_i - 1`` rows per sequence)."""
        if self.recorded is None:
            raise RuntimeError("MegatronReplay.record: no forward ran inside the recording")
        return recorded_to_trace(self.recorded, seq_lengths, self.num_experts)


class MegatronReplay:
    """The one owner of a Megatron model's ``RouterReplay`` state.

    >>> rep = MegatronReplay(model)
    >>> with rep.record() as rec:                 # R2: record pi_old's routes
    ...     megatron_forward(model, tokens)
    >>> old_trace = rec.trace(seq_lengths)
    >>> with rep.replay_forward(rollout_trace, seq_lengths) as stats:   # R3
    ...     logits = megatron_forward(model, tokens)   # REPLAY_FORWARD
    ...     loss.backward()   # under recompute: REPLAY_BACKWARD, switched automatically after the forward

    After every forward in ``replay_forward`` (and in ``record``) that will be recomputed in backward
    (``recompute_granularity="full"``, train mode, grad enabled), the routers switch to
    ``REPLAY_BACKWARD`` so the recompute pops exactly the forward's routes from Megatron's FIFO
    (several forwards in one block work if their backwards run one by one, in forward order).
    :meth:`replay_backward` does the same switch by hand. Outside a mode, routing is Megatron's
    native top-k; a RECORD forward under recompute also pins its recompute to the recorded routes.

    The routes Megatron actually dispatched (its ``routing_map``) are kept for the last forward
    (:meth:`last_routes`) and for the last recompute (:meth:`last_recompute_routes`).
    """

    def __init__(self, model, *, check_routing_map: bool = True) -> None:
        from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

        self._RouterReplay, self._Action = RouterReplay, RouterReplayAction
        self.model = model
        self.config = _moe_config(model)
        self.routers = [layer.mlp.router for layer in model.decoder.layers]
        self.instances = [r.router_replay for r in self.routers]
        if any(rr is None for rr in self.instances):
            raise ValueError("MegatronReplay: the model was built without moe_enable_routing_replay=True")
        if len(self.routers) != self.config.num_hidden_layers:
            raise ValueError(f"MegatronReplay: {len(self.routers)} MoE routers for {self.config.num_hidden_layers} layers")
        self.check_routing_map = check_routing_map
        self._mode: str | None = None
        self._trace: RoutingTrace | None = None
        self._stats: ReplayStats | None = None
        self._recording: MegatronRecording | None = None
        self._grid: dict[tuple[int, int], tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._will_recompute = False
        self._forward_maps: list[torch.Tensor | None] = [None] * len(self.routers)
        self._recompute_maps: list[torch.Tensor | None] = [None] * len(self.routers)
        self._targets: list[torch.Tensor | None] = [None] * len(self.routers)
        self._batch = 0
        self._restore_backward = False
        previous = getattr(model, _REPLAY_ATTR, None)
        if previous is not None:
            previous.close()
        self._handles = [model.register_forward_pre_hook(self._model_pre_hook), model.register_forward_hook(self._model_post_hook)]
        for layer, router in enumerate(self.routers):
            self._handles.append(router.register_forward_pre_hook(lambda mod, args, layer=layer: self._router_pre_hook(layer, args)))
            self._handles.append(router.register_forward_hook(lambda mod, args, out, layer=layer: self._router_post_hook(layer, out)))
        setattr(model, _REPLAY_ATTR, self)
        self._bind()

    @classmethod
    def of(cls, model) -> "MegatronReplay":
        """The model's controller (created on first use)."""
        existing = getattr(model, _REPLAY_ATTR, None)
        return existing if existing is not None else cls(model)

    def close(self) -> None:
        """Remove the hooks (the model routes natively afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.model, _REPLAY_ATTR, None) is self:
            delattr(self.model, _REPLAY_ATTR)

    # ---------------------------------------------------------------- Megatron state, one place
    def _bind(self) -> None:
        """Make Megatron's class-level instance list hold exactly this model's routers, in layer order.

        A model built after another without ``clear_global_router_replay_instances()`` leaves
        orphaned instances there; Megatron's static helpers would then address the wrong routers.
        """
        registry = self._RouterReplay.global_router_replay_instances
        if len(registry) != len(self.instances) or any(a is not b for a, b in zip(registry, self.instances)):
            self._RouterReplay.clear_global_router_replay_instances()
            registry.extend(self.instances)

    def _set_action(self, action) -> None:
        for rr in self.instances:
            if action is None:
                rr.clear_router_replay_action()
            else:
                rr.set_router_replay_action(action)

    def _clear_indices(self) -> None:
        for rr in self.instances:
            rr.clear_indices()

    def pending_backward(self) -> list[int]:
        """Targets each router still holds for a recompute (all 0 once backward has run)."""
        return [len(rr.replay_backward_list) for rr in self.instances]

    def clear(self) -> None:
        """Forget targets, recordings and pending recompute targets; route natively (Megatron's
        ``clear_global_indices`` + ``clear_router_replay_action`` for this model's routers)."""
        self._clear_indices()
        self._set_action(None)

    @contextmanager
    def _mode_block(self, mode: str):
        if self._mode is not None:
            raise RuntimeError(f"MegatronReplay: already in mode {self._mode!r}; modes do not nest")
        pending = self.pending_backward()
        if any(pending):
            raise RuntimeError(
                f"MegatronReplay: routers still hold recompute targets {pending} from a forward whose backward "
                "has not run; run that backward first, or call clear() to drop them"
            )
        self._bind()
        self._clear_indices()
        self._mode = mode
        ok = False
        try:
            yield
            ok = True
        finally:
            self._mode = None
            self._grid.clear()
            if ok and any(self.pending_backward()):
                # A forward inside the block will be recomputed in a backward that has not run yet:
                # keep its targets and REPLAY_BACKWARD until that backward pops them.
                self.replay_backward()
            else:
                self.clear()

    # ----------------------------------------------------------------------------------- modes
    @contextmanager
    def record(self) -> Iterator[MegatronRecording]:
        """RECORD: Megatron routes natively and records its top-k; yields a :class:`MegatronRecording`."""
        self._recording = MegatronRecording(num_experts=self.config.num_experts)
        try:
            with self._mode_block("record"):
                yield self._recording
        finally:
            self._recording = None

    @contextmanager
    def replay_forward(
        self,
        trace: RoutingTrace,
        seq_lengths: Sequence[int] | None = None,
        *,
        invalid_rows: str = "native",
        strict: bool = True,
    ) -> Iterator[ReplayStats]:
        """REPLAY_FORWARD ``trace`` in every forward inside the block; yields live :class:`ReplayStats`.

        Sequence ``i`` of the trace drives batch row ``i``: positions ``0 .. rows_i - 1`` take its
        ids; the last position, padding and invalid rows take the native top-k of the same forward
        (``invalid_rows="native"``), or a trace with invalid rows is refused (``"error"``).
        ``seq_lengths`` checks the alignment rule up front. With ``strict``, a block in which no
        forward of this model ran raises (a replay that silently did nothing).
        """
        cfg = self.config
        trace.check_compatible(num_layers=cfg.num_hidden_layers, top_k=cfg.num_experts_per_tok, num_experts=cfg.num_experts)
        if seq_lengths is not None:
            trace.check_alignment(seq_lengths)
        if invalid_rows not in ("native", "error"):
            raise ValueError(f"MegatronReplay: invalid_rows must be 'native' or 'error', got {invalid_rows!r}")
        if invalid_rows == "error" and trace.num_invalid:
            raise ValueError(
                f"MegatronReplay: the trace has {trace.num_invalid} invalid rows and invalid_rows='error' "
                "(Megatron replays every row; use invalid_rows='native' to route them natively)"
            )
        self._trace, self._stats = trace, ReplayStats()
        ok = False
        try:
            with self._mode_block("replay"):
                yield self._stats
                ok = True
        finally:
            stats, self._trace, self._stats = self._stats, None, None
        if ok and strict and stats.forwards == 0:
            raise RuntimeError(
                "MegatronReplay.replay_forward: no forward of this model ran inside the block, so nothing "
                "was replayed (was the forward run on another model instance?)"
            )

    def replay_backward(self) -> None:
        """Switch this model's routers to REPLAY_BACKWARD: a recompute pops the forwards' targets in order."""
        self._set_action(self._Action.REPLAY_BACKWARD)

    # -------------------------------------------------------------------------------- hooks
    def _model_pre_hook(self, module, args) -> None:
        cfg = module.config
        self._will_recompute = bool(
            cfg.recompute_granularity == "full" and module.training and torch.is_grad_enabled()
        )
        self._forward_maps = [None] * len(self.routers)
        if self._mode is None:
            # Outside a mode Megatron routes natively, even while an earlier forward's recompute
            # targets wait for their backward (REPLAY_BACKWARD must then be restored afterwards).
            if any(self.pending_backward()):
                if self._will_recompute:
                    raise RuntimeError(
                        "MegatronReplay: a native forward that will be recomputed cannot run while routers hold "
                        "another forward's recompute targets; run that backward first, or call clear()"
                    )
                self._restore_backward = True
            self._set_action(None)
            return
        self._bind()
        if self._mode == "record":
            self._set_action(self._Action.RECORD)
        elif self._mode == "replay":
            self._stats.forwards += 1
            self._set_action(self._Action.REPLAY_FORWARD)

    def _model_post_hook(self, module, args, output) -> None:
        if self._mode is None:
            if self._restore_backward:
                self._restore_backward = False
                self.replay_backward()
            return
        if self._mode == "record":
            recorded = [rr.get_recorded_indices() for rr in self.instances]
            rec = self._recording
            rec.recorded = [r.detach().clone() for r in recorded]
            rec.batch = self._batch
            rec.forwards += 1
            if self._will_recompute:
                # Pin the recompute to the recorded routes (native top-k could flip a near tie).
                for rr, ids in zip(self.instances, recorded):
                    rr.replay_backward_list.append(ids)
                self.replay_backward()
        elif self._mode == "replay" and self._will_recompute:
            self.replay_backward()

    def _router_pre_hook(self, layer: int, args) -> None:
        hidden = args[0]  # [S, B, H]
        s, b = hidden.shape[0], hidden.shape[1]
        rr = self.instances[layer]
        if rr.router_replay_action == self._Action.REPLAY_BACKWARD:
            return
        self._batch = b
        if self._mode != "replay" or rr.router_replay_action != self._Action.REPLAY_FORWARD:
            return
        trace = self._trace
        if b != trace.num_sequences:
            raise ValueError(f"MegatronReplay: the forward has batch {b} but the trace holds {trace.num_sequences} sequences")
        if (s, b) not in self._grid:
            if max(trace.rows_per_seq, default=0) > s:
                raise ValueError(
                    f"MegatronReplay: the trace has a sequence of {max(trace.rows_per_seq)} routed rows, "
                    f"more than the {s} positions of the forward"
                )
            self._grid[(s, b)] = megatron_replay_targets(trace, s)
        targets, valid = self._grid[(s, b)]
        target = targets[layer].to(hidden.device)
        n_valid = int(valid.sum())
        if n_valid < valid.numel():
            router = self.routers[layer]
            with torch.no_grad():
                native = torch.topk(router.gating(hidden).view(s * b, -1), self.config.num_experts_per_tok, dim=1).indices
            target = torch.where(valid.to(hidden.device)[:, None], target, native)
        self._stats.replayed_rows += n_valid
        self._stats.native_rows += valid.numel() - n_valid
        rr.set_target_indices(target)  # appends to replay_backward_list too
        if not self._will_recompute:
            rr.replay_backward_list.pop()  # no recompute will pop it: keep the FIFO clean
        self._targets[layer] = target

    def _router_post_hook(self, layer: int, out) -> None:
        routing_map = out[1].detach()
        rr = self.instances[layer]
        if rr.router_replay_action == self._Action.REPLAY_BACKWARD:
            self._recompute_maps[layer] = routing_map
        else:
            self._forward_maps[layer] = routing_map
        if (
            self.check_routing_map
            and self._mode == "replay"
            and rr.router_replay_action == self._Action.REPLAY_FORWARD
            and not (
                bool(routing_map.gather(1, self._targets[layer]).all())
                and bool((routing_map.sum(dim=1) == self.config.num_experts_per_tok).all())
            )
        ):
            raise RuntimeError(f"MegatronReplay: layer {layer} dispatched tokens to experts other than the replayed ones")

    # ------------------------------------------------------------------------------ readouts
    def last_routes(self) -> torch.Tensor:
        """Routes Megatron dispatched in the last forward: ``[B, S, L, k]`` int64, ids ascending."""
        return self._maps_to_routes(self._forward_maps)

    def last_recompute_routes(self) -> torch.Tensor:
        """Routes Megatron dispatched in the last activation recompute (backward): ``[B, S, L, k]``."""
        return self._maps_to_routes(self._recompute_maps)

    def _maps_to_routes(self, maps) -> torch.Tensor:
        if any(m is None for m in maps):
            raise RuntimeError("MegatronReplay: no routing map captured (no forward, or it ran outside a mode)")
        k = self.config.num_experts_per_tok
        per_layer = []
        for m in maps:
            n, e = m.shape
            per_layer.append(torch.arange(e).expand(n, e)[m.cpu()].view(n, k))
        return _sb_to_routes(per_layer, self._batch)


# ---------------------------------------------------------------------------------- one call
@dataclass
class MegatronLogprobs:
    """Result of :func:`megatron_logprobs`.

    logprobs ``[B, S-1]``: ``logprobs[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])``, 0 where
    ``mask`` is False; mask ``[B, S-1]``: ``t < seq_lengths[b] - 1``; logits ``[B, S, V]``;
    routes ``[B, S, L, k]`` Megatron dispatched (None in native mode); trace: the recorded trace
    (``mode="record"``); stats: replay counts (``mode="replay"``).
    """

    logprobs: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    routes: torch.Tensor | None = None
    trace: RoutingTrace | None = None
    stats: dict = field(default_factory=dict)


def megatron_logprobs(
    model,
    tokens: torch.Tensor,
    seq_lengths: Sequence[int],
    trace: RoutingTrace | None = None,
    mode: str | None = None,
    *,
    temperature: float = 1.0,
    invalid_rows: str = "native",
) -> MegatronLogprobs:
    """Next-token log-probs of a right-padded batch from a Megatron ``GPTModel``, in one call.

    Args:
        tokens: ``[B, S]`` token ids, sequence ``b`` in ``tokens[b, :seq_lengths[b]]``.
        seq_lengths: tokens per sequence (prompt + response).
        trace: routes to replay (``n_i - 1`` rows per sequence, e.g. captured by vLLM).
        mode: ``"replay"`` (default when ``trace`` is given; REPLAY_FORWARD, and REPLAY_BACKWARD
            under recompute), ``"record"`` (RECORD: returns the trace Megatron chose), ``"native"``
            (default without a trace).
        invalid_rows: see :meth:`MegatronReplay.replay_forward`.

    Runs with gradient when grad is enabled (call ``.logprobs`` ... ``.backward()`` afterwards; under
    recompute the routers are already switched to REPLAY_BACKWARD).
    """
    from ..logprobs import next_token_logprobs

    if mode is None:
        mode = "replay" if trace is not None else "native"
    if mode not in ("native", "record", "replay"):
        raise ValueError(f"megatron_logprobs: mode must be 'native', 'record' or 'replay', got {mode!r}")
    if mode == "replay" and trace is None:
        raise ValueError("megatron_logprobs: mode='replay' needs a trace")
    if mode != "replay" and trace is not None:
        raise ValueError(f"megatron_logprobs: a trace was given but mode={mode!r}")
    seq_lengths = [int(n) for n in seq_lengths]
    b, s = tokens.shape
    if len(seq_lengths) != b or any(n < 1 or n > s for n in seq_lengths):
        raise ValueError(f"megatron_logprobs: seq_lengths {seq_lengths} do not fit tokens of shape {(b, s)}")

    rep = MegatronReplay.of(model)
    out = MegatronLogprobs(logprobs=None, mask=None, logits=None)  # type: ignore[arg-type]
    if mode == "native":
        logits = megatron_forward(model, tokens)
    elif mode == "record":
        with rep.record() as rec:
            logits = megatron_forward(model, tokens)
        out.trace = rec.trace(seq_lengths)
        out.routes = rep.last_routes()
    else:
        with rep.replay_forward(trace, seq_lengths, invalid_rows=invalid_rows) as stats:
            logits = megatron_forward(model, tokens)
        out.stats = {"replayed_rows": stats.replayed_rows, "native_rows": stats.native_rows, "forwards": stats.forwards}
        out.routes = rep.last_routes()
    lengths = torch.tensor(seq_lengths)
    out.mask = torch.arange(s - 1)[None, :] < (lengths - 1)[:, None]
    logp = next_token_logprobs(logits, tokens, temperature)
    out.logprobs = torch.where(out.mask, logp, torch.zeros_like(logp))
    out.logits = logits
    return out

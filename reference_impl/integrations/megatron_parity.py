"""The model-parallel parity check: replay under a megatron layout against one process, on real ranks.

Every rank of a job (``torchrun``, or the forked ranks of the tests) runs the same step through
megatron's own schedule (``get_forward_backward_func``, ``M`` micro-batches) and the checks compare
what all ranks produced, gathered to full shape, with a one-process reference computed from the
same weights (:class:`ParityReference`, our :class:`~reference_impl.MoEForCausalLM`, fp32):

* native log-probs; R2: the routes RECORDed on every rank and micro-batch, re-assembled
  (:meth:`MegatronRecording.global_trace`), equal the reference's recorded trace;
* REPLAY_FORWARD of a trace: log-probs, and the routes megatron dispatched on every rank,
  re-assembled, equal the trace on every traced row;
* replay of another trace with backward: log-probs, routes, every parameter's gradient gathered to
  full shape (``‖g − g_ref‖ ≤ tol·‖g_ref‖``, exactly 0 where ``g_ref`` is), and every replay queue
  empty after the step.

A rank's own "dispatched == my target" check cannot catch a slicing bug (megatron obeys whatever it
is given); only these global comparisons can, which is why the negative controls (:data:`CONTROLS`)
run the same checks with a known-wrong slicing and must fail them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..layers import LayerMap
from ..routing import RoutingTrace
from ..slicing import ParallelLayout, batch_rows, sequence_positions, slice_routes

__all__ = ["LAYOUTS", "CONTROLS", "ParityReference", "parity_reference", "init_layout", "build_layout_model", "run_parity"]

# name -> (init_megatron_cpu sizes, TransformerConfig overrides, recompute)
LAYOUTS: dict[str, dict] = {
    "ep2_alltoall": dict(sizes=dict(expert_model_parallel_size=2), config=dict(moe_token_dispatcher_type="alltoall")),
    "ep2_allgather": dict(sizes=dict(expert_model_parallel_size=2), config={}),
    "tp2_sp": dict(sizes=dict(tensor_model_parallel_size=2), config={}),
    "pp2": dict(sizes=dict(pipeline_model_parallel_size=2), config={}),
    "pp2_recompute": dict(sizes=dict(pipeline_model_parallel_size=2), config={}, recompute=True),
    "cp2": dict(sizes=dict(context_parallel_size=2), config={}),
    "tp2_sp_ep2": dict(sizes=dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1), config={}),
    "cp2_ep2": dict(sizes=dict(context_parallel_size=2, expert_model_parallel_size=2), config={}),
}


# ------------------------------------------------------------------ negative controls (known-wrong slicing)
def _batch_major(grid, layout, microbatch, layer_map):
    """Bug: the trace flattened batch-major (row ``b*S + s``) but read as megatron's s-major rows."""
    S, B = grid.shape[:2]
    misread = grid.transpose(0, 1).reshape(S * B, *grid.shape[2:]).view(S, B, *grid.shape[2:])
    return slice_routes(misread, layout, microbatch, layer_map)


def _contiguous_rows(grid, layout, microbatch, layer_map):
    """Bug: each rank and micro-batch takes a contiguous block of the flattened ``[S*B]`` rows."""
    S, B = grid.shape[:2]
    parts = layout.dp * layout.num_microbatches
    block = grid.reshape(S * B, *grid.shape[2:]).chunk(parts)[layout.dp_rank * layout.num_microbatches + microbatch]
    local = block.view(S, B // parts, *grid.shape[2:])
    one = dataclasses.replace(layout, dp=1, dp_rank=0, num_microbatches=1)
    return slice_routes(local, one, 0, layer_map)


def _first_stage_layers(grid, layout, microbatch, layer_map):
    """Bug: every pipeline stage is given the first stage's layers (a global layer list indexed locally)."""
    return slice_routes(grid, dataclasses.replace(layout, pp_rank=0), microbatch, layer_map)


def _contiguous_cp(grid, layout, microbatch, layer_map):
    """Bug: context parallelism split into ``cp`` contiguous chunks instead of the zigzag."""
    S = grid.shape[0]
    chunk = torch.arange(S).chunk(layout.cp)[layout.cp_rank]
    return slice_routes(grid[chunk], dataclasses.replace(layout, cp=1, cp_rank=0), microbatch, layer_map)


# name -> (slicer, skip REPLAY_BACKWARD under recompute)
CONTROLS: dict[str, tuple[Callable, bool]] = {
    "batch_major": (_batch_major, False),
    "contiguous_rows": (_contiguous_rows, False),
    "first_stage_layers": (_first_stage_layers, False),
    "contiguous_cp": (_contiguous_cp, False),
    "no_replay_backward": (slice_routes, True),
}


# --------------------------------------------------------------------------------- reference
@dataclass
class ParityReference:
    """One-process results for the check (reference model, fp32), shared by every rank."""

    tokens: torch.Tensor  # [B, S]
    lengths: list[int]
    weights: torch.Tensor  # [B, S-1] per-token loss weights
    mask: torch.Tensor  # [B, S-1] scored tokens
    full_state: dict[str, torch.Tensor]  # megatron names, full shapes
    native_trace: RoutingTrace
    native_logprobs: torch.Tensor
    replay_trace: RoutingTrace
    replay_logprobs: torch.Tensor
    grad_trace: RoutingTrace
    grad_logprobs: torch.Tensor
    grads: dict[str, torch.Tensor]  # megatron names, full shapes
    num_experts: int = 8

    def loss(self, logprobs: torch.Tensor) -> torch.Tensor:
        """The step's loss: ``-Σ w·logp / N`` over scored tokens (N = their count)."""
        return -(logprobs * self.weights * self.mask).sum() / self.mask.sum()


def _perturbed(trace: RoutingTrace, seed: int, experts: int) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    n, L, k = trace.expert_ids.shape
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(n * L)]).view(n, L, k)
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq)


def parity_reference(ref, tokens: torch.Tensor, lengths: list[int], seed: int = 0) -> ParityReference:
    """The reference numbers for :func:`run_parity` from our :class:`~reference_impl.MoEForCausalLM` ``ref``.

    ``replay_trace`` draws every route from all experts; ``grad_trace`` only from experts
    ``0 .. E-3``, so the last two experts get exactly zero gradient.
    """
    from ..logprobs import next_token_logprobs
    from ..replay import record_routing, replay_routing
    from .megatron_cpu import megatron_state_dict

    cfg = ref.config
    E = cfg.num_experts
    B, S = tokens.shape
    mask = (torch.arange(S - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()
    weights = 0.5 + torch.rand(B, S - 1, generator=torch.Generator().manual_seed(seed + 1))
    ref.eval()
    with torch.no_grad(), record_routing(ref) as rec:
        native_lp = next_token_logprobs(ref(tokens).logits, tokens)
    native = rec.trace(lengths)
    replay_trace = _perturbed(native, seed + 2, E)
    with torch.no_grad(), replay_routing(ref, replay_trace, seq_lengths=lengths):
        replay_lp = next_token_logprobs(ref(tokens).logits, tokens)
    grad_trace = _perturbed(native, seed + 3, E - 2)
    ref.zero_grad()
    with replay_routing(ref, grad_trace, seq_lengths=lengths):
        grad_lp = next_token_logprobs(ref(tokens).logits, tokens)
    out = ParityReference(tokens, list(lengths), weights, mask, {}, native, native_lp * mask, replay_trace,
                          replay_lp * mask, grad_trace, grad_lp.detach() * mask, {}, E)
    out.loss(grad_lp).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in ref.named_parameters()}
    out.grads = megatron_state_dict(grads, cfg)
    out.full_state = megatron_state_dict(ref.state_dict(), cfg)
    ref.zero_grad()
    return out


# ------------------------------------------------------------------------------ rank side
def init_layout(name: str) -> tuple[str, ...]:
    """Join the running process group and set megatron's parallel sizes of layout ``name``."""
    from .megatron_cpu import init_megatron_cpu

    return init_megatron_cpu(**LAYOUTS[name]["sizes"])


def build_layout_model(name: str, reference_model):
    """This rank's ``GPTModel`` of layout ``name`` holding ``reference_model``'s weights (logits gathered over TP)."""
    from .megatron_cpu import build_megatron_model

    spec = LAYOUTS[name]
    return build_megatron_model(reference_model, recompute=spec.get("recompute", False), parallel_output=False, **spec["config"])


def _microbatches(ref: ParityReference, layout: ParallelLayout) -> list[dict]:
    B, S = ref.tokens.shape
    pos = sequence_positions(layout, S, router=False)
    out = []
    for m in range(layout.num_microbatches):
        rows = batch_rows(layout, B, m)
        out.append(dict(rows=rows, pos=pos, tokens=ref.tokens[rows][:, pos], position_ids=pos.expand(len(rows), -1).contiguous()))
    return out


def schedule_step(model, ref: ParityReference, layout: ParallelLayout, *, forward_only: bool) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One step of megatron's schedule over the micro-batches; returns this rank's log-prob pieces."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .megatron import causal_attention_mask

    B, S = ref.tokens.shape
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    M = layout.num_microbatches

    def loss_func(mb, logits):  # logits [b, s_cp, V] (gathered over TP)
        rows, pos = mb["rows"], mb["pos"]
        nxt = (pos + 1).clamp(max=S - 1)
        labels = ref.tokens[rows][:, nxt]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None])[..., 0]
        keep = (pos < S - 1)[None, :].float()
        lp = lp * keep
        cols = pos.clamp(max=S - 2)
        w = ref.weights[rows][:, cols] * ref.mask[rows][:, cols] * keep
        pieces.append((rows, pos, (lp * ref.mask[rows][:, cols] * keep).detach()))
        loss = -(lp * w).sum() / ref.mask.sum()
        # megatron's schedule multiplies a 2-tuple loss by the CP size and divides it by M
        return loss * M / layout.cp, {}

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(input_ids=mb["tokens"], position_ids=mb["position_ids"],
                    attention_mask=causal_attention_mask(len(mb["pos"])))
        return out, partial(loss_func, mb)

    mbs = _microbatches(ref, layout)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=M,
        seq_length=S, micro_batch_size=len(mbs[0]["rows"]), forward_only=forward_only,
    )
    return pieces


def _gather_logprobs(pieces, B: int, S: int) -> torch.Tensor:
    """Log-prob pieces of every rank -> the global ``[B, S-1]`` (first writer wins among TP duplicates)."""
    import torch.distributed as dist

    part = torch.full((B, S), float("nan"))
    for rows, pos, lp in pieces:
        part[rows[:, None], pos[None, :]] = lp
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, part)
    out = torch.full((B, S), float("nan"))
    for p in parts:
        out = torch.where(torch.isnan(out), p, out)
    return out[:, : S - 1]


def _routes_equal_trace(rep, trace: RoutingTrace, lengths, S: int, layer_map: LayerMap) -> bool:
    """Routes megatron dispatched on every rank and micro-batch, re-assembled, equal the trace on every traced row."""
    from ..slicing import assemble_routes
    from .megatron import all_gather_pieces

    grid = assemble_routes(all_gather_pieces(rep.dispatched), S, len(lengths), layer_map)  # [S, B, L, k]
    got = RoutingTrace.from_padded(grid.transpose(0, 1), lengths, trace.num_experts)
    want = trace.expert_ids.long().sort(-1).values
    have = got.expert_ids.long().sort(-1).values
    return bool((want == have).all(-1).all(-1)[trace.valid].all())


def _grad_errors(model, ref: ParityReference) -> tuple[float, bool, int]:
    """(max relative error over parameters, exact zeros where the reference is zero, parameters compared)."""
    from .megatron_cpu import gather_full_grads

    full = gather_full_grads(model, {n: t.shape for n, t in ref.full_state.items()})
    worst, zeros_ok = 0.0, True
    for name, g_ref in ref.grads.items():
        g = full[name]
        ref_norm = float(g_ref.norm())
        err = float((g - g_ref).norm())
        worst = max(worst, err / ref_norm if ref_norm > 0 else (0.0 if err == 0 else float("inf")))
        zeros_ok = zeros_ok and bool((g[g_ref == 0] == 0).all())
    return worst, zeros_ok, len(ref.grads)


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    if torch.isnan(a[mask.bool()]).any():
        return float("inf")
    return float(((a - b).abs() * mask).nan_to_num(0.0).max())


def run_parity(name: str, model, ref: ParityReference, *, num_microbatches: int = 2, controls: tuple[str, ...] = (),
               tol: float = 1e-5, timings: bool = False) -> dict:
    """The full check of layout ``name`` on this rank (collective: every rank calls it); the same dict on every rank."""
    from .megatron import MegatronReplay

    B, S = ref.tokens.shape
    # --8<-- [start:setup]
    layout = ParallelLayout.from_megatron(model.config, num_microbatches)  # sizes and ranks from parallel_state
    rep = MegatronReplay(model)  # sizes from model.config; this stage's MoE routers only
    # --8<-- [end:setup]
    lm = rep.sizes.layer_map
    out: dict = {"layout": name, "ranks": {k: getattr(layout, k) for k in ("dp", "pp", "cp", "tp", "sequence_parallel")},
                 "ep": model.config.expert_model_parallel_size, "num_microbatches": num_microbatches,
                 "dispatcher": model.config.moe_token_dispatcher_type, "recompute": model.config.recompute_granularity}

    # native + R2 RECORD
    with torch.no_grad(), rep.record(layout) as rec:
        lp = _gather_logprobs(schedule_step(model, ref, layout, forward_only=True), B, S)
    out["native_logprobs_max_diff"] = _max_diff(lp, ref.native_logprobs, ref.mask)
    out["record_equals_reference"] = rec.global_trace(ref.lengths, S) == ref.native_trace

    # REPLAY_FORWARD of a trace
    with torch.no_grad(), rep.replay_forward(ref.replay_trace, layout=layout):
        lp = _gather_logprobs(schedule_step(model, ref, layout, forward_only=True), B, S)
    out["replay_logprobs_max_diff"] = _max_diff(lp, ref.replay_logprobs, ref.mask)
    out["replay_routes_equal_trace"] = _routes_equal_trace(rep, ref.replay_trace, ref.lengths, S, lm)

    # replay with backward (and each negative control: the same checks, known-wrong slicing)
    for label in ("replay_grad", *controls):
        slicer, skip_backward = (slice_routes, False) if label == "replay_grad" else CONTROLS[label]
        model.zero_grad()
        if skip_backward:
            rep.replay_backward = lambda: None  # the bug: routers stay on REPLAY_FORWARD for the recompute
        try:
            t0 = time.perf_counter()
            # --8<-- [start:replay_step]
            # every rank: the GLOBAL trace, this rank's layout; megatron's schedule runs the micro-batches
            with rep.replay_forward(ref.grad_trace, layout=layout, slicer=slicer):
                lp = _gather_logprobs(schedule_step(model, ref, layout, forward_only=False), B, S)
            # --8<-- [end:replay_step]
            seconds = time.perf_counter() - t0
        finally:
            rep.__dict__.pop("replay_backward", None)
        r = {"logprobs_max_diff": _max_diff(lp, ref.grad_logprobs, ref.mask),
             "routes_equal_trace": _routes_equal_trace(rep, ref.grad_trace, ref.lengths, S, lm)}
        try:
            # --8<-- [start:drained]
            rep.check_drained()  # every router's recompute FIFO is empty after the step (names the layer otherwise)
            # --8<-- [end:drained]
            r["queues_empty"], r["queue_error"] = True, ""
        except RuntimeError as e:
            r["queues_empty"], r["queue_error"] = False, str(e)
        rep.clear()
        r["grad_rel_max"], r["grad_zeros_exact"], r["grad_params"] = _grad_errors(model, ref)
        r["passes"] = bool(r["logprobs_max_diff"] <= tol and r["routes_equal_trace"] and r["queues_empty"]
                           and r["grad_rel_max"] <= tol and r["grad_zeros_exact"])
        if timings:
            r["seconds"] = seconds
        out[label] = r
    rep.close()
    return out


# Which negative controls each layout runs (each must be caught by the checks above).
LAYOUT_CONTROLS: dict[str, tuple[str, ...]] = {
    "ep2_alltoall": ("contiguous_rows",),
    "ep2_allgather": ("batch_major", "contiguous_rows"),
    "tp2_sp": ("batch_major",),
    "pp2": ("first_stage_layers", "contiguous_rows"),
    "pp2_recompute": ("no_replay_backward", "first_stage_layers"),
    "cp2": ("contiguous_cp", "batch_major"),
    "tp2_sp_ep2": ("contiguous_rows",),
    "cp2_ep2": ("contiguous_cp",),
}


def tiny_reference_model(num_layers: int = 4):
    """The tiny Qwen3-MoE of the checks: 4 layers, 8 experts, top-2, well-separated router logits (std 0.5)."""
    from ..model import MoEConfig, MoEForCausalLM

    torch.manual_seed(0)
    cfg = MoEConfig(vocab_size=64, num_experts=8, num_hidden_layers=num_layers, router_initializer_range=0.5, initializer_range=0.1)
    return MoEForCausalLM(cfg).eval()


def tiny_batch(lengths=(16, 12, 16, 9), seed: int = 1) -> tuple[torch.Tensor, list[int]]:
    """A right-padded ``[4, 16]`` batch (4 rows: dp=2 x 2 micro-batches; 16 positions: 2·cp x tp chunks)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64, (len(lengths), max(lengths)), generator=g)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
    return tokens, list(lengths)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(fn: Callable[[int, int], None], world_size: int = 2, timeout: float = 60.0) -> list[int]:
    """Run ``fn(rank, port)`` in ``world_size`` forked processes (ranks of one gloo job on 127.0.0.1).

    Forking after the parent imported torch and megatron costs nothing per layout (the imports are
    the slow part). Children exit with ``os._exit``; the exit codes are returned, and ranks still
    running after ``timeout`` seconds are killed (code -9).
    """
    import os
    import signal

    port = _free_port()
    pids = []
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fn(rank, port)
                code = 0
            except BaseException:  # noqa: BLE001 - reported by the exit code and the traceback
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        pids.append(pid)
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            codes[pid] = -9
    return [codes[p] for p in pids]


def init_rank(rank: int, port: int, world_size: int = 2) -> None:
    """Join a gloo job of ``world_size`` ranks on 127.0.0.1:``port`` (bounded rendezvous)."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))


# --------------------------------------------------------------- a user-built model with dense layers
DENSE_LAYOUT = "pp2_dense"
DENSE_PATTERN = [0, 1, 1, 1]  # moe_layer_freq: decoder layer 0 is dense; stage 0 = layers 0-1, stage 1 = layers 2-3


def build_user_model(moe_layer_freq=DENSE_PATTERN, seed: int = 0):
    """A ``GPTModel`` built the way a user builds one: megatron's decoder block spec (dense and MoE
    layers from ``moe_layer_freq``), megatron's own random initialization, this rank's pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.router_replay import RouterReplay

    from .megatron_cpu import megatron_config

    cfg = tiny_reference_model().config
    RouterReplay.clear_global_router_replay_instances()
    torch.manual_seed(seed + ps.get_pipeline_model_parallel_rank())
    tcfg = megatron_config(cfg, moe_layer_freq=list(moe_layer_freq))
    spec = get_gpt_decoder_block_spec(tcfg, use_transformer_engine=False, normalization="RMSNorm")
    return GPTModel(tcfg, spec, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_position_embeddings,
                    position_embedding_type="rope", rotary_base=int(cfg.rope_theta), parallel_output=False,
                    share_embeddings_and_output_weights=False, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage()).train()


def run_dense_check(model, tokens: torch.Tensor, lengths: list[int], *, num_microbatches: int = 2, seed: int = 0) -> dict:
    """Replay on a user-built model with dense layers under PP (collective). No one-process reference
    exists for random megatron weights, so the checks are self-consistency ones that a wrong layer
    mapping fails: each stage's routers are its ``LayerMap.stage`` ordinals; replaying the recorded
    (R2) trace reproduces the native log-probs; a replayed trace is what megatron dispatched on every
    stage, re-assembled; queues drain. (A slicing that gives a stage another stage's layers fails
    loudly here: with dense layers the stages hold different numbers of MoE layers, and
    :class:`MegatronReplay` refuses a slice of the wrong shape.)"""
    from .megatron import MegatronReplay

    B, S = tokens.shape
    mask = (torch.arange(S - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()
    ref = ParityReference(tokens, list(lengths), torch.ones(B, S - 1), mask, {}, None, None, None, None, None, None, {})
    layout = ParallelLayout.from_megatron(model.config, num_microbatches)
    rep = MegatronReplay(model)
    lm = rep.sizes.layer_map
    out = {"layout": DENSE_LAYOUT, "pattern": list(lm.pattern), "stage_ordinals": list(rep.ordinals),
           "stage_expected": list(lm.stage(layout.pp_rank, layout.pp)), "decoder_layers": list(rep.decoder_layers)}
    with torch.no_grad(), rep.record(layout) as rec:
        native = _gather_logprobs(schedule_step(model, ref, layout, forward_only=True), B, S)
    recorded = rec.global_trace(lengths, S)
    with torch.no_grad(), rep.replay_forward(recorded, layout=layout):
        replayed = _gather_logprobs(schedule_step(model, ref, layout, forward_only=True), B, S)
    out["r2_replay_logprobs_max_diff"] = _max_diff(replayed, native, mask)
    out["r2_routes_equal_record"] = _routes_equal_trace(rep, recorded, lengths, S, lm)
    other = _perturbed(recorded, seed + 5, recorded.num_experts)
    for label in ("replay",):
        model.zero_grad()
        with rep.replay_forward(other, layout=layout):
            schedule_step(model, ref, layout, forward_only=False)
        r = {"routes_equal_trace": _routes_equal_trace(rep, other, lengths, S, lm)}
        try:
            rep.check_drained()
            r["queues_empty"] = True
        except RuntimeError:
            r["queues_empty"] = False
        rep.clear()
        out[label] = r
    out["stage_ordinals_all"] = _gather_ints(rep.ordinals, 3)
    rep.close()
    return out


def _gather_ints(values: list[int], width: int) -> list[list[int]]:
    """Every rank's short int list (padded with -1 to ``width``), in rank order."""
    import torch.distributed as dist

    t = torch.full((width,), -1, dtype=torch.long)
    t[: len(values)] = torch.tensor(values, dtype=torch.long)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return [[v for v in p.tolist() if v >= 0] for p in parts]


def run_layouts(names: list[str] | None = None, timeout: float = 90.0, log=print) -> dict:
    """Every layout in ``names`` (default: all) on 2 forked gloo ranks with its negative controls.

    Imports torch and megatron once in this process, computes the one-process reference once,
    then forks 2 ranks per layout. Returns ``{layout: run_parity result + exit_codes + seconds}``.
    Forks this process: call it from a script or a subprocess (``python -m
    reference_impl.integrations.megatron_parity OUT.json [LAYOUT ...]``), not from a notebook kernel.
    """
    import json
    import os
    import tempfile

    import megatron.core.models.gpt  # noqa: F401 - imported once, before the forks
    import megatron.core.pipeline_parallel  # noqa: F401

    from .megatron_cpu_shims import apply_cpu_shims

    torch.set_num_threads(1)
    apply_cpu_shims()
    ref_model = tiny_reference_model()
    tokens, lengths = tiny_batch()
    ref = parity_reference(ref_model, tokens, lengths)
    tmp = tempfile.mkdtemp(prefix="megatron_parallel_")
    results: dict = {}
    for name in names or [*LAYOUTS, DENSE_LAYOUT]:
        if name not in LAYOUTS and name != DENSE_LAYOUT:
            raise ValueError(f"run_layouts: unknown layout {name!r}; known: {sorted([*LAYOUTS, DENSE_LAYOUT])}")
        path = os.path.join(tmp, f"{name}.json")

        def rank_main(rank: int, port: int, name=name, path=path) -> None:
            from .megatron_cpu import init_megatron_cpu

            init_rank(rank, port)
            if name == DENSE_LAYOUT:
                init_megatron_cpu(pipeline_model_parallel_size=2)
                res = run_dense_check(build_user_model(), tokens, lengths)
            else:
                init_layout(name)
                model = build_layout_model(name, ref_model)
                res = run_parity(name, model, ref, controls=LAYOUT_CONTROLS[name])
            if rank == 0:
                with open(path, "w") as f:
                    json.dump(res, f)

        t0 = time.perf_counter()
        codes = fork_ranks(rank_main, 2, timeout)
        res = json.load(open(path)) if os.path.exists(path) else {}
        res.update(exit_codes=codes, seconds=time.perf_counter() - t0)
        results[name] = res
        log(f"{name}: {res['seconds']:.1f} s, exit codes {codes}")
    return results


def main(argv: list[str] | None = None) -> int:
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m reference_impl.integrations.megatron_parity OUT.json [LAYOUT ...]")
        return 2
    results = run_layouts(args[1:] or None, log=lambda s: print(s, flush=True))
    with open(args[0], "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(r["exit_codes"] == [0, 0] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())

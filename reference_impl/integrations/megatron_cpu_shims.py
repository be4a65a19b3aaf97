"""Small patches that let megatron-core 0.16.1 run a ``GPTModel`` with MoE on a CPU-only machine, under model parallelism too.

megatron-core assumes CUDA in a handful of places that a world-size-1, local-spec, fp32 model still
reaches. :func:`apply_cpu_shims` patches exactly those, and nothing else:

1. ``torch.cuda.current_device()`` (rotary embedding, ``Router.gating``, the global memory buffer)
   returns the CPU device instead of raising.
2. ``get_default_causal_mask`` (the mask the local softmax builds when no ``attention_mask`` is
   passed) is built on the CPU instead of ``device="cuda"``. Our forward passes an explicit mask
   anyway; the shim only keeps a bare ``model(...)`` call from failing.
3. ``CudaRNGStatesTracker.fork()`` (the RNG context around attention dropout) becomes a no-op
   context: it would read and write the CUDA RNG state. Harmless with attention dropout 0, which the
   loader enforces.
4. ``moe_utils.te_general_gemm`` is defined as ``None`` when Transformer Engine is absent (its failed
   import leaves the name undefined, and ``RouterGatingLinearFunction`` reads it: ``NameError``).
5. ``tensor_parallel.random._get_all_rng_states`` / ``_set_all_rng_states`` (used by activation
   recompute, ``recompute_granularity="full"``) save and restore only the CPU RNG state instead of
   calling ``torch.cuda.get_rng_state``.

Model parallelism (gloo ranks) reaches five more:

6. ``WrappedTorchNorm`` (the norm picked without Apex) refuses ``sequence_parallel``: build the torch
   norm anyway and tag its weight ``sequence_parallel`` (as megatron's fused norms do).
7. ``get_pos_emb_on_this_cp_rank`` (RoPE under context parallelism) moves its index with ``.cuda()``.
8. The local ``DotProductAttention`` refuses context parallelism (Transformer Engine only): under
   CP it all-gathers K/V over the CP group and masks causally by global (zigzag) positions. This
   exercises megatron's CP plumbing and the replay slicing, not Transformer Engine's ring attention.
9. The pipeline schedules allocate their token counter with ``device="cuda"``.
10. The ``alltoall`` token dispatcher uses a CUDA side stream/event for its device-to-host copies,
    and its split sizes stay CPU tensors (``all_to_all_single`` wants Python/numpy ints).

The patches are process-wide (they touch ``torch.cuda`` and megatron's modules), applied only when
CUDA is unavailable, and idempotent. Run megatron in its own process when anything else in that
process must see the unpatched ``torch.cuda``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["apply_cpu_shims", "shims_applied"]

_APPLIED: list[str] = []
_MARK = "_reference_impl_cpu_shim"


def shims_applied() -> tuple[str, ...]:
    """Names of the shims applied in this process (empty on a CUDA machine)."""
    return tuple(_APPLIED)


def _mark(fn):
    setattr(fn, _MARK, True)
    return fn


def _is_shim(fn) -> bool:
    return getattr(fn, _MARK, False)


def apply_cpu_shims() -> tuple[str, ...]:
    """Apply the CPU patches if CUDA is unavailable; return the names applied (idempotent)."""
    if torch.cuda.is_available():
        return ()

    # 1. torch.cuda.current_device() raises without a CUDA driver; megatron only uses its result as a
    #    `device=` argument (rotary inv_freq, Router.gating's weight move, GlobalMemoryBuffer).
    if not _is_shim(torch.cuda.current_device):
        torch.cuda.current_device = _mark(lambda: torch.device("cpu"))
        _APPLIED.append("torch.cuda.current_device -> cpu")

    # 2. The local softmax builds its default causal mask with device="cuda" when attention_mask is None.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    if not _is_shim(fused_softmax.get_default_causal_mask):

        @_mark
        def get_default_causal_mask(sq: int) -> torch.Tensor:
            return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

        fused_softmax.get_default_causal_mask = get_default_causal_mask
        transformer_utils.get_default_causal_mask = get_default_causal_mask
        _APPLIED.append("get_default_causal_mask on cpu")

    # 3. Attention dropout runs inside get_cuda_rng_tracker().fork(), which swaps the CUDA RNG state.
    from megatron.core.tensor_parallel import random as tp_random

    if not _is_shim(tp_random.CudaRNGStatesTracker.fork):

        @_mark
        @contextlib.contextmanager
        def fork(self, name=None):
            yield

        tp_random.CudaRNGStatesTracker.fork = fork
        _APPLIED.append("CudaRNGStatesTracker.fork -> no-op (dropout must be 0)")

    # 4. Without Transformer Engine, moe_utils' `from ...transformer_engine import te_general_gemm`
    #    fails and leaves the name undefined; RouterGatingLinearFunction then raises NameError.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _APPLIED.append("moe_utils.te_general_gemm = None")

    # 5. Activation recompute (CheckpointFunction) saves/restores all RNG states, CUDA ones included.
    if not _is_shim(tp_random._get_all_rng_states):

        @_mark
        def _get_all_rng_states():
            return torch.get_rng_state(), None, None

        @_mark
        def _set_all_rng_states(cpu_rng_state, cuda_rng_state=None, cuda_rng_state_tracker=None):
            torch.set_rng_state(cpu_rng_state)

        tp_random._get_all_rng_states = _get_all_rng_states
        tp_random._set_all_rng_states = _set_all_rng_states
        _APPLIED.append("tensor_parallel.random RNG save/restore: cpu state only")

    _apply_parallel_shims()
    return shims_applied()


def _apply_parallel_shims() -> None:
    # 6. Without Apex the norm is WrappedTorchNorm, which asserts `not config.sequence_parallel`.
    from megatron.core.transformer import torch_norm

    if not _is_shim(torch_norm.WrappedTorchNorm.__new__):
        original_new = torch_norm.WrappedTorchNorm.__new__

        @_mark
        def norm_new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
            sp = config.sequence_parallel
            config.sequence_parallel = False  # the assert only; the norm itself is per-token
            try:
                norm = original_new(cls, config, hidden_size, eps, *args, **kwargs)
            finally:
                config.sequence_parallel = sp
            for p in norm.parameters():
                setattr(p, "sequence_parallel", sp)  # megatron all-reduces these grads over TP
            return norm

        torch_norm.WrappedTorchNorm.__new__ = norm_new
        _APPLIED.append("WrappedTorchNorm accepts sequence_parallel (tags its weight)")

    # 7. RoPE's CP slice builds its index on pinned memory and calls .cuda().
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    if not _is_shim(rope_utils.get_pos_emb_on_this_cp_rank):

        @_mark
        def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
            cp_size, cp_rank = cp_group.size(), cp_group.rank()
            cp_idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1])
            pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
            pos_emb = pos_emb.index_select(seq_dim, cp_idx)
            return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])

        rope_utils.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank
        _APPLIED.append("get_pos_emb_on_this_cp_rank on cpu")

    # 8. Local attention asserts context_parallel_size == 1 (TE only): all-gather K/V instead.
    from megatron.core.transformer import dot_product_attention as dpa

    if not _is_shim(dpa.DotProductAttention.forward):
        _patch_attention_for_cp(dpa.DotProductAttention)
        _APPLIED.append("DotProductAttention under CP: all-gather K/V, causal mask by global position")

    # 9. The schedules' token counter: torch.zeros([], dtype=torch.int, device="cuda").
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _CpuTorch):
        schedules.torch = _CpuTorch()
        _APPLIED.append("pipeline schedules: device='cuda' tensors on cpu")

    # 10. alltoall dispatcher: CUDA side stream/event for its D2H copies; splits must be ints.
    from megatron.core.transformer.moe import token_dispatcher

    if not _is_shim(token_dispatcher.maybe_move_tensor_to_cpu):

        @_mark
        def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
            return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor

        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
        torch.cuda.Stream = _FakeStream
        torch.cuda.current_stream = _mark(lambda device=None: _FAKE_STREAM)
        torch.cuda.stream = _mark(lambda stream=None: contextlib.nullcontext())
        _APPLIED.append("alltoall dispatcher: no-op CUDA stream/event, numpy split sizes")


class _FakeEvent:
    def synchronize(self) -> None:  # CPU copies are synchronous
        pass


class _FakeStream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> _FakeEvent:
        return _FakeEvent()


_FAKE_STREAM = _FakeStream()


class _CpuTorch:
    """``torch`` for megatron's schedules module, with ``device="cuda"`` in ``torch.zeros`` mapped to the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; backward sums every rank's gradient and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, group):
        import torch.distributed as dist

        ctx.group, ctx.n = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = ctx.group.rank()
        return grad[r * ctx.n : (r + 1) * ctx.n], None


def _cp_positions(cp_size: int, cp_rank: int, local_len: int) -> torch.Tensor:
    per = local_len // 2
    return torch.cat([torch.arange(cp_rank * per, (cp_rank + 1) * per),
                      torch.arange((2 * cp_size - 1 - cp_rank) * per, (2 * cp_size - cp_rank) * per)])


def _patch_attention_for_cp(cls) -> None:
    original_init, original_forward = cls.__init__, cls.forward

    @_mark
    def __init__(self, config, *args, **kwargs):
        cp = config.context_parallel_size
        config.context_parallel_size = 1  # the assert only
        try:
            original_init(self, config, *args, **kwargs)
        finally:
            config.context_parallel_size = cp

    @_mark
    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        if self.config.context_parallel_size == 1:
            return original_forward(self, query, key, value, attention_mask, *args, **kwargs)
        from megatron.core import parallel_state

        group = parallel_state.get_context_parallel_group()
        cp, rank, sq = group.size(), group.rank(), query.shape[0]
        key, value = _GatherCP.apply(key, group), _GatherCP.apply(value, group)
        q_pos = _cp_positions(cp, rank, sq)
        k_pos = torch.cat([_cp_positions(cp, r, sq) for r in range(cp)])
        mask = (k_pos[None, :] > q_pos[:, None])[None, None]  # True = masked; causal only
        return original_forward(self, query, key, value, mask, *args, **kwargs)

    cls.__init__, cls.forward = __init__, forward

"""Five small patches that let megatron-core 0.16.1 run a ``GPTModel`` with MoE on a CPU-only machine.

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
    """Apply the five CPU patches if CUDA is unavailable; return the names applied (idempotent)."""
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

    return shims_applied()

"""Converters from the routing layouts real frameworks return into :class:`RoutingTrace`.

Every converter ends in the package's one alignment rule (a sequence of ``n`` tokens has ``n - 1``
routed rows, :func:`reference_impl.routing.routed_rows`) and turns sentinels into the validity
mask. Layouts, as read from each project's source (options move fast; see the framework guide):

==================  ===============================================  =========================
source              per-sequence layout                              missing rows
==================  ===============================================  =========================
vLLM                ``routed_experts [prompt+gen-1, L, k]``,         prefix-cached positions
                    uint8 (≤ 256 experts) or uint16                  are not reported
SGLang / slime      ``meta_info["routed_experts"]``: base64 of       —
                    int32 ``[len(tokens)-1, L, k]``
verl                int16 ``[seq_len, L, k]``: one row per token,    zero rows + a replay mask
                    the last one zero, plus a replay mask
NeMo-RL             ``[.., L, k]`` with ``-1`` for missing rows      ``-1`` sentinel
Megatron-core       per layer ``[S*B, k]`` long, s-major             —
                    (row = s * B + b) over a padded ``[B, S]`` batch
==================  ===============================================  =========================
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import numpy as np
import torch

from .layers import LayerMap
from .routing import RoutingTrace, routed_rows

__all__ = [
    "routed_experts_to_trace",
    "from_vllm",
    "from_sglang",
    "from_verl",
    "from_sentinel_rows",
    "from_layer_major",
    "to_layer_major",
]


def _as_tensor(array, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    arr = np.asarray(array)
    if arr.dtype == np.uint16:  # torch has no general uint16 ops; widen losslessly
        arr = arr.astype(np.int32)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name}: routed experts must be integers, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _check_rows(rows: torch.Tensor, seq_len: int, name: str) -> None:
    if rows.dim() != 3:
        raise ValueError(f"{name}: expected [rows, num_layers, top_k], got shape {tuple(rows.shape)}")
    if rows.shape[0] != routed_rows(seq_len):
        raise ValueError(
            f"{name}: a sequence of {seq_len} tokens must have {routed_rows(seq_len)} routed rows "
            f"(positions 0..n-2), got {rows.shape[0]}"
        )


def routed_experts_to_trace(
    routed_experts: Any,
    num_experts: int,
    *,
    num_tokens: int | None = None,
    prompt_start: int = 0,
    layer_map: LayerMap | None = None,
    router_family: str | None = None,
) -> RoutingTrace:
    """Convert vLLM's official ``CompletionOutput.routed_experts`` into a one-sequence trace.

    Args:
        routed_experts: array ``[prompt_len + gen_len - 1 - prompt_start, num_layers, top_k]``,
            uint8 (≤ 256 experts) or uint16 (more), logical expert ids.
        num_experts: experts per MoE layer (from the model config; the array does not carry it).
        num_tokens: prompt + generated tokens of the sequence; when given, the array must hold
            exactly ``num_tokens - 1 - prompt_start`` rows (the alignment rule).
        prompt_start: ``SamplingParams.routed_experts_prompt_start``: vLLM then omits the first
            ``prompt_start`` rows (multi-turn); they are kept here as *invalid* rows so the trace
            still covers positions ``0 .. n-2``.
        layer_map: the model's decoder-layer pattern (``LayerMap.from_hf_config(config)``). vLLM's
            array has one column per **decoder** layer (``num_hidden_layers``), dense ones included
            and never written; with a map the dense columns are dropped by configuration, leaving the
            trace's MoE-layer axis. Required when the model has dense layers.
        router_family: recorded in the trace (e.g. ``"sigmoid_bias"`` for GLM-4.5 / DeepSeek-V3).

    Not tested against a live engine (the official path is blocked on CPU), only on arrays of the
    documented layout.
    """
    arr = np.asarray(routed_experts)
    if arr.ndim != 3:
        raise ValueError(f"routed_experts must be [rows, num_layers, top_k], got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"routed_experts must hold integers (vLLM writes uint8/uint16), got {arr.dtype}")
    if arr.dtype == np.uint8 and num_experts > 256:
        raise ValueError(
            f"routed_experts is uint8 but num_experts={num_experts} > 256: vLLM writes uint16 past 256 "
            "experts, so this array was truncated or num_experts is wrong"
        )
    if prompt_start < 0:
        raise ValueError(f"prompt_start must be >= 0, got {prompt_start}")
    if layer_map is not None:
        arr = layer_map.moe_columns(arr)
    rows, num_layers, top_k = arr.shape
    if num_tokens is not None:
        expected = routed_rows(num_tokens) - prompt_start
        if rows != expected:
            raise ValueError(
                f"routed_experts has {rows} rows but a sequence of {num_tokens} tokens with prompt_start="
                f"{prompt_start} needs {expected} (positions {prompt_start}..{num_tokens - 2}; the last "
                "sampled token is never forwarded)"
            )
    ids = torch.from_numpy(arr.astype(np.int64))  # uint16 has no full torch dtype: widen first
    valid = torch.ones(prompt_start + rows, dtype=torch.bool)
    if prompt_start:
        valid[:prompt_start] = False
        ids = torch.cat([torch.zeros(prompt_start, num_layers, top_k, dtype=torch.int64), ids])
    return RoutingTrace(ids, num_experts, valid, router_family=router_family)


def from_vllm(
    routed_experts: Sequence,
    seq_lengths: Sequence[int],
    num_experts: int,
    *,
    layer_map: LayerMap | None = None,
    router_family: str | None = None,
) -> RoutingTrace:
    """vLLM's ``CompletionOutput.routed_experts`` arrays, one per sequence, ``[prompt+gen-1, num_hidden_layers, k]``.

    ``seq_lengths[i]`` = prompt + generated tokens of sequence ``i``. See :func:`routed_experts_to_trace`
    (``layer_map`` drops dense-layer columns).
    """
    parts = []
    for i, (arr, n) in enumerate(zip(routed_experts, seq_lengths, strict=True)):
        try:
            parts.append(
                routed_experts_to_trace(arr, num_experts, num_tokens=int(n), layer_map=layer_map, router_family=router_family)
            )
        except ValueError as err:
            raise ValueError(f"from_vllm: sequence {i}: {err}") from None
    return RoutingTrace.concatenate(parts)


def from_sglang(routed_experts_b64: Sequence[str], seq_lengths: Sequence[int], num_layers: int, top_k: int, num_experts: int) -> RoutingTrace:
    """SGLang's ``meta_info["routed_experts"]`` (base64 of int32 ``[len(tokens)-1, L, k]``), as slime consumes it."""
    parts = []
    for i, (payload, n) in enumerate(zip(routed_experts_b64, seq_lengths, strict=True)):
        flat = np.frombuffer(base64.b64decode(payload), dtype=np.int32)
        if flat.size % (num_layers * top_k):
            raise ValueError(
                f"from_sglang: sequence {i} payload has {flat.size} ids, not a multiple of num_layers*top_k={num_layers * top_k}"
            )
        rows = torch.from_numpy(flat.reshape(-1, num_layers, top_k).copy())
        _check_rows(rows, int(n), f"from_sglang: sequence {i}")
        parts.append(RoutingTrace(rows, num_experts))
    return RoutingTrace.concatenate(parts)


def from_verl(routes: Sequence, replay_masks: Sequence | None, num_experts: int) -> RoutingTrace:
    """verl's per-token layout: ``[seq_len, L, k]`` (int16), the last row zero, plus an optional replay mask.

    The last row (the last token is never forwarded by the engine) is dropped; rows whose mask is
    False become invalid rows (replayed natively), whatever ids they hold.
    """
    parts = []
    for i, arr in enumerate(routes):
        rows = _as_tensor(arr, "from_verl")
        if rows.dim() != 3 or rows.shape[0] < 1:
            raise ValueError(f"from_verl: sequence {i} must be [seq_len >= 1, L, k], got {tuple(rows.shape)}")
        valid = torch.ones(rows.shape[0], dtype=torch.bool)
        if replay_masks is not None:
            mask = replay_masks[i]
            mask = mask.bool() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask, dtype=bool))
            if mask.shape != (rows.shape[0],):
                raise ValueError(f"from_verl: sequence {i} replay mask has shape {tuple(mask.shape)}, expected ({rows.shape[0]},)")
            valid = mask
        n = rows.shape[0]
        parts.append(RoutingTrace(rows[: routed_rows(n)], num_experts, valid[: routed_rows(n)].clone()))
    return RoutingTrace.concatenate(parts)


def from_sentinel_rows(routes: Sequence, seq_lengths: Sequence[int], num_experts: int, sentinel: int = -1) -> RoutingTrace:
    """Layouts that mark missing rows with a sentinel id (NeMo-RL: ``-1``): such rows become invalid."""
    parts = []
    for i, (arr, n) in enumerate(zip(routes, seq_lengths, strict=True)):
        rows = _as_tensor(arr, "from_sentinel_rows").long()
        _check_rows(rows, int(n), f"from_sentinel_rows: sequence {i}")
        missing = (rows == sentinel).any(dim=-1).any(dim=-1)
        parts.append(RoutingTrace(rows, num_experts, ~missing))
    return RoutingTrace.concatenate(parts)


def from_layer_major(per_layer: Sequence[torch.Tensor], seq_lengths: Sequence[int], num_experts: int, *, order: str = "s-major") -> RoutingTrace:
    """Per-layer ``[S*B, k]`` routing of a right-padded ``[B, S]`` batch (Megatron's RouterReplay layout).

    ``order="s-major"``: row ``s * B + b`` (Megatron); ``"b-major"``: row ``b * S + s`` (transformers).
    """
    B = len(seq_lengths)
    if not per_layer:
        raise ValueError("from_layer_major: no layers given")
    rows, k = per_layer[0].shape
    if rows % B:
        raise ValueError(f"from_layer_major: {rows} rows is not a multiple of the batch size {B}")
    S = rows // B
    stacked = torch.stack([t.long() for t in per_layer], dim=1)  # [S*B, L, k]
    if order == "s-major":
        grid = stacked.view(S, B, len(per_layer), k).transpose(0, 1)
    elif order == "b-major":
        grid = stacked.view(B, S, len(per_layer), k)
    else:
        raise ValueError(f"from_layer_major: order must be 's-major' or 'b-major', got {order!r}")
    return RoutingTrace.from_padded(grid, seq_lengths, num_experts)


def to_layer_major(trace: RoutingTrace, seq_len: int, *, order: str = "s-major", fill: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Inverse of :func:`from_layer_major`: per-layer ``[S*B, k]`` long targets and the ``[S*B]`` validity.

    Positions without a valid trace row get ``fill[b, s, layer]`` if given (e.g. the engine's own
    native choice), else the filler ``0..k-1``.
    """
    ids, valid = trace.to_padded(seq_len)  # [B, S, L, k], [B, S]
    if fill is not None:
        ids = torch.where(valid[..., None, None], ids, fill.long())
    if order == "s-major":
        ids, valid = ids.transpose(0, 1), valid.transpose(0, 1)
    elif order != "b-major":
        raise ValueError(f"to_layer_major: order must be 's-major' or 'b-major', got {order!r}")
    flat = ids.reshape(-1, trace.num_layers, trace.top_k)
    return [flat[:, layer].contiguous() for layer in range(trace.num_layers)], valid.reshape(-1)

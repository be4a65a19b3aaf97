"""Converters from the routing layouts real frameworks return into :class:`RoutingTrace`.

Every converter ends in the package's one alignment rule (a sequence of ``n`` tokens has ``n - 1``
routed rows, :func:`reference_impl.routing.routed_rows`) and turns sentinels into the validity
mask. Layouts, as read from each project's source (options move fast; see the framework guide):

==================  ===============================================  =========================
source              per-sequence layout                              missing rows
==================  ===============================================  =========================
vLLM                ``routed_experts [prompt+gen-1, L, k]``,         prefix-cached positions
                    uint8 (≤ 256 experts) or uint16                  are not reported
SGLang              ``meta_info["routed_experts"]``: base64 of       —
                    int32 ``[len(tokens)-1, L, k]``
slime               SGLang's rows per sample, or packed with a       filler row ``arange(L*k) % E``
                    filler row at each sample's last position        at each last position
verl                int16 ``[seq_len, L, k]``: one row per token,    zero rows + a replay mask
                    the last one zero, plus a replay mask; or the
                    padded batch ``[B, T, L, k]`` + attention mask
NeMo-RL             ``[.., L, k]`` with ``-1`` for missing rows      ``-1`` sentinel
Megatron-core       per layer ``[S*B, k]`` long, s-major             —
                    (row = s * B + b) over a padded ``[B, S]`` batch
==================  ===============================================  =========================
"""

from __future__ import annotations

import base64
import binascii
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from .errors import AlignmentError, ConfigError, TraceFormatError
from .layers import LayerMap
from .routing import RoutingTrace, routed_rows

__all__ = [
    "routed_experts_to_trace",
    "from_vllm",
    "from_sglang",
    "from_verl",
    "from_slime",
    "slime_filler",
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


def _check_batch(fn: str, name: str, items: Sequence, *others: tuple[str, Sequence | None]) -> None:
    """Refuse an empty batch and per-sequence arguments whose counts differ, naming the arguments."""
    if items is None or len(items) == 0:
        raise TraceFormatError(f"{fn}: {name} is empty (no sequences to convert)")
    for other, values in others:
        if values is not None and len(values) != len(items):
            raise TraceFormatError(f"{fn}: {name} has {len(items)} sequences but {other} has {len(values)}")


def _check_rows(rows: torch.Tensor, seq_len: int, name: str) -> None:
    if rows.dim() != 3:
        raise TraceFormatError(f"{name}: expected [rows, num_layers, top_k], got shape {tuple(rows.shape)}")
    if rows.shape[0] != routed_rows(seq_len):
        raise AlignmentError(
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
    _check_batch("from_vllm", "routed_experts", routed_experts, ("seq_lengths", seq_lengths))
    parts = []
    for i, (arr, n) in enumerate(zip(routed_experts, seq_lengths, strict=True)):
        try:
            parts.append(
                routed_experts_to_trace(arr, num_experts, num_tokens=int(n), layer_map=layer_map, router_family=router_family)
            )
        except ValueError as err:
            raise type(err)(f"from_vllm: sequence {i}: {err}") from None  # keeps the package's error class
    return RoutingTrace.concatenate(parts)


def _tagged(trace: RoutingTrace, router_family: str | None) -> RoutingTrace:
    """``trace`` recording the router family that produced it (``router_family=``, the converters' one keyword for it)."""
    if router_family is None:
        return trace
    return RoutingTrace(trace.expert_ids, trace.num_experts, trace.valid, trace.rows_per_seq, router_family=router_family)


def from_sglang(
    routed_experts_b64: Sequence[str], seq_lengths: Sequence[int], num_layers: int, top_k: int, num_experts: int, *, router_family: str | None = None
) -> RoutingTrace:
    """SGLang's ``meta_info["routed_experts"]`` (base64 of int32 ``[len(tokens)-1, L, k]``), as slime consumes it."""
    _check_batch("from_sglang", "routed_experts_b64", routed_experts_b64, ("seq_lengths", seq_lengths))
    for name, value in (("num_layers", num_layers), ("top_k", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"from_sglang: {name} must be an int >= 1, got {value!r}")
    parts = []
    for i, (payload, n) in enumerate(zip(routed_experts_b64, seq_lengths, strict=True)):
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, TypeError, ValueError) as err:
            raise TraceFormatError(f"from_sglang: routed_experts_b64[{i}] is not valid base64: {err}") from None
        if len(raw) % 4:
            raise TraceFormatError(
                f"from_sglang: routed_experts_b64[{i}] decodes to {len(raw)} bytes, not a whole number of int32 ids"
            )
        flat = np.frombuffer(raw, dtype=np.int32)
        if flat.size % (num_layers * top_k):
            raise TraceFormatError(
                f"from_sglang: sequence {i} payload has {flat.size} ids, not a multiple of num_layers*top_k={num_layers * top_k}"
            )
        rows = torch.from_numpy(flat.reshape(-1, num_layers, top_k).copy())
        _check_rows(rows, int(n), f"from_sglang: sequence {i}")
        parts.append(RoutingTrace(rows, num_experts))
    return _tagged(RoutingTrace.concatenate(parts), router_family)


def from_verl(
    routes: Any,
    replay_masks: Sequence | None = None,
    num_experts: int | None = None,
    *,
    attention_mask: Any = None,
    response_mask: Any = None,
    router_family: str | None = None,
) -> RoutingTrace:
    """verl's ``routed_experts`` (int16, one row per token, zero rows where nothing was recorded).

    Two forms, as verl hands them over (read at verl-project/verl ``1dda039b``, Aug 2026):

    * **per sequence**: ``routes[i]`` of shape ``[n_i, L, k]`` with ``replay_masks[i]`` of shape
      ``[n_i]`` (``build_r3_replay_mask``: every row but the last), or ``replay_masks=None``;
    * **batch**: one padded tensor ``[B, prompt_len + response_len, L, k]`` (prompt left-padded,
      response right-padded) with ``attention_mask`` ``[B, prompt_len + response_len]`` and,
      optionally, ``response_mask`` ``[B, response_len]``; as verl does, a sequence whose
      response mask is empty is not replayed at all.

    The last row of each sequence is dropped (the alignment rule of :func:`routed_rows`). Rows the
    mask leaves out become invalid rows (routed natively on replay). Rows the mask *marks* but that
    hold only zeros (``k > 1``) are rows verl zero-filled because its rollout engine never recorded
    them (a multi-turn rollout whose last turn was not generated, a partial rollout); verl would
    replay expert 0 ``k`` times there. They also become invalid rows, with one warning that counts them.
    """
    if num_experts is None:
        raise TypeError("from_verl: num_experts is required (the routes do not carry it)")
    batch = _as_tensor(routes, "from_verl") if isinstance(routes, (torch.Tensor, np.ndarray)) else None
    if batch is not None and batch.dim() == 4:
        if replay_masks is not None:
            raise AlignmentError(
                "from_verl: a padded [B, seq_len, L, k] batch takes attention_mask= (and response_mask=), not replay_masks"
            )
        rows, masks = _verl_batch_sequences(batch, attention_mask, response_mask)
    elif batch is not None:
        raise TraceFormatError(
            f"from_verl: a single tensor must be verl's padded batch [B, seq_len, L, k], got shape {tuple(batch.shape)}; "
            "pass per-sequence [n, L, k] arrays as a list"
        )
    elif attention_mask is not None or response_mask is not None:
        raise AlignmentError(
            "from_verl: attention_mask/response_mask go with verl's padded batch [B, seq_len, L, k], not with a list "
            "of per-sequence arrays (pass replay_masks there)"
        )
    else:
        _check_batch("from_verl", "routes", routes)
        rows = [_as_tensor(arr, "from_verl") for arr in routes]
        masks = [None] * len(rows) if replay_masks is None else [_as_bool(m, "from_verl") for m in replay_masks]
        if len(masks) != len(rows):
            raise AlignmentError(f"from_verl: {len(rows)} route arrays but {len(masks)} replay masks")
    parts, zero_filled, seqs_hit = [], 0, 0
    for i, (seq, mask) in enumerate(zip(rows, masks)):
        trace, zeros = _verl_sequence(seq, mask, num_experts, f"from_verl: sequence {i}")
        parts.append(trace)
        zero_filled += zeros
        seqs_hit += bool(zeros)
    if zero_filled:
        warnings.warn(
            f"from_verl: {zero_filled} row(s) in {seqs_hit} sequence(s) hold only expert 0 (zero-filled) although "
            "the replay mask marks them: verl zero-fills positions its rollout engine never recorded (a multi-turn "
            "rollout whose last turn was not generated, a partial rollout). They are kept as invalid rows and "
            "routed natively on replay (verl would replay expert 0 k times there).",
            stacklevel=2,
        )
    return _tagged(RoutingTrace.concatenate(parts), router_family)


def _as_bool(mask, name: str) -> torch.Tensor:
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().bool()
    return torch.from_numpy(np.asarray(mask).astype(bool))


def _verl_sequence(rows: torch.Tensor, mask: torch.Tensor | None, num_experts: int, name: str) -> tuple[RoutingTrace, int]:
    """One verl sequence ``[n, L, k]`` (+ mask ``[n]``) -> its ``n - 1`` rows and how many were zero-filled."""
    if rows.dim() != 3 or rows.shape[0] < 1:
        raise TraceFormatError(f"{name} must be [seq_len >= 1, L, k] (one row per token), got {tuple(rows.shape)}")
    n = rows.shape[0]
    valid = torch.ones(n, dtype=torch.bool) if mask is None else mask
    if valid.dim() != 1:
        raise AlignmentError(f"{name}: replay mask must be 1-D [seq_len], got shape {tuple(valid.shape)}")
    if valid.shape[0] > n:
        raise AlignmentError(
            f"{name} has {n} rows, fewer than its replay mask implies ({valid.shape[0]} positions): verl's layout has "
            "one row per token; rows of an engine ([n - 1, L, k]) go to from_vllm"
        )
    if valid.shape[0] < n:
        raise AlignmentError(f"{name}: replay mask has {valid.shape[0]} entries for {n} rows (one per token expected)")
    kept, valid = rows[: routed_rows(n)].long(), valid[: routed_rows(n)].clone()
    zero_filled = valid & (kept == 0).flatten(1).all(dim=1) if rows.shape[-1] > 1 else torch.zeros_like(valid)
    return RoutingTrace(kept, num_experts, valid & ~zero_filled), int(zero_filled.sum())


def _verl_batch_sequences(batch: torch.Tensor, attention_mask, response_mask) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Unpad verl's ``[B, T, L, k]`` by its attention mask; rebuild verl's R3 replay mask per sequence."""
    if attention_mask is None:
        raise AlignmentError("from_verl: a padded [B, seq_len, L, k] batch needs its attention_mask [B, seq_len]")
    attn = _as_bool(attention_mask, "from_verl")
    if tuple(attn.shape) != tuple(batch.shape[:2]):
        raise AlignmentError(
            f"from_verl: attention_mask has shape {tuple(attn.shape)} but routes are {tuple(batch.shape)}; "
            f"expected [{batch.shape[0]}, {batch.shape[1]}]"
        )
    resp = None
    if response_mask is not None:
        resp = _as_bool(response_mask, "from_verl")
        if resp.dim() != 2 or resp.shape[0] != batch.shape[0] or resp.shape[1] > batch.shape[1]:
            raise AlignmentError(
                f"from_verl: response_mask has shape {tuple(resp.shape)}; expected [{batch.shape[0]}, response_len <= "
                f"{batch.shape[1]}] (the response columns are the last ones of the batch)"
            )
    rows, masks = [], []
    for b in range(batch.shape[0]):
        n = int(attn[b].sum())
        if n < 1:
            raise AlignmentError(f"from_verl: sequence {b} has no attended token in attention_mask")
        rows.append(batch[b][attn[b]])
        replay = n - 1 if resp is None or bool(resp[b].any()) else 0  # verl: no response, no replay
        masks.append(torch.arange(n) < replay)
    return rows, masks


def slime_filler(rows: int, num_layers: int, top_k: int, num_experts: int) -> torch.Tensor:
    """slime's padding rows ``arange(rows * L * k) % E`` as ``[rows, L, k]`` (``_pad_routed_experts``)."""
    return (torch.arange(rows * num_layers * top_k) % num_experts).reshape(rows, num_layers, top_k)


def from_slime(rollout_routed_experts: Any, seq_lengths: Sequence[int], num_experts: int, *, router_family: str | None = None) -> RoutingTrace:
    """slime's routed experts: per sample, or packed the way its Megatron actor replays them.

    * **per sample** (``Sample.rollout_routed_experts``, a list): ``[n_i - 1, L, k]`` (SGLang's
      rows), or ``[n_i, L, k]`` whose last row is slime's filler ``arange(L*k) % E``;
    * **packed** (one ``[sum n_i + pad, L, k]`` tensor, ``prepare_routed_experts_for_routing_replay``
      without context or sequence parallelism): each sample's rows plus one filler row, then ``pad``
      filler rows up to a multiple of the tensor-parallel padding.

    slime replays the filler at each sequence's last position; here that position is routed natively
    (it predicts no scored token), so the filler is recognised and dropped. A last row that is not
    the filler means the boundaries are wrong and raises :class:`AlignmentError`.
    """
    seq_lengths = [int(n) for n in seq_lengths]
    if isinstance(rollout_routed_experts, (torch.Tensor, np.ndarray)):
        packed = _as_tensor(rollout_routed_experts, "from_slime").long()
        if packed.dim() != 3:
            raise TraceFormatError(f"from_slime: packed routes must be [tokens, L, k], got {tuple(packed.shape)}")
        total = sum(seq_lengths)
        if packed.shape[0] < total:
            raise AlignmentError(
                f"from_slime: packed routes have {packed.shape[0]} rows, fewer than the {total} tokens of the samples"
            )
        _, L, k = packed.shape
        tail = packed[total:]
        if not torch.equal(tail, slime_filler(tail.shape[0], L, k, num_experts)):
            raise AlignmentError(f"from_slime: the {tail.shape[0]} rows after the samples' {total} tokens are not slime's padding filler")
        bounds = np.cumsum([0] + seq_lengths)
        per_sample = [packed[bounds[i] : bounds[i + 1]] for i in range(len(seq_lengths))]
    else:
        per_sample = [_as_tensor(a, "from_slime").long() for a in rollout_routed_experts]
        if len(per_sample) != len(seq_lengths):
            raise AlignmentError(f"from_slime: {len(per_sample)} samples but {len(seq_lengths)} lengths")
    parts = []
    for i, (rows, n) in enumerate(zip(per_sample, seq_lengths)):
        name = f"from_slime: sample {i}"
        if rows.dim() != 3:
            raise TraceFormatError(f"{name} must be [rows, L, k], got {tuple(rows.shape)}")
        if rows.shape[0] == n and n >= 1:
            if not torch.equal(rows[-1:], slime_filler(1, rows.shape[1], rows.shape[2], num_experts)):
                raise AlignmentError(
                    f"{name} has {n} rows for {n} tokens but its last row {rows[-1, 0].tolist()}... is not slime's "
                    "filler arange(L*k) % E: the sequence boundaries or lengths are wrong"
                )
            rows = rows[:-1]
        _check_rows(rows, n, name)
        parts.append(RoutingTrace(rows, num_experts))
    return _tagged(RoutingTrace.concatenate(parts), router_family)


def from_sentinel_rows(routes: Sequence, seq_lengths: Sequence[int], num_experts: int, sentinel: int = -1) -> RoutingTrace:
    """Layouts that mark missing rows with a sentinel id (NeMo-RL: ``-1``): such rows become invalid."""
    _check_batch("from_sentinel_rows", "routes", routes, ("seq_lengths", seq_lengths))
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
        raise TraceFormatError("from_layer_major: per_layer is empty (zero layers given)")
    if B == 0:
        raise TraceFormatError("from_layer_major: seq_lengths is empty (no sequences)")
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

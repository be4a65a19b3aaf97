"""Packed routing ids: each (token, layer) top-k *set* stored in about ⌈log2 C(E, k)⌉ bits.

A top-k route is a set of k distinct experts out of E, so it carries at most log2 C(E, k) bits
(33 for E = 64, 41 for E = 128, 49 for E = 256 at k = 8, after rounding up), against 8k bits
in ``uint8``. This module is the codec behind version 2 of the ``RoutingTrace``
file; the trace itself stays a plain ``[num_tokens, num_layers, top_k]`` tensor in memory.

Two layouts, chosen from (E, k) alone by :func:`packed_layout`:

* ``rank`` (when ⌈log2 C(E, k)⌉ <= 63): the set's rank in the combinatorial number system,
  ``rank(c_1 < ... < c_m) = sum_i C(c_i, i)`` (the set's colexicographic position), a number in
  ``[0, C(E, m))``, written with ⌈log2 C(E, k)⌉ bits. ``m = min(k, E - k)``: when k > E/2 the
  complement set is ranked instead (C(E, k) = C(E, E - k)), which keeps the binomial table small.
* ``ids`` (otherwise, e.g. E = 32767 with k = 8): the k sorted ids, ⌈log2 E⌉ bits each.

Values are bit-packed little-endian, value ``j`` occupying bits ``[j*w, (j+1)*w)`` of the byte
stream, then zero padding to the next byte. Decoding returns the ids of each row *sorted
ascending*: order inside a row is not stored (replay and agreement compare sets).

Everything is vectorised: ranks are sums of gathers from a precomputed int64 binomial table,
unranking is one ``searchsorted`` per slot, and bit packing loops over the (at most 64) bit
phases of a block of 64 values, never over rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .errors import TraceFormatError

__all__ = ["PackedLayout", "packed_layout", "information_bound_bits", "encode_sets", "decode_sets", "pack_bits", "unpack_bits"]

_INT64_MAX = (1 << 63) - 1
_CHUNK_ROWS = 1 << 18  # rows per encode/decode chunk (a multiple of 64: chunks start on a byte)


def information_bound_bits(num_experts: int, top_k: int) -> int:
    """⌈log2 C(E, k)⌉: the fewest bits that can name every top-k set of E experts."""
    return (math.comb(num_experts, top_k) - 1).bit_length()


@dataclass(frozen=True)
class PackedLayout:
    """How one (token, layer) row is stored: ``scheme`` ``"rank"`` or ``"ids"``, ``bits_per_row`` bits."""

    num_experts: int
    top_k: int
    scheme: str
    bits_per_row: int

    @property
    def ranked_size(self) -> int:
        """m = min(k, E - k): how many ids the rank scheme ranks (the set or its complement)."""
        return min(self.top_k, self.num_experts - self.top_k)

    @property
    def id_bits(self) -> int:
        """⌈log2 E⌉: bits per id in the ``ids`` scheme."""
        return (self.num_experts - 1).bit_length()

    def payload_bytes(self, num_rows: int) -> int:
        return (num_rows * self.bits_per_row + 7) // 8


def packed_layout(num_experts: int, top_k: int) -> PackedLayout:
    """The layout for (E, k): ``rank`` with ⌈log2 C(E, k)⌉ bits if that is <= 63, else ``ids``."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"packed_layout: need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    bound = information_bound_bits(num_experts, top_k)
    if bound <= 63:
        return PackedLayout(num_experts, top_k, "rank", bound)
    return PackedLayout(num_experts, top_k, "ids", top_k * (num_experts - 1).bit_length())


# ----------------------------------------------------------------------- bit packing
def _phases(width: int) -> tuple[int, int]:
    """Values per block P (block = a whole number W of 64-bit words) and W."""
    period = 64 // math.gcd(width, 64)
    return period, period * width // 64


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Bit-pack unsigned ``values`` (each < 2**width, width <= 63) into ``ceil(n*width/8)`` bytes."""
    n = len(values)
    if width == 0 or n == 0:
        return np.zeros((n * width + 7) // 8, dtype=np.uint8)
    period, words_per_block = _phases(width)
    blocks = -(-n // period)
    v = np.zeros(blocks * period, dtype=np.uint64)
    v[:n] = values
    v = v.reshape(blocks, period)
    words = np.zeros((blocks, words_per_block), dtype=np.uint64)
    for j in range(period):  # one pass per bit phase of the block, vectorised over blocks
        bit = j * width
        q, s = bit >> 6, bit & 63
        words[:, q] |= v[:, j] << np.uint64(s)
        if s + width > 64:
            words[:, q + 1] |= v[:, j] >> np.uint64(64 - s)
    return words.reshape(-1).view(np.uint8)[: (n * width + 7) // 8].copy()


def unpack_bits(payload: np.ndarray, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` uint64 values of ``width`` bits from ``payload``."""
    if width == 0 or n == 0:
        return np.zeros(n, dtype=np.uint64)
    period, words_per_block = _phases(width)
    blocks = -(-n // period)
    buf = np.zeros(blocks * words_per_block * 8, dtype=np.uint8)
    buf[: len(payload)] = payload
    words = buf.view("<u8").reshape(blocks, words_per_block)
    out = np.empty((blocks, period), dtype=np.uint64)
    mask = np.uint64((1 << width) - 1)
    for j in range(period):
        bit = j * width
        q, s = bit >> 6, bit & 63
        x = words[:, q] >> np.uint64(s)
        if s + width > 64:
            x |= words[:, q + 1] << np.uint64(64 - s)
        out[:, j] = x & mask
    return out.reshape(-1)[:n]


# -------------------------------------------------------------- combinatorial ranks
@lru_cache(maxsize=16)
def _binomials(num_experts: int, m: int) -> torch.Tensor:
    """``table[n, i] = C(n, i)`` for ``n < E``, ``i <= m``, int64, saturated at 2**63 - 1.

    Saturated entries are never summed: for a valid set ``c_i <= E - m + i - 1``, and
    ``C(E - m + i - 1, i) < C(E, m) < 2**63``. Saturation keeps each column non-decreasing, which
    is all :func:`torch.searchsorted` needs.
    """
    table = [[min(math.comb(n, i), _INT64_MAX) for i in range(m + 1)] for n in range(num_experts)]
    return torch.tensor(table, dtype=torch.int64)


def _complement(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sorted ``[rows, E - k]`` ids absent from each row of ``[rows, k]`` ``ids``."""
    present = torch.zeros(ids.shape[0], num_experts, dtype=torch.bool)
    present.scatter_(1, ids, True)
    return torch.nonzero(~present)[:, 1].view(ids.shape[0], num_experts - ids.shape[1])


def _rank(sorted_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``sum_i C(c_i, i)`` (1-based i) for rows of ascending ids: the combinatorial-number-system rank."""
    m = sorted_ids.shape[1]
    if m == 0:
        return torch.zeros(sorted_ids.shape[0], dtype=torch.int64)
    return table[sorted_ids, torch.arange(1, m + 1)].sum(dim=1)


def _unrank(ranks: torch.Tensor, table: torch.Tensor, m: int, tail: int = 0) -> torch.Tensor:
    """Inverse of :func:`_rank`: greedily the largest ``c_i`` with ``C(c_i, i) <= r``, for i = m .. 1.

    The last ``tail`` slots are looked up at once in :func:`_tail_sets` (the remaining rank is
    below ``C(E, tail)``, and ranks ``0 .. C(E, t) - 1`` are exactly the t-sets of ``[0, E)``).
    """
    out = torch.empty(ranks.shape[0], m, dtype=torch.int64)
    r = ranks.clone()
    tail = min(tail, m)
    for i in range(m, tail, -1):  # one vectorised search per slot
        column = table[:, i].contiguous()
        c = torch.searchsorted(column, r, right=True) - 1
        r -= column[c]
        out[:, i - 1] = c
    if tail:
        out[:, :tail] = _tail_sets(table.shape[0], tail)[r]
    return out


_TAIL_ENTRIES = 1 << 22  # largest lookup table of t-sets kept per (E, t)


def _tail_size(num_experts: int, m: int) -> int:
    """Slots decoded by table lookup: the largest t <= min(m, 3) with C(E, t) <= 2**22 (0 if none)."""
    return max((t for t in range(1, min(m, 3) + 1) if math.comb(num_experts, t) <= _TAIL_ENTRIES), default=0)


@lru_cache(maxsize=8)
def _tail_sets(num_experts: int, t: int) -> torch.Tensor:
    """``[C(E, t), t]`` int64: row ``r`` is the t-set of rank ``r`` (built once by search)."""
    return _unrank(torch.arange(math.comb(num_experts, t)), _binomials(num_experts, t), t)


# ------------------------------------------------------------------ encode / decode
def encode_sets(ids: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Packed uint8 bytes of ``[rows, k]`` valid id rows (distinct ids in ``[0, E)``, any order)."""
    rows = ids.shape[0]
    pieces = []
    for start in range(0, rows, _CHUNK_ROWS):
        chunk = ids[start : start + _CHUNK_ROWS].to(torch.int64).sort(dim=1).values
        if layout.scheme == "rank":
            m = layout.ranked_size
            ranked = chunk if m == layout.top_k else _complement(chunk, layout.num_experts)
            values = _rank(ranked, _binomials(layout.num_experts, m)).numpy().astype(np.uint64)
            pieces.append(pack_bits(values, layout.bits_per_row))
        else:
            pieces.append(pack_bits(chunk.reshape(-1).numpy().astype(np.uint64), layout.id_bits))
    if not pieces:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.from_numpy(np.concatenate(pieces))


def decode_sets(payload: torch.Tensor, layout: PackedLayout, num_rows: int, dtype: torch.dtype, source: str) -> torch.Tensor:
    """``[num_rows, k]`` ids (ascending within each row) in ``dtype`` from :func:`encode_sets` bytes.

    Raises :class:`TraceFormatError` (naming ``source``) on a wrong byte count, non-zero padding
    bits, a rank ``>= C(E, k)`` or, in the ``ids`` scheme, an id ``>= E`` or a row that is not
    strictly increasing: every payload that decodes is a valid trace.
    """
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise TraceFormatError(f"{source}: packed_ids must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
    expected = layout.payload_bytes(num_rows)
    if payload.numel() != expected:
        raise TraceFormatError(
            f"{source}: packed_ids has {payload.numel()} bytes, expected {expected} for {num_rows} rows of "
            f"{layout.bits_per_row} bits ({layout.scheme} layout, E={layout.num_experts}, k={layout.top_k})"
        )
    data = payload.numpy()
    tail_bits = (num_rows * layout.bits_per_row) % 8
    if tail_bits and int(data[-1]) >> tail_bits:
        raise TraceFormatError(f"{source}: packed_ids has non-zero padding bits after the last row")
    out = torch.empty(num_rows, layout.top_k, dtype=dtype)
    for start in range(0, num_rows, _CHUNK_ROWS):  # chunks start on a byte: _CHUNK_ROWS is a multiple of 8
        n = min(_CHUNK_ROWS, num_rows - start)
        first_byte = start * layout.bits_per_row // 8
        piece = data[first_byte : first_byte + layout.payload_bytes(n)]
        out[start : start + n] = _decode_chunk(piece, layout, n, source, start).to(dtype)
    return out


def _decode_chunk(piece: np.ndarray, layout: PackedLayout, n: int, source: str, first_row: int) -> torch.Tensor:
    if layout.scheme == "ids":
        ids = torch.from_numpy(unpack_bits(piece, layout.id_bits, n * layout.top_k).astype(np.int64)).view(n, layout.top_k)
        bad = (ids >= layout.num_experts).any(dim=1) | (ids[:, 1:] <= ids[:, :-1]).any(dim=1)
        if bad.any():
            row = int(torch.nonzero(bad)[0])
            raise TraceFormatError(
                f"{source}: packed row {first_row + row} decodes to ids {ids[row].tolist()}, not {layout.top_k} "
                f"ascending distinct ids below num_experts={layout.num_experts}"
            )
        return ids
    ranks = torch.from_numpy(unpack_bits(piece, layout.bits_per_row, n).astype(np.int64))
    m = layout.ranked_size
    count = math.comb(layout.num_experts, m)
    if n and int(ranks.max()) >= count:
        row = int(torch.nonzero(ranks >= count)[0])
        raise TraceFormatError(
            f"{source}: packed row {first_row + row} holds rank {int(ranks[row])}, but only C({layout.num_experts}, "
            f"{layout.top_k}) = {count} top-k sets exist"
        )
    ranked = _unrank(ranks, _binomials(layout.num_experts, m), m, _tail_size(layout.num_experts, m))
    return ranked if m == layout.top_k else _complement(ranked, layout.num_experts)

"""Captured expert routing: `RoutingTrace`, the one container every part of the package uses.

A trace holds the *logical* expert ids chosen by each MoE layer for each routed token:

    expert_ids : [num_tokens, num_layers, top_k]   (uint8 if num_experts <= 256, else int16)
    valid      : [num_tokens] bool                 (rows an engine could not report are False)
    rows_per_seq                                    (how many rows belong to each sequence)

Alignment rule (the only one in the package, see :func:`routed_rows`): an engine never forwards
the last sampled token, so a sequence of ``n`` tokens (prompt + response) has ``n - 1`` routed
rows, one per input position ``0 .. n-2``. This is the layout vLLM, SGLang and slime return.

Missing rows are described by ``valid``, never by a sentinel inside the compact dtype (uint8 has
no spare value at 256 experts). Their ids are stored as ``0, 1, ..., k-1`` so that the id tensor is
always well formed, and they are ignored by replay (which routes them natively) and by agreement
statistics.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AlignmentError, ConfigError, TraceFormatError
from .trace_packing import decode_sets, encode_sets, packed_layout

__all__ = [
    "RoutingTrace",
    "RoutingAgreement",
    "compact_dtype",
    "routed_rows",
    "MAX_NUM_EXPERTS",
]

#: Largest expert count a trace can store (ids 0 .. 32766 fit in int16).
MAX_NUM_EXPERTS = 32767
_FORMAT_NAME = "reference_impl.RoutingTrace"
_FORMAT_VERSION = "1"  # plain compact expert_ids
_PACKED_VERSION = "2"  # packed_ids at the information bound (reference_impl.trace_packing)
_RESERVED_KEYS = ("format", "version", "num_experts", "num_layers", "top_k", "packing", "router_family")


# --8<-- [start:compact-dtype]
def compact_dtype(num_experts: int) -> torch.dtype:
    """The storage dtype for ids in ``[0, num_experts)``: uint8 up to 256 experts, int16 up to 32767."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"RoutingTrace: num_experts must be a positive int, got {num_experts!r}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= MAX_NUM_EXPERTS:
        return torch.int16
    raise ValueError(
        f"RoutingTrace: num_experts={num_experts} is larger than {MAX_NUM_EXPERTS}, "
        "the most the compact int16 layout can hold"
    )
# --8<-- [end:compact-dtype]


# --8<-- [start:routed-rows]
def routed_rows(num_tokens: int) -> int:
    """Number of routed rows for a sequence of ``num_tokens`` tokens: ``num_tokens - 1``.

    Positions ``0 .. n-2`` are forwarded by the engine that sampled the sequence; the last
    sampled token is never forwarded, so it has no route. This is the package's one alignment rule.
    """
    if num_tokens < 1:
        raise ValueError(f"RoutingTrace: a sequence needs at least 1 token, got {num_tokens}")
    return num_tokens - 1
# --8<-- [end:routed-rows]


@dataclass(frozen=True)
class RoutingAgreement:
    """Routing disagreement at the three levels the R3 paper reports (arXiv 2510.11370).

    router_disagreement: share of (token, layer) pairs whose top-k *sets* differ.
    token_disagreement:  share of tokens with at least one differing layer.
    mean_differing_layers: mean number of differing layers per token.
    num_tokens: rows compared (valid in both traces), ``n`` of ``num_rows``.
    num_rows: rows of each trace (``N``); with ``num_tokens == 0`` the disagreements are NaN.
    """

    router_disagreement: float
    token_disagreement: float
    mean_differing_layers: float
    num_tokens: int
    per_layer: tuple[float, ...] = ()  # share of compared tokens whose top-k set differs, per layer
    num_rows: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "router_disagreement": self.router_disagreement,
            "token_disagreement": self.token_disagreement,
            "mean_differing_layers": self.mean_differing_layers,
            "num_tokens": self.num_tokens,
            "num_rows": self.num_rows,
        }


class RoutingTrace:
    """Logical expert ids ``[num_tokens, num_layers, top_k]`` plus a row-validity mask.

    Args:
        expert_ids: integer tensor ``[num_tokens, num_layers, top_k]`` (any integer dtype; stored
            compactly). Ids at invalid rows are ignored and may hold any value (e.g. -1 sentinels).
        num_experts: experts per MoE layer (ids must lie in ``[0, num_experts)``).
        valid: optional bool tensor ``[num_tokens]``; default all True.
        rows_per_seq: optional number of rows of each sequence (sums to ``num_tokens``);
            default: one sequence.
        router_family: the router family that produced the ids (``softmax``, ``sigmoid_bias``, …;
            :func:`reference_impl.routers.router_family`), saved as the metadata key
            ``router_family``; replay into a model of another family is refused. None = unknown.
    """

    def __init__(
        self,
        expert_ids: torch.Tensor,
        num_experts: int,
        valid: torch.Tensor | None = None,
        rows_per_seq: Sequence[int] | None = None,
        *,
        router_family: str | None = None,
    ) -> None:
        dtype = compact_dtype(num_experts)
        if not isinstance(expert_ids, torch.Tensor):
            raise TypeError(f"RoutingTrace: expert_ids must be a torch.Tensor, got {type(expert_ids).__name__}")
        if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
            raise TypeError(f"RoutingTrace: expert_ids must have an integer dtype, got {expert_ids.dtype}")
        if expert_ids.dim() != 3:
            raise ValueError(
                "RoutingTrace: expert_ids must have shape [num_tokens, num_layers, top_k], "
                f"got {tuple(expert_ids.shape)}"
            )
        num_tokens, num_layers, top_k = expert_ids.shape
        if num_layers < 1 or top_k < 1:
            raise ValueError(f"RoutingTrace: num_layers and top_k must be >= 1, got shape {tuple(expert_ids.shape)}")
        if top_k > num_experts:
            raise ValueError(f"RoutingTrace: top_k={top_k} is larger than num_experts={num_experts}")
        expert_ids = expert_ids.detach().to("cpu")

        if valid is None:
            valid = torch.ones(num_tokens, dtype=torch.bool)
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"RoutingTrace: valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid))}")
        if valid.shape != (num_tokens,):
            raise ValueError(f"RoutingTrace: valid must have shape [{num_tokens}], got {tuple(valid.shape)}")
        valid = valid.detach().to("cpu").clone()

        if rows_per_seq is None:
            rows_per_seq = (num_tokens,)
        rows_per_seq = tuple(int(r) for r in rows_per_seq)
        if any(r < 0 for r in rows_per_seq):
            raise ValueError(f"RoutingTrace: rows_per_seq must be non-negative, got {rows_per_seq}")
        if sum(rows_per_seq) != num_tokens:
            raise ValueError(
                f"RoutingTrace: rows_per_seq sums to {sum(rows_per_seq)} but expert_ids has {num_tokens} rows"
            )

        _check_ids(expert_ids, valid, num_experts)
        self._set(expert_ids.to(dtype, copy=True), num_experts, valid, rows_per_seq, router_family)

    def _set(
        self, ids: torch.Tensor, num_experts: int, valid: torch.Tensor, rows_per_seq: tuple[int, ...], router_family: str | None = None
    ) -> None:
        """Store checked compact ids (in place: invalid rows get the canonical filler 0..k-1, never a sentinel)."""
        if not bool(valid.all()):
            ids[~valid] = torch.arange(ids.shape[2], dtype=ids.dtype)
        self.expert_ids: torch.Tensor = ids
        self.valid: torch.Tensor = valid
        self.num_experts: int = num_experts
        self.rows_per_seq: tuple[int, ...] = rows_per_seq
        if router_family is not None and not isinstance(router_family, str):
            raise TypeError(f"RoutingTrace: router_family must be a str or None, got {type(router_family).__name__}")
        self.router_family: str | None = router_family

    @classmethod
    def _from_checked(
        cls, ids: torch.Tensor, num_experts: int, valid: torch.Tensor, rows_per_seq: Sequence[int], router_family: str | None = None
    ) -> "RoutingTrace":
        """Wrap compact ids whose rows are already known to be valid sets (a packed decode proves it)."""
        trace = cls.__new__(cls)
        trace._set(ids, num_experts, valid, tuple(int(r) for r in rows_per_seq), router_family)
        return trace

    # ------------------------------------------------------------------ shape
    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def num_sequences(self) -> int:
        return len(self.rows_per_seq)

    @property
    def num_invalid(self) -> int:
        return int((~self.valid).sum())

    def __repr__(self) -> str:
        return (
            f"RoutingTrace(num_tokens={self.num_tokens}, num_layers={self.num_layers}, top_k={self.top_k}, "
            f"num_experts={self.num_experts}, num_sequences={self.num_sequences}, "
            f"invalid_rows={self.num_invalid}, dtype={self.expert_ids.dtype})"
        )

    def __eq__(self, other: object) -> bool:
        """Same experts, boundaries, validity and top-k *sets* per row (order within a row is ignored)."""
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            self.num_experts == other.num_experts
            and self.rows_per_seq == other.rows_per_seq
            and self.expert_ids.shape == other.expert_ids.shape
            and torch.equal(self.valid, other.valid)
            and (
                torch.equal(self.expert_ids, other.expert_ids)
                or torch.equal(self.expert_ids.sort(dim=-1).values, other.expert_ids.sort(dim=-1).values)
            )
        )

    # ------------------------------------------------------------ validation
    def check_compatible(self, *, num_layers: int, top_k: int, num_experts: int) -> None:
        """Raise if this trace cannot drive a model with the given routing shape."""
        if self.num_layers != num_layers:
            raise ValueError(f"RoutingTrace: trace has num_layers={self.num_layers} but the model has {num_layers} MoE layers")
        if self.top_k != top_k:
            raise ValueError(f"RoutingTrace: trace has top_k={self.top_k} but the model routes top_k={top_k}")
        if self.num_experts != num_experts:
            raise ValueError(
                f"RoutingTrace: trace has num_experts={self.num_experts} but the model has {num_experts} experts"
            )

    def check_router_family(self, model_family: str | None) -> None:
        """Refuse replay into a model of another router family; warn when the trace does not say its family.

        The ids of a ``softmax`` trace are not the choice a ``sigmoid_bias`` router would make (nor
        the reverse): replaying one into the other silently trains a different model's routing.
        """
        if model_family is None:
            return
        if self.router_family is None:
            warnings.warn(
                f"RoutingTrace: the trace does not record its router family; replaying it into a {model_family!r} "
                "model unchecked (record with this package, or pass router_family= when building the trace)",
                stacklevel=3,
            )
        elif self.router_family != model_family:
            raise ConfigError(
                f"RoutingTrace: the trace was recorded by a {self.router_family!r} router but the model routes with "
                f"{model_family!r}: replaying ids across router families is refused"
            )

    def check_alignment(self, seq_lengths: Sequence[int]) -> None:
        """Raise unless sequence ``i`` of ``seq_lengths[i]`` tokens has ``routed_rows(seq_lengths[i])`` rows."""
        seq_lengths = [int(n) for n in seq_lengths]
        if len(seq_lengths) != self.num_sequences:
            raise ValueError(
                f"RoutingTrace: trace holds {self.num_sequences} sequences but {len(seq_lengths)} lengths were given"
            )
        for i, (n, rows) in enumerate(zip(seq_lengths, self.rows_per_seq)):
            if routed_rows(n) != rows:
                raise ValueError(
                    f"RoutingTrace: sequence {i} has {n} tokens, so {routed_rows(n)} routed rows are expected "
                    f"(positions 0..n-2; the last sampled token is never forwarded), but the trace has {rows}"
                )

    # ------------------------------------------------- sequences and layouts
    def split(self) -> list["RoutingTrace"]:
        """One trace per sequence."""
        out, start = [], 0
        for rows in self.rows_per_seq:
            out.append(
                RoutingTrace(
                    self.expert_ids[start : start + rows],
                    self.num_experts,
                    self.valid[start : start + rows],
                    (rows,),
                    router_family=self.router_family,
                )
            )
            start += rows
        return out

    @staticmethod
    def concatenate(traces: Iterable["RoutingTrace"]) -> "RoutingTrace":
        """Join traces sequence after sequence (they must share num_layers, top_k and num_experts)."""
        traces = list(traces)
        if not traces:
            raise ValueError("RoutingTrace.concatenate: no traces given")
        first = traces[0]
        for i, t in enumerate(traces[1:], start=1):
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
                raise ValueError(
                    f"RoutingTrace.concatenate: trace {i} has (num_layers, top_k, num_experts)="
                    f"{(t.num_layers, t.top_k, t.num_experts)}, trace 0 has "
                    f"{(first.num_layers, first.top_k, first.num_experts)}"
                )
        families = {t.router_family for t in traces} - {None}
        if len(families) > 1:
            raise ConfigError(f"RoutingTrace.concatenate: traces come from different router families {sorted(families)}")
        return RoutingTrace(
            torch.cat([t.expert_ids for t in traces]),
            first.num_experts,
            torch.cat([t.valid for t in traces]),
            tuple(r for t in traces for r in t.rows_per_seq),
            router_family=families.pop() if families else None,
        )

    # --8<-- [start:append-turn]
    def extend(self, new_rows: "RoutingTrace") -> "RoutingTrace":
        """Sequence ``i`` keeps its rows and gains the rows of sequence ``i`` of ``new_rows``."""
        if new_rows.num_sequences != self.num_sequences:
            raise AlignmentError(f"RoutingTrace.extend: {new_rows.num_sequences} sequences of new rows for {self.num_sequences} sequences")
        if (new_rows.num_layers, new_rows.top_k, new_rows.num_experts) != (self.num_layers, self.top_k, self.num_experts):
            raise AlignmentError(
                f"RoutingTrace.extend: new rows have (num_layers, top_k, num_experts)="
                f"{(new_rows.num_layers, new_rows.top_k, new_rows.num_experts)}, this trace "
                f"{(self.num_layers, self.top_k, self.num_experts)}"
            )
        ids, valid = [], []
        for (a0, a), (b0, b) in zip(self._spans(), new_rows._spans()):  # one slice per sequence
            ids += [self.expert_ids[a0 : a0 + a], new_rows.expert_ids[b0 : b0 + b]]
            valid += [self.valid[a0 : a0 + a], new_rows.valid[b0 : b0 + b]]
        rows = [a + b for a, b in zip(self.rows_per_seq, new_rows.rows_per_seq)]
        return RoutingTrace._from_checked(torch.cat(ids), self.num_experts, torch.cat(valid), rows, self.router_family or new_rows.router_family)

    def rows_from(self, start: Sequence[int]) -> "RoutingTrace":
        """Rows ``start[i] ..`` of each sequence ``i`` (the tail a new turn adds)."""
        start = [int(s) for s in start]
        if len(start) != self.num_sequences or any(not 0 <= s <= r for s, r in zip(start, self.rows_per_seq)):
            raise AlignmentError(f"RoutingTrace.rows_from: start rows {start} do not fit rows_per_seq {self.rows_per_seq}")
        ids, valid = [], []
        for (a0, a), s in zip(self._spans(), start):
            ids.append(self.expert_ids[a0 + s : a0 + a])
            valid.append(self.valid[a0 + s : a0 + a])
        rows = [r - s for r, s in zip(self.rows_per_seq, start)]
        return RoutingTrace._from_checked(torch.cat(ids), self.num_experts, torch.cat(valid), rows, self.router_family)

    def append_turn(self, turn: "RoutingTrace") -> "RoutingTrace":
        """Multi-turn and partial rollouts: add the rows of a new turn, keeping the earlier turns' rows.

        ``self`` routes conversations of ``n_i`` tokens (``n_i - 1`` rows, the alignment rule);
        ``turn`` is the engine's trace of the call that continued them to ``m_i >= n_i`` tokens,
        with the conversation so far as its prompt (``m_i - 1`` rows). The result keeps rows
        ``0 .. n_i - 2`` from ``self`` and takes rows ``n_i - 1 .. m_i - 2`` from ``turn``: the
        boundary row ``n_i - 1`` (the previous turn's last token, never forwarded by the engine that
        sampled it) comes from the new turn. After every turn the trace has ``m_i - 1`` rows.
        """
        if turn.num_sequences != self.num_sequences or any(t < r for t, r in zip(turn.rows_per_seq, self.rows_per_seq)):
            raise AlignmentError(
                f"RoutingTrace.append_turn: the new turn's trace has rows {turn.rows_per_seq}, fewer than the "
                f"{self.rows_per_seq} already routed (its prompt must be the whole conversation so far)"
            )
        return self.extend(turn.rows_from(self.rows_per_seq))
    # --8<-- [end:append-turn]

    def _spans(self) -> list[tuple[int, int]]:
        """(first row, row count) of each sequence."""
        out, start = [], 0
        for rows in self.rows_per_seq:
            out.append((start, rows))
            start += rows
        return out

    @staticmethod
    def from_padded(
        routes: torch.Tensor,
        seq_lengths: Sequence[int],
        num_experts: int,
        valid: torch.Tensor | None = None,
        *,
        router_family: str | None = None,
    ) -> "RoutingTrace":
        """Build a trace from per-position routes of a right-padded batch.

        Args:
            routes: ``[batch, seq_len, num_layers, top_k]`` routes of a forward over all positions.
            seq_lengths: tokens in each sequence (``<= seq_len``); sequence ``i`` keeps positions
                ``0 .. seq_lengths[i]-2`` (the alignment rule).
            valid: optional ``[batch, seq_len]`` bool mask of positions whose routes are known.
        """
        if routes.dim() != 4:
            raise ValueError(f"RoutingTrace.from_padded: routes must be [batch, seq_len, num_layers, top_k], got {tuple(routes.shape)}")
        batch, seq_len = routes.shape[:2]
        seq_lengths = [int(n) for n in seq_lengths]
        if len(seq_lengths) != batch:
            raise ValueError(f"RoutingTrace.from_padded: {len(seq_lengths)} lengths for a batch of {batch}")
        if any(n > seq_len for n in seq_lengths):
            raise ValueError(f"RoutingTrace.from_padded: a length in {seq_lengths} exceeds seq_len={seq_len}")
        rows = [routed_rows(n) for n in seq_lengths]
        ids = torch.cat([routes[b, :r] for b, r in enumerate(rows)])
        if valid is None:
            row_valid = None
        else:
            row_valid = torch.cat([valid[b, :r] for b, r in enumerate(rows)]).to(torch.bool)
        return RoutingTrace(ids, num_experts, row_valid, rows, router_family=router_family)

    def to_padded(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Lay the trace out on a right-padded grid for a forward over ``seq_len`` positions.

        Returns ``(ids, valid)`` with ids ``[num_sequences, seq_len, num_layers, top_k]`` (int64)
        and valid ``[num_sequences, seq_len]``: sequence ``i`` fills positions ``0 .. rows_i-1``;
        its last token position and the padding stay invalid (routed natively on replay).
        """
        num_seq = self.num_sequences
        ids = torch.zeros(num_seq, seq_len, self.num_layers, self.top_k, dtype=torch.int64)
        ids[:] = torch.arange(self.top_k)  # well-formed filler
        valid = torch.zeros(num_seq, seq_len, dtype=torch.bool)
        start = 0
        for i, rows in enumerate(self.rows_per_seq):
            if rows > seq_len:
                raise ValueError(
                    f"RoutingTrace: sequence {i} has {rows} routed rows, more than the {seq_len} positions of the forward"
                )
            ids[i, :rows] = self.expert_ids[start : start + rows].to(torch.int64)
            valid[i, :rows] = self.valid[start : start + rows]
            start += rows
        return ids, valid

    # ------------------------------------------------------------ agreement
    # --8<-- [start:agreement]
    def agreement(self, other: "RoutingTrace") -> RoutingAgreement:
        """Disagreement with ``other`` at the R3 paper's three levels, over rows valid in both.

        Top-k order is ignored (sets are compared). Traces with different ``num_experts`` or
        sequence boundaries (``rows_per_seq``) describe different things and are refused
        (:class:`AlignmentError`). With no row valid in both, every disagreement is NaN (not 0:
        nothing was compared) and ``num_tokens`` is 0; ``num_rows`` is the rows of each trace.
        """
        if (self.num_tokens, self.num_layers, self.top_k) != (other.num_tokens, other.num_layers, other.top_k):
            raise AlignmentError(
                "RoutingTrace.agreement: shapes differ: "
                f"{tuple(self.expert_ids.shape)} vs {tuple(other.expert_ids.shape)}"
            )
        if self.num_experts != other.num_experts:
            raise AlignmentError(
                f"RoutingTrace.agreement: num_experts differ ({self.num_experts} vs {other.num_experts}): "
                "the ids name different experts"
            )
        if self.rows_per_seq != other.rows_per_seq:
            first = next(i for i, (a, b) in enumerate(zip(self.rows_per_seq, other.rows_per_seq)) if a != b) if self.num_sequences == other.num_sequences else None
            where = f"sequence {first} has {self.rows_per_seq[first]} vs {other.rows_per_seq[first]} rows" if first is not None else f"{self.num_sequences} vs {other.num_sequences} sequences"
            raise AlignmentError(f"RoutingTrace.agreement: sequence boundaries differ ({where})")
        both = self.valid & other.valid
        a = self.expert_ids[both].to(torch.int64).sort(dim=-1).values
        b = other.expert_ids[both].to(torch.int64).sort(dim=-1).values
        differs = (a != b).any(dim=-1)  # [tokens, layers]
        n = int(both.sum())
        if n == 0:
            nan = float("nan")
            return RoutingAgreement(nan, nan, nan, 0, (nan,) * self.num_layers, num_rows=self.num_tokens)
        return RoutingAgreement(
            router_disagreement=float(differs.float().mean()),
            token_disagreement=float(differs.any(dim=-1).float().mean()),
            mean_differing_layers=float(differs.sum(dim=-1).float().mean()),
            num_tokens=n,
            per_layer=tuple(differs.float().mean(dim=0).tolist()),
            num_rows=self.num_tokens,
        )
    # --8<-- [end:agreement]

    # ---------------------------------------------------------- persistence
    # --8<-- [start:to-tensors]
    def to_tensors(self, prefix: str = "", packed: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The on-disk layout: tensors and metadata, names prefixed by ``prefix``.

        Both versions store ``rows_per_seq`` (int64 per sequence) and ``invalid_rows`` (int64
        indices of invalid rows; empty when all rows are valid). Version ``"2"`` (``packed=True``,
        the default) stores the ids as ``packed_ids``, uint8 bytes of
        :func:`reference_impl.trace_packing.encode_sets` (one rank or k ids per (token, layer)
        row, token-major), with ``num_layers``, ``top_k`` and ``packing`` in the metadata.
        Version ``"1"`` stores ``expert_ids`` in the compact dtype.
        """
        tensors = {
            prefix + "rows_per_seq": torch.tensor(self.rows_per_seq, dtype=torch.int64),
            prefix + "invalid_rows": torch.nonzero(~self.valid).flatten().to(torch.int64),
        }
        meta = {"format": _FORMAT_NAME, prefix + "num_experts": str(self.num_experts)}
        if self.router_family is not None:  # optional metadata key (older files lack it)
            meta[prefix + "router_family"] = self.router_family
        if not packed:
            tensors[prefix + "expert_ids"] = self.expert_ids.contiguous()
            return tensors, {**meta, "version": _FORMAT_VERSION}
        layout = packed_layout(self.num_experts, self.top_k)
        tensors[prefix + "packed_ids"] = encode_sets(self.expert_ids.reshape(-1, self.top_k), layout)
        meta.update({prefix + "num_layers": str(self.num_layers), prefix + "top_k": str(self.top_k), prefix + "packing": layout.scheme})
        return tensors, {**meta, "version": _PACKED_VERSION}
    # --8<-- [end:to-tensors]

    @staticmethod
    def from_tensors(
        tensors: dict[str, torch.Tensor], meta: dict[str, str], prefix: str = "", source: str = "RoutingTrace.load"
    ) -> "RoutingTrace":
        """Rebuild (and fully validate) a trace from :meth:`to_tensors` output of either version.

        ``source`` (e.g. the file name) starts every :class:`TraceFormatError` message.
        """
        version = meta.get("version")
        if version not in (_FORMAT_VERSION, _PACKED_VERSION):
            raise TraceFormatError(
                f"{source}: unsupported trace version {version!r} (this reader knows {_FORMAT_VERSION!r} and {_PACKED_VERSION!r})"
            )
        names = ("packed_ids" if version == _PACKED_VERSION else "expert_ids", "rows_per_seq", "invalid_rows")
        keys = ("num_experts", "num_layers", "top_k", "packing") if version == _PACKED_VERSION else ("num_experts",)
        missing = [prefix + n for n in names if prefix + n not in tensors] + [prefix + k for k in keys if prefix + k not in meta]
        if missing:
            raise TraceFormatError(f"{source}: file lacks {missing}")
        ids, rows_per_seq, invalid_rows = (tensors[prefix + n] for n in names)
        num_experts = _meta_int(meta, prefix + "num_experts", source)
        try:
            dtype = compact_dtype(num_experts)
        except ValueError as err:
            raise TraceFormatError(f"{source}: {err}") from None
        for name, t in (("rows_per_seq", rows_per_seq), ("invalid_rows", invalid_rows)):
            if t.dtype != torch.int64:
                raise TraceFormatError(f"{source}: {prefix}{name} stored as {t.dtype}, expected torch.int64")
            if t.dim() != 1:
                raise TraceFormatError(f"{source}: {prefix}{name} has rank {t.dim()} (shape {tuple(t.shape)}), expected rank 1")
        if version == _FORMAT_VERSION:
            if ids.dtype != dtype:
                raise TraceFormatError(
                    f"{source}: expert_ids stored as {ids.dtype}, expected {dtype} for num_experts={num_experts}"
                )
            if ids.dim() != 3:
                raise TraceFormatError(f"{source}: {prefix}expert_ids has rank {ids.dim()} (shape {tuple(ids.shape)}), expected rank 3")
            valid = _valid_from(invalid_rows, ids.shape[0], source)
            try:
                return RoutingTrace(ids, num_experts, valid, rows_per_seq.tolist(), router_family=meta.get(prefix + "router_family"))
            except (TypeError, ValueError) as err:
                raise TraceFormatError(f"{source}: {err}") from None
        if bool((rows_per_seq < 0).any()):
            raise TraceFormatError(f"{source}: rows_per_seq holds a negative count")
        num_tokens, num_layers, top_k = int(rows_per_seq.sum()), _meta_int(meta, prefix + "num_layers", source), _meta_int(meta, prefix + "top_k", source)
        if num_layers < 1 or not 1 <= top_k <= num_experts:
            raise TraceFormatError(f"{source}: num_layers={num_layers}, top_k={top_k} invalid for num_experts={num_experts}")
        layout = packed_layout(num_experts, top_k)
        if meta[prefix + "packing"] != layout.scheme:
            raise TraceFormatError(f"{source}: packing {meta[prefix + 'packing']!r}, but (E={num_experts}, k={top_k}) is stored as {layout.scheme!r}")
        expected = layout.payload_bytes(num_tokens * num_layers)
        if ids.numel() != expected:  # checked before anything of the size the metadata claims is allocated
            raise TraceFormatError(
                f"{source}: {prefix}packed_ids has {ids.numel()} bytes, expected {expected} for "
                f"{num_tokens * num_layers} rows of {layout.bits_per_row} bits ({num_tokens} tokens x {num_layers} layers)"
            )
        valid = _valid_from(invalid_rows, num_tokens, source)
        flat = decode_sets(ids, layout, num_tokens * num_layers, dtype, source)
        try:
            return RoutingTrace._from_checked(
                flat.view(num_tokens, num_layers, top_k), num_experts, valid, rows_per_seq.tolist(), router_family=meta.get(prefix + "router_family")
            )
        except (TypeError, ValueError) as err:
            raise TraceFormatError(f"{source}: {err}") from None

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None, packed: bool = True) -> None:
        """Write the trace with safetensors (never pickle), layout of :meth:`to_tensors`.

        Packed (version ``"2"``) by default; ``packed=False`` writes version ``"1"`` (a plain
        ``expert_ids`` tensor any safetensors reader can index).
        """
        tensors, meta = self.to_tensors(packed=packed)
        save_file(tensors, os.fspath(path), metadata=_merge_metadata(meta, metadata))

    @staticmethod
    def load(path: str | os.PathLike) -> "RoutingTrace":
        """Read a trace written by :meth:`save` (either version), validating it fully."""
        trace, _ = RoutingTrace.load_with_metadata(path)
        return trace

    @staticmethod
    def load_with_metadata(path: str | os.PathLike) -> tuple["RoutingTrace", dict[str, str]]:
        """Like :meth:`load`, also returning the user metadata stored with the trace."""
        tensors, meta = read_safetensors(path, _FORMAT_NAME)
        user_meta = {k: v for k, v in meta.items() if k not in _RESERVED_KEYS}
        return RoutingTrace.from_tensors(tensors, meta, source=f"RoutingTrace.load({os.fspath(path)!r})"), user_meta


def _meta_int(meta: dict[str, str], key: str, source: str) -> int:
    try:
        return int(meta[key])
    except ValueError:
        raise TraceFormatError(f"{source}: metadata {key}={meta[key]!r} is not an integer") from None


def _valid_from(invalid_rows: torch.Tensor, num_tokens: int, source: str) -> torch.Tensor:
    valid = torch.ones(num_tokens, dtype=torch.bool)
    if invalid_rows.numel():
        if int(invalid_rows.min()) < 0 or int(invalid_rows.max()) >= num_tokens:
            raise TraceFormatError(f"{source}: invalid_rows holds an index outside the trace")
        valid[invalid_rows] = False
    return valid


def _merge_metadata(meta: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    meta = dict(meta)
    for key, value in (extra or {}).items():
        if key in meta or key in _RESERVED_KEYS:
            raise ValueError(f"save: metadata key {key!r} is reserved")
        if not isinstance(value, str):
            raise TypeError(f"save: metadata values must be str, got {type(value).__name__} for {key!r}")
        meta[key] = value
    return meta


def read_safetensors(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file whose ``format`` metadata is ``expected_format``.

    Any file that cannot be read as such (missing, a directory, empty, truncated, not safetensors,
    another format) raises :class:`TraceFormatError` naming the file and what is wrong.
    """
    name = repr(os.fspath(path))
    if not os.path.exists(path):
        raise TraceFormatError(f"load: {name} does not exist")
    if os.path.isdir(path):
        raise TraceFormatError(f"load: {name} is a directory, not a {expected_format} file")
    if os.path.getsize(path) == 0:
        raise TraceFormatError(f"load: {name} is empty")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != expected_format:
                raise TraceFormatError(
                    f"load: {name} is not a {expected_format} file (format={meta.get('format')!r})"
                )
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except TraceFormatError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the parser says, the file is not a valid safetensors file
        raise TraceFormatError(
            f"load: {name} is not a readable safetensors file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None


def _check_ids(ids: torch.Tensor, valid: torch.Tensor, num_experts: int, chunk_tokens: int = 1 << 14) -> None:
    """Range and duplicate checks on valid rows, naming the first offending token and layer.

    Runs over blocks of ``chunk_tokens`` tokens so a large trace never needs an int64 copy of itself.
    """
    for start in range(0, ids.shape[0], chunk_tokens):
        block = ids[start : start + chunk_tokens].to(torch.int64)
        ok = valid[start : start + chunk_tokens]
        bad = ((block < 0) | (block >= num_experts)) & ok[:, None, None]
        if bad.any():
            token, layer, slot = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(
                f"RoutingTrace: expert id {int(block[token, layer, slot])} out of range for num_experts={num_experts} "
                f"at token {start + token}, layer {layer}"
            )
        if ids.shape[-1] > 1:
            sorted_ids = block.sort(dim=-1).values
            dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1) & ok[:, None]
            if dup.any():
                token, layer = (int(v) for v in torch.nonzero(dup)[0])
                raise ValueError(
                    f"RoutingTrace: duplicate expert ids {block[token, layer].tolist()} at token {start + token}, "
                    f"layer {layer} (a top-k row must name k distinct experts)"
                )

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

from .errors import ConfigError

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
_FORMAT_VERSION = "1"


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
    num_tokens: rows compared (valid in both traces).
    """

    router_disagreement: float
    token_disagreement: float
    mean_differing_layers: float
    num_tokens: int
    per_layer: tuple[float, ...] = ()  # share of compared tokens whose top-k set differs, per layer

    def as_dict(self) -> dict[str, float]:
        return {
            "router_disagreement": self.router_disagreement,
            "token_disagreement": self.token_disagreement,
            "mean_differing_layers": self.mean_differing_layers,
            "num_tokens": self.num_tokens,
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

        ids = expert_ids.to(torch.int64)
        _check_ids(ids, valid, num_experts)
        # Invalid rows get a canonical filler (0..k-1): the compact tensor never carries sentinels.
        filler = torch.arange(top_k, dtype=torch.int64).expand(num_layers, top_k)
        ids = torch.where(valid[:, None, None], ids, filler)

        self.expert_ids: torch.Tensor = ids.to(dtype)
        self.valid: torch.Tensor = valid
        self.num_experts: int = num_experts
        self.rows_per_seq: tuple[int, ...] = rows_per_seq
        if router_family is not None and not isinstance(router_family, str):
            raise TypeError(f"RoutingTrace: router_family must be a str or None, got {type(router_family).__name__}")
        self.router_family: str | None = router_family

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
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        return (
            self.num_experts == other.num_experts
            and self.rows_per_seq == other.rows_per_seq
            and torch.equal(self.valid, other.valid)
            and torch.equal(self.expert_ids, other.expert_ids)
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

        Top-k order is ignored (sets are compared).
        """
        if (self.num_tokens, self.num_layers, self.top_k) != (other.num_tokens, other.num_layers, other.top_k):
            raise ValueError(
                "RoutingTrace.agreement: shapes differ: "
                f"{tuple(self.expert_ids.shape)} vs {tuple(other.expert_ids.shape)}"
            )
        both = self.valid & other.valid
        a = self.expert_ids[both].to(torch.int64).sort(dim=-1).values
        b = other.expert_ids[both].to(torch.int64).sort(dim=-1).values
        differs = (a != b).any(dim=-1)  # [tokens, layers]
        n = int(both.sum())
        if n == 0:
            return RoutingAgreement(0.0, 0.0, 0.0, 0, (0.0,) * self.num_layers)
        return RoutingAgreement(
            router_disagreement=float(differs.float().mean()),
            token_disagreement=float(differs.any(dim=-1).float().mean()),
            mean_differing_layers=float(differs.sum(dim=-1).float().mean()),
            num_tokens=n,
            per_layer=tuple(differs.float().mean(dim=0).tolist()),
        )
    # --8<-- [end:agreement]

    # ---------------------------------------------------------- persistence
    def to_tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The on-disk layout (the only one): tensors and metadata, names prefixed by ``prefix``.

        ``expert_ids`` in the compact dtype, ``rows_per_seq`` (int64 per sequence) and
        ``invalid_rows`` (int64 indices of invalid rows; empty when all rows are valid).
        """
        tensors = {
            prefix + "expert_ids": self.expert_ids.contiguous(),
            prefix + "rows_per_seq": torch.tensor(self.rows_per_seq, dtype=torch.int64),
            prefix + "invalid_rows": torch.nonzero(~self.valid).flatten().to(torch.int64),
        }
        meta = {"format": _FORMAT_NAME, "version": _FORMAT_VERSION, prefix + "num_experts": str(self.num_experts)}
        if self.router_family is not None:  # optional key of format version 1 (older files lack it)
            meta[prefix + "router_family"] = self.router_family
        return tensors, meta

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], prefix: str = "") -> "RoutingTrace":
        """Rebuild (and fully validate) a trace from :meth:`to_tensors` output."""
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"RoutingTrace.load: unsupported trace version {meta.get('version')!r}")
        names = [prefix + n for n in ("expert_ids", "rows_per_seq", "invalid_rows")]
        missing = [n for n in names if n not in tensors]
        if missing or prefix + "num_experts" not in meta:
            raise ValueError(f"RoutingTrace.load: file lacks {missing or [prefix + 'num_experts']}")
        ids, rows_per_seq, invalid_rows = (tensors[n] for n in names)
        num_experts = int(meta[prefix + "num_experts"])
        if ids.dtype != compact_dtype(num_experts):
            raise ValueError(
                f"RoutingTrace.load: expert_ids stored as {ids.dtype}, expected {compact_dtype(num_experts)} "
                f"for num_experts={num_experts}"
            )
        valid = torch.ones(ids.shape[0], dtype=torch.bool)
        if invalid_rows.numel():
            if int(invalid_rows.min()) < 0 or int(invalid_rows.max()) >= ids.shape[0]:
                raise ValueError("RoutingTrace.load: invalid_rows holds an index outside the trace")
            valid[invalid_rows] = False
        return RoutingTrace(ids, num_experts, valid, rows_per_seq.tolist(), router_family=meta.get(prefix + "router_family"))

    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
        """Write the trace with safetensors (never pickle), layout of :meth:`to_tensors`."""
        tensors, meta = self.to_tensors()
        save_file(tensors, os.fspath(path), metadata=_merge_metadata(meta, metadata))

    @staticmethod
    def load(path: str | os.PathLike) -> "RoutingTrace":
        """Read a trace written by :meth:`save`, validating it fully."""
        trace, _ = RoutingTrace.load_with_metadata(path)
        return trace

    @staticmethod
    def load_with_metadata(path: str | os.PathLike) -> tuple["RoutingTrace", dict[str, str]]:
        """Like :meth:`load`, also returning the user metadata stored with the trace."""
        tensors, meta = read_safetensors(path, _FORMAT_NAME)
        user_meta = {k: v for k, v in meta.items() if k not in ("format", "version", "num_experts", "router_family")}
        return RoutingTrace.from_tensors(tensors, meta), user_meta


def _merge_metadata(meta: dict[str, str], extra: dict[str, str] | None) -> dict[str, str]:
    meta = dict(meta)
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"save: metadata key {key!r} is reserved")
        if not isinstance(value, str):
            raise TypeError(f"save: metadata values must be str, got {type(value).__name__} for {key!r}")
        meta[key] = value
    return meta


def read_safetensors(path: str | os.PathLike, expected_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file whose ``format`` metadata is ``expected_format``."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != expected_format:
            raise ValueError(
                f"load: {os.fspath(path)!r} is not a {expected_format} file (format={meta.get('format')!r})"
            )
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _check_ids(ids: torch.Tensor, valid: torch.Tensor, num_experts: int) -> None:
    """Range and duplicate checks on valid rows, naming the first offending token and layer."""
    bad = ((ids < 0) | (ids >= num_experts)) & valid[:, None, None]
    if bad.any():
        token, layer, slot = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"RoutingTrace: expert id {int(ids[token, layer, slot])} out of range for num_experts={num_experts} "
            f"at token {token}, layer {layer}"
        )
    if ids.shape[-1] > 1:
        sorted_ids = ids.sort(dim=-1).values
        dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1) & valid[:, None]
        if dup.any():
            token, layer = (int(v) for v in torch.nonzero(dup)[0])
            raise ValueError(
                f"RoutingTrace: duplicate expert ids {ids[token, layer].tolist()} at token {token}, layer {layer} "
                "(a top-k row must name k distinct experts)"
            )

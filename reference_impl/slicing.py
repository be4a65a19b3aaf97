"""The slicing rule: which tokens and layers of a global trace one model-parallel rank routes, and back.

A replayed trace is global: every sequence of the step, every MoE layer. Under model parallelism
each rank's routers see only some of those tokens and hold only some of those layers, and each
router holds one target per forward, so the trace must be cut per rank **and per micro-batch**.
This module is the one place that cut is defined (:func:`slice_routes`) and undone
(:func:`assemble_routes`, for R2: routes RECORDed on every rank and micro-batch → one global grid).

The grid. A right-padded batch ``[B, S]`` has a routing grid ``[S, B, L, k]`` (s-major: megatron's
hidden states are ``[S, B, H]``, so router row ``s * B + b`` is position ``s`` of batch row ``b``).
The rank holding data-parallel rank ``d``, micro-batch ``m``, pipeline stage ``p``, context-parallel
rank ``c`` and tensor-parallel rank ``t`` routes::

    grid[positions][:, rows][:, :, stage_layers]          (then viewed as [s_loc * b_loc, k] per layer)

* ``rows`` (:func:`batch_rows`): data parallelism splits the batch rows into ``dp`` contiguous blocks,
  micro-batches split the rank's block into ``M`` contiguous blocks: ``arange(B).chunk(dp)[d].chunk(M)[m]``.
  In the s-major router layout these are *strided* rows, never a contiguous block of ``[S*B]``.
* ``positions`` (:func:`sequence_positions`): context parallelism cuts the sequence into ``2·cp``
  chunks and gives rank ``c`` chunks ``c`` and ``2·cp−1−c``, in that order (the load-balanced
  "zigzag" split of ``megatron.core.utils.get_batch_on_this_cp_rank``); sequence parallelism then
  gives tensor-parallel rank ``t`` the contiguous chunk ``t`` of those positions (the router runs
  after megatron's scatter to the sequence-parallel region). Tensor parallelism without sequence
  parallelism routes the full (CP-local) sequence on every TP rank.
* ``stage_layers``: the MoE-layer ordinals of pipeline stage ``p`` (:meth:`LayerMap.stage`; dense
  layers have no routes). Expert parallelism changes nothing: the router runs before dispatch, on
  the rank's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .errors import AlignmentError, ConfigError
from .layers import LayerMap

__all__ = ["ParallelLayout", "batch_rows", "sequence_positions", "slice_routes", "assemble_routes"]


@dataclass(frozen=True)
class ParallelLayout:
    """One rank's place in a model-parallel job (sizes and ranks), plus the micro-batch count."""

    dp: int = 1
    dp_rank: int = 0
    pp: int = 1
    pp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    tp: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    num_microbatches: int = 1

    def __post_init__(self) -> None:
        for size, rank in (("dp", "dp_rank"), ("pp", "pp_rank"), ("cp", "cp_rank"), ("tp", "tp_rank")):
            n, r = getattr(self, size), getattr(self, rank)
            if not isinstance(n, int) or n < 1 or not isinstance(r, int) or not 0 <= r < n:
                raise ConfigError(f"ParallelLayout: {rank}={r!r} must be in [0, {size}={n!r})")
        if not isinstance(self.num_microbatches, int) or self.num_microbatches < 1:
            raise ConfigError(f"ParallelLayout: num_microbatches must be an int >= 1, got {self.num_microbatches!r}")

    @classmethod
    def from_megatron(cls, config, num_microbatches: int = 1) -> "ParallelLayout":
        """This rank's layout from megatron-core's ``parallel_state`` and a ``TransformerConfig``."""
        from megatron.core import parallel_state as ps

        return cls(
            dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
            pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
            tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            sequence_parallel=bool(config.sequence_parallel), num_microbatches=num_microbatches,
        )


def _chunk(n: int, parts: int, index: int, what: str) -> torch.Tensor:
    if n % parts:
        raise ConfigError(f"slicing: {what} of {n} cannot be split into {parts} equal parts")
    per = n // parts
    return torch.arange(index * per, (index + 1) * per)


def batch_rows(layout: ParallelLayout, batch: int, microbatch: int) -> torch.Tensor:
    """Global batch rows of ``microbatch`` on this data-parallel rank: ``arange(B).chunk(dp)[d].chunk(M)[m]``."""
    if not 0 <= microbatch < layout.num_microbatches:
        raise ConfigError(f"slicing: micro-batch {microbatch} out of range [0, {layout.num_microbatches})")
    rows = _chunk(batch, layout.dp, layout.dp_rank, "a global batch")
    return rows[_chunk(len(rows), layout.num_microbatches, microbatch, f"data-parallel rank {layout.dp_rank}'s batch")]


def sequence_positions(layout: ParallelLayout, seq_len: int, *, router: bool = True) -> torch.Tensor:
    """Global positions this rank holds, in its local order.

    ``router=False``: the positions of the rank's *input* (context-parallel zigzag chunks ``c`` and
    ``2·cp−1−c``); ``router=True``: the positions its routers see (then the sequence-parallel chunk).
    """
    cp, c = layout.cp, layout.cp_rank
    if cp > 1 and seq_len % (2 * cp):
        raise ConfigError(f"slicing: a sequence of {seq_len} cannot be cut into 2*cp={2 * cp} equal chunks")
    if cp > 1:
        per = seq_len // (2 * cp)
        pos = torch.cat([torch.arange(c * per, (c + 1) * per), torch.arange((2 * cp - 1 - c) * per, (2 * cp - c) * per)])
    else:
        pos = torch.arange(seq_len)
    if router and layout.sequence_parallel and layout.tp > 1:
        pos = pos[_chunk(len(pos), layout.tp, layout.tp_rank, "a context-parallel-local sequence")]
    return pos


# --8<-- [start:slice_routes]
def slice_routes(grid: torch.Tensor, layout: ParallelLayout, microbatch: int, layer_map: LayerMap) -> torch.Tensor:
    """This rank's routes for one micro-batch: ``grid[positions][:, rows][:, :, stage_layers]``.

    ``grid`` is the global ``[S, B, L, ...]`` (s-major, ``L`` = MoE layers); the result is
    ``[s_loc, b_loc, L_stage, ...]``, whose ``[:, :, j]`` viewed as ``[s_loc * b_loc, ...]`` is the
    target of the stage's ``j``-th MoE router (see the module docstring for each cut).
    """
    if grid.dim() < 3 or grid.shape[2] != layer_map.num_moe_layers:
        raise AlignmentError(
            f"slice_routes: grid must be [S, B, {layer_map.num_moe_layers} MoE layers, ...], got {tuple(grid.shape)}"
        )
    positions = sequence_positions(layout, grid.shape[0], router=True)
    rows = batch_rows(layout, grid.shape[1], microbatch)
    layers = list(layer_map.stage(layout.pp_rank, layout.pp))
    return grid[positions][:, rows][:, :, layers]
# --8<-- [end:slice_routes]


# --8<-- [start:assemble_routes]
def assemble_routes(
    pieces: Iterable[tuple[ParallelLayout, int, torch.Tensor]],
    seq_len: int,
    batch: int,
    layer_map: LayerMap,
    *,
    fill: int = -1,
    allow_missing: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`slice_routes`: ``(layout, microbatch, local)`` pieces → the global ``[S, B, L, ...]`` grid.

    Every piece is written where :func:`slice_routes` would have read it. Entries written twice (TP
    ranks without sequence parallelism see the same tokens) must agree; entries nobody wrote keep
    ``fill`` and raise unless ``allow_missing`` (a partial grid, e.g. one rank's share before a gather).
    """
    out: torch.Tensor | None = None
    written: torch.Tensor | None = None
    for layout, microbatch, local in pieces:
        positions = sequence_positions(layout, seq_len, router=True)
        rows = batch_rows(layout, batch, microbatch)
        layers = torch.tensor(layer_map.stage(layout.pp_rank, layout.pp), dtype=torch.long)
        if tuple(local.shape[:3]) != (len(positions), len(rows), len(layers)):
            raise AlignmentError(
                f"assemble_routes: a piece of {layout} micro-batch {microbatch} has shape {tuple(local.shape)}, "
                f"expected [{len(positions)}, {len(rows)}, {len(layers)}, ...]"
            )
        if out is None:
            out = torch.full((seq_len, batch, layer_map.num_moe_layers, *local.shape[3:]), fill, dtype=local.dtype)
            written = torch.zeros(seq_len, batch, layer_map.num_moe_layers, dtype=torch.bool)
        idx = (positions[:, None, None], rows[None, :, None], layers[None, None, :])
        seen = written[idx]
        if seen.any() and not torch.equal(out[idx][seen], local[seen]):
            raise AlignmentError(f"assemble_routes: {layout} micro-batch {microbatch} disagrees with a piece written before")
        out[idx] = local
        written[idx] = True
    if out is None:
        raise AlignmentError("assemble_routes: no pieces given")
    if not allow_missing and not written.all():
        missing = (~written).nonzero()[0].tolist()
        raise AlignmentError(f"assemble_routes: no piece covers position {missing[0]}, row {missing[1]}, MoE layer {missing[2]}")
    return out
# --8<-- [end:assemble_routes]

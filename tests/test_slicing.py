"""The model-parallel slicing rule and its inverse (reference_impl.slicing), on plain tensors."""

import itertools

import pytest
import torch

from reference_impl.errors import AlignmentError, ConfigError
from reference_impl.layers import LayerMap
from reference_impl.slicing import ParallelLayout, assemble_routes, batch_rows, sequence_positions, slice_routes

S, B, K = 8, 4, 2


def coded_grid(num_layers: int) -> torch.Tensor:
    """grid[s, b, l, :] = (code, code) with code = 1000*l + 10*s + b: every entry names its place."""
    s, b, l = torch.meshgrid(torch.arange(S), torch.arange(B), torch.arange(num_layers), indexing="ij")
    code = 1000 * l + 10 * s + b
    return torch.stack([code, code], dim=-1)


def all_layouts(**sizes):
    """Every rank of a job with the given sizes (dp, pp, cp, tp, sequence_parallel, num_microbatches)."""
    dp, pp, cp, tp = (sizes.get(k, 1) for k in ("dp", "pp", "cp", "tp"))
    for d, p, c, t in itertools.product(range(dp), range(pp), range(cp), range(tp)):
        yield ParallelLayout(dp=dp, dp_rank=d, pp=pp, pp_rank=p, cp=cp, cp_rank=c, tp=tp, tp_rank=t,
                             sequence_parallel=sizes.get("sp", False), num_microbatches=sizes.get("m", 1))


def test_data_parallel_rows_are_strided_in_the_s_major_router_layout():
    lay = ParallelLayout(dp=2, dp_rank=1)
    local = slice_routes(coded_grid(1), lay, 0, LayerMap.from_config(1))
    assert batch_rows(lay, B, 0).tolist() == [2, 3]
    flat = local[:, :, 0, 0].reshape(-1)  # the router's [s_loc * b_loc] rows
    assert flat[:4].tolist() == [2, 3, 12, 13]  # (s=0, b=2), (s=0, b=3), (s=1, b=2), ...: strided, not rows 16..31


def test_micro_batches_split_the_rank_block_contiguously():
    lay = ParallelLayout(dp=2, dp_rank=0, num_microbatches=2)
    assert [batch_rows(lay, B, m).tolist() for m in range(2)] == [[0], [1]]
    with pytest.raises(ConfigError, match="micro-batch 2 out of range"):
        batch_rows(lay, B, 2)


def test_context_parallel_is_the_zigzag_of_get_batch_on_this_cp_rank():
    assert sequence_positions(ParallelLayout(cp=2, cp_rank=0), S).tolist() == [0, 1, 6, 7]
    assert sequence_positions(ParallelLayout(cp=2, cp_rank=1), S).tolist() == [2, 3, 4, 5]
    with pytest.raises(ConfigError, match="2\\*cp=4"):
        sequence_positions(ParallelLayout(cp=2, cp_rank=0), 6)


def test_sequence_parallel_takes_the_tp_chunk_of_the_cp_local_sequence_for_routers_only():
    lay = ParallelLayout(cp=2, cp_rank=1, tp=2, tp_rank=1, sequence_parallel=True)
    assert sequence_positions(lay, S, router=True).tolist() == [4, 5]
    assert sequence_positions(lay, S, router=False).tolist() == [2, 3, 4, 5]  # the input is not SP-split
    no_sp = ParallelLayout(tp=2, tp_rank=1)
    assert sequence_positions(no_sp, S).tolist() == list(range(S))


def test_pipeline_stages_get_their_own_moe_ordinals_dense_layers_excluded():
    lm = LayerMap.from_config(4, moe_layer_freq=[1, 0, 1, 1])  # MoE ordinals 0 (layer 0), 1 (layer 2), 2 (layer 3)
    grid = coded_grid(3)
    stage1 = slice_routes(grid, ParallelLayout(pp=2, pp_rank=1), 0, lm)
    assert stage1.shape == (S, B, 2, K)
    assert (stage1[..., 0] // 1000).unique().tolist() == [1, 2]
    stage0 = slice_routes(grid, ParallelLayout(pp=2, pp_rank=0), 0, lm)
    assert (stage0[..., 0] // 1000).unique().tolist() == [0]
    with pytest.raises(AlignmentError, match="3 MoE layers"):
        slice_routes(coded_grid(4), ParallelLayout(), 0, lm)


@pytest.mark.parametrize(
    "sizes",
    [dict(dp=2, m=2), dict(tp=2, sp=True, m=2), dict(pp=2, m=2), dict(cp=2, m=2), dict(cp=2, tp=2, sp=True), dict(dp=2, pp=2, cp=2, m=1), dict(tp=2)],
)
def test_assemble_inverts_slice_over_every_rank_and_micro_batch(sizes):
    lm = LayerMap.from_config(4)
    grid = coded_grid(4)
    pieces = [(lay, m, slice_routes(grid, lay, m, lm)) for lay in all_layouts(**sizes) for m in range(lay.num_microbatches)]
    assert torch.equal(assemble_routes(pieces, S, B, lm), grid)
    # every global entry is read by exactly one rank and micro-batch (by tp ranks alike without SP)
    reads = sum(p[2].numel() for p in pieces)
    assert reads == grid.numel() * (sizes.get("tp", 1) if not sizes.get("sp") else 1)


def test_assemble_refuses_gaps_shape_errors_and_disagreeing_duplicates():
    lm = LayerMap.from_config(2)
    grid = coded_grid(2)
    lays = list(all_layouts(dp=2))
    one = [(lays[0], 0, slice_routes(grid, lays[0], 0, lm))]
    with pytest.raises(AlignmentError, match="no piece covers position 0, row 2"):
        assemble_routes(one, S, B, lm)
    partial = assemble_routes(one, S, B, lm, allow_missing=True)
    assert (partial[:, 2:] == -1).all() and torch.equal(partial[:, :2], grid[:, :2])
    with pytest.raises(AlignmentError, match="has shape"):
        assemble_routes([(lays[1], 0, grid)], S, B, lm)
    tp = list(all_layouts(tp=2))
    a = slice_routes(grid, tp[0], 0, lm)
    with pytest.raises(AlignmentError, match="disagrees"):
        assemble_routes([(tp[0], 0, a), (tp[1], 0, a + 1)], S, B, lm)


def test_layouts_are_validated():
    with pytest.raises(ConfigError, match="tp_rank=2"):
        ParallelLayout(tp=2, tp_rank=2)
    with pytest.raises(ConfigError, match="cannot be split into 2"):
        batch_rows(ParallelLayout(dp=2), 3, 0)


def test_shards_of_a_gated_fc1_are_gate_and_up_halves_and_unshard_inverts_them():
    from reference_impl.integrations.megatron_cpu import ShardSpec, shard_tensor, unshard_tensors

    full = torch.arange(8.0)[:, None].expand(8, 3)  # rows 0..3 = gate, 4..7 = up
    specs = [ShardSpec("w", i, 2, 0, gated=True) for i in range(2)]
    shards = [shard_tensor(full, s) for s in specs]
    assert shards[0][:, 0].tolist() == [0, 1, 4, 5] and shards[1][:, 0].tolist() == [2, 3, 6, 7]
    assert torch.equal(unshard_tensors(shards, specs[0]), full)
    plain = [ShardSpec("w", i, 2, 1) for i in range(2)]
    assert torch.equal(unshard_tensors([shard_tensor(full, s) for s in plain], plain[0]), full)
    with pytest.raises(ValueError, match="needs 2 shards"):
        unshard_tensors(shards[:1], specs[0])


@pytest.mark.parametrize(
    "control,sizes",
    [("batch_major", dict(dp=2)), ("contiguous_rows", dict(dp=2, m=2)), ("contiguous_rows", dict(m=2)),
     ("first_stage_layers", dict(pp=2)), ("contiguous_cp", dict(cp=2))],
)
def test_every_negative_control_slices_differently_on_some_rank_with_the_same_shapes(control, sizes):
    """The controls of the multi-rank test are real bugs: same shapes (megatron accepts them), other routes."""
    from reference_impl.integrations.megatron_parity import CONTROLS

    slicer, _ = CONTROLS[control]
    lm = LayerMap.from_config(4)
    grid = coded_grid(4)
    differs = False
    for lay in all_layouts(**sizes):
        for m in range(lay.num_microbatches):
            good, bad = slice_routes(grid, lay, m, lm), slicer(grid, lay, m, lm)
            assert bad.shape == good.shape
            differs |= not torch.equal(good, bad)
    assert differs

"""Megatron's s-major replay-target layout, on plain tensors (no megatron-core needed)."""

import pytest
import torch

from reference_impl import RoutingTrace
from reference_impl.integrations.megatron import megatron_replay_targets, recorded_to_trace


def test_duplicate_ids_in_a_target_row_are_refused_by_the_trace():
    ids = torch.tensor([[[1, 2]], [[3, 3]]])
    with pytest.raises(ValueError, match="duplicate expert ids"):
        RoutingTrace(ids, num_experts=8)


def test_targets_are_s_major_long_with_the_tail_marked_invalid():
    # two sequences of 4 and 2 tokens: 3 and 1 routed rows, forward over S = 4 positions
    ids = torch.tensor([[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]])
    trace = RoutingTrace(ids, num_experts=8, rows_per_seq=(3, 1))
    targets, valid = megatron_replay_targets(trace, seq_len=4)
    assert len(targets) == 1 and targets[0].dtype == torch.long and targets[0].shape == (8, 2)
    # row s * B + b
    assert targets[0][0 * 2 + 0].tolist() == [0, 1] and targets[0][0 * 2 + 1].tolist() == [6, 7]
    assert targets[0][2 * 2 + 0].tolist() == [4, 5]
    assert valid.tolist() == [True, True, True, False, True, False, False, False]
    # and back: Megatron's recorded layout -> the same trace (ids sorted within a row)
    recorded = [t[:, [1, 0]] for t in targets]  # Megatron records in top-k order, not sorted
    assert recorded_to_trace(recorded, [4, 2], num_experts=8) == trace

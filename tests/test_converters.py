"""Framework layouts → RoutingTrace: row counts, sentinels, dtypes, s-major vs b-major."""

import base64

import numpy as np
import pytest
import torch

from reference_impl import RoutingTrace
from reference_impl.converters import (
    from_layer_major,
    from_sentinel_rows,
    from_sglang,
    from_verl,
    from_vllm,
    to_layer_major,
)


def rows(n, L=3, k=2, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, L, E, generator=g).topk(k, dim=-1).indices


def test_vllm_arrays_with_prompt_plus_gen_minus_one_rows():
    a, b = rows(9).numpy().astype(np.uint8), rows(4, seed=1).numpy().astype(np.uint8)
    trace = from_vllm([a, b], seq_lengths=[10, 5], num_experts=8)
    assert trace.rows_per_seq == (9, 4)
    assert torch.equal(trace.expert_ids[:9].long(), torch.from_numpy(a).long())
    with pytest.raises(ValueError, match="sequence 1: routed_experts has 4 rows but a sequence of 6 tokens"):
        from_vllm([a, b], seq_lengths=[10, 6], num_experts=8)


def test_vllm_uint16_payload_past_256_experts():
    a = rows(5, E=300).numpy().astype(np.uint16)
    a[0, 0] = [299, 256]
    trace = from_vllm([a], seq_lengths=[6], num_experts=300)
    assert trace.expert_ids.dtype == torch.int16 and trace.expert_ids[0, 0].tolist() == [299, 256]


def test_sglang_base64_int32_payload():
    r = rows(6).numpy().astype(np.int32)
    payload = base64.b64encode(r.tobytes()).decode()
    trace = from_sglang([payload], seq_lengths=[7], num_layers=3, top_k=2, num_experts=8)
    assert torch.equal(trace.expert_ids.long(), torch.from_numpy(r).long())
    with pytest.raises(ValueError, match="not a multiple of num_layers\\*top_k=8"):
        from_sglang([payload], seq_lengths=[7], num_layers=4, top_k=2, num_experts=8)


def test_verl_drops_the_last_zero_row_and_turns_the_mask_into_invalid_rows():
    r = rows(8)
    r[-1] = 0  # verl's zero last row (would be a duplicate-id row: must never be validated)
    r[2] = 0  # a masked-out row with zeros
    mask = torch.ones(8, dtype=torch.bool)
    mask[2] = False
    trace = from_verl([r.to(torch.int16)], [mask], num_experts=8)
    assert trace.rows_per_seq == (7,)
    assert trace.valid.tolist() == [True, True, False, True, True, True, True]


def test_nemo_rl_minus_one_rows_become_invalid():
    r = rows(5)
    r[1] = -1
    trace = from_sentinel_rows([r], seq_lengths=[6], num_experts=8)
    assert trace.valid.tolist() == [True, False, True, True, True]


@pytest.mark.parametrize("order", ["s-major", "b-major"])
def test_layer_major_round_trip(order):
    trace = RoutingTrace(rows(7 + 4), 8, rows_per_seq=(7, 4))
    per_layer, valid = to_layer_major(trace, seq_len=8, order=order)
    assert len(per_layer) == 3 and per_layer[0].shape == (16, 2) and per_layer[0].dtype == torch.long
    back = from_layer_major(per_layer, seq_lengths=[8, 5], num_experts=8, order=order)
    assert back == trace
    assert int(valid.sum()) == 11


def test_s_major_puts_batch_rows_next_to_each_other():
    trace = RoutingTrace(rows(3 + 3), 8, rows_per_seq=(3, 3))
    per_layer, _ = to_layer_major(trace, seq_len=4, order="s-major")
    # row s*B + b: rows 0 and 1 are position 0 of sequences 0 and 1
    assert per_layer[0][0].tolist() == trace.expert_ids[0, 0].long().tolist()
    assert per_layer[0][1].tolist() == trace.expert_ids[3, 0].long().tolist()


def test_verl_accepts_a_numpy_bool_mask():
    r = rows(4)
    mask = np.array([True, False, True, True])
    trace = from_verl([r.numpy().astype(np.int16)], [mask], num_experts=8)
    assert trace.valid.tolist() == [True, False, True]

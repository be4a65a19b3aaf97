"""RoutingTrace: layout, dtype rule, alignment rule, validation, persistence, agreement."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reference_impl import RoutingTrace, routed_rows
from reference_impl.routing import compact_dtype
from reference_impl.routing import MAX_NUM_EXPERTS


def random_ids(num_tokens, num_layers, top_k, num_experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_layers, num_experts, generator=g)
    return scores.topk(top_k, dim=-1).indices  # distinct ids per row


# ------------------------------------------------------------------------- dtype rule
@pytest.mark.parametrize(
    "num_experts, dtype",
    [(1, torch.uint8), (8, torch.uint8), (256, torch.uint8), (257, torch.int16), (MAX_NUM_EXPERTS, torch.int16)],
)
def test_compact_dtype_follows_the_expert_count(num_experts, dtype):
    assert compact_dtype(num_experts) == dtype


def test_more_than_int16_experts_is_refused():
    with pytest.raises(ValueError, match="larger than 32767"):
        compact_dtype(MAX_NUM_EXPERTS + 1)


def test_more_than_256_experts_round_trips_without_overflow(tmp_path):
    ids = random_ids(50, 3, 4, 300)
    ids[0, 0] = torch.tensor([299, 256, 255, 0])
    trace = RoutingTrace(ids, num_experts=300)
    assert trace.expert_ids.dtype == torch.int16
    trace.save(tmp_path / "t.safetensors")
    loaded = RoutingTrace.load(tmp_path / "t.safetensors")
    assert loaded == trace
    assert torch.equal(loaded.expert_ids.long(), ids)


def test_256_experts_fit_uint8_including_id_255(tmp_path):
    ids = random_ids(20, 2, 2, 256)
    ids[3, 1] = torch.tensor([255, 254])
    trace = RoutingTrace(ids, num_experts=256)
    assert trace.expert_ids.dtype == torch.uint8
    assert torch.equal(trace.expert_ids.long(), ids)


# ------------------------------------------------------------------- alignment rule
def test_a_sequence_of_n_tokens_has_n_minus_1_routed_rows():
    assert routed_rows(10) == 9
    assert routed_rows(1) == 0
    with pytest.raises(ValueError, match="at least 1 token"):
        routed_rows(0)


def test_check_alignment_accepts_n_minus_1_rows_and_names_any_other_mismatch():
    trace = RoutingTrace(random_ids(9 + 4, 2, 2, 8), 8, rows_per_seq=(9, 4))
    trace.check_alignment([10, 5])
    with pytest.raises(ValueError, match=r"sequence 1 has 4 tokens, so 3 routed rows are expected .* but the trace has 4"):
        trace.check_alignment([10, 4])
    with pytest.raises(ValueError, match="sequence 0 has 9 tokens"):
        trace.check_alignment([9, 5])
    with pytest.raises(ValueError, match="holds 2 sequences but 3 lengths"):
        trace.check_alignment([10, 5, 3])


def test_from_padded_keeps_positions_0_to_n_minus_2_and_to_padded_inverts_it():
    routes = random_ids(2 * 7, 2, 2, 8).view(2, 7, 2, 2)
    trace = RoutingTrace.from_padded(routes, [7, 4], num_experts=8)
    assert trace.rows_per_seq == (6, 3)
    assert torch.equal(trace.expert_ids[:6].long(), routes[0, :6])
    assert torch.equal(trace.expert_ids[6:].long(), routes[1, :3])
    ids, valid = trace.to_padded(7)
    assert valid.tolist() == [[True] * 6 + [False], [True] * 3 + [False] * 4]
    assert torch.equal(ids[0, :6], routes[0, :6]) and torch.equal(ids[1, :3], routes[1, :3])


# ---------------------------------------------------------------------- validation
def test_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"shape \[num_tokens, num_layers, top_k\], got \(4, 2\)"):
        RoutingTrace(torch.zeros(4, 2, dtype=torch.long), 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_non_integer_dtype_is_refused(dtype):
    with pytest.raises(TypeError, match="integer dtype"):
        RoutingTrace(torch.zeros(4, 2, 2, dtype=dtype), 8)


def test_out_of_range_id_names_token_and_layer():
    ids = random_ids(20, 4, 2, 256)
    ids[17, 3, 1] = 300
    with pytest.raises(ValueError, match="expert id 300 out of range for num_experts=256 at token 17, layer 3"):
        RoutingTrace(ids, 256)


def test_negative_id_on_a_valid_row_is_out_of_range():
    ids = random_ids(5, 2, 2, 8)
    ids[2, 0, 0] = -1
    with pytest.raises(ValueError, match="expert id -1 out of range for num_experts=8 at token 2, layer 0"):
        RoutingTrace(ids, 8)


def test_duplicate_ids_within_a_row_are_refused():
    ids = random_ids(5, 2, 3, 8)
    ids[4, 1] = torch.tensor([6, 2, 6])
    with pytest.raises(ValueError, match=r"duplicate expert ids \[6, 2, 6\] at token 4, layer 1"):
        RoutingTrace(ids, 8)


def test_top_k_larger_than_num_experts_is_refused():
    with pytest.raises(ValueError, match="top_k=3 is larger than num_experts=2"):
        RoutingTrace(torch.zeros(1, 1, 3, dtype=torch.long), 2)


def test_wrong_top_k_layers_or_experts_for_a_model_are_named():
    trace = RoutingTrace(random_ids(5, 2, 2, 8), 8)
    with pytest.raises(ValueError, match="trace has top_k=2 but the model routes top_k=4"):
        trace.check_compatible(num_layers=2, top_k=4, num_experts=8)
    with pytest.raises(ValueError, match="num_layers=2 but the model has 3 MoE layers"):
        trace.check_compatible(num_layers=3, top_k=2, num_experts=8)
    with pytest.raises(ValueError, match="num_experts=8 but the model has 16 experts"):
        trace.check_compatible(num_layers=2, top_k=2, num_experts=16)


def test_rows_per_seq_must_cover_the_rows_exactly():
    with pytest.raises(ValueError, match="rows_per_seq sums to 4 but expert_ids has 5 rows"):
        RoutingTrace(random_ids(5, 2, 2, 8), 8, rows_per_seq=(2, 2))


def test_valid_mask_shape_and_dtype_are_checked():
    ids = random_ids(5, 2, 2, 8)
    with pytest.raises(ValueError, match=r"valid must have shape \[5\]"):
        RoutingTrace(ids, 8, valid=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        RoutingTrace(ids, 8, valid=torch.ones(5))


# ----------------------------------------------------------- invalid rows, no sentinels
def test_invalid_rows_live_in_the_mask_never_as_a_sentinel(tmp_path):
    ids = random_ids(6, 2, 2, 256)
    ids[2] = -1  # e.g. NeMo-RL's sentinel for a prefix-cached position
    ids[4] = 999
    valid = torch.tensor([True, True, False, True, False, True])
    trace = RoutingTrace(ids, 256, valid=valid)
    assert trace.num_invalid == 2
    assert trace.expert_ids.dtype == torch.uint8
    assert trace.expert_ids[2].tolist() == [[0, 1], [0, 1]]  # canonical filler, not a sentinel
    trace.save(tmp_path / "t.safetensors")
    loaded = RoutingTrace.load(tmp_path / "t.safetensors")
    assert loaded == trace and loaded.valid.tolist() == valid.tolist()


# --------------------------------------------------------------------- persistence
def test_save_uses_safetensors_with_metadata_and_compact_layout(tmp_path):
    trace = RoutingTrace(random_ids(100, 4, 8, 64), 64, rows_per_seq=(60, 40))
    path = tmp_path / "t.safetensors"
    trace.save(path, metadata={"engine": "test"})
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == {"expert_ids", "rows_per_seq", "invalid_rows"}
        assert f.get_tensor("expert_ids").dtype == torch.uint8
        assert f.metadata()["num_experts"] == "64"
    loaded, meta = RoutingTrace.load_with_metadata(path)
    assert loaded == trace and meta == {"engine": "test"}
    # bytes: num_layers * top_k per token for <= 256 experts, plus a small constant header
    payload = 100 * 4 * 8
    assert payload <= os.path.getsize(path) <= payload + 512


def test_load_refuses_files_that_are_not_traces(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="is not a reference_impl.RoutingTrace file"):
        RoutingTrace.load(path)


def test_load_refuses_a_wrong_storage_dtype(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file(
        {
            "expert_ids": torch.zeros(3, 1, 2, dtype=torch.int32),
            "rows_per_seq": torch.tensor([3]),
            "invalid_rows": torch.zeros(0, dtype=torch.long),
        },
        path,
        metadata={"format": "reference_impl.RoutingTrace", "version": "1", "num_experts": "8"},
    )
    with pytest.raises(ValueError, match="stored as torch.int32, expected torch.uint8"):
        RoutingTrace.load(path)


# ----------------------------------------------------------------- split / concatenate
def test_split_and_concatenate_are_inverse():
    valid = torch.ones(12, dtype=torch.bool)
    valid[5] = False
    trace = RoutingTrace(random_ids(12, 2, 2, 8), 8, valid=valid, rows_per_seq=(3, 0, 9))
    parts = trace.split()
    assert [p.num_tokens for p in parts] == [3, 0, 9]
    assert RoutingTrace.concatenate(parts) == trace


def test_concatenate_refuses_incompatible_traces():
    a = RoutingTrace(random_ids(3, 2, 2, 8), 8)
    b = RoutingTrace(random_ids(3, 2, 2, 16), 16)
    with pytest.raises(ValueError, match="trace 1 has"):
        RoutingTrace.concatenate([a, b])


# ----------------------------------------------------------------------- agreement
def test_agreement_reports_the_three_levels_and_ignores_top_k_order():
    ids = torch.tensor(
        [
            [[0, 1], [2, 3]],  # token 0: same sets (order swapped below)
            [[0, 1], [2, 3]],  # token 1: layer 1 differs
            [[4, 5], [6, 7]],  # token 2: both layers differ
            [[1, 2], [3, 4]],  # token 3: same
        ]
    )
    other = ids.clone()
    other[0, 0] = torch.tensor([1, 0])
    other[1, 1] = torch.tensor([2, 7])
    other[2, 0] = torch.tensor([4, 6])
    other[2, 1] = torch.tensor([0, 7])
    agr = RoutingTrace(ids, 8).agreement(RoutingTrace(other, 8))
    assert agr.router_disagreement == pytest.approx(3 / 8)
    assert agr.token_disagreement == pytest.approx(2 / 4)
    assert agr.mean_differing_layers == pytest.approx(3 / 4)
    assert agr.num_tokens == 4


def test_agreement_skips_rows_invalid_in_either_trace():
    ids = random_ids(4, 1, 2, 8)
    other = ids.clone()
    other[0, 0] = (other[0, 0] + 1) % 8 if len(set(((other[0, 0] + 1) % 8).tolist())) == 2 else other[0, 0]
    valid = torch.tensor([False, True, True, True])
    agr = RoutingTrace(ids, 8, valid=valid).agreement(RoutingTrace(other, 8))
    assert agr.num_tokens == 3 and agr.router_disagreement == 0.0

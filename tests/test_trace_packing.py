"""Packed routing traces (file version 2): the codec, round trips, corrupted payloads, old files, replay."""

import itertools
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import tiny_model
from reference_impl import RoutingTrace, record_routing, replay_routing
from reference_impl import trace_packing as tp
from reference_impl.errors import TraceFormatError
from reference_impl.batch import RolloutBatch
from reference_impl.rollout import RolloutEngine


def random_sets(num_rows, top_k, num_experts, seed=0):
    """``[num_rows, top_k]`` distinct ids per row, in random order (no [rows, E] score tensor)."""
    g = torch.Generator().manual_seed(seed)
    layout = tp.packed_layout(num_experts, top_k)
    if layout.scheme == "rank":  # uniform ranks, unranked (or complemented) by the codec's own tables
        m = layout.ranked_size
        count = math.comb(num_experts, m)
        ranks = torch.randint(0, 2**62, (num_rows,), generator=g) % count if count > 1 else torch.zeros(num_rows, dtype=torch.long)
        ranked = tp._unrank(ranks, tp._binomials(num_experts, m), m)
        ids = ranked if m == top_k else tp._complement(ranked, num_experts)
    else:  # huge C(E, k): random permutations
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_rows)])
    perm = torch.rand(num_rows, top_k, generator=g).argsort(dim=1)
    return ids.gather(1, perm)


# ------------------------------------------------------------------------- the bound
def test_bound_and_layout_choice():
    assert [tp.information_bound_bits(e, 8) for e in (64, 128, 256, 512)] == [33, 41, 49, 57]
    assert tp.packed_layout(256, 8) == tp.PackedLayout(256, 8, "rank", 49)
    assert tp.packed_layout(8, 8).bits_per_row == 0  # one possible set: nothing to store
    wide = tp.packed_layout(32767, 8)  # ⌈log2 C(32767, 8)⌉ = 105 > 63: fixed-width ids
    assert tp.information_bound_bits(32767, 8) > 63
    assert (wide.scheme, wide.id_bits, wide.bits_per_row) == ("ids", 15, 120)


def test_ranks_enumerate_every_set_exactly_once():
    sets = torch.tensor(list(itertools.combinations(range(9), 4)))
    ranks = tp._rank(sets, tp._binomials(9, 4))
    assert sorted(ranks.tolist()) == list(range(math.comb(9, 4)))
    assert torch.equal(tp._unrank(ranks, tp._binomials(9, 4), 4), sets)


@pytest.mark.parametrize("width", [1, 3, 5, 8, 15, 33, 49, 57, 63])
def test_bit_packing_round_trips_and_is_exactly_the_bound(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, size=1001, dtype=np.uint64)
    values[:2] = [0, 2**width - 1]
    payload = tp.pack_bits(values, width)
    assert len(payload) == math.ceil(1001 * width / 8)
    assert np.array_equal(tp.unpack_bits(payload, width, 1001), values)


# ------------------------------------------------------------------------ round trips
CASES = [
    (8, 2), (64, 2), (64, 8), (128, 8), (256, 8), (256, 1), (256, 256), (1, 1), (300, 4),
    (64, 40),  # k > E/2: the complement is ranked
    (512, 8),  # 57 bits
    (32767, 8),  # fixed-width fallback, 15-bit ids
    (32767, 32766),  # complement of one id, 15 bits
]


@pytest.mark.parametrize("num_experts, top_k", CASES)
def test_packed_round_trip_random_and_extreme_sets(tmp_path, num_experts, top_k):
    rows, layers = 37, 3
    ids = random_sets(rows * layers, top_k, num_experts).view(rows, layers, top_k)
    ids[0, 0] = torch.arange(num_experts - top_k, num_experts)  # the top of the range
    ids[0, 1] = torch.arange(top_k)  # the bottom
    ids[1, 2] = torch.arange(num_experts - top_k, num_experts).flip(0)
    valid = torch.ones(rows, dtype=torch.bool)
    valid[[3, 30]] = False
    trace = RoutingTrace(ids, num_experts, valid=valid, rows_per_seq=(10, 0, 27))
    path = tmp_path / "t.safetensors"
    trace.save(path, metadata={"run": "x"})
    loaded, meta = RoutingTrace.load_with_metadata(path)
    assert meta == {"run": "x"}
    assert loaded == trace and loaded.expert_ids.dtype == trace.expert_ids.dtype
    sorted_ids = trace.expert_ids.sort(dim=-1).values
    assert torch.equal(loaded.expert_ids, sorted_ids)  # packed traces decode to sorted ids
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["version"] == "2"
        layout = tp.packed_layout(num_experts, top_k)
        assert f.get_tensor("packed_ids").numel() == math.ceil(rows * layers * layout.bits_per_row / 8)


def test_round_trip_across_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(tp, "_CHUNK_ROWS", 64)
    for num_experts, top_k in ((256, 8), (32767, 3), (64, 40)):
        ids = random_sets(1000, top_k, num_experts, seed=1)
        layout = tp.packed_layout(num_experts, top_k)
        out = tp.decode_sets(tp.encode_sets(ids, layout), layout, 1000, torch.int16, "test")
        assert torch.equal(out.long(), ids.sort(dim=1).values)


def test_packed_file_is_the_bound_plus_a_constant_header(tmp_path):
    trace = RoutingTrace(random_sets(4000 * 4, 8, 256).view(4000, 4, 8), 256, rows_per_seq=(1000, 3000))
    packed, plain = tmp_path / "p.safetensors", tmp_path / "u.safetensors"
    trace.save(packed)
    trace.save(plain, packed=False)
    bound = math.ceil(4000 * 4 * 49 / 8)
    assert bound <= os.path.getsize(packed) <= bound + 1024
    assert os.path.getsize(plain) >= 4000 * 4 * 8


def test_rollout_batch_saves_packed_by_default_and_reads_version_1(tmp_path):
    model = tiny_model(router_initializer_range=0.5)
    engine = RolloutEngine(seed=0)
    engine.sync_weights(model)
    batch = engine.generate(torch.randint(3, 60, (2, 5)), group_size=2, max_new_tokens=6, eos_id=1)
    for packed, version in ((True, "2"), (False, "1")):
        path = tmp_path / f"b{version}.safetensors"
        batch.save(path, packed=packed)
        with safe_open(path, framework="pt") as f:
            assert f.metadata()["version"] == version
        assert RolloutBatch.load(path).rollout_trace == batch.rollout_trace


# ------------------------------------------------------------------- corrupted payloads
def _write_variant(tmp_path, trace, name, tensors_edit=None, meta_edit=None):
    src = tmp_path / "good.safetensors"
    trace.save(src)
    with safe_open(src, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if tensors_edit:
        tensors_edit(tensors)
    if meta_edit:
        meta_edit(meta)
    path = tmp_path / name
    save_file(tensors, path, metadata=meta)
    return path


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _max_last_bytes(d):
    d["packed_ids"] = d["packed_ids"].clone()
    d["packed_ids"][:2] = 0xFF


def _pad_bit(d):
    d["packed_ids"] = d["packed_ids"].clone()
    d["packed_ids"][-1] |= 0x80


SMALL = RoutingTrace(random_sets(7 * 2, 2, 8).view(7, 2, 2), 8)  # 14 rows of 5 bits = 70 bits: 2 padding bits
WIDE = RoutingTrace(random_sets(10, 5, 32767).view(5, 2, 5), 32767)  # ids layout (C(32767, 5) > 2**63), 15-bit ids

CORRUPTIONS = [
    ("truncated.safetensors", SMALL, lambda d: d.__setitem__("packed_ids", d["packed_ids"][:-1].clone()), None, "has 8 bytes, expected 9"),
    ("longer.safetensors", SMALL, lambda d: d.__setitem__("packed_ids", torch.cat([d["packed_ids"], torch.zeros(1, dtype=torch.uint8)])), None, "has 10 bytes, expected 9"),
    ("rank.safetensors", SMALL, _max_last_bytes, None, r"rank 31, but only C\(8, 2\) = 28"),
    ("padding.safetensors", SMALL, _pad_bit, None, "non-zero padding bits"),
    ("dtype.safetensors", SMALL, lambda d: d.__setitem__("packed_ids", d["packed_ids"].to(torch.int32)), None, "must be a 1-D uint8 tensor"),
    ("id_range.safetensors", WIDE, _max_last_bytes, None, "not 5 ascending distinct ids below num_experts=32767"),
    ("order.safetensors", WIDE, lambda d: d.__setitem__("packed_ids", torch.zeros_like(d["packed_ids"])), None, r"decodes to ids \[0, 0, 0, 0, 0\]"),
    ("rows.safetensors", SMALL, lambda d: d.__setitem__("rows_per_seq", torch.tensor([8, -1])), None, "negative count"),
    ("rows_sum.safetensors", SMALL, lambda d: d.__setitem__("rows_per_seq", torch.tensor([8])), None, "expected 10 for 16 rows"),
    ("invalid.safetensors", SMALL, lambda d: d.__setitem__("invalid_rows", torch.tensor([7])), None, "invalid_rows holds an index outside"),
    ("packing.safetensors", SMALL, None, _set("packing", "ids"), "packing 'ids', but"),
    ("top_k.safetensors", SMALL, None, _set("top_k", "two"), "metadata top_k='two' is not an integer"),
    ("top_k_range.safetensors", SMALL, None, _set("top_k", "9"), "top_k=9 invalid for num_experts=8"),
    ("experts.safetensors", SMALL, None, _set("num_experts", "40000"), "larger than 32767"),
    ("missing.safetensors", SMALL, None, lambda m: m.pop("num_layers"), r"lacks \['num_layers'\]"),
    ("version.safetensors", SMALL, None, _set("version", "3"), "unsupported trace version '3'"),
]


@pytest.mark.parametrize("name, trace, tensors_edit, meta_edit, message", CORRUPTIONS, ids=[c[0].split(".")[0] for c in CORRUPTIONS])
def test_corrupted_packed_payloads_are_refused_naming_the_file(tmp_path, name, trace, tensors_edit, meta_edit, message):
    path = _write_variant(tmp_path, trace, name, tensors_edit, meta_edit)
    with pytest.raises(TraceFormatError, match=message) as info:
        RoutingTrace.load(path)
    assert name in str(info.value)


def test_every_single_byte_flip_of_a_packed_payload_is_refused_or_decodes_a_valid_trace(tmp_path):
    # Unlike the plain layout, a packed payload has no invalid id to hide: any accepted byte
    # pattern decodes to sorted distinct ids in range (the constructor's checks would pass).
    good = tmp_path / "good.safetensors"
    SMALL.save(good)
    with safe_open(good, framework="pt") as f:
        payload = f.get_tensor("packed_ids")
    layout = tp.packed_layout(8, 2)
    refused = 0
    for i in range(payload.numel()):
        for bit in range(8):
            bad = payload.clone()
            bad[i] ^= 1 << bit
            try:
                ids = tp.decode_sets(bad, layout, 14, torch.uint8, "flip")
            except TraceFormatError:
                refused += 1
                continue
            RoutingTrace(ids.view(7, 2, 2), 8)  # valid sets: must not raise
    assert refused > 0


# ----------------------------------------------------------------------- old files
def test_version_1_files_written_by_the_old_code_still_load(tmp_path):
    # The exact layout the version-1 writer produced (tensors and metadata), written by hand.
    ids = torch.tensor([[[3, 1], [0, 7]], [[2, 5], [6, 4]], [[0, 1], [0, 1]]], dtype=torch.uint8)
    path = tmp_path / "v1.safetensors"
    save_file(
        {"expert_ids": ids, "rows_per_seq": torch.tensor([2, 1]), "invalid_rows": torch.tensor([2])},
        path,
        metadata={"format": "reference_impl.RoutingTrace", "version": "1", "num_experts": "8", "engine": "old"},
    )
    trace, meta = RoutingTrace.load_with_metadata(path)
    assert meta == {"engine": "old"}
    assert torch.equal(trace.expert_ids, ids)  # version 1 keeps the stored order
    assert trace.rows_per_seq == (2, 1) and trace.valid.tolist() == [True, True, False]


def test_reserved_metadata_keys_are_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="'top_k' is reserved"):
        SMALL.save(tmp_path / "t.safetensors", metadata={"top_k": "2"}, packed=False)


# ----------------------------------------------------------------------------- replay
def test_replay_from_a_packed_trace_is_bit_identical_to_replay_from_uint8(tmp_path):
    model = tiny_model(router_initializer_range=0.5).eval()
    x = torch.randint(0, model.config.vocab_size, (3, 14))
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    trace = rec.trace([14, 11, 9])
    # another valid routing, so replay really overrides the router
    other = RoutingTrace(random_sets(trace.num_tokens * 2, 2, 8, seed=3).view(-1, 2, 2), 8, rows_per_seq=trace.rows_per_seq)
    trace.save(tmp_path / "packed.safetensors")
    other.save(tmp_path / "other.safetensors")
    other.save(tmp_path / "other_v1.safetensors", packed=False)
    outputs = {}
    for name in ("packed", "other", "other_v1"):
        loaded = RoutingTrace.load(tmp_path / f"{name}.safetensors")
        with torch.no_grad(), replay_routing(model, loaded, seq_lengths=[14, 11, 9]) as stats:
            outputs[name] = model(x)
        assert stats.replayed_rows == trace.num_tokens * model.num_layers
    assert torch.equal(outputs["other"].logits, outputs["other_v1"].logits)
    assert torch.equal(outputs["other"].routes, outputs["other_v1"].routes)
    with torch.no_grad(), replay_routing(model, trace, seq_lengths=[14, 11, 9]):
        native = model(x)
    assert torch.equal(outputs["packed"].logits, native.logits)
    assert not torch.equal(outputs["other"].logits, native.logits)

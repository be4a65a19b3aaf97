"""Issue 14: one clear error for every bad input, and no silent wrong answers (fast tier)."""

import base64
import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_model
from reference_impl import RoutingTrace, record_routing, replay_routing
from reference_impl.__main__ import main as cli
from reference_impl.batch import RolloutBatch
from reference_impl.compare import compare_batch, forward_fn_for, load_forward
from reference_impl.converters import from_layer_major, from_sentinel_rows, from_sglang, from_verl, from_vllm
from reference_impl.errors import AlignmentError, ConfigError, TraceFormatError
from reference_impl.rollout import RolloutEngine
from reference_impl.tasks import EOS, PAD, VOCAB_SIZE, make_task


def small_trace(rows=(3, 2), num_experts=8) -> RoutingTrace:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(sum(rows) * 2)]).view(sum(rows), 2, 2)
    return RoutingTrace(ids, num_experts, rows_per_seq=rows)


# ---------------------------------------------------------------- RoutingTrace.load
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "trace.safetensors"
    small_trace().save(path)
    return path


def _damaged(kind, saved, tmp_path):
    path = tmp_path / f"{kind}.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(saved.read_bytes()[: len(saved.read_bytes()) - 7])
    elif kind == "not-safetensors":
        path.write_text("tokens,routes\n1,2\n")
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "not-safetensors", "directory", "missing"])
def test_load_of_a_bad_path_names_the_file(kind, saved, tmp_path):
    path = _damaged(kind, saved, tmp_path)
    with pytest.raises(TraceFormatError) as err:
        RoutingTrace.load(path)
    assert str(path) in str(err.value)


def _write(path, tensors, num_experts="8"):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "reference_impl.RoutingTrace", "version": "1", "num_experts": num_experts})


def _good_tensors():
    t, _ = small_trace().to_tensors(packed=False)  # format version 1: a plain expert_ids tensor
    return t


def test_load_checks_the_rank_of_every_tensor(tmp_path):
    for name in ("expert_ids", "rows_per_seq", "invalid_rows"):
        tensors = _good_tensors()
        tensors[name] = tensors[name].reshape(1, *tensors[name].shape)
        path = tmp_path / f"{name}.safetensors"
        _write(path, tensors)
        with pytest.raises(TraceFormatError, match=f"{name} has rank") as err:
            RoutingTrace.load(path)
        assert str(path) in str(err.value)


def test_load_checks_the_dtype_of_the_row_tensors(tmp_path):
    tensors = _good_tensors()
    tensors["rows_per_seq"] = tensors["rows_per_seq"].float()
    _write(tmp_path / "f.safetensors", tensors)
    with pytest.raises(TraceFormatError, match="rows_per_seq stored as torch.float32"):
        RoutingTrace.load(tmp_path / "f.safetensors")


@pytest.mark.parametrize("value", ["eight", "0", "-3", "99999999"])
def test_load_parses_num_experts_with_a_named_error(tmp_path, value):
    _write(tmp_path / "f.safetensors", _good_tensors(), num_experts=value)
    with pytest.raises(TraceFormatError, match="num_experts"):
        RoutingTrace.load(tmp_path / "f.safetensors")


def test_load_wraps_row_errors_with_the_file_name(tmp_path):
    tensors = _good_tensors()
    tensors["rows_per_seq"] = torch.tensor([1, 1], dtype=torch.int64)  # sums to 2, not 5
    _write(tmp_path / "f.safetensors", tensors)
    with pytest.raises(TraceFormatError, match="rows_per_seq sums to 2") as err:
        RoutingTrace.load(tmp_path / "f.safetensors")
    assert "f.safetensors" in str(err.value)


def test_rollout_batch_load_of_a_truncated_file_names_it(saved, tmp_path):
    path = _damaged("truncated", saved, tmp_path)
    with pytest.raises(TraceFormatError, match="truncated"):
        RolloutBatch.load(path)


# ---------------------------------------------------------------- agreement
def test_agreement_refuses_different_expert_counts():
    a = small_trace(num_experts=8)
    b = RoutingTrace(a.expert_ids, 16, rows_per_seq=a.rows_per_seq)
    with pytest.raises(AlignmentError, match="num_experts differ"):
        a.agreement(b)


def test_agreement_refuses_different_sequence_boundaries():
    a = small_trace(rows=(3, 2))
    b = RoutingTrace(a.expert_ids, a.num_experts, rows_per_seq=(2, 3))
    with pytest.raises(AlignmentError, match="sequence 0 has 3 vs 2 rows"):
        a.agreement(b)


def test_agreement_with_no_comparable_row_is_nan_not_zero():
    a = small_trace()
    none = RoutingTrace(a.expert_ids, a.num_experts, torch.zeros(a.num_tokens, dtype=torch.bool), a.rows_per_seq)
    r = a.agreement(none)
    assert math.isnan(r.router_disagreement) and math.isnan(r.token_disagreement)
    assert (r.num_tokens, r.num_rows) == (0, a.num_tokens)


# ---------------------------------------------------------------- replay without seq_lengths
def test_replay_without_seq_lengths_catches_rows_beyond_the_forward():
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    trace = rec.trace([10, 10])  # 9 rows per sequence
    with pytest.raises(AlignmentError, match="sequence 0 has 9 trace rows"):
        with torch.no_grad(), replay_routing(model, trace):
            model(x[:, :8])  # 8 positions: at most 7 rows can be consumed


def test_replay_without_seq_lengths_accepts_an_aligned_forward():
    model = tiny_model()
    x = torch.randint(0, model.config.vocab_size, (2, 10))
    with torch.no_grad(), record_routing(model) as rec:
        model(x)
    trace = rec.trace([10, 7])  # second sequence shorter (padding)
    with torch.no_grad(), replay_routing(model, trace) as stats:
        model(x)
    assert stats.replayed_rows == (9 + 6) * model.num_layers


# ---------------------------------------------------------------- compare
def _batch(model, numerics="fp32"):
    task = make_task("sort")
    engine = RolloutEngine(numerics=numerics, seed=0)
    engine.sync_weights(model)
    prompts = task.sample_prompts(6, torch.Generator().manual_seed(0))
    return engine.generate(prompts, group_size=2, max_new_tokens=task.max_new_tokens, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def policy():
    return tiny_model(seed=3, vocab_size=VOCAB_SIZE, router_initializer_range=0.02, initializer_range=0.1).eval()


def test_compare_with_no_comparable_rows_reports_nan_null_and_says_so(policy):
    batch = _batch(policy)
    t = batch.rollout_trace
    batch.rollout_trace = RoutingTrace(t.expert_ids, t.num_experts, torch.zeros(t.num_tokens, dtype=torch.bool), t.rows_per_seq)
    report = compare_batch(batch, forward_fn_for(policy, lambda x: policy(x).logits))
    assert math.isnan(report.routing["router_disagreement"])
    assert report.routing["num_tokens"] == 0 and report.routing["num_rows"] == t.num_tokens
    as_json = json.loads(report.to_json())
    assert as_json["routing"]["router_disagreement"] is None
    text = report.summary()
    assert f"0 of {t.num_tokens} rows compared" in text and "router 0.0000%" not in text
    assert report.replay_rows_driven == 0
    assert any("replay drove no row" in w for w in report.warnings)


def test_compare_reports_replayed_routes_against_the_trace(policy):
    batch = _batch(policy, numerics="fp8_e5m2")
    report = compare_batch(batch, forward_fn_for(policy, lambda x: policy(x).logits))
    n = batch.rollout_trace.num_tokens
    assert report.routing["router_disagreement"] > 0  # the low-precision engine routes differently
    assert report.replayed_routing["router_disagreement"] == 0.0  # replay reached every router
    assert report.replayed_routing["num_tokens"] == n and report.replayed_routing["num_rows"] == n
    assert report.replay_rows_driven == n * policy.num_layers
    assert f"{n} of {n} rows compared" in report.summary() and not report.warnings


def test_compare_with_a_missing_transformers_path_never_asks_the_hub(tmp_path, monkeypatch, capsys):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("from_pretrained must not be called")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_hub)
    with pytest.raises(ConfigError, match="local paths only"):
        load_forward("Qwen/Qwen3-30B-A3B", "transformers")
    rollout = tmp_path / "r.safetensors"
    _batch(tiny_model(vocab_size=VOCAB_SIZE)).save(rollout)
    code = cli(["compare", "--rollout", str(rollout), "--checkpoint", str(tmp_path / "nope"), "--engine", "transformers"])
    err = capsys.readouterr().err
    assert code == 2 and "not a local directory" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- converters
def test_sglang_bad_base64_names_the_argument():
    with pytest.raises(TraceFormatError, match=r"routed_experts_b64\[0\] is not valid base64"):
        from_sglang(["%%%not base64%%%"], [3], num_layers=2, top_k=2, num_experts=8)


def test_sglang_wrong_byte_count_names_the_argument():
    payload = base64.b64encode(b"\x00" * 10).decode()
    with pytest.raises(TraceFormatError, match=r"routed_experts_b64\[0\] decodes to 10 bytes"):
        from_sglang([payload], [3], num_layers=2, top_k=2, num_experts=8)


def test_sglang_zero_layers_is_refused():
    with pytest.raises(ConfigError, match="num_layers must be an int >= 1"):
        from_sglang([""], [1], num_layers=0, top_k=2, num_experts=8)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: from_vllm([], [], 8), "routed_experts is empty"),
        (lambda: from_sglang([], [], 2, 2, 8), "routed_experts_b64 is empty"),
        (lambda: from_verl([], None, 8), "routes is empty"),
        (lambda: from_sentinel_rows([], [], 8), "routes is empty"),
        (lambda: from_layer_major([], [3], 8), "zero layers"),
    ],
)
def test_empty_batches_name_the_argument(call, name):
    with pytest.raises(TraceFormatError, match=name):
        call()


def test_mismatched_counts_name_both_arguments():
    routes = [np.zeros((4, 2, 2), dtype=np.int16) + np.array([0, 1], dtype=np.int16)] * 2
    with pytest.raises(AlignmentError, match="2 route arrays but 1 replay masks"):
        from_verl(routes, [np.ones(4, dtype=bool)], 8)
    with pytest.raises(TraceFormatError, match="routed_experts has 2 sequences but seq_lengths has 3"):
        from_vllm([np.zeros((2, 2, 2), dtype=np.uint8)] * 2, [3, 3, 3], 8)


def test_cli_bad_rollout_file_and_bad_checkpoint_are_one_line_errors(policy, tmp_path, capsys):
    from reference_impl.checkpoint import save_hf_checkpoint

    ckpt = save_hf_checkpoint(policy, tmp_path / "ckpt")
    batch = _batch(policy)
    batch.rollout_logp = batch.rollout_logp[:, :-1]  # wrong shape: a malformed file
    bad = tmp_path / "bad.safetensors"
    tensors, meta = batch.rollout_trace.to_tensors(prefix="trace.")
    from safetensors.torch import save_file

    for name in ("tokens", "rollout_logp", "mask", "prompt_lengths", "seq_lengths", "group_ids"):
        tensors[name] = getattr(batch, name).contiguous()
    save_file(tensors, bad, metadata={**meta, "format": "reference_impl.RolloutBatch"})
    assert cli(["compare", "--rollout", str(bad), "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "rollout_logp has shape" in err and len(err.splitlines()) == 1
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert cli(["rollout", "--checkpoint", str(ckpt), "--out", str(tmp_path / "r.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "expected model_type 'qwen3_moe'" in err and len(err.splitlines()) == 1

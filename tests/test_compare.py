"""The compare command: validating one engine's routes and log-probs against another forward."""

import json

import pytest
import torch

from conftest import tiny_model
from reference_impl import RoutingTrace
from reference_impl.__main__ import main as cli
from reference_impl.batch import RolloutBatch
from reference_impl.tasks import VOCAB_SIZE
from reference_impl.tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model(seed=3, vocab_size=VOCAB_SIZE, router_initializer_range=0.02, initializer_range=0.1)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), model=model)


def rollout(checkpoint, tmp_path, *extra):
    out = tmp_path / "rollout.safetensors"
    assert cli(["rollout", "--checkpoint", str(checkpoint), "--out", str(out), "--num-prompts", "8", *extra]) == 0
    return out


def run_compare(checkpoint, rollout_file, tmp_path, engine):
    report_file = tmp_path / f"report_{engine}.json"
    assert cli(["compare", "--rollout", str(rollout_file), "--checkpoint", str(checkpoint), "--engine", engine, "--json", str(report_file)]) == 0
    return json.loads(report_file.read_text())


@pytest.mark.parametrize("engine", ["reference", "transformers"])
def test_an_fp32_engine_compares_clean(checkpoint, tmp_path, engine):
    report = run_compare(checkpoint, rollout(checkpoint, tmp_path), tmp_path, engine)
    assert report["routing"]["router_disagreement"] == 0.0
    assert report["native"]["max_abs_log_ratio"] < 1e-4
    assert len(report["worst_tokens"]) == 10


def test_a_low_precision_engine_shows_disagreement_that_replay_removes(checkpoint, tmp_path):
    report = run_compare(checkpoint, rollout(checkpoint, tmp_path, "--numerics", "fp8_e5m2"), tmp_path, "transformers")
    assert report["routing"]["router_disagreement"] > 0
    assert report["replayed"]["kl_k3"] < report["native"]["kl_k3"]
    assert max(report["per_layer_router_disagreement"]) > 0


def test_a_misaligned_trace_is_caught(checkpoint, tmp_path):
    batch = RolloutBatch.load(rollout(checkpoint, tmp_path))
    parts = batch.rollout_trace.split()
    # the classic off-by-one: one row per token instead of n - 1
    shifted = RoutingTrace.concatenate(
        RoutingTrace(torch.cat([p.expert_ids, p.expert_ids[-1:]]), p.num_experts) for p in parts
    )
    batch.rollout_trace = shifted
    with pytest.raises(ValueError, match="routed rows are expected"):
        batch.validate()


def test_rollout_batch_round_trips_through_safetensors(checkpoint, tmp_path):
    path = rollout(checkpoint, tmp_path)
    batch = RolloutBatch.load(path)
    batch.save(tmp_path / "again.safetensors")
    again = RolloutBatch.load(tmp_path / "again.safetensors")
    assert torch.equal(batch.tokens, again.tokens) and batch.rollout_trace == again.rollout_trace

"""The compare command with megatron-core as the recompute engine (its own subprocess: process-wide state)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import tiny_model
from reference_impl.tasks import VOCAB_SIZE
from reference_impl.tiny_checkpoint import build_tiny_checkpoint

pytestmark = pytest.mark.engine


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core is not installed")
def test_compare_a_reference_rollout_against_megatron(tmp_path):
    model = tiny_model(seed=5, vocab_size=VOCAB_SIZE, router_initializer_range=0.5, initializer_range=0.1)
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", model=model)
    rollout = tmp_path / "rollout.safetensors"
    report = tmp_path / "report.json"
    cli = [sys.executable, "-m", "reference_impl"]
    subprocess.run(cli + ["rollout", "--checkpoint", str(ckpt), "--out", str(rollout), "--num-prompts", "6"], check=True, timeout=300)
    subprocess.run(
        cli + ["compare", "--rollout", str(rollout), "--checkpoint", str(ckpt), "--engine", "megatron", "--json", str(report)],
        check=True, timeout=300,
    )
    r = json.loads(report.read_text())
    assert r["routing"]["router_disagreement"] == 0.0
    assert r["native"]["max_abs_log_ratio"] < 1e-4
    assert r["replayed"]["max_abs_log_ratio"] < 1e-4

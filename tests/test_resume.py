"""Issue 14: a real training process SIGKILLed at deterministic points resumes exactly.

Kill points are set by the run directory's test-only hooks (reference_impl.run_dir):
REFERENCE_IMPL_TEST_KILL_AFTER_STEP (between steps) and REFERENCE_IMPL_TEST_KILL_IN_SAVE (between
two files of a checkpoint save). The resumed run must give the weights and every metric except
wall-clock times of an uninterrupted run with the same seed (reference engine).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reference_impl.checkpoint import load_hf_checkpoint
from reference_impl.run_dir import KILL_AFTER_STEP, KILL_IN_SAVE, latest_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
FLAGS = ["--steps", str(STEPS), "--num-prompts", "4", "--group-size", "2", "--num-minibatches", "2", "--replay", "r3",
         "--numerics", "bf16", "--router-noise-std", "0.1", "--cold-start-steps", "2", "--no-progress"]


def train(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "reference_impl", "train", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def without_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in records]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    done = train(*FLAGS, "--checkpoint-every", "1", "--out-dir", str(out))
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(run, reference):
    assert without_times(json.loads((run / "metrics.json").read_text())) == without_times(json.loads((reference / "metrics.json").read_text()))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(STEPS))
    final = f"checkpoints/step_{STEPS:05d}/model.safetensors"
    assert (run / final).read_bytes() == (reference / final).read_bytes()


def test_killed_between_steps_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed = train(*FLAGS, "--checkpoint-every", "2", "--out-dir", str(out), env_extra={KILL_AFTER_STEP: "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # step 3 was logged durably, but the last checkpoint is step 2: resume recomputes step 3
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert latest_checkpoint(out).name == "step_00002"
    refused = train(*FLAGS, "--out-dir", str(out))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    resumed = train("--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, uninterrupted)


def test_killed_inside_a_save_leaves_earlier_checkpoints_and_resumes_exactly(uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed = train(*FLAGS, "--checkpoint-every", "1", "--out-dir", str(out), env_extra={KILL_IN_SAVE: "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step_00002" / "model.safetensors").exists()  # the save was cut half-way ...
    assert not (ckpts / "step_00002").exists()  # ... and nothing looks like a complete step-2 checkpoint
    assert latest_checkpoint(out).name == "step_00001"
    load_hf_checkpoint(ckpts / "step_00001")  # every earlier checkpoint is loadable
    resumed = train("--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert not (ckpts / ".tmp-step_00002").exists()
    assert_same_run(out, uninterrupted)

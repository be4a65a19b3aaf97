"""Every script in examples/ runs, in a process of its own, and prints what the docs say it prints.

The docs include these scripts by snippet (docs_*/index.md, frameworks.md, engines/*.md), so a
page can only show code that this file has just run. Engine state (vLLM, Megatron) is process-wide,
hence one subprocess per script.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 600


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    """Run examples/NAME with a fresh interpreter; return its standard output, fail with its log."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: more threads only oversubscribe a shared CPU
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, f"examples/{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_every_example_has_a_test():
    tested = {"quickstart.py", "reference_engine.py", "validate_framework.py", "vllm_rollout.py", "megatron_replay.py", "transformers_replay.py", "megatron_parallel_replay.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_quickstart_shows_the_mismatch_and_r3_closing_it(tmp_path):
    out = run_example("quickstart.py", tmp_path)
    assert number(r"routers choosing other experts than the engine: ([\d.]+)%", out) > 0
    assert number(r"tokens routed differently in at least one layer: ([\d.]+)%", out) > 0
    native = number(r"KL\(mu \|\| pi_old\), k3, native routing: (\S+)", out)
    r3 = number(r"KL\(mu \|\| pi_old\), k3, R3 replay: +(\S+)", out)
    assert r3 < native / 5, "R3 replay should remove most of the bf16 engine's mismatch"


def test_reference_engine_example_covers_every_numerics_setting(tmp_path):
    out = run_example("reference_engine.py", tmp_path)
    rows = {}
    for line in out.splitlines()[1:]:
        label, differ, native, r3 = (cell.strip() for cell in line.split("|"))
        rows[label] = (float(differ.rstrip("%")), float(native), float(r3))
    assert list(rows) == ["fp32", "bf16", "fp8_e4m3", "fp8_e5m2", "fp32 + router noise 0.3 (SIMULATED)"]
    differ, native, r3 = rows["fp32"]
    assert differ == 0.0 and native < 1e-9 and r3 < 1e-9, "an fp32 engine is the trainer: no mismatch at all"
    for label in list(rows)[1:]:
        differ, native, r3 = rows[label]
        assert differ > 0 and r3 < native, f"{label}: routes should flip and R3 should lower the KL"


@pytest.mark.slow
@pytest.mark.skipif(not _has("transformers"), reason="transformers is not installed (the hf extra)")
def test_validate_framework_converts_every_layout_and_compares(tmp_path):
    out = run_example("validate_framework.py", tmp_path, "--workdir", str(tmp_path / "work"))
    for name in ("vLLM", "SGLang/slime", "verl"):
        assert re.search(rf"^\s*{re.escape(name)}: \d+ sequences, \d+ routed rows, 2 layers x top-2, stored as torch.uint8$", out, re.M)
    for line in ("routing disagreement (engine vs native recompute): router", "per layer: L0", "native  : KL k1", "replayed: KL k1", "worst tokens"):
        assert line in out
    assert "R3 replay lowers KL(mu || pi_old): True" in out
    assert re.search(r"off-by-one caught: from_vllm: sequence 0: routed_experts has \d+ rows but a sequence of (\d+) tokens", out)
    assert (tmp_path / "work" / "report.json").is_file() and (tmp_path / "work" / "framework.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(not _has("vllm"), reason="vLLM is not installed (the engines extra)")
def test_vllm_example_captures_routes_that_r3_replays(tmp_path):
    out = run_example("vllm_rollout.py", tmp_path, "--workdir", str(tmp_path / "work"))
    m = re.search(r"sample 0: (\d+) prompt \+ (\d+) generated tokens, (\d+) routed rows \(n - 1\)", out)
    assert m and int(m.group(3)) == int(m.group(1)) + int(m.group(2)) - 1
    assert "R3 replay lowers KL(mu || pi_old): True" in out
    assert "-> the same RoutingTrace" in out
    assert (tmp_path / "work" / "vllm_rollout.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(not _has("megatron"), reason="megatron-core is not installed (the engines extra)")
def test_megatron_example_records_replays_and_recomputes(tmp_path):
    out = run_example("megatron_replay.py", tmp_path, "--workdir", str(tmp_path / "work"))
    native = number(r"KL\(mu \|\| pi_old\), k3, native: (\S+)", out)
    r3 = number(r"KL\(mu \|\| pi_old\), k3, R3: +(\S+)", out)
    assert r3 < native / 5
    assert "after the forward: routers hold [1, 1] targets for the recompute" in out
    assert "after the backward: [0, 0] pending; recompute used the forward's routes: True" in out
    assert number(r"router gradient norm, layer 0: (\S+)", out) > 0


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(not _has("megatron"), reason="megatron-core is not installed (the engines extra)")
def test_megatron_parallel_example_under_torchrun_passes_parity_and_catches_a_control(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    # torchrun == python -m torch.distributed.run: 2 real ranks on 127.0.0.1, gloo
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), str(EXAMPLES / "megatron_parallel_replay.py"), "--layout", "tp2_sp_ep2",
         "--control", "batch_major"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,  # about 35 s on a loaded 2-core machine
    )
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    out = done.stdout
    assert "'tp': 2" in out and "ep=2" in out
    assert number(r"native log-probs, max \|diff\| +(\S+)", out) <= 1e-5
    assert number(r"replay\+backward: grads, max rel. error +(\S+)", out) <= 1e-5
    assert "parity under tp2_sp_ep2: PASS" in out
    assert "control batch_major: caught" in out


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.skipif(not _has("transformers"), reason="transformers is not installed (the hf extra)")
def test_transformers_example_runs_r3_r2_and_other_families(tmp_path):
    out = run_example("transformers_replay.py", tmp_path, "--workdir", str(tmp_path / "work"))
    assert "Qwen3MoeForCausalLM: 2 MoE layers, 8 experts, top-2" in out
    native = number(r"KL\(mu \|\| pi_old\), k3: native (\S+),", out)
    r3 = number(r"KL\(mu \|\| pi_old\), k3: native \S+, R3 (\S+)", out)
    assert r3 < native / 5
    assert "R2 on the first mini-batch (theta = theta_old) changes nothing: True" in out
    assert "routes used in the update = old_trace: True" in out
    assert number(r"router gradient norm, layer 0: (\S+)", out) > 0
    assert "MixtralForCausalLM: record -> replay bit-identical: True" in out
    assert "OlmoeForCausalLM: record -> replay bit-identical: True" in out

"""megatron-core's RouterReplay driven from a RoutingTrace (reference_impl.integrations.megatron).

Megatron's state is process-wide (CPU shims on ``torch.cuda``, class-level ``RouterReplay``
instances, the gloo group), so each scenario of ``megatron_scenarios.py`` runs in a fresh
interpreter (both start at once) and the tests assert on the JSON it writes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# find_spec instead of importorskip: importing megatron.core here would cost seconds in this
# process for nothing (every megatron call runs in a subprocess). Skips fail CI (conftest).
if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)


pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOL = 1e-5
SCENARIOS = ("parity", "lifecycle")
TIMEOUT = 300


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every scenario in its own process, concurrently; return {name: JSON dict}."""
    out_dir = tmp_path_factory.mktemp("megatron")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(HERE / "megatron_scenarios.py"), name, str(out_dir / f"{name}.json")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in SCENARIOS
    }
    logs = {name: proc.communicate(timeout=TIMEOUT)[0] for name, proc in procs.items()}
    data = {}
    for name in SCENARIOS:
        path = out_dir / f"{name}.json"
        assert path.exists(), f"scenario {name} wrote no result:\n{logs[name][-4000:]}"
        data[name] = json.loads(path.read_text())
    return data


def scenario(results, name):
    r = results[name]
    assert r["ok"], f"scenario {name} failed:\n{r.get('error')}"
    return r


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("case", ["single", "padded"])
def test_megatron_forward_on_our_checkpoint_equals_the_reference_logits(results, case):
    r = scenario(results, "parity")
    assert r[f"{case}_logits_max_diff"] <= TOL
    assert r[f"{case}_native_logprobs_max_diff"] <= TOL


# -------------------------------------------------------------------------------- RECORD
@pytest.mark.parametrize("case", ["single", "padded"])
def test_record_gives_the_reference_models_native_routes(results, case):
    r = scenario(results, "parity")
    assert r[f"{case}_record_equals_reference"] is True
    assert r[f"{case}_record_dtype"] == "torch.uint8"


# ------------------------------------------------------------------------ REPLAY_FORWARD
@pytest.mark.parametrize("case", ["single", "padded"])
@pytest.mark.parametrize("which", ["replay_ref", "replay_perturbed"])
def test_replay_forward_reproduces_reference_logprobs_and_moves_the_routing_map(results, case, which):
    r = scenario(results, "parity")
    assert r[f"{case}_{which}_logprobs_max_diff"] <= TOL
    # Megatron dispatched exactly the trace's experts on every traced row ...
    assert r[f"{case}_{which}_routing_map_is_trace"] is True
    # ... and the same experts as the reference replay everywhere (native last position and padding).
    assert r[f"{case}_{which}_routes_equal_reference_replay"] is True
    stats = r[f"{case}_{which}_stats"]
    assert stats["forwards"] == 1 and stats["replayed_rows"] > 0 and stats["native_rows"] > 0


def test_the_perturbed_trace_really_differs_and_nothing_leaks_into_the_next_record(results):
    r = scenario(results, "parity")
    for case in ("single", "padded"):
        assert r[f"{case}_perturbed_router_disagreement_with_native"] > 0.5
        assert r[f"{case}_record_after_replay_is_native"] is True


def test_invalid_rows_are_routed_natively_within_the_same_forward_or_refused(results):
    r = scenario(results, "parity")
    assert r["invalid_rows_logprobs_max_diff"] <= TOL
    assert r["invalid_rows_routes_equal_reference_replay"] is True
    # 5 invalid rows x 2 layers on top of the tail positions natively routed in the padded case
    assert r["invalid_rows_stats"]["native_rows"] == r["padded_replay_ref_stats"]["native_rows"] + 10
    assert "invalid_rows='error'" in r["invalid_rows_error_mode"]


# ------------------------------------------------------------- recompute: REPLAY_BACKWARD
def test_replay_backward_under_recompute_runs_and_empties_the_backward_lists(results):
    r = scenario(results, "parity")
    assert r["recompute_config"] == "full"
    assert r["recompute_pending_after_forward"] == [1, 1]
    assert all(a.endswith("REPLAY_BACKWARD") for a in r["recompute_action_after_forward"])
    assert r["recompute_pending_after_backward"] == [0, 0]
    assert r["recompute_routes_equal_forward_routes"] is True
    assert r["recompute_logprobs_max_diff"] <= TOL


def test_replay_gradients_reach_the_router_and_skip_unused_experts(results):
    r = scenario(results, "parity")
    assert all(g > 0 for g in r["recompute_router_grad_abs_sum"])
    assert all(g == 0.0 for g in r["recompute_unused_expert_grad_abs_sum"])
    assert all(g > 0 for g in r["recompute_used_expert_grad_abs_sum"])
    # the same gradients as the reference model (replay + its own activation checkpointing)
    assert r["recompute_router_grad_max_diff"] <= 1e-6
    assert r["recompute_expert_fc1_grad_max_diff"] <= 1e-6


def test_record_under_recompute_pins_the_recompute_to_the_recorded_routes(results):
    r = scenario(results, "parity")
    assert r["record_recompute_pending_after_forward"] == [1, 1]
    assert r["record_recompute_pending_after_backward"] == [0, 0]
    assert r["record_recompute_routes_equal"] is True
    assert r["record_recompute_trace_equals_reference"] is True


def test_recompute_targets_wait_for_their_backwards_in_order(results):
    r = scenario(results, "parity")
    assert r["fifo_pending_after_two_forwards"] == [2, 2]
    assert "backward has not run" in r["fifo_new_block_refused"]
    assert r["fifo_pending_after_first_backward"] == [1, 1]
    assert r["fifo_pending_after_second_backward"] == [0, 0]
    assert r["fifo_recompute_routes_equal"] is True
    assert r["fifo_then_record_is_native"] is True


# ------------------------------------------------------------------------------ pitfalls
def test_a_second_model_built_without_clearing_still_replays(results):
    r = scenario(results, "parity")
    assert r["instances_after_second_build"] == 2  # load_megatron_model clears before building
    r = scenario(results, "lifecycle")
    # the pitfall itself: stale instances of the first model stay in Megatron's class-level list
    assert r["instances_after_unclean_rebuild"] == 4
    assert "does not match instances" in r["megatron_set_replay_data_refuses"]
    assert r["stale_instances_belong_to_first_model"] is True
    # handled: replay takes effect on the second model, and the first one still works
    assert r["second_model_replay_routing_map_is_trace"] is True
    assert r["second_model_replay_logprobs_max_diff"] <= TOL
    assert r["registry_is_second_model_after_replay"] is True
    assert r["first_model_replay_routing_map_is_trace"] is True


def test_modes_leave_no_action_or_indices_behind(results):
    r = scenario(results, "lifecycle")
    assert r["actions_after_modes"] == ["None", "None"]
    assert r["indices_cleared_after_modes"] is True
    assert r["native_after_replay_equals_reference_native"] is True
    assert r["clear_empties"] is True


def test_compact_traces_become_long_targets_which_megatron_requires(results):
    r = scenario(results, "lifecycle")
    assert r["int16_trace_dtype"] == "torch.int16"
    assert r["int16_targets_dtype"] == "torch.int64" and r["uint8_targets_dtype"] == "torch.int64"
    assert r["int16_targets_values_ok"] is True
    assert "gather" in r["megatron_rejects_int16_targets"]
    assert r["megatron_accepts_long_targets"] is True


def test_misuse_raises_instead_of_replaying_nothing(results):
    r = scenario(results, "lifecycle")
    assert "no forward of this model ran" in r["replay_without_forward_raises"]
    assert "do not nest" in r["nested_modes_raise"]
    assert "routed rows are expected" in r["misaligned_trace_raises"]
    assert "batch 1" in r["batch_mismatch_raises"]
    assert r["registry_after_errors"] == 2
    assert r["replay_after_errors_routing_map_is_trace"] is True


def test_five_cpu_shims_are_applied_once(results):
    r = scenario(results, "lifecycle")
    if r["cuda_available"]:
        assert r["shims"] == []
        return
    assert len(r["shims"]) == 5
    assert r["shims_second_call"] == r["shims"]
    assert r["shims_idempotent"] is True

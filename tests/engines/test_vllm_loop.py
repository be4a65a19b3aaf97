"""The real RL loop with vLLM rollouts: weight sync, prefix caching with capture, a short R3 run.

Each scenario runs one live engine per subprocess (``vllm_worker_scripts/vllm_loop_run.py``);
the checks run here.

* weight sync: after each sync, vLLM's fp32 log-probs of a fixed batch equal the trainer's within
  1e-5; the same engine before the sync (one update behind) does not;
* prefix caching on vs off (fp32, prompts longer than a 32-token KV block): identical tokens and
  routes, hits > 0 from the route cache, no invalid rows; after a weight sync and after a cache reset
  the routes are the new weights' (never the cached old ones);
* a short RL run, bf16 vLLM against the fp32 trainer, R3, near-tie routers: the reward rises,
  captured vs replayed routes disagree on exactly 0 rows while native routing disagrees on some,
  and a same-seed rerun gives identical metrics except wall-clock times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from reference_impl import load_hf_checkpoint  # noqa: E402
from reference_impl.model import MoEForCausalLM  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "vllm_worker_scripts" / "vllm_loop_run.py"


def run(job: dict, timeout: float = 600) -> Path:
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "job.json"
    path.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"vLLM subprocess failed:\n{proc.stderr[-4000:]}"
    return out


# ------------------------------------------------------------------------- weight sync
def test_after_each_weight_sync_vllm_fp32_logprobs_equal_the_trainers_and_a_stale_engine_does_not(tmp_path):
    config = {"rollout_engine": "vllm", "numerics": "fp32", "num_prompts": 8, "group_size": 8, "lr": 3e-3, "progress": False}
    out = run({"scenario": "sync", "out": str(tmp_path), "steps": 3, "config": config})
    from safetensors.torch import load_file

    t = load_file(out / "sync.safetensors")
    mask = t["mask"] > 0
    for step in range(3):
        synced = (t[f"synced_{step}"] - t[f"trainer_{step}"])[mask].abs().max().item()
        stale = (t[f"stale_{step}"] - t[f"trainer_{step}"])[mask].abs().max().item()
        assert synced <= 1e-5, f"step {step}: synced engine is {synced} away from the trainer"
        assert stale > 1e-3, f"step {step}: an engine one update behind matched the trainer ({stale}); the check would not catch a missed sync"


# ------------------------------------------------------------------- prefix caching
@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix")
    job = {"scenario": "prefix", "out": str(out), "prompt_lengths": [70, 80, 66, 75], "group_size": 4, "max_tokens": 12, "block_size": 32}
    run(job)
    from safetensors.torch import load_file

    return load_file(out / "prefix.safetensors"), json.loads((out / "result.json").read_text()), out


def reference_routes(model: MoEForCausalLM, tokens: torch.Tensor, routes_like: torch.Tensor) -> torch.Tensor:
    """The fp32 reference model's sorted routes at the rows vLLM reported (-1 elsewhere)."""
    with torch.no_grad():
        routes = model(tokens).routes[:, :-1]
    return torch.where(routes_like >= 0, routes, torch.full_like(routes, -1))


def test_prefix_caching_with_the_route_cache_gives_the_same_tokens_and_routes_as_caching_off(prefix_run):
    t, result, _ = prefix_run
    assert result["off"]["cached_tokens"] == 0
    for name in ("on", "on_again"):
        assert result[name]["cached_tokens"] > 0 and result[name]["rows_from_cache"] == result[name]["cached_tokens"], result[name]
        assert result[name]["invalid_rows"] == 0
        assert torch.equal(t[f"{name}_tokens"], t["off_tokens"]), name
        assert torch.equal(t[f"{name}_routes"], t["off_routes"]), name
    assert result["off"]["invalid_rows"] == 0, "caching off must capture every row"


def test_weight_sync_and_cache_reset_never_serve_stale_routes(prefix_run):
    t, result, out = prefix_run
    from safetensors.torch import load_file

    model = load_hf_checkpoint(out / "ckpt")
    model.load_state_dict(load_file(out / "perturbed.safetensors"))
    model.eval()
    for name in ("synced", "reset"):
        assert result[name]["cached_tokens"] > 0 and result[name]["invalid_rows"] == 0, result[name]
        tokens, routes = t[f"{name}_tokens"], t[f"{name}_routes"]
        assert torch.equal(routes, reference_routes(model, tokens, routes)), f"{name}: routes are not the new weights'"
    assert result["synced"]["route_cache"]["clears"] > result["on_again"]["route_cache"]["clears"]
    # the perturbation moved routes, so serving the old cached rows would have failed the check above
    stale = t["on_routes"][:, :64]
    assert not torch.equal(stale, t["synced_routes"][:, :64])


# -------------------------------------------------------------------- the RL run
RL_CONFIG = {
    "rollout_engine": "vllm",
    "numerics": "bf16",
    "replay": "r3",
    "num_digits": 3,  # sort 3 digits: learns within 30 steps (reward ~0.26 -> ~0.49 with the reference engine)
    "steps": 30,
    "num_prompts": 16,
    "group_size": 8,
    "lr": 1e-3,
    "cold_start_steps": 20,
    "router_init_std": 0.02,  # near-tie routers: bf16 flips some routes
    "progress": False,
    "seed": 0,
}


def _without_wall_clock(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if "seconds" not in k} for h in history]


def test_short_rl_run_with_bf16_vllm_rollouts_and_r3_raises_the_reward_and_replays_exactly(tmp_path):
    first = json.loads((run({"scenario": "train", "out": str(tmp_path / "a"), "config": RL_CONFIG}) / "history.json").read_text())
    again = json.loads((run({"scenario": "train", "out": str(tmp_path / "b"), "config": RL_CONFIG}) / "history.json").read_text())
    start = sum(h["reward"] for h in first[:8]) / 8
    end = sum(h["reward"] for h in first[-8:]) / 8
    assert end > start + 0.1, (start, end)
    assert all(h["routing_disagreement"] == 0.0 for h in first), "R3: the recompute must route exactly as vLLM did"
    assert sum(h["native_routing_disagreement"] for h in first) > 0, "bf16 flipped no route: the replay check is vacuous"
    assert all(h["engine/invalid_rows"] == 0 for h in first)
    assert _without_wall_clock(first) == _without_wall_clock(again)

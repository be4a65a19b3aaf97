"""The reproduction script keeps working: its reduced CI profile runs end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reproduction_script_ci_profile_runs_and_writes_its_outputs(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "reproduce.py"), "--profile", "ci", "--out", str(tmp_path)],
        check=True, cwd=ROOT, timeout=900,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["mismatch"]) == {"bf16", "fp8_e4m3", "fp8_e5m2"}
    assert "on_policy/minirl_r3" in summary["rl"] and "off_policy/N2/r2/noclip" in summary["rl"]
    # R3 removes routing flips: it lowers the train-inference KL where flips dominate (fp8_e5m2), and
    # where they barely occur (bf16, fp8_e4m3 on 16 prompts) it moves the KL by well under 1% either way
    # (measured on this profile: bf16 5.4326e-5 -> 5.4363e-5, also at commit 1d589c3, so "never raises"
    # was a property of one machine's numbers, not of R3).
    mm = summary["mismatch"]
    assert mm["fp8_e5m2"]["kl_k3_r3"][0] < mm["fp8_e5m2"]["kl_k3"][0]
    for row in mm.values():
        assert row["kl_k3_r3"][0] <= row["kl_k3"][0] * 1.01
    assert (tmp_path / "rewards.png").stat().st_size > 1000
    assert "R3 vs native recompute" in (tmp_path / "summary.md").read_text()
    assert "R3 与原生重新计算对比" in (tmp_path / "summary.zh.md").read_text()


def _final_rewards() -> dict[str, list[float]]:
    """Final reward (mean over the last fifth of the steps, as reproduce.py summarises) per run group."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        from reproduce import group_key, run_summary
    finally:
        sys.path.pop(0)
    runs = json.loads((ROOT / "experiments" / "results" / "runs.json").read_text())["runs"]
    groups: dict[str, list[float]] = {}
    for run in runs:
        groups.setdefault(group_key(run["name"]), []).append(run_summary(run["history"])["final_reward"])
    return groups


def test_reproduction_page_off_policy_wording_matches_committed_runs():
    """The counts docs_en/reproduction.md (and its zh twin) state in "Partially reproduced (N ≥ 4)"."""
    final = _final_rewards()
    collapsed = lambda xs: sum(x < 0.05 for x in xs)  # noqa: E731  (near-zero final reward)
    n8_noclip = [final[f"off_policy/N8/{r}/noclip"] for r in ("none", "r2", "r3")]
    assert sum(collapsed(xs) for xs in n8_noclip) == 8 and len(sum(n8_noclip, [])) == 9
    assert round(max(final["off_policy/N8/r3/noclip"]), 2) == 0.30  # the one seed that holds
    assert min(final["off_policy/N8/r3/clip"]) > 0.25  # only R3 non-trivial in every clipped seed
    assert collapsed(final["off_policy/N8/none/clip"]) >= 1 and collapsed(final["off_policy/N8/r2/clip"]) >= 1
    assert collapsed(final["off_policy/N4/none/noclip"]) == 3 and collapsed(final["off_policy/N4/r2/noclip"]) == 2
    assert collapsed(final["off_policy/N4/r3/noclip"]) == 0
    assert all(collapsed(final[f"off_policy/N2/{r}/{c}"]) == 0 for r in ("none", "r2", "r3") for c in ("clip", "noclip"))

"""``--trainer megatron``: the update in megatron-core matches the reference trainer on the same batches.

Runs ``megatron_trainer_run.py`` in its own interpreter (megatron's state is process-wide): for R3
and R2, two steps in which both trainers recompute π_θold and update on the same batch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)

pytestmark = [pytest.mark.engine, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def test_megatron_trainer_matches_the_reference_trainer_in_logprobs_and_losses(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "megatron_trainer.json"
    proc = subprocess.run([sys.executable, str(HERE / "megatron_trainer_run.py"), str(out)], capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    for replay, r in json.loads(out.read_text()).items():
        assert max(r["old_logp_diff"]) <= 2e-5, (replay, r["old_logp_diff"])  # π_θold after 0 and 1 updates
        for ref, meg in zip(r["loss_ref"], r["loss_meg"]):
            assert len(ref) == len(meg) == 2
            assert all(abs(a - b) <= 1e-5 for a, b in zip(ref, meg)), (replay, ref, meg)
        assert r["old_routes_disagreement"] == [0.0, 0.0]
        assert r["exported_logp_diff"] <= 1e-5, (replay, r["exported_logp_diff"])

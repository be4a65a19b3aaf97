"""Replay under megatron model parallelism on real ranks, for tests/engines/test_megatron_parallel.py.

    python tests/engines/megatron_parallel_ranks.py OUT.json [LAYOUT ...]

Imports torch and megatron once, computes the one-process reference once, then for each layout
forks 2 ranks (gloo on 127.0.0.1) that run :func:`reference_impl.integrations.megatron_parity.run_parity`
with the layout's negative controls; rank 0 writes the layout's JSON, and this process writes them all.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

import megatron.core.models.gpt  # noqa: E402,F401 - imported once, before the forks
import megatron.core.pipeline_parallel  # noqa: E402,F401

from reference_impl.integrations import megatron_parity as mp  # noqa: E402
from reference_impl.integrations.megatron_cpu_shims import apply_cpu_shims  # noqa: E402

LAYOUT_TIMEOUT = 90.0


def main() -> int:
    out_path, names = sys.argv[1], sys.argv[2:] or list(mp.LAYOUTS)
    apply_cpu_shims()
    ref_model = mp.tiny_reference_model()
    tokens, lengths = mp.tiny_batch()
    ref = mp.parity_reference(ref_model, tokens, lengths)
    tmp = tempfile.mkdtemp(prefix="megatron_parallel_")
    results: dict = {}
    for name in names:

        def rank_main(rank: int, port: int, name=name) -> None:
            mp.init_rank(rank, port)
            mp.init_layout(name)
            model = mp.build_layout_model(name, ref_model)
            res = mp.run_parity(name, model, ref, controls=mp.LAYOUT_CONTROLS[name])
            if rank == 0:
                with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                    json.dump(res, f)

        t0 = time.perf_counter()
        codes = mp.fork_ranks(rank_main, 2, LAYOUT_TIMEOUT)
        path = os.path.join(tmp, f"{name}.json")
        res = json.load(open(path)) if os.path.exists(path) else {}
        res.update(exit_codes=codes, seconds=time.perf_counter() - t0)
        results[name] = res
        print(name, f"{res['seconds']:.1f}s", codes, flush=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

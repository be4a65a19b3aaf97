"""megatron-core on a tiny GLM-4.5-style model, for tests/engines/test_router_families_engines.py (own process).

    python tests/engines/router_families_scenarios.py CHECKPOINT_DIR JOB.json OUT.json

Loads the GLM checkpoint (sigmoid router, expert bias, 4 groups keep 2, scaling 2.5, shared expert,
dense first layer) into megatron, then writes: native RECORD routes, REPLAY_FORWARD log-probs of
the given traces (``JOB.json``: ``{"tokens", "lengths", "traces": {name: [[[ids]]]}}``), replayed
routing maps, router-weight gradient and expert-bias gradient, the group-scoring refusal.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from reference_impl import RoutingTrace, load_hf_checkpoint  # noqa: E402


def run(ckpt: str, job: dict, out: dict) -> None:
    from reference_impl.errors import ConfigError
    from reference_impl.integrations.megatron import megatron_logprobs
    from reference_impl.integrations.megatron_cpu import build_megatron_model, megatron_config

    ref = load_hf_checkpoint(ckpt)
    model = build_megatron_model(ref)
    routers = [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    out["num_routers"] = len(routers)
    out["expert_bias_loaded"] = all(
        torch.equal(r.expert_bias.cpu(), ref.model.layers[i].mlp.gate.e_score_correction_bias)
        for r, i in zip(routers, ref.config.layer_map.moe_layers)
    )
    tokens = torch.tensor(job["tokens"])
    lengths = job["lengths"]
    with torch.no_grad():
        rec = megatron_logprobs(model, tokens, lengths, mode="record")
    out["record_ids"] = rec.trace.expert_ids.long().sort(-1).values.tolist()
    out["native_logprobs"] = rec.logprobs.tolist()
    for name, ids in job["traces"].items():
        trace = RoutingTrace(torch.tensor(ids), ref.config.num_experts, rows_per_seq=[n - 1 for n in lengths], router_family="sigmoid_bias")
        model.zero_grad()
        res = megatron_logprobs(model, tokens, lengths, trace)
        mask = (torch.arange(tokens.shape[1] - 1)[None] < torch.tensor(lengths)[:, None] - 1).float()
        (res.logprobs * mask).sum().backward()
        out[f"{name}_logprobs"] = res.logprobs.detach().tolist()
        got = RoutingTrace.from_padded(res.routes, lengths, ref.config.num_experts).expert_ids.long().sort(-1).values
        out[f"{name}_routes_are_trace"] = bool(torch.equal(got, trace.expert_ids.long().sort(-1).values))
        out[f"{name}_router_grad_norm"] = float(routers[1].weight.grad.norm())
        out[f"{name}_bias_grad_is_none"] = all(r.expert_bias.grad is None for r in routers)
    # Groups that limit the choice with k / topk_group != 2: megatron scores groups differently.
    cfg = ref.config
    from dataclasses import replace

    odd = replace(cfg, num_experts_per_tok=3)
    try:
        megatron_config(odd)
        out["group_refusal"] = ""
    except ConfigError as err:
        out["group_refusal"] = str(err)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        megatron_config(odd, native_group_scoring="warn")
    out["group_warning"] = " ".join(str(w.message) for w in caught)


def main() -> int:
    ckpt, job_path, path = sys.argv[1], sys.argv[2], sys.argv[3]
    out: dict = {}
    t0 = time.perf_counter()
    try:
        run(ckpt, json.loads(open(job_path).read()), out)
        out["ok"] = True
    except Exception:  # noqa: BLE001 - reported to the test through the JSON
        out["ok"] = False
        out["error"] = traceback.format_exc()
    out["seconds"] = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump(out, f)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

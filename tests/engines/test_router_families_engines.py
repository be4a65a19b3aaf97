"""A tiny GLM-4.5-style model in four engines: vLLM fp32 capture, transformers, the reference model, megatron-core.

The model (built locally): sigmoid router with a selection bias, 16 experts in 4 groups of which 2
are kept, top-4 (k / topk_group = 2, the case where megatron's group scoring equals HF / vLLM's),
``routed_scaling_factor`` 2.5, one shared expert, a dense first layer. vLLM and megatron each run in
a subprocess (vLLM first: megatron replays vLLM's trace). Checked: every top-k set agrees across the
four engines; replayed log-probs agree within 1e-5; a perturbed trace moves routing exactly; the
router weight gets gradient and the bias none; the dense layer is never captured or replayed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("megatron.core") is None:
    pytest.skip("megatron-core is not installed", allow_module_level=True)

from reference_impl import RoutingTrace, load_hf_checkpoint, record_routing, replay_routing  # noqa: E402
from reference_impl.batch import RolloutBatch  # noqa: E402
from reference_impl.integrations.transformers import attach_routing  # noqa: E402
from reference_impl.logprobs import next_token_logprobs  # noqa: E402
from reference_impl.model import MoEConfig, MoEForCausalLM  # noqa: E402
from reference_impl.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.engine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VLLM_SCRIPT = HERE / "vllm_worker_scripts" / "vllm_run.py"
MEGATRON_SCRIPT = HERE / "router_families_scenarios.py"
TOL = 1e-5
GLM_ENGINES = MoEConfig(
    num_hidden_layers=3, num_experts=16, num_experts_per_tok=4, score_function="sigmoid", expert_bias=True,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
    intermediate_size=96, router_initializer_range=0.1, bias_initializer_range=0.1, initializer_range=0.1,
)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def perturbed(trace: RoutingTrace, seed: int = 3) -> RoutingTrace:
    """Every valid row of every MoE layer: a random top-k set."""
    g = torch.Generator().manual_seed(seed)
    n, L, k = trace.expert_ids.shape
    ids = torch.stack([torch.randperm(trace.num_experts, generator=g)[:k] for _ in range(n * L)]).view(n, L, k)
    return RoutingTrace(ids, trace.num_experts, trace.valid, trace.rows_per_seq, router_family=trace.router_family)


def sorted_ids(trace: RoutingTrace) -> torch.Tensor:
    return trace.expert_ids.long().sort(-1).values


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("router_families")
    torch.manual_seed(0)
    ref = MoEForCausalLM(GLM_ENGINES).eval()
    ckpt = build_tiny_checkpoint(root / "ckpt", model=ref)

    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(4, 64, (n,), generator=g).tolist() for n in (6, 9, 12, 7)]
    calls = [{"name": "glm", "prompts": prompts, "sampling": {"temperature": 1.0, "max_tokens": 10, "seed": 0, "ignore_eos": True}}]
    job = root / "vllm_job.json"
    job.write_text(json.dumps({"model": str(ckpt), "out": str(root / "vllm"), "llm": {"dtype": "float32", "seed": 0, "max_model_len": 64}, "calls": calls}))
    proc = subprocess.run([sys.executable, str(VLLM_SCRIPT), str(job)], capture_output=True, text=True, timeout=400, env=_env())
    assert proc.returncode == 0, f"vLLM subprocess failed:\n{proc.stderr[-4000:]}"
    result = json.loads((root / "vllm" / "result.json").read_text())
    assert "error" not in result["calls"]["glm"], result["calls"]["glm"]
    batch = RolloutBatch.load(root / "vllm" / "glm.safetensors")
    lengths = batch.seq_lengths.tolist()

    moved = perturbed(batch.rollout_trace)
    mjob = root / "megatron_job.json"
    mjob.write_text(json.dumps({
        "tokens": batch.tokens.tolist(), "lengths": lengths,
        "traces": {"vllm": batch.rollout_trace.expert_ids.long().tolist(), "perturbed": moved.expert_ids.long().tolist()},
    }))
    mout = root / "megatron.json"
    proc = subprocess.run(
        [sys.executable, str(MEGATRON_SCRIPT), str(ckpt), str(mjob), str(mout)], capture_output=True, text=True, timeout=300, env=_env()
    )
    megatron = json.loads(mout.read_text()) if mout.exists() else {"ok": False, "error": proc.stdout[-3000:] + proc.stderr[-3000:]}
    assert megatron["ok"], megatron.get("error")

    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    return {"ref": load_hf_checkpoint(ckpt).eval(), "hf": hf, "batch": batch, "lengths": lengths, "moved": moved, "megatron": megatron,
            "vllm_seconds": result["startup_s"] + result["calls"]["glm"]["seconds"]}


def response_mask(batch: RolloutBatch) -> torch.Tensor:
    return batch.mask.bool()


def test_vllm_captures_moe_layers_only_with_the_family(engines):
    trace = engines["batch"].rollout_trace
    assert trace.num_layers == 2 and trace.top_k == 4 and trace.num_experts == 16
    assert trace.router_family == "sigmoid_bias"
    assert trace.num_invalid == 0 and list(trace.rows_per_seq) == [n - 1 for n in engines["lengths"]]


def test_every_top_k_set_agrees_across_vllm_transformers_reference_and_megatron(engines):
    batch, lengths = engines["batch"], engines["lengths"]
    vllm_ids = sorted_ids(batch.rollout_trace)
    with torch.no_grad(), record_routing(engines["ref"]) as rec:
        engines["ref"](batch.tokens)
    routing = attach_routing(engines["hf"])
    with torch.no_grad(), record_routing(routing) as hf_rec:
        engines["hf"](batch.tokens)
    assert torch.equal(sorted_ids(rec.trace(lengths)), vllm_ids)
    assert torch.equal(sorted_ids(hf_rec.trace(lengths)), vllm_ids)
    assert torch.equal(torch.tensor(engines["megatron"]["record_ids"]), vllm_ids)


def replayed_logprobs(model, host, tokens, trace):
    with torch.no_grad(), replay_routing(host, trace):
        out = model(tokens)
    logits = out.logits if hasattr(out, "logits") else out
    return next_token_logprobs(logits, tokens), out


@pytest.mark.parametrize("which", ["vllm", "perturbed"])
def test_replayed_logprobs_agree_within_1e5_and_a_perturbed_trace_moves_routing_exactly(engines, which):
    batch, ref, hf = engines["batch"], engines["ref"], engines["hf"]
    trace = batch.rollout_trace if which == "vllm" else engines["moved"]
    mask = response_mask(batch)
    lp_ref, out = replayed_logprobs(ref, ref, batch.tokens, trace)
    lp_hf, _ = replayed_logprobs(hf, attach_routing(hf), batch.tokens, trace)
    lp_meg = torch.tensor(engines["megatron"][f"{which}_logprobs"])
    assert (lp_ref - lp_hf)[mask].abs().max() <= TOL
    assert (lp_ref - lp_meg)[mask].abs().max() <= TOL
    assert torch.equal(RoutingTrace.from_padded(out.routes, engines["lengths"], 16).expert_ids.long().sort(-1).values, sorted_ids(trace))
    assert engines["megatron"][f"{which}_routes_are_trace"] is True
    if which == "vllm":  # replaying vLLM's own routes reproduces μ_old
        assert (lp_ref - batch.rollout_logp)[mask].abs().max() <= TOL
    else:
        assert (lp_ref - batch.rollout_logp)[mask].abs().max() > 1e-3


def test_megatron_router_weight_gets_gradient_and_the_bias_none(engines):
    m = engines["megatron"]
    assert m["num_routers"] == 2 and m["expert_bias_loaded"] is True
    for which in ("vllm", "perturbed"):
        assert m[f"{which}_router_grad_norm"] > 0 and m[f"{which}_bias_grad_is_none"] is True


def test_megatron_refuses_native_group_routing_where_its_group_scoring_differs(engines):
    m = engines["megatron"]
    assert "k/topk_group = 1.5 != 2" in m["group_refusal"] and "native_group_scoring='warn'" in m["group_refusal"]
    assert "scores groups by their top-1" in m["group_warning"]


def test_a_softmax_trace_is_refused_by_the_glm_model(engines):
    trace = engines["batch"].rollout_trace
    foreign = RoutingTrace(trace.expert_ids, 16, trace.valid, trace.rows_per_seq, router_family="softmax")
    from reference_impl.errors import ConfigError

    with pytest.raises(ConfigError, match="'softmax' router"):
        with replay_routing(engines["ref"], foreign):
            engines["ref"](engines["batch"].tokens)

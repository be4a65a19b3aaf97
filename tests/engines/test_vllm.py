"""vLLM rollouts with captured routes (``reference_impl.integrations.vllm``) against code we trust.

vLLM's state is process-wide, so every live engine runs in its own subprocess
(``vllm_worker_scripts/vllm_run.py``), which saves the :class:`RolloutBatch` of each call; the
checks run here. Three engines, each shared by several tests through a module-scoped fixture:

* fp32, well-separated routes (router std 0.5), KV cache small enough to force preemption:
  routes equal the reference model's and transformers' for every token and layer; μ_old equals
  π_old within 1e-5 (temperature 1 and 0.7); every trace has prompt+gen−1 rows.
* fp32 with prefix caching on: refused by default; with ``on_missing_rows="invalid"`` the cached
  prompt positions come back as invalid rows.
* bf16 against the fp32 reference on a model with near-tie router logits: routes flip, and R3
  (replaying vLLM's trace) lowers KL(μ_old‖π_old).

The official ``enable_return_routed_experts`` output is blocked on CPU (it needs Model Runner V2 /
Triton), so its conversion is tested on arrays of the documented layout only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
transformers = pytest.importorskip("transformers")

from conftest import hf_forward_with_routes  # noqa: E402
from reference_impl import RoutingTrace, load_hf_checkpoint, replay_routing  # noqa: E402
from reference_impl.integrations import vllm as rv  # noqa: E402
from reference_impl.integrations import vllm_client  # noqa: E402
from reference_impl.model import MoEConfig, MoEForCausalLM  # noqa: E402
from reference_impl.batch import RolloutBatch  # noqa: E402
from reference_impl.logprobs import next_token_logprobs  # noqa: E402
from reference_impl.tasks import make_task  # noqa: E402
from reference_impl.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).resolve().parent / "vllm_worker_scripts" / "vllm_run.py"


# --------------------------------------------------------------------------- helpers
@contextmanager
def one_thread():
    """Run the tiny reference forwards on one thread (restored after).

    On a busy 2-core machine, two OpenMP threads spin against each other: a forward of 8x64 tokens
    took ~6 s with 2 threads and ~0.03 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_engine(out: Path, model_dir: Path, llm: dict, calls: list[dict], timeout: float = 600) -> dict:
    """Start one vLLM engine in a subprocess, run ``calls`` through generate_with_routes, return result.json."""
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.json"
    job.write_text(json.dumps({"model": str(model_dir), "out": str(out), "llm": llm, "calls": calls}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")  # a 2-thread OpenMP team spins badly on a busy 2-core machine
    proc = subprocess.run([sys.executable, str(SCRIPT), str(job)], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"vLLM subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads((out / "result.json").read_text())


def hf_routes(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-layer top-k ids (sorted) of a transformers Qwen3-MoE forward, ``[b, t, L, k]``."""
    return hf_forward_with_routes(hf_model, input_ids)[1]


def sorted_ids(trace: RoutingTrace) -> torch.Tensor:
    return trace.expert_ids.to(torch.int64).sort(dim=-1).values


def k3(logp: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(μ‖π) estimate over generated tokens: mean of ρ − 1 − log ρ with ρ = π/μ."""
    log_ratio = (logp - mu)[mask > 0].double()
    return float((log_ratio.exp() - 1 - log_ratio).mean())


# ------------------------------------------------------------------ fp32 exact engine
FP32_PROMPT_LENGTHS = [3, 5, 8, 13, 21, 30, 40, 6]
FP32_MAX_TOKENS = 24


@pytest.fixture(scope="module")
def fp32_ckpt(tmp_path_factory):
    """fp32 tiny Qwen3-MoE with well-separated routes (router std 0.5)."""
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("vllm_ckpt") / "ckpt",
        MoEConfig(vocab_size=64, router_initializer_range=0.5, initializer_range=0.1),
        seed=1,
    )


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, fp32_ckpt):
    root, ckpt = tmp_path_factory.mktemp("vllm_fp32"), fp32_ckpt
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 64, (n - 1,), generator=g).tolist() for n in FP32_PROMPT_LENGTHS]
    sampling = {"max_tokens": FP32_MAX_TOKENS, "ignore_eos": True}
    # 6 KV blocks of 32 tokens for 8 sequences of up to 64 tokens: the scheduler must preempt
    # (recompute mode), so some positions are forwarded twice.
    llm = {"dtype": "float32", "seed": 0, "max_model_len": 128, "block_size": 32, "num_gpu_blocks_override": 6, "max_num_seqs": 8}
    calls = [
        {"name": "t1", "prompts": prompts, "sampling": {**sampling, "temperature": 1.0, "seed": 0}, "prompt_logprobs": True},
        {"name": "t07", "prompts": prompts, "sampling": {**sampling, "temperature": 0.7, "seed": 1}},
    ]
    result = run_engine(root / "out", ckpt, llm, calls)
    batches = {c["name"]: RolloutBatch.load(root / "out" / f"{c['name']}.safetensors") for c in calls}
    from safetensors.torch import load_file

    prompt_logp = load_file(root / "out" / "t1.prompt_logp.safetensors")["prompt_logp"]
    # the reference model (π_old, fp32) and transformers over the same prompt + generated tokens
    model = load_hf_checkpoint(ckpt).eval()
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    reference, hf_route = {}, {}
    with one_thread(), torch.no_grad():
        for name, batch in batches.items():
            reference[name] = model(batch.tokens)
            hf_route[name] = hf_routes(hf, batch.tokens)
    return SimpleNamespace(
        ckpt=ckpt, prompts=prompts, result=result, batches=batches, prompt_logp=prompt_logp, reference=reference, hf_routes=hf_route
    )


def test_vllm_routes_equal_the_reference_model_and_transformers_for_every_token_and_layer(fp32_run):
    for name, batch in fp32_run.batches.items():
        lengths = batch.seq_lengths.tolist()
        assert batch.prompt_lengths.tolist() == FP32_PROMPT_LENGTHS
        assert [n - p for n, p in zip(lengths, FP32_PROMPT_LENGTHS)] == [FP32_MAX_TOKENS] * len(lengths)
        ours = RoutingTrace.from_padded(fp32_run.reference[name].routes, lengths, 8)
        theirs = RoutingTrace.from_padded(fp32_run.hf_routes[name], lengths, 8)
        vllm_trace = batch.rollout_trace
        assert vllm_trace.num_invalid == 0
        assert torch.equal(sorted_ids(vllm_trace), sorted_ids(ours)), f"{name}: vLLM routes differ from the reference model"
        assert torch.equal(sorted_ids(vllm_trace), sorted_ids(theirs)), f"{name}: vLLM routes differ from transformers"


def test_vllm_mu_old_logprobs_match_the_reference_pi_old(fp32_run):
    for name, temperature in (("t1", 1.0), ("t07", 0.7)):
        batch = fp32_run.batches[name]
        pi = next_token_logprobs(fp32_run.reference[name].logits, batch.tokens, temperature)
        gen = batch.mask > 0
        assert int(gen.sum()) == len(FP32_PROMPT_LENGTHS) * FP32_MAX_TOKENS
        err = (pi - batch.rollout_logp)[gen].abs().max().item()
        assert err <= 1e-5, f"{name}: max |log μ − log π| = {err}"
    # prompt log-probs (prompt_logprobs=0): column t scores prompt token t+1
    batch = fp32_run.batches["t1"]
    pi = next_token_logprobs(fp32_run.reference["t1"].logits, batch.tokens)
    prompt_cols = torch.arange(pi.shape[1])[None, :] < (batch.prompt_lengths[:, None] - 1)
    assert (pi - fp32_run.prompt_logp)[prompt_cols].abs().max().item() <= 1e-5


def test_every_trace_has_prompt_plus_gen_minus_one_captured_rows_even_under_preemption(fp32_run):
    for name in ("t1", "t07"):
        call = fp32_run.result["calls"][name]
        assert "error" not in call, call
        assert call["trace_rows"] == [n - 1 for n in call["seq_lengths"]]
        assert call["invalid_rows"] == [0] * len(FP32_PROMPT_LENGTHS)
        # the tiny KV cache forced recompute: re-forwarded positions overwrote their rows
        assert sum(call["rows_overwritten"]) > 0, "no preemption happened; shrink num_gpu_blocks_override"
        fp32_run.batches[name].rollout_trace.check_alignment(call["seq_lengths"])
    ids = fp32_run.result["calls"]["t1"]["request_ids"] + fp32_run.result["calls"]["t07"]["request_ids"]
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------- prefix caching engine
def test_prefix_caching_is_refused_or_reported_as_invalid_rows(fp32_ckpt, tmp_path):
    g = torch.Generator().manual_seed(1)
    long = [1] + torch.randint(4, 64, (69,), generator=g).tolist()  # 70 tokens: two full 32-token blocks
    sampling = {"max_tokens": 8, "temperature": 1.0, "seed": 0, "ignore_eos": True}
    llm = {"dtype": "float32", "seed": 0, "max_model_len": 128, "block_size": 32, "enable_prefix_caching": True}
    calls = [
        {"name": "refused", "prompts": [long], "sampling": sampling},
        {"name": "first", "prompts": [long], "sampling": sampling, "on_missing_rows": "invalid"},
        {"name": "again", "prompts": [long, long[:40]], "sampling": sampling, "on_missing_rows": "invalid"},
    ]
    result = run_engine(tmp_path, fp32_ckpt, llm, calls)["calls"]
    assert "prefix caching is on" in result["refused"]["error"]
    assert result["first"]["invalid_rows"] == [0]
    # the second time, the cached prompt blocks are not forwarded: their rows are invalid, not absent
    assert result["again"]["num_cached_tokens"] == [64, 32]
    assert result["again"]["invalid_rows"] == result["again"]["num_cached_tokens"]
    assert result["again"]["trace_rows"] == [n - 1 for n in result["again"]["seq_lengths"]]
    first = RolloutBatch.load(tmp_path / "first.safetensors").rollout_trace
    again = RolloutBatch.load(tmp_path / "again.safetensors").rollout_trace.split()[0]
    assert torch.equal(again.valid[:64], torch.zeros(64, dtype=torch.bool)) and bool(again.valid[64:].all())
    # the forwarded prompt positions (64..69) route as in the first, uncached run
    assert torch.equal(sorted_ids(again)[64:70], sorted_ids(first)[64:70])


# ------------------------------------------------------------ bf16 vs fp32 reference
def test_bf16_vllm_flips_near_tie_routes_and_r3_replay_lowers_the_kl(tmp_path):
    # Near-tie router logits (router std 0.02) in a model whose other weights are large enough
    # (std 0.2) that a flipped expert moves the output distribution.
    torch.manual_seed(0)
    model = MoEForCausalLM(MoEConfig(vocab_size=16, router_initializer_range=0.02, initializer_range=0.2)).eval()
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt", model=model)
    task = make_task("sort")
    prompts = task.sample_prompts(128, torch.Generator().manual_seed(0)).tolist()
    calls = [{"name": "bf16", "prompts": prompts, "sampling": {"max_tokens": task.max_new_tokens, "temperature": 1.0, "seed": 0}}]
    run_engine(tmp_path / "out", ckpt, {"dtype": "bfloat16", "seed": 0, "max_model_len": 64}, calls)
    batch = RolloutBatch.load(tmp_path / "out" / "bf16.safetensors")
    lengths = batch.seq_lengths.tolist()

    reference = load_hf_checkpoint(ckpt).eval()  # fp32 π_old
    with one_thread(), torch.no_grad():
        native = reference(batch.tokens)
        with replay_routing(reference, batch.rollout_trace, seq_lengths=lengths) as stats:
            replayed = reference(batch.tokens)
    native_trace = RoutingTrace.from_padded(native.routes, lengths, 8)
    agreement = batch.rollout_trace.agreement(native_trace)
    assert agreement.router_disagreement > 0, "bf16 flipped no route; the replay comparison would be vacuous"
    # R3 drove the fp32 forward onto vLLM's routes exactly
    assert batch.rollout_trace.agreement(RoutingTrace.from_padded(replayed.routes, lengths, 8)).router_disagreement == 0
    assert stats.replayed_rows == batch.rollout_trace.num_tokens * 2

    kl_native = k3(next_token_logprobs(native.logits, batch.tokens), batch.rollout_logp, batch.mask)
    kl_r3 = k3(next_token_logprobs(replayed.logits, batch.tokens), batch.rollout_logp, batch.mask)
    print(
        f"\nbf16 vLLM vs fp32 reference: {agreement.num_tokens} rows, router disagreement "
        f"{agreement.router_disagreement:.4%}, token disagreement {agreement.token_disagreement:.4%}; "
        f"k3 KL(μ_old‖π_old) native {kl_native:.3e}, with R3 {kl_r3:.3e}"
    )
    assert kl_r3 < kl_native


# ----------------------------------------------- worker-side pieces (no engine start)
def test_capture_store_maps_rows_by_position_and_overwrites_recomputed_ones():
    cap = rv._StepCapturer([0, 1], top_k=2)
    cap.enabled = cap.active = True

    def step(req_ids, counts, positions, base):
        total = sum(counts)
        for layer in (0, 1):
            ids = torch.tensor([[(base + r + layer) % 8, (base + r + layer + 1) % 8] for r in range(total)])
            cap.capture(layer, torch.cat([ids, torch.zeros(3, 2, dtype=torch.long)]))  # padded rows are ignored
        cap.end_step(req_ids, counts, np.asarray(positions))
        cap.step.clear()

    step(["0-deadbeef", "1-0badf00d"], [3, 2], [0, 1, 2, 0, 1], base=0)  # prefill both
    step(["1-0badf00d", "0-deadbeef"], [1, 1], [2, 3], base=5)  # decode, batch order swapped
    step(["0-deadbeef"], [4], [0, 1, 2, 3], base=2)  # request 0 preempted and recomputed
    assert not cap.errors
    r0, r1 = cap.requests["0-deadbeef"], cap.requests["1-0badf00d"]
    assert r0.filled[:4].all() and not r0.filled[4:].any() and r0.overwritten == 4
    assert r1.filled[:3].all() and r1.overwritten == 0
    assert r0.ids[3].tolist() == [[5, 6], [6, 7]]  # the recompute's row, not the decode's
    assert r1.ids[2].tolist() == [[5, 6], [6, 7]]
    cap.step.clear()
    cap.capture(0, torch.zeros(2, 2, dtype=torch.long))  # layer 1 never reported
    cap.end_step(["0-deadbeef"], [2], np.array([4, 5]))
    assert cap.errors and "MoE layers [0, 1]" in cap.errors[0]
    assert rv._external_request_id("12-0a1b2c3d") == "12" and rv._external_request_id("run-7") == "run-7"


def test_logprobs_before_temperature_are_refused():
    from vllm import SamplingParams

    def fake_llm(mode):
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(model_config=SimpleNamespace(logprobs_mode=mode))))

    with pytest.raises(ValueError, match="processed_logprobs"):
        vllm_client._prepare_params(fake_llm("raw_logprobs"), SamplingParams(temperature=0.7), 2, False)
    with pytest.raises(ValueError, match="processed_logprobs"):
        vllm_client._prepare_params(fake_llm("raw_logprobs"), SamplingParams(top_p=0.9), 1, False)
    params = vllm_client._prepare_params(fake_llm("raw_logprobs"), SamplingParams(temperature=1.0), 2, True)
    assert [(p.logprobs, p.prompt_logprobs) for p in params] == [(0, 0), (0, 0)]
    assert vllm_client._prepare_params(fake_llm("processed_logprobs"), SamplingParams(temperature=0.7), 1, False)[0].logprobs == 0
    with pytest.raises(ValueError, match="n must be 1"):
        vllm_client._prepare_params(fake_llm("processed_logprobs"), SamplingParams(n=2), 1, False)

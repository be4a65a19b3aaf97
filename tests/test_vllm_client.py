"""The vLLM client side on plain data: the official ``routed_experts`` layout, request outputs →
:class:`RolloutBatch`, the alignment check of captured rows. No vLLM needed (the client module
imports without it); the live-engine checks are in ``tests/engines/test_vllm.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from reference_impl import RoutingTrace
from reference_impl.integrations import vllm_client as rv


def test_official_routed_experts_layout_converts_uint8_and_uint16():
    rng = np.random.default_rng(0)
    n, layers, k = 11, 3, 4
    # ≤ 256 experts: uint8, including expert 255
    ids = np.stack([rng.permutation(256)[:k] for _ in range((n - 1) * layers)]).reshape(n - 1, layers, k)
    ids[0, 0] = [255, 0, 1, 2]
    trace = rv.routed_experts_to_trace(ids.astype(np.uint8), 256, num_tokens=n)
    assert trace.expert_ids.dtype == torch.uint8 and trace.num_tokens == n - 1
    assert torch.equal(trace.expert_ids.long(), torch.from_numpy(ids.astype(np.int64)))
    # > 256 experts: uint16 ids beyond 255 survive (no uint8 overflow), stored as int16
    wide = np.stack([rng.permutation(300)[:k] for _ in range((n - 1) * layers)]).reshape(n - 1, layers, k)
    wide[-1, -1] = [299, 298, 257, 256]
    trace = rv.routed_experts_to_trace(wide.astype(np.uint16), 300, num_tokens=n)
    assert trace.expert_ids.dtype == torch.int16
    assert torch.equal(trace.expert_ids.long(), torch.from_numpy(wide.astype(np.int64)))
    assert trace.expert_ids[-1, -1].tolist() == [299, 298, 257, 256]
    # a uint8 array cannot hold a >256-expert model's ids
    with pytest.raises(ValueError, match="uint16 past 256"):
        rv.routed_experts_to_trace(ids.astype(np.uint8), 300)
    with pytest.raises(ValueError, match="needs 9"):
        rv.routed_experts_to_trace(ids.astype(np.uint8), 256, num_tokens=n - 1)
    with pytest.raises(ValueError, match="out of range"):
        rv.routed_experts_to_trace(wide.astype(np.uint16), 299)
    # routed_experts_prompt_start=4: vLLM omits the first 4 rows; they become invalid rows
    trace = rv.routed_experts_to_trace(ids[4:].astype(np.uint8), 256, num_tokens=n, prompt_start=4)
    assert trace.num_tokens == n - 1 and trace.valid.tolist() == [False] * 4 + [True] * (n - 5)
    assert torch.equal(trace.expert_ids[4:].long(), torch.from_numpy(ids[4:].astype(np.int64)))


def _fake_request_output(rid, prompt, generated, logps, routed_experts=None, prompt_logps=None):
    lp = [{t: SimpleNamespace(logprob=v)} for t, v in zip(generated, logps)]
    plp = None if prompt_logps is None else [None] + [{t: SimpleNamespace(logprob=v)} for t, v in zip(prompt[1:], prompt_logps)]
    completion = SimpleNamespace(token_ids=generated, logprobs=lp, routed_experts=routed_experts, finish_reason="length")
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, outputs=[completion], prompt_logprobs=plp, num_cached_tokens=0)


def test_official_layout_samples_become_a_rollout_batch():
    rng = np.random.default_rng(1)
    outs, samples = [], []
    for rid, (p, g) in enumerate([(3, 4), (5, 2)]):
        prompt, gen = list(range(1, p + 1)), list(range(10, 10 + g))
        routes = np.stack([rng.permutation(8)[:2] for _ in range((p + g - 1) * 2)]).reshape(p + g - 1, 2, 2).astype(np.uint8)
        out = _fake_request_output(str(rid), prompt, gen, [-0.5 - j for j in range(g)], routes, [-1.0] * (p - 1))
        trace = rv.routed_experts_to_trace(out.outputs[0].routed_experts, 8, num_tokens=p + g)
        samples.append(rv.sample_from_request_output(out, trace))
        outs.append(routes)
    assert samples[0].prompt_logprobs.tolist() == [-1.0, -1.0]
    batch = rv.to_rollout_batch(samples, group_ids=[0, 0])
    assert batch.tokens.tolist() == [[1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 4, 5, 10, 11]]
    # column t scores token t+1: generated tokens of sequence 0 sit in columns 2..5
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert batch.rollout_logp[0, 2:6].tolist() == [-0.5, -1.5, -2.5, -3.5]
    assert batch.rollout_trace.rows_per_seq == (6, 6)
    assert torch.equal(batch.rollout_trace.split()[1].expert_ids.long(), torch.from_numpy(outs[1].astype(np.int64)))
    with pytest.raises(ValueError, match="routed rows are expected"):
        bad = _fake_request_output("9", [1, 2], [3], [-1.0])
        rv.sample_from_request_output(bad, RoutingTrace(torch.zeros(3, 2, 2, dtype=torch.long) + torch.tensor([0, 1]), 8))


def test_missing_rows_raise_or_become_invalid():
    rec = {"ids": np.zeros((5, 2, 2), dtype=np.int32) + np.array([0, 1]), "filled": np.array([False, False, True, True, True])}
    with pytest.raises(RuntimeError, match="2 of 5 routed rows were never captured"):
        rv._trace_from_capture("3", rec, 6, 8, "error")
    trace = rv._trace_from_capture("3", rec, 6, 8, "invalid")
    assert trace.num_tokens == 5 and trace.valid.tolist() == [False, False, True, True, True]
    with pytest.raises(RuntimeError, match="beyond the last forwarded position"):
        rv._trace_from_capture("3", rec, 4, 8, "invalid")

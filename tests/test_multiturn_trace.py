"""Incremental traces for multi-turn rollouts, against one re-run of the concatenated conversation."""

import pytest
import torch

from conftest import tiny_model
from reference_impl import RoutingTrace, record_routing, replay_routing
from reference_impl.errors import AlignmentError
from reference_impl.rollout import RolloutEngine

EOS = 1


def next_turn_prompts(batch, user_turn):
    """Each conversation so far followed by the user's next message, right-padded, with lengths."""
    convs = [torch.cat([batch.tokens[i, : int(batch.seq_lengths[i])], user_turn]) for i in range(batch.num_sequences)]
    lengths = torch.tensor([len(c) for c in convs])
    prompts = torch.zeros(len(convs), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(convs):
        prompts[i, : len(c)] = c
    return prompts, lengths


def converse(model, engines, seed=0):
    """Three turns: returns every turn's batch and the incremental trace after each turn."""
    g = torch.Generator().manual_seed(seed)
    prompts, lengths = torch.randint(3, model.config.vocab_size, (3, 5), generator=g), None
    batches, traces = [], []
    for engine in engines:
        engine.sync_weights(model)
        batch = engine.generate(prompts, group_size=1, max_new_tokens=6, eos_id=EOS, prompt_lengths=lengths)
        traces.append(batch.rollout_trace if not traces else traces[-1].append_turn(batch.rollout_trace))
        batches.append(batch)
        prompts, lengths = next_turn_prompts(batch, torch.randint(3, model.config.vocab_size, (4,), generator=g))
    return batches, traces


def rerun(model, batch):
    """One forward of the trainer over the concatenated conversations, routes recorded."""
    with torch.no_grad(), record_routing(model) as rec:
        model(batch.tokens)
    return rec.trace(batch.seq_lengths.tolist())


def test_incremental_trace_equals_one_rerun_of_the_whole_conversation_at_every_turn():
    model = tiny_model(router_initializer_range=0.5).eval()
    batches, traces = converse(model, [RolloutEngine(seed=s) for s in range(3)])
    for batch, trace in zip(batches, traces):
        lengths = batch.seq_lengths.tolist()
        trace.check_alignment(lengths)  # n - 1 rows after every turn
        assert trace == rerun(model, batch)
    # the boundary row of each later turn (the previous turn's last token) came from the new turn
    for prev, batch, trace in zip(batches, batches[1:], traces[1:]):
        for i, (start, rows) in enumerate(trace._spans()):
            boundary = int(prev.seq_lengths[i]) - 1
            assert rows > boundary and bool(trace.valid[start + boundary])
    # and the conversation replays bit-identically from the incremental trace
    final = batches[-1]
    with torch.no_grad():
        native = model(final.tokens)
        with replay_routing(model, traces[-1], seq_lengths=final.seq_lengths.tolist()) as stats:
            replayed = model(final.tokens)
    assert torch.equal(native.logits, replayed.logits)
    assert stats.replayed_rows == traces[-1].num_tokens * model.num_layers


def test_earlier_turns_keep_the_rows_of_the_engine_that_sampled_them():
    model = tiny_model(router_initializer_range=0.5).eval()
    # SIMULATED mismatch: the second turn's engine re-routes the shared prefix differently
    batches, traces = converse(model, [RolloutEngine(seed=0), RolloutEngine(seed=1, router_noise_std=2.0)])
    first, second = batches
    kept = traces[1].rows_from([0] * 3)
    head_rows = first.rollout_trace.rows_per_seq
    for i, ((a0, a), (t0, _), (s0, s)) in enumerate(zip(first.rollout_trace._spans(), traces[1]._spans(), second.rollout_trace._spans())):
        assert torch.equal(kept.expert_ids[t0 : t0 + a], first.rollout_trace.expert_ids[a0 : a0 + a])
        assert torch.equal(kept.expert_ids[t0 + a : t0 + s], second.rollout_trace.expert_ids[s0 + a : s0 + s])
    prefix_in_second = second.rollout_trace.rows_from([0] * 3)
    differs = [
        not torch.equal(prefix_in_second.expert_ids[s0 : s0 + a], first.rollout_trace.expert_ids[a0 : a0 + a])
        for (a0, a), (s0, _) in zip(first.rollout_trace._spans(), second.rollout_trace._spans())
    ]
    assert any(differs), "the noisy engine should re-route some prefix row (else this test checks nothing)"
    traces[1].check_alignment(second.seq_lengths.tolist())
    assert traces[1].rows_per_seq == tuple(int(n) - 1 for n in second.seq_lengths) and head_rows != traces[1].rows_per_seq


def test_append_turn_refuses_a_turn_that_does_not_cover_the_conversation():
    ids = torch.arange(2).expand(5, 1, 2).contiguous()
    trace = RoutingTrace(ids, 8, rows_per_seq=(3, 2))
    with pytest.raises(AlignmentError, match="fewer than the"):
        trace.append_turn(RoutingTrace(ids[:4], 8, rows_per_seq=(2, 2)))
    with pytest.raises(AlignmentError, match="fewer than the"):
        trace.append_turn(RoutingTrace(ids, 8))
    with pytest.raises(AlignmentError, match=r"\(num_layers, top_k, num_experts\)"):
        trace.extend(RoutingTrace(ids, 16, rows_per_seq=(3, 2)))
    grown = trace.append_turn(RoutingTrace(torch.arange(2).expand(9, 1, 2).contiguous(), 8, rows_per_seq=(4, 5)))
    assert grown.rows_per_seq == (4, 5)

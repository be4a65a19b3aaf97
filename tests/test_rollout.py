"""The reference rollout engine: alignment of tokens, log-probs and routes; numerics."""

import pytest
import torch

from conftest import tiny_model
from reference_impl import record_routing, replay_routing
from reference_impl.metrics import kl_k3
from reference_impl.rollout import RolloutEngine, next_token_logprobs
from reference_impl.tasks import EOS, VOCAB_SIZE, make_task


@pytest.fixture(scope="module")
def policy():
    return tiny_model(seed=3, vocab_size=VOCAB_SIZE, router_initializer_range=0.02, initializer_range=0.1).eval()


def generate(policy, numerics="fp32", noise=0.0, temperature=1.0, prompts=None, prompt_lengths=None, seed=0):
    engine = RolloutEngine(numerics=numerics, router_noise_std=noise, temperature=temperature, seed=seed)
    engine.sync_weights(policy)
    if prompts is None:
        prompts = make_task("sort").sample_prompts(16, torch.Generator().manual_seed(seed))
    return engine.generate(prompts, group_size=4, max_new_tokens=6, eos_id=EOS, prompt_lengths=prompt_lengths)


def trainer_view(policy, batch, temperature=1.0, trace=None):
    with torch.no_grad(), record_routing(policy) as rec:
        if trace is None:
            logits = policy(batch.tokens).logits
        else:
            with replay_routing(policy, trace, seq_lengths=batch.seq_lengths.tolist()):
                logits = policy(batch.tokens).logits
    return next_token_logprobs(logits, batch.tokens, temperature), rec.trace(batch.seq_lengths.tolist())


def test_fp32_engine_matches_the_trainer_token_for_token_and_route_for_route(policy):
    batch = generate(policy)
    old_logp, old_trace = trainer_view(policy, batch)
    assert ((old_logp - batch.rollout_logp) * batch.mask).abs().max() <= 1e-5
    assert batch.rollout_trace.agreement(old_trace).router_disagreement == 0.0
    batch.rollout_trace.check_alignment(batch.seq_lengths.tolist())


def test_mask_covers_exactly_the_sampled_response_tokens(policy):
    batch = generate(policy)
    for i in range(batch.num_sequences):
        p, s = int(batch.prompt_lengths[i]), int(batch.seq_lengths[i])
        assert batch.mask[i].nonzero().flatten().tolist() == list(range(p - 1, s - 1))
        response = batch.tokens[i, p:s].tolist()
        assert EOS not in response[:-1], "a response continues after EOS"
        assert response[-1] == EOS or len(response) == 6
    assert (batch.rollout_logp <= 0).all()


def test_prompts_of_different_lengths_are_left_padded_internally_and_stay_aligned(policy):
    prompts = make_task("sort").sample_prompts(6, torch.Generator().manual_seed(1))
    lengths = torch.tensor([7, 4, 5, 7, 2, 6])
    batch = generate(policy, prompts=prompts, prompt_lengths=lengths)
    old_logp, old_trace = trainer_view(policy, batch)
    assert ((old_logp - batch.rollout_logp) * batch.mask).abs().max() <= 1e-5
    assert batch.rollout_trace.agreement(old_trace).router_disagreement == 0.0
    assert batch.prompt_lengths.tolist() == lengths.repeat_interleave(4).tolist()


def test_rollout_logp_is_the_tempered_distribution_that_was_sampled(policy):
    batch = generate(policy, temperature=0.7)
    old_logp, _ = trainer_view(policy, batch, temperature=0.7)
    assert ((old_logp - batch.rollout_logp) * batch.mask).abs().max() <= 1e-5


def test_same_seed_same_rollouts(policy):
    a, b = generate(policy, seed=5), generate(policy, seed=5)
    assert torch.equal(a.tokens, b.tokens) and a.rollout_trace == b.rollout_trace


@pytest.mark.parametrize("numerics", ["bf16", "fp8_e4m3", "fp8_e5m2"])
def test_low_precision_engines_flip_near_tie_routes_and_r3_lowers_the_kl(policy, numerics):
    batch = generate(policy, numerics=numerics)
    old_logp, old_trace = trainer_view(policy, batch)
    disagreement = batch.rollout_trace.agreement(old_trace).router_disagreement
    assert disagreement > 0, "the near-tie model should flip some routes"
    kl_native = kl_k3(batch.rollout_logp, old_logp, batch.mask)
    r3_logp, r3_trace = trainer_view(policy, batch, trace=batch.rollout_trace)
    kl_r3 = kl_k3(batch.rollout_logp, r3_logp, batch.mask)
    assert batch.rollout_trace.agreement(r3_trace).router_disagreement == 0.0
    assert 0 < kl_r3 < kl_native


def test_simulated_router_noise_flips_many_routes(policy):
    batch = generate(policy, noise=1.0)
    _, old_trace = trainer_view(policy, batch)
    assert batch.rollout_trace.agreement(old_trace).router_disagreement > 0.3


def test_bad_engine_settings_are_refused(policy):
    with pytest.raises(ValueError, match="unknown setting 'fp4'"):
        RolloutEngine(numerics="fp4").sync_weights(policy)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        RolloutEngine(temperature=0.0)
    with pytest.raises(RuntimeError, match="sync_weights"):
        RolloutEngine().generate(torch.ones(1, 3, dtype=torch.long), group_size=1, max_new_tokens=1, eos_id=EOS)

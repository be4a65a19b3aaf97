"""Quick start: a bf16 inference engine picks other experts than the fp32 trainer; R3 replay closes the gap.

    python examples/quickstart.py

Included in the home page (docs_en/index.md, docs_zh/index.md) and run by tests/test_examples.py.
"""
# --8<-- [start:quickstart]
import torch

from reference_impl import MoEConfig, MoEForCausalLM, record_routing, replay_routing
from reference_impl.metrics import kl_k3
from reference_impl.rollout import RolloutEngine, next_token_logprobs

torch.manual_seed(0)
# A tiny Qwen3-MoE: 2 MoE layers, 8 experts, top-2. Small router weights put routes
# near ties, where a bf16 engine and an fp32 trainer can disagree.
config = MoEConfig(vocab_size=16, initializer_range=0.1, router_initializer_range=0.02)
model = MoEForCausalLM(config).eval()  # the trainer's copy, fp32
engine = RolloutEngine(numerics="bf16", seed=0)  # inference engine μ: same weights, bf16
engine.sync_weights(model)
prompts = torch.randint(4, 14, (64, 7))
# tokens, log μ of every sampled token, and the engine's routes (batch.rollout_trace)
batch = engine.generate(prompts, group_size=4, max_new_tokens=6, eos_id=3)
lengths = batch.seq_lengths.tolist()

with torch.no_grad():  # the trainer recomputes π_old in fp32
    with record_routing(model) as rec:  # with its own routing
        native_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
    with replay_routing(model, batch.rollout_trace, seq_lengths=lengths):  # R3
        r3_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)

agree = batch.rollout_trace.agreement(rec.trace(lengths))
kl_native = kl_k3(batch.rollout_logp, native_logp, batch.mask)
kl_r3 = kl_k3(batch.rollout_logp, r3_logp, batch.mask)
print(f"routers choosing other experts than the engine: {agree.router_disagreement:.2%}")
print(f"tokens routed differently in at least one layer: {agree.token_disagreement:.2%}")
print(f"KL(mu || pi_old), k3, native routing: {kl_native:.3e}")
print(f"KL(mu || pi_old), k3, R3 replay:      {kl_r3:.3e}")
# --8<-- [end:quickstart]

"""The reference inference engine in every numerics setting: how far μ lands from the fp32 trainer, with and without R3.

    python examples/reference_engine.py

A small version of benchmarks/mismatch_table.py (32 prompts x 4 responses, no cold start), fast
enough to run as a test. Included in the reference engine page (docs_en/engines/reference.md,
docs_zh/engines/reference.md); run by tests/test_examples.py.
"""

import torch

from reference_impl import MoEConfig, MoEForCausalLM, record_routing, replay_routing
from reference_impl.metrics import kl_k3
from reference_impl.rollout import RolloutEngine, next_token_logprobs
from reference_impl.tasks import EOS, VOCAB_SIZE, make_task

# --8<-- [start:settings]
torch.manual_seed(0)
config = MoEConfig(vocab_size=VOCAB_SIZE, initializer_range=0.1, router_initializer_range=0.02)
model = MoEForCausalLM(config).eval()  # the trainer: fp32, native routing
task = make_task("sort")
prompts = task.sample_prompts(32, torch.Generator().manual_seed(0))

print(f"{'engine':>36} | routers differ | KL k3 native | KL k3 with R3")
for numerics, noise in [("fp32", 0.0), ("bf16", 0.0), ("fp8_e4m3", 0.0), ("fp8_e5m2", 0.0), ("fp32", 0.3)]:
    engine = RolloutEngine(numerics=numerics, router_noise_std=noise, seed=0)
    engine.sync_weights(model)  # a fresh engine copy; call again after every optimizer step
    batch = engine.generate(prompts, group_size=4, max_new_tokens=task.max_new_tokens, eos_id=EOS)
    lengths = batch.seq_lengths.tolist()
    with torch.no_grad():
        with record_routing(model) as rec:  # π_old recomputed natively
            native_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
        with replay_routing(model, batch.rollout_trace, seq_lengths=lengths):  # π_old with the engine's routes
            r3_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
    label = numerics + (f" + router noise {noise} (SIMULATED)" if noise else "")
    differ = batch.rollout_trace.agreement(rec.trace(lengths)).router_disagreement
    print(f"{label:>36} | {differ:14.2%} | {kl_k3(batch.rollout_logp, native_logp, batch.mask):12.3e} | "
          f"{kl_k3(batch.rollout_logp, r3_logp, batch.mask):.3e}")
# --8<-- [end:settings]

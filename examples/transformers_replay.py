"""R2 and R3 in a Hugging Face transformers MoE model, with gradient checkpointing.

    python examples/transformers_replay.py [--workdir DIR]

Needs the ``hf`` extra (transformers 5.19). Included in the transformers engine page
(docs_en/engines/transformers.md, docs_zh/engines/transformers.md); run by tests/test_examples.py.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from reference_impl import MoEConfig, MoEForCausalLM, record_routing, replay_routing
from reference_impl.metrics import kl_k3
from reference_impl.rollout import RolloutEngine, next_token_logprobs
from reference_impl.tasks import EOS, VOCAB_SIZE, make_task
from reference_impl.tiny_checkpoint import build_tiny_checkpoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workdir", default=None, help="where to write files (default: a temporary folder)")
args = parser.parse_args()
work = Path(args.workdir or tempfile.mkdtemp(prefix="transformers_example_"))

torch.manual_seed(0)
config = MoEConfig(vocab_size=VOCAB_SIZE, initializer_range=0.1, router_initializer_range=0.02)
reference = MoEForCausalLM(config)
ckpt = build_tiny_checkpoint(work / "ckpt", model=reference)
engine = RolloutEngine(numerics="bf16", seed=0)  # stands in for the inference engine (vLLM, SGLang)
engine.sync_weights(reference)
task = make_task("sort")
batch = engine.generate(task.sample_prompts(8, torch.Generator().manual_seed(0)), group_size=4,
                        max_new_tokens=task.max_new_tokens, eos_id=EOS)
lengths = batch.seq_lengths.tolist()

# --8<-- [start:attach]
from transformers import AutoModelForCausalLM  # noqa: E402

from reference_impl.integrations.transformers import attach_routing  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)  # Qwen3MoeForCausalLM
routing = attach_routing(model)  # once per model instance; record_routing / replay_routing drive it
shape = routing.routing_shape
print(f"{type(model).__name__}: {shape.num_layers} MoE layers, {shape.num_experts} experts, top-{shape.top_k}")
# --8<-- [end:attach]

# --8<-- [start:r3]
model.eval()
with torch.no_grad():
    with record_routing(routing) as rec:  # native recompute of π_old, recording e^π_old (R2)
        old_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
    old_trace = rec.trace(lengths)
    with replay_routing(routing, batch.rollout_trace, seq_lengths=lengths) as stats:  # R3 recompute
        r3_old_logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
print(f"engine vs trainer routes: {batch.rollout_trace.agreement(old_trace).router_disagreement:.2%} of routers differ")
print(f"KL(mu || pi_old), k3: native {kl_k3(batch.rollout_logp, old_logp, batch.mask):.3e}, "
      f"R3 {kl_k3(batch.rollout_logp, r3_old_logp, batch.mask):.3e}")
print(f"R3 replay: {stats}")
# --8<-- [end:r3]

# --8<-- [start:r2-checkpointing]
model.config.use_cache = False  # no KV cache in training forwards
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
with record_routing(routing) as rec, replay_routing(routing, old_trace, seq_lengths=lengths):  # R2 update
    logp = next_token_logprobs(model(batch.tokens).logits, batch.tokens)
    loss = -(logp * batch.mask).sum() / batch.mask.sum()
    loss.backward()  # checkpointed layers recompute their routers here: they reuse the forward's ids
print(f"R2 on the first mini-batch (theta = theta_old) changes nothing: {torch.equal(logp.detach(), old_logp)}")
print(f"routes used in the update = old_trace: {rec.trace(lengths).agreement(old_trace).router_disagreement == 0.0}")
print(f"router gradient norm, layer 0: {model.model.layers[0].mlp.gate.weight.grad.norm():.3e}")
# --8<-- [end:r2-checkpointing]

# --8<-- [start:families]
from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM  # noqa: E402

small = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
for family in (MixtralForCausalLM(MixtralConfig(**small, num_key_value_heads=2, num_local_experts=8)),
               OlmoeForCausalLM(OlmoeConfig(**small, num_key_value_heads=4, num_experts=8, norm_topk_prob=True,
                                          eos_token_id=None))):
    family.eval()
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad(), record_routing(attach_routing(family)) as rec:
        logits = family(x).logits
    with torch.no_grad(), replay_routing(attach_routing(family), rec.trace([10, 10])):
        again = family(x).logits
    print(f"{type(family).__name__}: record -> replay bit-identical: {torch.equal(logits, again)}")
# --8<-- [end:families]

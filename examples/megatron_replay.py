"""R2 and R3 in megatron-core: drive its RouterReplay (RECORD, REPLAY_FORWARD, REPLAY_BACKWARD) from a RoutingTrace.

    python examples/megatron_replay.py [--workdir DIR]

Needs megatron-core 0.16.1 (the ``engines`` extra); runs on CPU through small compatibility shims.
Megatron's replay state is process-wide, so run this in a process of its own. Included in the
Megatron engine page (docs_en/engines/megatron.md, docs_zh/engines/megatron.md); run by
tests/test_examples.py.
"""

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

from reference_impl import MoEConfig, MoEForCausalLM
from reference_impl.metrics import kl_k3
from reference_impl.rollout import RolloutEngine
from reference_impl.tasks import EOS, VOCAB_SIZE, make_task
from reference_impl.tiny_checkpoint import build_tiny_checkpoint

warnings.filterwarnings("ignore", module=r"megatron\.")  # "Transformer Engine and Apex are not installed", ...
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workdir", default=None, help="where to write files (default: a temporary folder)")
args = parser.parse_args()
work = Path(args.workdir or tempfile.mkdtemp(prefix="megatron_example_"))

# --8<-- [start:rollout]
torch.manual_seed(0)
config = MoEConfig(vocab_size=VOCAB_SIZE, initializer_range=0.1, router_initializer_range=0.02)
reference = MoEForCausalLM(config)
ckpt = build_tiny_checkpoint(work / "ckpt", model=reference)
engine = RolloutEngine(numerics="bf16", seed=0)  # the inference engine μ (bf16); Megatron trains in fp32
engine.sync_weights(reference)
task = make_task("sort")
prompts = task.sample_prompts(8, torch.Generator().manual_seed(0))
batch = engine.generate(prompts, group_size=4, max_new_tokens=task.max_new_tokens, eos_id=EOS)
lengths = batch.seq_lengths.tolist()  # batch.rollout_trace: n - 1 rows per sequence
# --8<-- [end:rollout]

# --8<-- [start:load]
from reference_impl.integrations.megatron import MegatronReplay, load_megatron_model, megatron_logprobs  # noqa: E402

# GPTModel with TransformerConfig(moe_enable_routing_replay=True, moe_router_fusion=False,
# moe_token_dispatcher_type="allgather", ...); clears RouterReplay's class-level instance list first.
model = load_megatron_model(ckpt)
# --8<-- [end:load]

# --8<-- [start:record-replay]
with torch.no_grad():
    native = megatron_logprobs(model, batch.tokens, lengths, mode="native")  # Megatron's own top-k
    r2 = megatron_logprobs(model, batch.tokens, lengths, mode="record")  # RECORD: e^π_old for R2
    r3 = megatron_logprobs(model, batch.tokens, lengths, batch.rollout_trace)  # REPLAY_FORWARD: R3
print(f"Megatron RECORD vs engine routes: {r2.trace.agreement(batch.rollout_trace).router_disagreement:.2%} of routers differ")
print(f"KL(mu || pi_old), k3, native: {kl_k3(batch.rollout_logp, native.logprobs, batch.mask):.3e}")
print(f"KL(mu || pi_old), k3, R3:     {kl_k3(batch.rollout_logp, r3.logprobs, batch.mask):.3e}")
print(f"R3 replay: {r3.stats}")  # last positions and padding have no trace row: routed natively
# --8<-- [end:record-replay]

# --8<-- [start:recompute]
# Activation recompute: the backward re-runs each layer's forward. Without REPLAY_BACKWARD a near
# tie could route differently than the forward did.
model = load_megatron_model(ckpt, recompute=True)  # recompute_granularity="full"
replay = MegatronReplay.of(model)
result = megatron_logprobs(model, batch.tokens, lengths, batch.rollout_trace)  # REPLAY_FORWARD, with grad
print(f"after the forward: routers hold {replay.pending_backward()} targets for the recompute")
loss = -(result.logprobs * result.mask).sum() / result.mask.sum()
loss.backward()  # REPLAY_BACKWARD pops the forward's routes layer by layer
print(f"after the backward: {replay.pending_backward()} pending; recompute used the forward's routes: "
      f"{torch.equal(replay.last_recompute_routes(), result.routes)}")
print(f"router gradient norm, layer 0: {model.decoder.layers[0].mlp.router.weight.grad.norm():.3e}")
# --8<-- [end:recompute]

"""Validate a framework's rollout routes and log-probs against reference_impl.

    python examples/validate_framework.py [--numerics bf16] [--workdir DIR]

Steps: build a tiny Qwen3-MoE checkpoint; sample rollouts with the reference engine (standing in
for your framework's inference engine); lay the routes out the way vLLM, SGLang/slime and verl
return them; convert each layout back with ``reference_impl.converters``; save a RolloutBatch and
run ``python -m reference_impl compare`` against transformers on the same checkpoint.

Included in the framework guide (docs_en/frameworks.md, docs_zh/frameworks.md) and the reference
engine page; run by tests/test_examples.py.
"""

import argparse
import base64
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from reference_impl import MoEConfig, MoEForCausalLM
from reference_impl.converters import from_sglang, from_verl, from_vllm
from reference_impl.batch import RolloutBatch
from reference_impl.tasks import VOCAB_SIZE
from reference_impl.tiny_checkpoint import build_tiny_checkpoint

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--numerics", default="bf16", help="engine numerics: fp32, bf16, fp8_e4m3, fp8_e5m2")
parser.add_argument("--workdir", default=None, help="where to write files (default: a temporary folder)")
args = parser.parse_args()
work = Path(args.workdir or tempfile.mkdtemp(prefix="validate_"))
work.mkdir(parents=True, exist_ok=True)


def run(*command) -> str:
    """Run a command, fail loudly, return its standard output."""
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stderr}")
    return done.stdout


# --8<-- [start:checkpoint]
torch.manual_seed(0)
config = MoEConfig(vocab_size=VOCAB_SIZE, initializer_range=0.1, router_initializer_range=0.02)
ckpt = build_tiny_checkpoint(work / "ckpt", model=MoEForCausalLM(config))  # config, weights, tokenizer
E, L, k = config.num_experts, config.num_hidden_layers, config.num_experts_per_tok
# --8<-- [end:checkpoint]

# --8<-- [start:rollout]
print(run(sys.executable, "-m", "reference_impl", "rollout", "--checkpoint", ckpt,
          "--numerics", args.numerics, "--out", work / "engine.safetensors").strip())
engine = RolloutBatch.load(work / "engine.safetensors")
# --8<-- [end:rollout]

# --8<-- [start:framework-output]
# What a framework hands you per sequence i of n_i tokens (prompt + response). Here it is made
# from the reference engine's rollout; with a real framework, take it from the framework's output.
lengths = engine.seq_lengths.tolist()
rows = [t.expert_ids.numpy() for t in engine.rollout_trace.split()]  # [n_i - 1, L, k] each
token_ids = [engine.tokens[i, :n].tolist() for i, n in enumerate(lengths)]
prompt_lengths = engine.prompt_lengths.tolist()
response_logprobs = [engine.rollout_logp[i, p - 1 : n - 1].tolist() for i, (p, n) in enumerate(zip(prompt_lengths, lengths))]

vllm_routed_experts = [r.astype(np.uint8) for r in rows]  # CompletionOutput.routed_experts
sglang_meta_info = [base64.b64encode(r.astype(np.int32).tobytes()).decode() for r in rows]  # base64 int32
verl_routes = [np.concatenate([r, np.zeros((1, L, k), r.dtype)]).astype(np.int16) for r in rows]  # one row per token
verl_masks = [torch.arange(n) < n - 1 for n in lengths]  # the last row is a zero row, not a route
# --8<-- [end:framework-output]

# --8<-- [start:convert]
traces = {
    "vLLM": from_vllm(vllm_routed_experts, lengths, num_experts=E),
    "SGLang/slime": from_sglang(sglang_meta_info, lengths, num_layers=L, top_k=k, num_experts=E),
    "verl": from_verl(verl_routes, verl_masks, num_experts=E),
}
for name, trace in traces.items():
    assert trace == engine.rollout_trace, f"{name}: converted trace differs from the engine's routes"
    print(f"{name:>12}: {trace.num_sequences} sequences, {trace.num_tokens} routed rows, "
          f"{trace.num_layers} layers x top-{trace.top_k}, stored as {trace.expert_ids.dtype}")
# --8<-- [end:convert]

# --8<-- [start:batch]
def batch_from_sequences(token_ids, prompt_lengths, response_logprobs, trace, group_ids, pad_id=0):
    """A RolloutBatch from per-sequence lists: token ids (prompt + response) and log μ of each response token."""
    n, width = len(token_ids), max(len(ids) for ids in token_ids)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    rollout_logp, mask = torch.zeros(n, width - 1), torch.zeros(n, width - 1)
    for i, (ids, p, logp) in enumerate(zip(token_ids, prompt_lengths, response_logprobs)):
        tokens[i, : len(ids)] = torch.tensor(ids)
        rollout_logp[i, p - 1 : len(ids) - 1] = torch.tensor(logp)  # column t scores token t + 1
        mask[i, p - 1 : len(ids) - 1] = 1.0
    seq_lengths = torch.tensor([len(ids) for ids in token_ids])
    return RolloutBatch(tokens, torch.tensor(prompt_lengths), seq_lengths, rollout_logp, mask, trace, torch.as_tensor(group_ids))


batch = batch_from_sequences(token_ids, prompt_lengths, response_logprobs, traces["verl"], engine.group_ids)
batch.validate()  # shapes and the alignment rule (n - 1 routed rows per sequence)
batch.save(work / "framework.safetensors")
# --8<-- [end:batch]

# --8<-- [start:compare]
print(run(sys.executable, "-m", "reference_impl", "compare", "--rollout", work / "framework.safetensors",
          "--checkpoint", ckpt, "--engine", "transformers", "--top", "3", "--json", work / "report.json"))
report = json.loads((work / "report.json").read_text())
native, replayed = report["native"]["kl_k3"], report["replayed"]["kl_k3"]
print(f"R3 replay lowers KL(mu || pi_old): {replayed < native} ({native:.3e} -> {replayed:.3e})")
# --8<-- [end:compare]

# --8<-- [start:off-by-one]
try:  # verl's one-row-per-token layout is not vLLM's n - 1 rows: the converter refuses it
    from_vllm(verl_routes, lengths, num_experts=E)
except ValueError as err:
    print(f"off-by-one caught: {err}")
# --8<-- [end:off-by-one]

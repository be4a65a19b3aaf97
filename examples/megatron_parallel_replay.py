"""Replay a routing trace under megatron-core model parallelism and print the parity table against one process.

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 examples/megatron_parallel_replay.py --layout tp2_sp

Layouts (2 ranks each): ep2_alltoall, ep2_allgather, tp2_sp, pp2, pp2_recompute, cp2, tp2_sp_ep2,
cp2_ep2. Every rank builds the same tiny Qwen3-MoE, computes the one-process reference (fp32), builds
its shard of megatron's ``GPTModel`` inside the layout and runs megatron's own schedule over 2
micro-batches; rank 0 prints the table. ``--control NAME`` also runs a known-wrong slicing, which the
same checks must catch. Needs megatron-core 0.16.1 (the ``engines`` extra); on CPU through small
shims. Included in docs_en/model-parallel.md and docs_zh/model-parallel.md; run by tests/test_examples.py.
"""

import argparse
import warnings

import torch
import torch.distributed as dist

from reference_impl.integrations import megatron_parity as mp

warnings.filterwarnings("ignore", module=r"megatron\.")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--layout", default="tp2_sp", choices=sorted(mp.LAYOUTS))
parser.add_argument("--control", action="append", default=[], choices=sorted(mp.CONTROLS),
                    help="also run this known-wrong slicing (repeatable)")
args = parser.parse_args()
torch.set_num_threads(1)

# --8<-- [start:setup]
dist.init_process_group("gloo")  # torchrun's rendezvous; your job's group works the same way
mp.init_layout(args.layout)  # init_megatron_cpu(...sizes): joins the group, sets megatron's parallel state
reference = mp.tiny_reference_model()  # the same weights on every rank (seed 0)
tokens, lengths = mp.tiny_batch()  # the global batch: 4 sequences, 16 positions
ref = mp.parity_reference(reference, tokens, lengths)  # one process: log-probs, traces, gradients
model = mp.build_layout_model(args.layout, reference)  # this rank's part of megatron's GPTModel
result = mp.run_parity(args.layout, model, ref, controls=tuple(args.control))
# --8<-- [end:setup]

if dist.get_rank() == 0:
    tol = 1e-5
    print(f"layout {args.layout}: {result['ranks']} ep={result['ep']} dispatcher={result['dispatcher']} "
          f"recompute={result['recompute']} micro-batches={result['num_microbatches']}")
    print(f"{'check':<44}{'value':>14}  ok")
    rows = [
        ("native log-probs, max |diff|", result["native_logprobs_max_diff"], result["native_logprobs_max_diff"] <= tol),
        ("R2 record re-assembled == one process", result["record_equals_reference"], result["record_equals_reference"]),
        ("REPLAY_FORWARD log-probs, max |diff|", result["replay_logprobs_max_diff"], result["replay_logprobs_max_diff"] <= tol),
        ("REPLAY_FORWARD routes re-assembled == trace", result["replay_routes_equal_trace"], result["replay_routes_equal_trace"]),
    ]
    for label in ("replay_grad", *args.control):
        r = result[label]
        tag = "replay+backward" if label == "replay_grad" else f"control {label}"
        rows += [
            (f"{tag}: log-probs, max |diff|", r["logprobs_max_diff"], r["logprobs_max_diff"] <= tol),
            (f"{tag}: routes == trace", r["routes_equal_trace"], r["routes_equal_trace"]),
            (f"{tag}: grads, max rel. error", r["grad_rel_max"], r["grad_rel_max"] <= tol),
            (f"{tag}: grads zero where reference is", r["grad_zeros_exact"], r["grad_zeros_exact"]),
            (f"{tag}: queues empty after the step", r["queues_empty"], r["queues_empty"]),
        ]
    for name, value, ok in rows:
        shown = f"{value:.2e}" if isinstance(value, float) else str(value)
        print(f"{name:<50}{shown:>14}  {'yes' if ok else 'NO'}")
    verdict = result["replay_grad"]["passes"] and all(ok for _, _, ok in rows[:4])
    print(f"parity under {args.layout}: {'PASS' if verdict else 'FAIL'}")
    for label in args.control:
        print(f"control {label}: {'caught' if not result[label]['passes'] else 'NOT caught'}")
dist.destroy_process_group()

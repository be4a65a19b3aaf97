"""Run one vLLM engine over a list of generate_with_routes calls and save what came back.

Usage: ``python vllm_run.py JOB.json``. vLLM's state is process-wide, so each engine set-up runs in
its own process; the test reads the results. JOB holds::

    {"model": ckpt dir, "out": result dir, "llm": {make_llm kwargs},
     "calls": [{"name", "prompts": [[ids]], "sampling": {SamplingParams kwargs},
                "prompt_logprobs": bool, "on_missing_rows": "error"|"invalid"}]}

For each call, ``out/NAME.safetensors`` holds the RolloutBatch (``RolloutBatch.save``),
``out/NAME.prompt_logp.safetensors`` the prompt log-probs if asked, and ``out/result.json``
per-call stats or the error raised.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(job_path: str) -> None:
    import torch
    from safetensors.torch import save_file
    from vllm import SamplingParams

    from reference_impl.integrations.vllm import generate_with_routes, make_llm, to_rollout_batch

    job = json.loads(open(job_path).read())
    out = job["out"]
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    llm = make_llm(job["model"], **job.get("llm", {}))
    result = {"startup_s": time.perf_counter() - t0, "calls": {}}
    for call in job["calls"]:
        name = call["name"]
        t0 = time.perf_counter()
        try:
            samples = generate_with_routes(
                llm,
                call["prompts"],
                SamplingParams(**call["sampling"]),
                prompt_logprobs=call.get("prompt_logprobs", False),
                on_missing_rows=call.get("on_missing_rows", "error"),
            )
        except Exception as exc:  # recorded for the test to assert on
            result["calls"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        seconds = time.perf_counter() - t0
        batch = to_rollout_batch(samples, pad_id=0)
        batch.save(os.path.join(out, f"{name}.safetensors"))
        if samples[0].prompt_logprobs is not None:
            plp = torch.zeros(len(samples), batch.tokens.shape[1] - 1)
            for i, s in enumerate(samples):
                plp[i, : s.prompt_len - 1] = s.prompt_logprobs
            save_file({"prompt_logp": plp}, os.path.join(out, f"{name}.prompt_logp.safetensors"))
        result["calls"][name] = {
            "seconds": seconds,
            "rows_per_seq": list(batch.rollout_trace.rows_per_seq),
            "seq_lengths": batch.seq_lengths.tolist(),
            "trace_rows": [s.trace.num_tokens for s in samples],
            "invalid_rows": [s.trace.num_invalid for s in samples],
            "rows_overwritten": [s.stats["rows_overwritten"] for s in samples],
            "num_cached_tokens": [s.num_cached_tokens for s in samples],
            "request_ids": [s.request_id for s in samples],
            "finish_reasons": [s.finish_reason for s in samples],
        }
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is on disk; skip vLLM's engine shutdown at interpreter exit (~5 s on a busy machine).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""Scenarios of the vLLM RL loop, one live engine per process: ``python vllm_loop_run.py JOB.json``.

JOB = ``{"scenario": "train" | "sync" | "prefix", "out": dir, ...}``; each writes its results
(JSON + safetensors) into ``out`` for tests/engines/test_vllm_loop.py to check.

* ``train``: ``Trainer(TrainConfig(**job["config"]))`` → ``history.json``.
* ``sync``: a fp32 vLLM-rollout trainer; after each training step, vLLM's prompt log-probs of a
  fixed batch before the sync (stale engine) and after it, and the trainer's log-probs.
* ``prefix``: fp32 engines with prefix caching on and off over the same seeded requests (prompts
  longer than a KV block), then a weight perturbation + sync and a prefix-cache reset.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def fixed_batch_logprobs(llm, sequences):
    """vLLM's log-prob of every token of ``sequences`` given its prefix (prompt_logprobs), ``[n, S-1]``."""
    import torch
    from vllm import SamplingParams

    from reference_impl.integrations.vllm_client import generate_with_routes

    samples = generate_with_routes(llm, sequences, SamplingParams(max_tokens=1, temperature=1.0), prompt_logprobs=True, on_missing_rows="invalid")
    width = max(len(s) for s in sequences)
    out = torch.zeros(len(sequences), width - 1)
    for i, s in enumerate(samples):
        out[i, : s.prompt_len - 1] = s.prompt_logprobs
    return out


def run_train(job):
    from reference_impl.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**job["config"]))
    history = trainer.train()
    with open(os.path.join(job["out"], "history.json"), "w") as f:
        json.dump(history, f)


def run_sync(job):
    import torch
    from safetensors.torch import save_file

    from reference_impl.logprobs import next_token_logprobs
    from reference_impl.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(**job["config"]))
    batch, _ = trainer.rollout()  # builds the engine; its samples are the fixed batch
    fixed = [batch.tokens[i, : int(n)].tolist() for i, n in enumerate(batch.seq_lengths)]
    tokens, mask = batch.tokens, torch.zeros(batch.tokens.shape[0], batch.tokens.shape[1] - 1)
    for i, n in enumerate(batch.seq_lengths.tolist()):
        mask[i, : n - 1] = 1
    tensors = {"mask": mask}
    for step in range(job["steps"]):
        trainer.train_step()  # sync, sample, update: the engine is now one update behind
        stale = fixed_batch_logprobs(trainer.engine.llm, fixed)
        trainer.engine.sync_weights(trainer.model)
        synced = fixed_batch_logprobs(trainer.engine.llm, fixed)
        with torch.no_grad():
            ours = next_token_logprobs(trainer.model(tokens).logits, tokens)
        tensors[f"stale_{step}"], tensors[f"synced_{step}"], tensors[f"trainer_{step}"] = stale, synced, ours
    save_file(tensors, os.path.join(job["out"], "sync.safetensors"))


def run_prefix(job):
    import torch
    from safetensors.torch import save_file
    from vllm import SamplingParams

    from reference_impl.integrations.vllm_client import generate_with_routes, make_llm, reset_prefix_cache, sync_weights
    from reference_impl.model import MoEConfig, MoEForCausalLM
    from reference_impl.tiny_checkpoint import build_tiny_checkpoint

    torch.manual_seed(1)
    model = MoEForCausalLM(MoEConfig(vocab_size=16, router_initializer_range=0.5, initializer_range=0.1)).eval()
    ckpt = build_tiny_checkpoint(os.path.join(job["out"], "ckpt"), model=model)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 14, (n - 1,), generator=g).tolist() for n in job["prompt_lengths"]]
    requests = [p for p in prompts for _ in range(job["group_size"])]
    params = [SamplingParams(max_tokens=job["max_tokens"], temperature=1.0, seed=1000 + i, ignore_eos=True) for i in range(len(requests))]
    llm_kwargs = dict(dtype="float32", seed=0, max_model_len=128, block_size=job["block_size"], enable_chunked_prefill=False, max_num_batched_tokens=128)
    tensors, result = {}, {}

    def call(llm, name, caching):
        samples = generate_with_routes(llm, requests, params, on_missing_rows="invalid", route_cache=caching)
        width = max(s.prompt_len + s.gen_len for s in samples)
        toks = torch.zeros(len(samples), width, dtype=torch.long)
        routes = torch.full((len(samples), width - 1, model.config.num_hidden_layers, model.config.num_experts_per_tok), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            toks[i, : len(s.token_ids)] = torch.tensor(s.token_ids)
            ids = s.trace.expert_ids.long().sort(dim=-1).values
            ids[~s.trace.valid] = -1
            routes[i, : ids.shape[0]] = ids
        tensors[f"{name}_tokens"], tensors[f"{name}_routes"] = toks, routes
        result[name] = {
            "cached_tokens": sum(s.num_cached_tokens for s in samples),
            "rows_from_cache": sum(s.stats["rows_from_cache"] for s in samples),
            "invalid_rows": sum(s.trace.num_invalid for s in samples),
            "route_cache": llm.collective_rpc("route_cache_stats")[0],
        }

    llm = make_llm(ckpt, enable_prefix_caching=False, **llm_kwargs)
    call(llm, "off", False)
    del llm
    llm = make_llm(ckpt, enable_prefix_caching=True, **llm_kwargs)
    call(llm, "on", True)
    call(llm, "on_again", True)  # hits from the previous generate call
    # perturb the weights, sync (resets both caches), sample again: routes of the new weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    sync_weights(llm, model.state_dict())
    call(llm, "synced", True)
    reset_prefix_cache(llm)
    call(llm, "reset", True)
    save_file(tensors, os.path.join(job["out"], "prefix.safetensors"))
    model_path = os.path.join(job["out"], "perturbed.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, model_path)
    with open(os.path.join(job["out"], "result.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    os.makedirs(job["out"], exist_ok=True)
    {"train": run_train, "sync": run_sync, "prefix": run_prefix}[job["scenario"]](job)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is on disk; skip vLLM's slow engine shutdown

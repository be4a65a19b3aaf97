"""Bridges to real engines. Each submodule imports its engine lazily; import the one you need:

* :mod:`reference_impl.integrations.vllm` — rollouts from vLLM with captured routing (R3).
"""

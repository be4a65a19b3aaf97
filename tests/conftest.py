"""Shared fixtures, and the rule that a skipped test fails CI.

Optional engines may be missing on a developer's machine, so engine tests may skip there; with
``CI`` or ``REQUIRE_ALL=1`` in the environment every skip turns the run red.
"""

import os

import pytest
import torch

from reference_impl import MoEConfig, MoEForCausalLM

# One thread: on a 2-core machine an OpenMP team spinning against engine subprocesses (or any
# other load) was seen to make forwards 100x slower; single-threaded runs are steady.
torch.set_num_threads(1)


def _skips_fail() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("REQUIRE_ALL") == "1"


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and _skips_fail():
        reporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; skips are not allowed in CI (REQUIRE_ALL)", red=True)
        session.exitstatus = 1


def pytest_collection_modifyitems(config, items):
    """Engine and site tests are slow by definition: the fast tier (-m "not slow") starts no engine,
    notebook, site build or browser."""
    for item in items:
        if item.get_closest_marker("engine") or item.get_closest_marker("site"):
            item.add_marker(pytest.mark.slow)


def tiny_model(seed: int = 0, **overrides) -> MoEForCausalLM:
    """A small Qwen3-MoE; ``router_initializer_range`` small gives near-tie router logits."""
    torch.manual_seed(seed)
    cfg = MoEConfig(**overrides)
    return MoEForCausalLM(cfg)


@pytest.fixture
def model() -> MoEForCausalLM:
    return tiny_model(seed=0, router_initializer_range=0.5).eval()


def hf_forward_with_routes(hf_model, input_ids):
    """Logits and per-layer top-k ids ``[b, t, L, k]`` (sorted) of a transformers Qwen3-MoE forward.

    Read from the routers' own outputs with forward hooks (not through this package's adapter),
    so it is an independent check of our routes.
    """
    captured = {}
    handles = [
        layer.mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out[2]))
        for i, layer in enumerate(hf_model.model.layers)
    ]
    try:
        with torch.no_grad():
            logits = hf_model(input_ids).logits
    finally:
        for h in handles:
            h.remove()
    b, t = input_ids.shape
    routes = torch.stack([captured[i].view(b, t, -1).sort(-1).values for i in range(len(captured))], dim=2)
    return logits, routes

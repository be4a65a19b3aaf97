"""Validate a framework's routes and log-probs against another forward: ``python -m reference_impl compare``.

Input: a :class:`~reference_impl.batch.RolloutBatch` file (tokens, the engine's log-probs
``rollout_logp`` and its routes ``rollout_trace``), e.g. captured from vLLM or SGLang and
converted with :mod:`reference_impl.converters`. A second engine (the reference model, or
transformers, on the same checkpoint) recomputes the log-probs — natively, and with the engine's
routes replayed (R3) — and the report gives:

* routing disagreement at the R3 paper's three levels (arXiv 2510.11370), and per layer;
* KL(μ_old‖π_old) (k1, k3) and the extreme-token fraction F(2), native and under replay;
* the tokens with the largest |log π_old − log μ_old| and the layers that disagree most.

With matching numerics (both fp32) every number should be ~0 natively: that is the check that a
framework's capture is aligned (row ``t`` routes input position ``t``) and its replay reaches the
routers. Under a real precision gap, replay should lower the KL and zero the disagreement.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import metrics as M
from .replay import record_routing, replay_routing
from .batch import RolloutBatch
from .logprobs import next_token_logprobs
from .routing import RoutingTrace

__all__ = ["ComparisonReport", "compare_batch", "forward_fn_for"]

#: ``forward(tokens, seq_lengths, trace_or_None) -> (logits [n, S, V], routes RoutingTrace)``
ForwardFn = Callable[[torch.Tensor, list[int], RoutingTrace | None], tuple[torch.Tensor, RoutingTrace]]


@dataclass
class ComparisonReport:
    num_sequences: int
    num_response_tokens: int
    routing: dict  # three levels, engine vs native recompute
    per_layer_router_disagreement: list[float]
    native: dict  # kl_k1, kl_k3, extreme_token_fraction, max_abs_log_ratio
    replayed: dict | None
    worst_tokens: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        r = self.routing
        lines = [
            f"sequences: {self.num_sequences}, response tokens: {self.num_response_tokens}",
            f"routing disagreement: router {r['router_disagreement']:.4%}, token {r['token_disagreement']:.4%}, "
            f"mean differing layers/token {r['mean_differing_layers']:.4f}",
            "per layer: " + ", ".join(f"L{i} {v:.3%}" for i, v in enumerate(self.per_layer_router_disagreement)),
            _fmt("native  ", self.native),
        ]
        if self.replayed is not None:
            lines.append(_fmt("replayed", self.replayed))
        lines.append("worst tokens (sequence, position, token, log mu, log pi_old):")
        for w in self.worst_tokens:
            lines.append(f"  seq {w['sequence']:>4} pos {w['position']:>5} token {w['token']:>6}  {w['rollout_logp']:.5f}  {w['old_logp']:.5f}")
        return "\n".join(lines)


def _fmt(label: str, d: dict) -> str:
    return (
        f"{label}: KL k1 {d['kl_k1']:.3e}, k3 {d['kl_k3']:.3e}, F(2) {d['extreme_token_fraction']:.4%}, "
        f"max |log ratio| {d['max_abs_log_ratio']:.3e}"
    )


def _logprob_stats(batch: RolloutBatch, old_logp: torch.Tensor) -> dict:
    mask = batch.mask
    log_ratio = (old_logp - batch.rollout_logp) * mask
    return {
        "kl_k1": M.kl_k1(batch.rollout_logp, old_logp, mask),
        "kl_k3": M.kl_k3(batch.rollout_logp, old_logp, mask),
        "extreme_token_fraction": M.extreme_token_fraction(batch.rollout_logp, old_logp, mask, tau=2.0),
        "max_abs_log_ratio": float(log_ratio.abs().max()),
    }


def compare_batch(batch: RolloutBatch, forward: ForwardFn, *, replay: bool = True, top: int = 10, temperature: float = 1.0) -> ComparisonReport:
    """Recompute ``batch`` with ``forward`` (natively, and replaying its routes) and compare."""
    batch.validate()
    lengths = batch.seq_lengths.tolist()
    logits, native_trace = forward(batch.tokens, lengths, None)
    old_logp = next_token_logprobs(logits, batch.tokens, temperature)
    agreement = batch.rollout_trace.agreement(native_trace)
    replayed = None
    if replay:
        r_logits, _ = forward(batch.tokens, lengths, batch.rollout_trace)
        replayed = _logprob_stats(batch, next_token_logprobs(r_logits, batch.tokens, temperature))
    gap = ((old_logp - batch.rollout_logp).abs() * batch.mask).flatten()
    worst = []
    for flat in gap.topk(min(top, int(batch.mask.sum()))).indices.tolist():
        i, t = divmod(flat, old_logp.shape[1])
        worst.append(
            {
                "sequence": i,
                "position": t + 1,
                "token": int(batch.tokens[i, t + 1]),
                "rollout_logp": float(batch.rollout_logp[i, t]),
                "old_logp": float(old_logp[i, t]),
            }
        )
    return ComparisonReport(
        num_sequences=batch.num_sequences,
        num_response_tokens=int(batch.mask.sum()),
        routing=agreement.as_dict(),
        per_layer_router_disagreement=list(agreement.per_layer),
        native=_logprob_stats(batch, old_logp),
        replayed=replayed,
        worst_tokens=worst,
    )


def forward_fn_for(routable, call: Callable[[torch.Tensor], torch.Tensor]) -> ForwardFn:
    """A :data:`ForwardFn` for anything :func:`record_routing` / :func:`replay_routing` drive.

    ``routable`` is a :class:`~reference_impl.MoEForCausalLM` or the adapter of
    :func:`reference_impl.integrations.transformers.attach_routing`; ``call(tokens)`` returns logits.
    """

    @torch.no_grad()
    def forward(tokens, seq_lengths, trace):
        with record_routing(routable) as rec:
            if trace is None:
                logits = call(tokens)
            else:
                with replay_routing(routable, trace, seq_lengths=seq_lengths):
                    logits = call(tokens)
        return logits.float(), rec.trace(seq_lengths)

    return forward


def load_forward(checkpoint: str | Path, engine: str) -> ForwardFn:
    """The recompute side of ``compare``: ``reference`` (this package's model), ``transformers`` or ``megatron``."""
    if engine == "reference":
        from .checkpoint import load_hf_checkpoint

        model = load_hf_checkpoint(checkpoint).eval()
        return forward_fn_for(model, lambda tokens: model(tokens).logits)
    if engine == "transformers":
        from transformers import AutoModelForCausalLM

        from .integrations.transformers import attach_routing

        hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        return forward_fn_for(attach_routing(hf), lambda tokens: hf(tokens).logits)
    if engine == "megatron":
        return _megatron_forward(checkpoint)
    raise ValueError(f"compare: unknown engine {engine!r}; choose 'reference', 'transformers' or 'megatron'")


def _megatron_forward(checkpoint: str | Path) -> ForwardFn:
    """megatron-core ``GPTModel`` on the checkpoint (CPU, world size 1): RECORD natively, REPLAY_FORWARD a trace."""
    from .integrations.megatron import megatron_logprobs
    from .integrations.megatron_cpu import init_megatron_cpu, load_megatron_model

    init_megatron_cpu()
    model = load_megatron_model(checkpoint)
    model.eval()

    @torch.no_grad()
    def forward(tokens, seq_lengths, trace):
        if trace is None:
            out = megatron_logprobs(model, tokens, seq_lengths, mode="record")
            return out.logits.float(), out.trace
        out = megatron_logprobs(model, tokens, seq_lengths, trace)
        return out.logits.float(), RoutingTrace.from_padded(out.routes, seq_lengths, trace.num_experts)

    return forward

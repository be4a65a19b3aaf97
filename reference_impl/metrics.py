"""What to watch during MoE RL: training–inference mismatch, routing drift, entropy, clipping.

* :func:`kl_k1`, :func:`kl_k3`: estimates of KL(μ_θold ‖ π_θold) from the sampled tokens;
* :func:`extreme_token_fraction`: F(τ) of the R3 paper (arXiv 2510.11370);
* :func:`routing_disagreement`: the R3 paper's three routing-agreement levels between two traces;
* :func:`routing_flip_rate`: share of selected experts that changed between two route tensors;
* :func:`token_logprobs_and_entropy`: log-probs of the sampled tokens and the full-vocabulary
  entropy from logits, chunked so that no second ``[N, V]`` float32 tensor is ever built;
* :func:`mean_entropy`, :func:`clip_fraction`: one-number summaries.

Token metrics take ``[n, T]`` tensors and a response ``mask`` (validated by
:func:`reference_impl.validation.validate_batch`) and return Python floats.
"""

from __future__ import annotations

import math

import torch

from .logprobs import token_logprobs_and_entropy  # re-exported: its home is reference_impl.logprobs
from .objectives import clip_mask
from .routing import RoutingTrace
from .validation import masked_sum, validate_batch

__all__ = [
    "kl_k1",
    "kl_k3",
    "extreme_token_fraction",
    "mismatch_metrics",
    "routing_disagreement",
    "routing_flip_rate",
    "token_logprobs_and_entropy",
    "mean_entropy",
    "clip_fraction",
]


# ------------------------------------------------------------------ training–inference mismatch
def _log_ratio(fn: str, rollout_logp, old_logp, mask):
    """log ρ = log π_θold − log μ_θold at response tokens, and the batch."""
    b = validate_batch(fn, mask, rollout_logp=rollout_logp, old_logp=old_logp)
    return (b["old_logp"] - b["rollout_logp"]).detach(), b


# --8<-- [start:kl-k1]
def kl_k1(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """k1 estimate of KL(μ_θold ‖ π_θold): mean over response tokens of log μ − log π_old.

    Unbiased for tokens sampled from μ (the inference engine), but single tokens can be negative.

    Args:
        rollout_logp: ``[n, T]`` log μ_θold(y_t). old_logp: ``[n, T]`` log π_θold(y_t).
        mask: ``[n, T]`` response mask.
    """
    log_rho, b = _log_ratio("kl_k1", rollout_logp, old_logp, mask)
    return float(masked_sum(-log_rho, b.mask) / b.num_tokens)
# --8<-- [end:kl-k1]


# --8<-- [start:kl-k3]
def kl_k3(rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """k3 estimate: mean over response tokens of ρ − 1 − log ρ, with ρ = π_θold(y_t)/μ_θold(y_t).

    Every term is ≥ 0. The R3 paper (arXiv 2510.11370) labels this quantity D_KL(π_train; π_infer);
    but the tokens are sampled from μ and the ratio is π/μ, so E_μ[ρ − 1 − log ρ] = KL(μ ‖ π_old):
    it estimates **KL(μ_θold ‖ π_θold)**, the same divergence as :func:`kl_k1`. Its variance is lower
    than k1's near ρ ≈ 1 (Schulman, "Approximating KL Divergence", 2020); with extreme tokens it
    can be higher.

    Args: as :func:`kl_k1`.
    """
    log_rho, b = _log_ratio("kl_k3", rollout_logp, old_logp, mask)
    terms = torch.expm1(log_rho) - log_rho  # ρ − 1 − log ρ, accurate for ρ ≈ 1
    return float(masked_sum(terms, b.mask) / b.num_tokens)
# --8<-- [end:kl-k3]


# --8<-- [start:extreme-token-fraction]
def extreme_token_fraction(
    rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, tau: float = 2.0
) -> float:
    """F(τ) of the R3 paper (arXiv 2510.11370): share of response tokens with
    max(π_θold/μ_θold, μ_θold/π_θold) > τ, i.e. |log π_old − log μ| > log τ. τ = 2 is the paper's
    headline value.

    Args: as :func:`kl_k1`, plus ``tau`` > 1.
    """
    if not tau > 1:
        raise ValueError(f"extreme_token_fraction: tau must be > 1, got {tau!r}")
    log_rho, b = _log_ratio("extreme_token_fraction", rollout_logp, old_logp, mask)
    extreme = (log_rho.abs() > math.log(tau)) & b.mask
    return float(extreme.sum()) / b.num_tokens
# --8<-- [end:extreme-token-fraction]


def mismatch_metrics(
    rollout_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, tau: float = 2.0
) -> dict[str, float]:
    """``{"kl_k1", "kl_k3", "extreme_token_fraction"}`` in one call (see the three functions)."""
    return {
        "kl_k1": kl_k1(rollout_logp, old_logp, mask),
        "kl_k3": kl_k3(rollout_logp, old_logp, mask),
        "extreme_token_fraction": extreme_token_fraction(rollout_logp, old_logp, mask, tau),
    }


# ---------------------------------------------------------------------------------- routing
def routing_disagreement(trace_a: RoutingTrace, trace_b: RoutingTrace) -> dict[str, float]:
    """The R3 paper's routing disagreement between two traces (top-k order ignored), as a dict.

    Keys: ``router_disagreement`` (share of (token, layer) pairs whose top-k sets differ),
    ``token_disagreement`` (share of tokens with at least one differing layer),
    ``mean_differing_layers``, ``num_tokens`` (rows valid in both, n) and ``num_rows`` (N); NaN
    disagreements when n = 0. A thin wrapper of
    :meth:`RoutingTrace.agreement`.
    """
    return trace_a.agreement(trace_b).as_dict()


# --8<-- [start:routing-flip-rate]
def routing_flip_rate(
    old_routes: torch.Tensor | RoutingTrace,
    new_routes: torch.Tensor | RoutingTrace,
    valid: torch.Tensor | None = None,
    *,
    per_layer: bool = False,
) -> float | torch.Tensor:
    """Share of selected experts that changed between two routings (set semantics).

    For each (token, layer), |old \\ new| / k: the fraction of the old top-k experts absent from the
    new top-k set (order ignored); averaged over valid tokens and layers. This is the quantity GSPO
    (arXiv 2507.18071) reports at ~10% of activated experts after one update; it is finer than the
    R3 paper's router level (:func:`routing_disagreement`), which counts a (token, layer) as one
    disagreement however many of its k experts changed.

    Args:
        old_routes, new_routes: integer ids ``[..., L, k]`` of the same shape, or two
            :class:`RoutingTrace` (then rows invalid in either are skipped).
        valid: optional bool ``[...]`` (the leading dims) selecting the tokens to count.
        per_layer: return a ``[L]`` tensor (one rate per layer) instead of a float.

    Raises:
        ValueError: shapes that differ, or no valid token.
    """
    fn = "routing_flip_rate"
    trace_valid = None
    if isinstance(old_routes, RoutingTrace) or isinstance(new_routes, RoutingTrace):
        if not (isinstance(old_routes, RoutingTrace) and isinstance(new_routes, RoutingTrace)):
            raise TypeError(f"{fn}: pass two RoutingTrace or two tensors, not one of each")
        trace_valid = old_routes.valid & new_routes.valid
        old_routes, new_routes = old_routes.expert_ids, new_routes.expert_ids
    if old_routes.shape != new_routes.shape:
        raise ValueError(
            f"{fn}: old_routes has shape {tuple(old_routes.shape)} but new_routes has shape "
            f"{tuple(new_routes.shape)}; both must be [..., num_layers, top_k]"
        )
    if old_routes.dim() < 2:
        raise ValueError(f"{fn}: routes must be [..., num_layers, top_k], got {tuple(old_routes.shape)}")
    lead = old_routes.shape[:-2]
    if valid is None:
        valid = torch.ones(lead, dtype=torch.bool)
    elif valid.shape != lead:
        raise ValueError(f"{fn}: valid has shape {tuple(valid.shape)}, expected {tuple(lead)} (the leading dims)")
    valid = valid.to(torch.bool)
    if trace_valid is not None:
        valid = valid & trace_valid
    old = old_routes[valid].to(torch.int64)  # [tokens, L, k]
    new = new_routes[valid].to(torch.int64)
    if old.shape[0] == 0:
        raise ValueError(f"{fn}: no valid token to compare")
    present = (old[..., :, None] == new[..., None, :]).any(dim=-1)  # [tokens, L, k]
    flipped = 1.0 - present.to(torch.float64).mean(dim=-1)  # [tokens, L]
    if per_layer:
        return flipped.mean(dim=0)
    return float(flipped.mean())
# --8<-- [end:routing-flip-rate]


# --------------------------------------------------------------------------------- summaries
def mean_entropy(entropy: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over response tokens of per-token entropies ``[n, T]`` (e.g. from
    :func:`token_logprobs_and_entropy`): H[π] ≈ mean_t −Σ_w π(w) log π(w)."""
    if entropy.shape != mask.shape:
        raise ValueError(
            f"mean_entropy: entropy has shape {tuple(entropy.shape)} but mask has shape {tuple(mask.shape)}"
        )
    keep = mask.to(torch.bool)
    count = int(keep.sum())
    if count == 0:
        raise ValueError("mean_entropy: the mask selects no token")
    return float(masked_sum(entropy.detach().to(torch.float64), keep) / count)


# --8<-- [start:clip-fraction]
def clip_fraction(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.27,
) -> float:
    """Share of response tokens whose gradient the clip removes: Â > 0 and r > 1 + ε_high, or
    Â < 0 and r < 1 − ε_low (r = π_θ/π_θold). The same rule as MiniRL's M_t and as PPO's clipped
    min; every objective also reports it as ``stats["clip_fraction"]``.
    """
    b = validate_batch("clip_fraction", mask, advantages, token_advantages=True, logp=logp, old_logp=old_logp)
    ratio = torch.exp(b["logp"] - b["old_logp"]).detach()
    removed = ~clip_mask(ratio, b.advantages, eps_low, eps_high) & b.mask
    return float(removed.sum()) / b.num_tokens
# --8<-- [end:clip-fraction]

"""What to watch during MoE RL: training–inference mismatch, routing drift, entropy, clipping.

* :func:`kl_k1`, :func:`kl_k3`: estimates of KL(μ_θold ‖ π_θold) from the sampled tokens;
* :func:`extreme_token_fraction`: F(τ) of the R3 paper (arXiv 2510.11370);
* :func:`routing_disagreement`: the R3 paper's three routing-agreement levels between two traces;
* :func:`routing_flip_rate`: share of selected experts that changed between two route tensors;
* :func:`token_logprobs_and_entropy`: log-probs of the sampled tokens and the full-vocabulary
  entropy from logits, chunked so that no second ``[N, V]`` float32 tensor is ever built;
* :func:`mean_entropy`, :func:`clip_fraction`: one-number summaries.

Token metrics take ``[n, T]`` tensors and a response ``mask`` (validated by
:func:`reference_impl.objectives.validate_batch`) and return Python floats.
"""

from __future__ import annotations

import math

import torch

from .objectives import _clip_mask, masked_sum, validate_batch
from .routing import RoutingTrace

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
    ``mean_differing_layers``, ``num_tokens`` (rows valid in both). A thin wrapper of
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


# ------------------------------------------------------------------------ log-probs, entropy
def _default_chunk_rows(vocab: int) -> int:
    return max(1, (1 << 22) // max(vocab, 1))  # ≈ 16 MiB of float32 per temporary


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log softmax(logits)[target] and entropy, row chunk by row chunk, with a chunked backward.

    Two ``[chunk_rows, V]`` buffers are allocated once and reused with in-place ops, so the peak
    extra memory is ~2 chunks and no chunk pays fresh page faults.
    """

    @staticmethod
    def forward(ctx, logits, targets, chunk_rows, want_entropy):
        n, v = logits.shape
        compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lse = torch.empty(n, dtype=compute, device=logits.device)
        entropy = torch.empty(n if want_entropy else 0, dtype=compute, device=logits.device)
        rows_max = min(chunk_rows, n)
        shifted = torch.empty(rows_max, v, dtype=compute, device=logits.device)  # logit − row max
        probs = torch.empty(rows_max, v, dtype=compute, device=logits.device)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            c, q = shifted[: stop - start], probs[: stop - start]
            c.copy_(logits[start:stop])  # upcast, in place
            m = c.amax(dim=-1, keepdim=True)
            m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=compute))
            c.sub_(m)
            torch.exp(c, out=q)
            total = q.sum(dim=-1, keepdim=True)
            log_total = total.log()
            lse[start:stop] = (m + log_total).squeeze(-1)
            if want_entropy:
                c.sub_(log_total)  # log q
                q.div_(total)  # q
                c.clamp_(min=torch.finfo(compute).min)  # q = 0 at -inf logits: 0 * finite = 0, not NaN
                entropy[start:stop] = -torch.linalg.vecdot(q, c)
        del shifted, probs
        target_logit = logits.gather(1, targets[:, None]).squeeze(1).to(compute)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(entropy)
        return target_logit - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        n, v = logits.shape
        chunk_rows = ctx.chunk_rows
        buf = torch.empty(min(chunk_rows, n), v, dtype=lse.dtype, device=logits.device)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            g = grad_logp[start:stop].to(lse.dtype)
            c = buf[: stop - start]
            c.copy_(logits[start:stop])
            c.sub_(lse[start:stop, None]).exp_().mul_(-g[:, None])  # −g · softmax
            rows = torch.arange(stop - start, device=logits.device)
            c[rows, targets[start:stop]] += g  # + g · onehot(target)
            grad[start:stop].copy_(c)  # cast to the logits' dtype
        return grad, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int | None = None,
    return_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(target) and the full-vocabulary entropy from logits, without a second ``[N, V]`` fp32 tensor.

    ``log_softmax(logits.float()).gather(...)`` builds two ``[N, V]`` float32 tensors (the upcast
    and the log-softmax) and keeps one for backward. Here rows are processed in chunks: each chunk is
    upcast to float32, its logsumexp taken, the target logit gathered (log π = logit[y] − lse), and
    the entropy H = −Σ_w q_w log q_w computed (the same as lse − Σ_w q_w logit_w, and safe for −inf
    logits). Backward recomputes softmax chunk by chunk and writes the gradient
    g · (onehot(y) − softmax) straight into one tensor of the logits' dtype (the gradient itself,
    which any method must return). Peak extra memory: two ``[chunk_size, V]`` float32 buffers.

    The log-prob carries gradient (to ``logits``); the **entropy is detached** (a diagnostic).

    Args:
        logits: ``[..., V]`` any floating dtype (bf16/fp16/fp32 computed in fp32, fp64 in fp64).
        targets: ``[...]`` integer token ids in ``[0, V)``.
        chunk_size: rows per chunk; default ``max(1, 2**22 // V)`` (16 MiB of fp32 per buffer).
        return_entropy: skip the entropy (and return None) when False.

    Returns:
        ``(logp, entropy)``, both float32 (float64 for fp64 logits) of shape ``[...]`` (entropy None
        if not requested).
    """
    fn = "token_logprobs_and_entropy"
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"{fn}: logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must be [..., V], got a scalar")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: targets must be integer token ids, got {targets.dtype}")
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"{fn}: targets has shape {tuple(targets.shape)} but logits has shape {tuple(logits.shape)}; "
            "expected targets [...] for logits [..., V]"
        )
    vocab = logits.shape[-1]
    lead = logits.shape[:-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_targets = targets.reshape(-1).to(torch.int64)
    if flat_targets.numel():
        bad = (flat_targets < 0) | (flat_targets >= vocab)
        if bad.any():
            first = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"{fn}: target id {int(flat_targets[first])} out of range for vocabulary size {vocab} "
                f"at flat position {first}"
            )
    if chunk_size is None:
        chunk_size = _default_chunk_rows(vocab)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    logp, entropy = _ChunkedTokenLogprob.apply(flat_logits, flat_targets, chunk_size, return_entropy)
    return logp.reshape(lead), (entropy.reshape(lead) if return_entropy else None)


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
    removed = ~_clip_mask(ratio, b.advantages, eps_low, eps_high) & b.mask
    return float(removed.sum()) / b.num_tokens
# --8<-- [end:clip-fraction]

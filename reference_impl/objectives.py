"""Policy-gradient objectives for LLM RL: MiniRL (Eq. 7 of arXiv 2512.01374) and its relatives.

Three policies appear (notation of ``STYLE.md``), each as the log-probability of the *sampled*
token ``y_t`` at every position, shape ``[n, T]`` (``n`` responses, ``T`` padded length):

* ``rollout_logp`` = log μ_θold(y_t): the inference engine that sampled the responses;
* ``old_logp``     = log π_θold(y_t): the trainer's recompute before the updates (proximal policy);
* ``logp``         = log π_θ(y_t): the policy being optimized (the only tensor with gradient).

``mask`` ``[n, T]`` (float 0/1 or bool) marks response tokens; ``advantages`` is ``[n]`` (one Â per
response, broadcast over its tokens) or, where the paper allows it, ``[n, T]``.

Every objective is one function ``loss, stats = f(logp, old_logp, rollout_logp, advantages, mask,
**options)``: ``loss`` is a scalar to **minimize** (minus the objective J), ``stats`` a dict of Python
floats. Objectives that do not use μ accept ``rollout_logp=None`` (given, it only feeds the
``train_infer_ratio_mean`` diagnostic). :data:`OBJECTIVES` selects them by name.

Stats every objective reports:

* ``clip_fraction``: share of response tokens whose gradient the trust-region clip (or MiniRL's
  clip mask M_t) removed;
* ``masked_fraction`` (IcePop, MIS, and 0 elsewhere): share of response tokens whose gradient an
  importance-weight *mask* removed;
* ``is_weight_p50``, ``is_weight_p99``, ``is_weight_max``: quantiles over response tokens of the
  importance weight the objective multiplies its gradient by, **before** any truncation (each
  docstring says which weight); sequence-level objectives give one value per response;
* ``train_infer_ratio_mean``: mean of π_θold/μ_θold over response tokens (when ``rollout_logp``
  is given);
* ``num_tokens``, ``num_responses``.

Conventions shared by all functions (checked by :func:`validate_batch`):

* log-probs must be finite and ≤ 0 (up to 1e-5) at response tokens; padding may hold anything
  (NaN included) and never reaches the loss or the gradient;
* a response whose mask row is all zero (an *empty response*) contributes nothing to the loss and
  receives zero gradient; it still counts in ``n`` where an objective divides by the number of
  responses;
* a batch with no response token at all is an error (there is nothing to optimize);
* arithmetic runs in float32 (float64 if a log-prob input is float64), whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .advantages import group_advantages  # noqa: F401  (re-exported: old import path)
from .validation import POSITIVE_LOGP_TOLERANCE, Batch, masked_sum, validate_batch  # noqa: F401  (re-exported)

__all__ = [
    "clip_mask",
    "sequence_level_objective",
    "token_level_objective",
    "minirl_loss",
    "grpo_loss",
    "dr_grpo_loss",
    "dapo_loss",
    "cispo_loss",
    "gspo_loss",
    "gspo_token_loss",
    "router_shift",
    "rspo_loss",
    "icepop_loss",
    "seq_tis_loss",
    "seq_mis_loss",
    "OBJECTIVES",
    "compute_loss",
]

# GMPO-style token clip range (e^-0.4, e^0.4) written as 1 - eps_low, 1 + eps_high (used by RSPO).
_RSPO_EPS_LOW = 1.0 - math.exp(-0.4)
_RSPO_EPS_HIGH = math.exp(0.4) - 1.0



# --8<-- [start:aggregate]
def _aggregate(per_token: torch.Tensor, b: Batch, *, per_response_mean: bool, denominator) -> torch.Tensor:
    """Σ_i c_i Σ_t x_{i,t} / denominator, with c_i = 1/|y_i| if ``per_response_mean`` else 1.

    Empty responses contribute 0 (their token sum is 0; the 1/|y_i| uses max(|y_i|, 1)).
    """
    row = masked_sum(per_token, b.mask, dim=1)
    if per_response_mean:
        row = row / b.lengths.clamp(min=1)
    return row.sum() / denominator
# --8<-- [end:aggregate]


def _sequence_mean(x: torch.Tensor, b: Batch) -> torch.Tensor:
    """(1/|y_i|) Σ_t x_{i,t} per response ``[n]`` (0 for an empty response)."""
    return masked_sum(x, b.mask, dim=1) / b.lengths.clamp(min=1)


# --8<-- [start:clip-mask]
def clip_mask(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """M_t of Eq. 7 (arXiv 2512.01374), True where the token keeps its gradient.

    M_t = 0 if Â > 0 and r_t > 1 + ε_high; 0 if Â < 0 and r_t < 1 − ε_low; else 1. This is also
    exactly where PPO's min(r Â, clip(r, 1−ε_low, 1+ε_high) Â) has zero gradient.
    """
    removed = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    return ~removed
# --8<-- [end:clip-mask]


# --8<-- [start:ppo-term]
def _ppo_term(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    """min(r Â, clip(r, 1 − ε_low, 1 + ε_high) Â), elementwise (PPO, arXiv 1707.06347)."""
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
# --8<-- [end:ppo-term]


# --8<-- [start:stats]
def _fraction(flags: torch.Tensor, where: torch.Tensor) -> float:
    denom = int(where.sum())
    return float((flags & where).sum()) / denom if denom else 0.0


def _quantiles(values: torch.Tensor, prefix: str = "is_weight") -> dict[str, float]:
    v = values.detach().to(torch.float64).flatten()
    if v.numel() == 0:
        return {f"{prefix}_p50": float("nan"), f"{prefix}_p99": float("nan"), f"{prefix}_max": float("nan")}
    q = torch.quantile(v, torch.tensor([0.5, 0.99], dtype=torch.float64))
    return {f"{prefix}_p50": float(q[0]), f"{prefix}_p99": float(q[1]), f"{prefix}_max": float(v.max())}


def _base_stats(b: Batch, *, clip_removed: torch.Tensor, masked: torch.Tensor | None, weight_values) -> dict:
    """The stats every objective reports (see the module docstring)."""
    stats = {
        "clip_fraction": _fraction(clip_removed, b.mask),
        "masked_fraction": _fraction(masked, b.mask) if masked is not None else 0.0,
        **_quantiles(weight_values),
        "num_tokens": float(b.num_tokens),
        "num_responses": float(b.num_responses),
    }
    if "rollout_logp" in b.logps and "old_logp" in b.logps:
        tir = torch.exp(b["old_logp"] - b["rollout_logp"]).detach()
        stats["train_infer_ratio_mean"] = float(masked_sum(tir, b.mask) / b.num_tokens)
    return stats
# --8<-- [end:stats]


def _check_eps(fn: str, **eps: float | None) -> None:
    for name, value in eps.items():
        if value is not None and (not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value)):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The two estimators of the first-order approximation
# ---------------------------------------------------------------------------------------------


# --8<-- [start:sequence-level-objective]
def sequence_level_objective(
    logp: torch.Tensor, rollout_logp: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Sequence-level objective, Eq. 1 of arXiv 2512.01374: J_seq = E_{y∼μ}[(π(y|x)/μ(y|x)) R(x, y)].

    Estimated as (1/n) Σ_i exp(Σ_t (logp − rollout_logp)) · R_i; returns J (to maximize, not a loss).

    Args:
        logp: ``[n, T]`` log π_θ(y_t) (with gradient). rollout_logp: ``[n, T]`` log μ(y_t).
        rewards: ``[n]``. mask: ``[n, T]``.
    """
    b = validate_batch("sequence_level_objective", mask, rewards, logp=logp, rollout_logp=rollout_logp)
    seq_log_ratio = masked_sum(b["logp"] - b["rollout_logp"], b.mask, dim=1)
    return (torch.exp(seq_log_ratio) * b.response_advantages).sum() / b.num_responses
# --8<-- [end:sequence-level-objective]


# --8<-- [start:token-level-objective]
def token_level_objective(
    logp: torch.Tensor, rollout_logp: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Token-level surrogate, Eq. 3 of arXiv 2512.01374: J_tok = E_{y∼μ}[Σ_t (π(y_t)/μ(y_t)) R(x, y)].

    Estimated as (1/n) Σ_i Σ_t exp(logp − rollout_logp) · R_i; returns J (to maximize, not a loss).
    Its gradient equals that of :func:`sequence_level_objective` when π = μ (Eq. 4, the first-order
    approximation Π_t (1 + δ_t) ≈ 1 + Σ_t δ_t) and drifts from it as π and μ part.

    Args: as :func:`sequence_level_objective`.
    """
    b = validate_batch("token_level_objective", mask, rewards, logp=logp, rollout_logp=rollout_logp)
    per_token = torch.exp(b["logp"] - b["rollout_logp"]) * b.advantages
    return _aggregate(per_token, b, per_response_mean=False, denominator=b.num_responses)
# --8<-- [end:token-level-objective]


# ---------------------------------------------------------------------------------------------
# MiniRL
# ---------------------------------------------------------------------------------------------
# --8<-- [start:minirl]
def minirl_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.27,
    tis_cap: float | None = 5.0,
    tis_mode: str = "token_weight",
    length_norm: bool = False,
    train_infer_is: bool = True,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniRL, Eq. 7 of arXiv 2512.01374.

        J(θ) = (1/normalizer) Σ_i Σ_t M_t · sg[w_t] · Â_i · log π_θ(y_t),      loss = −J

    * w_t = π_θ(y_t)/μ_θold(y_t) = exp(logp − rollout_logp), the token-level IS weight, which Eq. 5
      factors into π_θold/μ_θold (training–inference discrepancy) × π_θ/π_θold (policy staleness).
    * TIS (truncation, cap C = ``tis_cap``), ``tis_mode``:

      - ``"token_weight"`` (default; the paper's wording, TIS "applied to the token-level IS
        weights"): sg[min(π_θ/μ_θold, C)];
      - ``"discrepancy"`` (the TIS blog's PPO form): truncate only the discrepancy factor,
        sg[min(π_θold/μ_θold, C) · π_θ/π_θold];
      - ``tis_cap=None``: no truncation, sg[π_θ/μ_θold].

    * M_t: decoupled clipping with π_θold as the proximal policy, r_t = π_θ/π_θold:
      M_t = 0 if Â > 0 and r_t > 1 + ε_high; 0 if Â < 0 and r_t < 1 − ε_low; else 1.
    * No length normalization: the token sum over all responses is divided by ``normalizer``,
      default **n, the number of responses in the batch**. The paper does not say which constant
      it uses; any constant only rescales the learning rate.

    Ablations (the paper's on-policy ablations):

    * ``length_norm=True`` ("w/ length-norm"): each response's token sum is first multiplied by
      1/|y_i|, then the total is divided by ``normalizer``.
    * ``train_infer_is=False`` ("w/o train-infer IS"): the training–inference factor is dropped;
      the weight is the staleness factor alone, sg[π_θ/π_θold] (= 1 on-policy, giving
      Σ_t Â log π_θ), and no truncation is applied (``tis_cap``/``tis_mode`` are ignored).

    On-policy (θ = θ_old, logp == old_logp) M_t = 1 and w_t = π_θold/μ_θold, so the loss reduces to
    −(1/normalizer) Σ_t [π_θold/μ_θold] Â log π_θ.

    Args:
        logp, old_logp, rollout_logp: ``[n, T]`` log-probs of the sampled tokens.
        advantages: ``[n]`` Â (see :func:`group_advantages`).
        mask: ``[n, T]`` response mask.
        eps_low, eps_high: ε_low, ε_high of M_t (paper: 0.2, 0.27).
        tis_cap: C (paper: 5); None disables truncation.
        tis_mode: ``"token_weight"`` or ``"discrepancy"`` (see above).
        length_norm: the "w/ length-norm" ablation.
        train_infer_is: False gives the "w/o train-infer IS" ablation.
        normalizer: constant dividing the token sum; default n.

    Returns:
        ``(loss, stats)``; stats add ``tis_fraction`` (share of response tokens whose weight was
        truncated) to the common ones; ``is_weight_*`` are quantiles of the untruncated weight
        (π_θ/μ_θold, or π_θ/π_θold without train-infer IS).
    """
    fn = "minirl_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    if tis_mode not in ("token_weight", "discrepancy"):
        raise ValueError(f"{fn}: tis_mode must be 'token_weight' or 'discrepancy', got {tis_mode!r}")
    if tis_cap is not None and not tis_cap > 0:
        raise ValueError(f"{fn}: tis_cap must be > 0 or None, got {tis_cap!r}")
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    if normalizer is None:
        normalizer = b.num_responses
    if not normalizer > 0:
        raise ValueError(f"{fn}: normalizer must be > 0, got {normalizer!r}")
    lp, adv = b["logp"], b.advantages
    with torch.no_grad():
        ratio = torch.exp(lp - b["old_logp"])  # r_t, policy staleness
        train_infer_ratio = torch.exp(b["old_logp"] - b["rollout_logp"])
        if not train_infer_is:
            raw = ratio
            weight = ratio
            truncated = torch.zeros_like(b.mask)
        elif tis_mode == "token_weight":
            raw = torch.exp(lp - b["rollout_logp"])  # π_θ/μ_θold
            weight = raw if tis_cap is None else raw.clamp(max=tis_cap)
            truncated = raw > tis_cap if tis_cap is not None else torch.zeros_like(b.mask)
        else:  # discrepancy
            raw = train_infer_ratio * ratio
            capped = train_infer_ratio if tis_cap is None else train_infer_ratio.clamp(max=tis_cap)
            weight = capped * ratio
            truncated = train_infer_ratio > tis_cap if tis_cap is not None else torch.zeros_like(b.mask)
        keep = clip_mask(ratio, adv, eps_low, eps_high)
    per_token = keep * weight * adv * lp
    objective = _aggregate(per_token, b, per_response_mean=length_norm, denominator=normalizer)
    stats = _base_stats(b, clip_removed=~keep, masked=None, weight_values=raw[b.mask])
    stats["tis_fraction"] = _fraction(truncated, b.mask)
    return -objective, stats
# --8<-- [end:minirl]


# ---------------------------------------------------------------------------------------------
# PPO-clipped relatives (GRPO, Dr. GRPO, DAPO) and the mismatch corrections (IcePop, TIS, MIS)
# ---------------------------------------------------------------------------------------------
# --8<-- [start:clipped-surrogate]
def _clipped_surrogate(
    b: Batch,
    *,
    eps_low: float,
    eps_high: float,
    per_response_mean: bool,
    denominator,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ sg[is_weight] · min(r Â, clip(r) Â) aggregated; returns (objective, kept-by-clip, ratio)."""
    ratio = torch.exp(b["logp"] - b["old_logp"])
    per_token = _ppo_term(ratio, b.advantages, eps_low, eps_high)
    if is_weight is not None:
        per_token = is_weight.detach() * per_token
    keep = clip_mask(ratio.detach(), b.advantages, eps_low, eps_high)
    objective = _aggregate(per_token, b, per_response_mean=per_response_mean, denominator=denominator)
    return objective, keep, ratio.detach()
# --8<-- [end:clipped-surrogate]


# --8<-- [start:grpo]
def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.2,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO, arXiv 2402.03300 (DeepSeekMath):

        J = (1/n) Σ_i (1/|y_i|) Σ_t [ min(r_t Â_i, clip(r_t, 1−ε, 1+ε) Â_i) − β · KL_t ],   loss = −J

    r_t = π_θ/π_θold; KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1 (the k3 form) when ``kl_coef`` β > 0.
    The std-normalized advantage is the caller's job: ``group_advantages(..., normalize_std=True)``.
    No training–inference IS (``rollout_logp`` may be None; if given it only feeds stats).

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None; advantages: ``[n]``;
        mask: ``[n, T]``; eps: ε; kl_coef: β; ref_logp: ``[n, T]`` log π_ref, required if β > 0.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of r_t; ``kl_ref`` (mean k3 over response
        tokens) when ``ref_logp`` is given.
    """
    fn = "grpo_loss"
    _check_eps(fn, eps=eps, kl_coef=kl_coef)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"{fn}: kl_coef={kl_coef} needs ref_logp (log-probs of the reference policy)")
    b = validate_batch(
        fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp, ref_logp=ref_logp
    )
    objective, keep, ratio = _clipped_surrogate(
        b, eps_low=eps, eps_high=eps, per_response_mean=True, denominator=b.num_responses
    )
    kl_mean = None
    if ref_logp is not None:
        log_ref_ratio = b["ref_logp"].detach() - b["logp"]
        kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
        kl_mean = float(masked_sum(kl.detach(), b.mask) / b.num_tokens)
        if kl_coef > 0:
            objective = objective - kl_coef * _aggregate(kl, b, per_response_mean=True, denominator=b.num_responses)
    stats = _base_stats(b, clip_removed=~keep, masked=None, weight_values=ratio[b.mask])
    if kl_mean is not None:
        stats["kl_ref"] = kl_mean
    return -objective, stats
# --8<-- [end:grpo]


# --8<-- [start:dr-grpo]
def dr_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps: float = 0.2,
    max_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dr. GRPO, arXiv 2503.20783: GRPO without 1/|y_i| (and without the std division of Â):

        J = (1/n) Σ_i (1/max_len) Σ_t min(r_t Â_i, clip(r_t, 1−ε, 1+ε) Â_i),   loss = −J

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None; advantages: ``[n]``
            (use ``group_advantages(..., normalize_std=False)``); mask: ``[n, T]``; eps: ε.
        max_len: the constant replacing |y_i|, e.g. the generation budget; default T (the padded
            width of the inputs), which stays constant only if the caller pads to a fixed width.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of r_t.
    """
    fn = "dr_grpo_loss"
    _check_eps(fn, eps=eps)
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    if max_len is None:
        max_len = mask.shape[1]
    if not max_len > 0:
        raise ValueError(f"{fn}: max_len must be > 0, got {max_len!r}")
    objective, keep, ratio = _clipped_surrogate(
        b, eps_low=eps, eps_high=eps, per_response_mean=False, denominator=b.num_responses * max_len
    )
    return -objective, _base_stats(b, clip_removed=~keep, masked=None, weight_values=ratio[b.mask])
# --8<-- [end:dr-grpo]


# --8<-- [start:dapo]
def dapo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO, arXiv 2503.14476: clip-higher and token-level normalization:

        J = (1/Σ_i |y_i|) Σ_i Σ_t min(r_t Â_i, clip(r_t, 1−ε_low, 1+ε_high) Â_i),   loss = −J

    Σ_i |y_i| runs over every response of the batch. Dynamic sampling (dropping groups whose
    rewards are all equal) is a data filter, not part of the loss; such groups have Â = 0 here and
    contribute nothing, though their tokens still count in the normalizer. No KL term.

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None; advantages: ``[n]``;
        mask: ``[n, T]``; eps_low, eps_high: 0.2 and 0.28 as in the paper.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of r_t.
    """
    fn = "dapo_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    objective, keep, ratio = _clipped_surrogate(
        b, eps_low=eps_low, eps_high=eps_high, per_response_mean=False, denominator=b.num_tokens
    )
    return -objective, _base_stats(b, clip_removed=~keep, masked=None, weight_values=ratio[b.mask])
# --8<-- [end:dapo]


# --8<-- [start:icepop]
def icepop_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    alpha: float = 0.5,
    beta: float = 5.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IcePop (Ring-1T, arXiv 2510.18855): GRPO whose per-token term is multiplied by M(k):

        J = (1/n) Σ_i (1/|y_i|) Σ_t sg[M(k_t)] · min(r_t Â_i, clip(r_t, 1−ε_low, 1+ε_high) Â_i)
        k_t = π_θold(y_t)/μ_θold(y_t),   M(k) = k if α ≤ k ≤ β else 0,   loss = −J

    Normalization as in the Ring-1T objective: per-response mean, then mean over the n responses;
    masked tokens still count in |y_i| (masking removes their term, not their share). The paper's
    KL term is omitted.

    Args:
        logp, old_logp, rollout_logp: ``[n, T]``; advantages: ``[n]``; mask: ``[n, T]``;
        eps_low, eps_high: PPO clip range; alpha, beta: the acceptance band [α, β] (0.5, 5).

    Returns:
        ``(loss, stats)``; ``masked_fraction`` = share of response tokens with k outside [α, β];
        ``is_weight_*`` are quantiles of k.
    """
    fn = "icepop_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    if not 0 <= alpha <= beta:
        raise ValueError(f"{fn}: need 0 <= alpha <= beta, got alpha={alpha!r}, beta={beta!r}")
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    k = torch.exp(b["old_logp"] - b["rollout_logp"]).detach()
    outside = (k < alpha) | (k > beta)
    m = torch.where(outside, torch.zeros_like(k), k)
    objective, keep, _ = _clipped_surrogate(
        b, eps_low=eps_low, eps_high=eps_high, per_response_mean=True, denominator=b.num_responses, is_weight=m
    )
    stats = _base_stats(b, clip_removed=~keep & ~outside, masked=outside, weight_values=k[b.mask])
    return -objective, stats
# --8<-- [end:icepop]


# --8<-- [start:rollout-correction]
def _rollout_correction(
    fn: str,
    logp,
    old_logp,
    rollout_logp,
    advantages,
    mask,
    *,
    cap: float,
    level: str,
    truncate: bool,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Shared body of :func:`seq_tis_loss` (truncate) and :func:`seq_mis_loss` (mask)."""
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    if level not in ("sequence", "token"):
        raise ValueError(f"{fn}: level must be 'sequence' or 'token', got {level!r}")
    if not cap > 0:
        raise ValueError(f"{fn}: the cap C must be > 0, got {cap!r}")
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    log_rho = (b["old_logp"] - b["rollout_logp"]).detach()
    if level == "sequence":
        log_rho = masked_sum(log_rho, b.mask, dim=1)[:, None].expand_as(log_rho)  # log ρ(y), per token
    log_cap = math.log(cap)
    over = log_rho > log_cap
    if truncate:
        weight = torch.exp(log_rho.clamp(max=log_cap))  # min(ρ, C) without overflowing exp
        masked = None
    else:
        weight = torch.where(over, torch.zeros_like(log_rho), torch.exp(log_rho.clamp(max=log_cap)))
        masked = over
    objective, keep, _ = _clipped_surrogate(
        b, eps_low=eps_low, eps_high=eps_high, per_response_mean=False, denominator=b.num_tokens, is_weight=weight
    )
    if level == "sequence":
        nonempty = b.lengths > 0
        values = torch.exp(log_rho[:, 0][nonempty])
    else:
        values = torch.exp(log_rho[b.mask])
    clip_removed = ~keep if masked is None else ~keep & ~masked
    stats = _base_stats(b, clip_removed=clip_removed, masked=masked, weight_values=values)
    stats["tis_fraction" if truncate else "mis_fraction"] = _fraction(over, b.mask)
    return -objective, stats
# --8<-- [end:rollout-correction]


# --8<-- [start:seq-tis]
def seq_tis_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tis_cap: float = 2.0,
    level: str = "sequence",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level truncated IS (Seq-TIS; "When Speed Kills Stability", Liu, Li et al., 2025 blog):

        J = (1/Σ_i |y_i|) Σ_i Σ_t sg[min(ρ, C)] · min(r_t Â_i, clip(r_t, 1−ε_low, 1+ε_high) Â_i)
        ρ(y) = π_θold(y|x)/μ_θold(y|x) = exp(Σ_t (old_logp − rollout_logp)),   loss = −J

    ``level="token"`` uses each token's own ρ_t = π_θold(y_t)/μ_θold(y_t) instead (token-level
    TIS). Normalization: token-level 1/Σ_i |y_i| over the batch (the common "token-mean" of
    verl/slime, where these corrections are implemented). ρ is computed in log space, so long
    responses do not overflow.

    Args:
        logp, old_logp, rollout_logp: ``[n, T]``; advantages: ``[n]``; mask: ``[n, T]``;
        tis_cap: C (2 in the blog's experiments); level: ``"sequence"`` or ``"token"``;
        eps_low, eps_high: PPO clip range.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of ρ (per response at sequence level, per
        token at token level); ``tis_fraction`` = share of response tokens whose weight was
        truncated.
    """
    return _rollout_correction(
        "seq_tis_loss", logp, old_logp, rollout_logp, advantages, mask,
        cap=tis_cap, level=level, truncate=True, eps_low=eps_low, eps_high=eps_high,
    )
# --8<-- [end:seq-tis]


# --8<-- [start:seq-mis]
def seq_mis_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    mis_cap: float = 2.0,
    level: str = "sequence",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level masked IS (Seq-MIS; "When Speed Kills Stability", Liu, Li et al., 2025 blog):

        J = (1/Σ_i |y_i|) Σ_i Σ_t sg[ρ · 1(ρ ≤ C)] · min(r_t Â_i, clip(r_t, 1−ε_low, 1+ε_high) Â_i)

    with ρ as in :func:`seq_tis_loss`: a response whose ρ exceeds C is masked out entirely; the
    others keep their IS weight ρ. ``level="token"`` applies the same rule to each token's ρ_t.
    Masked tokens stay in the normalizer Σ_i |y_i|.

    Args:
        logp, old_logp, rollout_logp: ``[n, T]``; advantages: ``[n]``; mask: ``[n, T]``;
        mis_cap: C (2); level: ``"sequence"`` or ``"token"``; eps_low, eps_high: PPO clip range.

    Returns:
        ``(loss, stats)``; ``masked_fraction`` = share of response tokens masked by ρ > C;
        ``is_weight_*`` are quantiles of ρ.
    """
    return _rollout_correction(
        "seq_mis_loss", logp, old_logp, rollout_logp, advantages, mask,
        cap=mis_cap, level=level, truncate=False, eps_low=eps_low, eps_high=eps_high,
    )
# --8<-- [end:seq-mis]


# ---------------------------------------------------------------------------------------------
# CISPO
# ---------------------------------------------------------------------------------------------
# --8<-- [start:cispo]
def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float | None = None,
    eps_high: float = 4.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO, MiniMax-M1 (arXiv 2506.13585):

        J = (1/Σ_i |y_i|) Σ_i Σ_t sg[clip(r_t, 1−ε_low, 1+ε_high)] · Â_{i,t} · log π_θ(y_t),  loss = −J

    r_t = π_θ/π_θold. Only the weight is clipped: every token keeps its gradient (``clip_fraction``
    is always 0). ``eps_low=None`` (default) means no lower bound, as in the paper ("we did not impose
    a lower bound"). The paper does not publish its ε_high; the default 4.0 puts the cap
    1 + ε_high at 5, the absolute cap TRL and ms-swift use for CISPO (their ``epsilon_high=5.0`` is
    the cap itself), which is also MiniRL's TIS cap.

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None (stats only);
        advantages: ``[n]`` or per-token ``[n, T]``; mask: ``[n, T]``; eps_low, eps_high.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of the unclipped r_t;
        ``weight_clip_fraction`` = share of response tokens whose weight was clipped.
    """
    fn = "cispo_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    b = validate_batch(
        fn, mask, advantages, token_advantages=True, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp
    )
    with torch.no_grad():
        ratio = torch.exp(b["logp"] - b["old_logp"])
        low = None if eps_low is None else 1.0 - eps_low
        weight = ratio.clamp(min=low, max=1.0 + eps_high)
        clipped = ratio > 1.0 + eps_high
        if low is not None:
            clipped |= ratio < low
    objective = _aggregate(weight * b.advantages * b["logp"], b, per_response_mean=False, denominator=b.num_tokens)
    stats = _base_stats(b, clip_removed=torch.zeros_like(b.mask), masked=None, weight_values=ratio[b.mask])
    stats["weight_clip_fraction"] = _fraction(clipped, b.mask)
    return -objective, stats
# --8<-- [end:cispo]


# ---------------------------------------------------------------------------------------------
# GSPO, GSPO-token, RSPO-style router-shift weighting
# ---------------------------------------------------------------------------------------------
# --8<-- [start:gspo]
def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO, arXiv 2507.18071:

        J = (1/n) Σ_i min(s_i Â_i, clip(s_i, 1−ε_low, 1+ε_high) Â_i),   loss = −J
        s_i = (π_θ(y_i|x)/π_θold(y_i|x))^{1/|y_i|} = exp((1/|y_i|) Σ_t (logp − old_logp))

    Clip range 3e-4 / 4e-4 as in the paper. An empty response contributes nothing.

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None (stats only);
        advantages: ``[n]`` (sequence-level); mask: ``[n, T]``; eps_low, eps_high.

    Returns:
        ``(loss, stats)``; ``clip_fraction`` counts the tokens of clipped responses;
        ``seq_clip_fraction`` the clipped share of non-empty responses; ``is_weight_*`` are
        quantiles of s_i over non-empty responses.
    """
    fn = "gspo_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    nonempty = b.lengths > 0
    s = torch.exp(_sequence_mean(b["logp"] - b["old_logp"], b))
    adv = b.response_advantages
    per_seq = torch.where(nonempty, _ppo_term(s, adv, eps_low, eps_high), torch.zeros_like(s))
    objective = per_seq.sum() / b.num_responses
    keep = clip_mask(s.detach(), adv, eps_low, eps_high)
    stats = _base_stats(
        b, clip_removed=(~keep)[:, None].expand_as(b.mask), masked=None, weight_values=s.detach()[nonempty]
    )
    stats["seq_clip_fraction"] = _fraction(~keep, nonempty)
    return -objective, stats
# --8<-- [end:gspo]


# --8<-- [start:gspo-token]
def gspo_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO-token, arXiv 2507.18071:

        J = (1/n) Σ_i (1/|y_i|) Σ_t min(s_{i,t} Â_{i,t}, clip(s_{i,t}, 1−ε_low, 1+ε_high) Â_{i,t})
        s_{i,t} = sg[s_i] · π_θ(y_t)/sg[π_θ(y_t)],   loss = −J

    s_{i,t} has the value of s_i and the gradient of a token ratio, so per-token advantages are
    allowed; with Â_{i,t} = Â_i the value and the gradient equal :func:`gspo_loss`'s.

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None (stats only);
        advantages: ``[n]`` or ``[n, T]``; mask: ``[n, T]``; eps_low, eps_high.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of s_i over non-empty responses.
    """
    fn = "gspo_token_loss"
    _check_eps(fn, eps_low=eps_low, eps_high=eps_high)
    b = validate_batch(
        fn, mask, advantages, token_advantages=True, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp
    )
    lp = b["logp"]
    s_seq = torch.exp(_sequence_mean(lp - b["old_logp"], b)).detach()
    s_tok = s_seq[:, None] * torch.exp(lp - lp.detach())
    per_token = _ppo_term(s_tok, b.advantages, eps_low, eps_high)
    objective = _aggregate(per_token, b, per_response_mean=True, denominator=b.num_responses)
    keep = clip_mask(s_tok.detach(), b.advantages, eps_low, eps_high)
    stats = _base_stats(b, clip_removed=~keep, masked=None, weight_values=s_seq[b.lengths > 0])
    return -objective, stats
# --8<-- [end:gspo-token]


# --8<-- [start:router-shift]
def router_shift(
    old_router_logp: torch.Tensor, router_logp: torch.Tensor, old_expert_ids: torch.Tensor
) -> torch.Tensor:
    """Per-token router shift Δ_t of RSPO (arXiv 2510.23027; reconstruction, see :func:`rspo_loss`).

        d^ℓ_t = (1/K) Σ_k | log g^ℓ_θ(e^(ℓ,k)) − log g^ℓ_θold(e^(ℓ,k)) |,   Δ_t = (1/L) Σ_ℓ d^ℓ_t

    over the top-K experts e^(ℓ,k) the OLD policy selected at layer ℓ; g is the router probability.

    Args:
        old_router_logp: ``[n, T, L, E]`` log router probabilities under π_θold.
        router_logp: ``[n, T, L, E]`` the same under π_θ (any leading dims, matching).
        old_expert_ids: ``[n, T, L, k]`` integer ids selected under π_θold.

    Returns:
        Δ ``[n, T]`` (≥ 0; keeps the graph of ``router_logp``; :func:`rspo_loss` detaches it).
    """
    fn = "router_shift"
    if old_router_logp.shape != router_logp.shape:
        raise ValueError(
            f"{fn}: old_router_logp has shape {tuple(old_router_logp.shape)} but router_logp has shape "
            f"{tuple(router_logp.shape)}; both must be [n, T, L, E]"
        )
    if old_router_logp.dim() < 2:
        raise ValueError(f"{fn}: router log-probs must be [..., L, E], got {tuple(old_router_logp.shape)}")
    if old_expert_ids.dtype.is_floating_point or old_expert_ids.dtype == torch.bool:
        raise TypeError(f"{fn}: old_expert_ids must be integers, got {old_expert_ids.dtype}")
    if old_expert_ids.shape[:-1] != old_router_logp.shape[:-1]:
        raise ValueError(
            f"{fn}: old_expert_ids has shape {tuple(old_expert_ids.shape)}, expected "
            f"{list(old_router_logp.shape[:-1]) + ['k']} to match router log-probs {tuple(old_router_logp.shape)}"
        )
    num_experts = old_router_logp.shape[-1]
    ids = old_expert_ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"{fn}: expert id out of range [0, {num_experts}) in old_expert_ids")
    diff = (router_logp.gather(-1, ids) - old_router_logp.gather(-1, ids)).abs()  # [..., L, k]
    return diff.mean(dim=-1).mean(dim=-1)
# --8<-- [end:router-shift]


# --8<-- [start:rspo]
def rspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    router_shift: torch.Tensor,
    gamma_min: float = 0.8,
    eps_low: float = _RSPO_EPS_LOW,
    eps_high: float = _RSPO_EPS_HIGH,
) -> tuple[torch.Tensor, dict[str, float]]:
    """RSPO-style router-shift weighting (arXiv 2510.23027). **A reconstruction** from the paper's
    abstract and secondary sources; the paper's versions differ on where the factor enters. What
    is implemented:

        γ_t = exp(−Δ_t),  γ̃_t = sg[max(γ_t, γ_min)]                     (router-shift ratio, floored)
        ℓ_t = log(γ̃_t · r_t),  r_t = π_θ/π_θold                         (ratio rescaled before clipping)
        c_t = ℓ_t clipped pessimistically to [log(1−ε_low), log(1+ε_high)]:
              min(ℓ_t, log(1+ε_high)) if Â_i > 0,  max(ℓ_t, log(1−ε_low)) if Â_i < 0
        s_i = exp((1/|y_i|) Σ_t c_t)                                      (geometric-mean aggregation)
        J = (1/n) Σ_i s_i Â_i,   loss = −J

    i.e. token-level clipping followed by GSPO/GMPO-style geometric-mean sequence aggregation (the
    RSPO paper's GMPO+RS variant). A clipped token keeps its value in s_i but gets no gradient.
    Defaults: clip range (e^−0.4, e^0.4) (GMPO's, which RSPO builds on), γ_min = 0.8 (the paper
    does not report it; third-party code uses 0.7–0.8).

    Args:
        logp, old_logp: ``[n, T]``; rollout_logp: ``[n, T]`` or None (stats only);
        advantages: ``[n]``; mask: ``[n, T]``.
        router_shift: Δ ``[n, T]`` ≥ 0, from :func:`router_shift` (detached here).
        gamma_min: floor γ_min of γ̃.
        eps_low, eps_high: the token clip range as 1 − ε_low, 1 + ε_high.

    Returns:
        ``(loss, stats)``; ``is_weight_*`` are quantiles of s_i over non-empty responses; also
        ``router_shift_mean`` and ``gamma_floor_fraction`` (share of tokens where γ_t < γ_min).
    """
    fn = "rspo_loss"
    _check_eps(fn, eps_high=eps_high)
    if not 0 <= eps_low < 1:
        raise ValueError(f"{fn}: eps_low must be in [0, 1), got {eps_low!r}")
    if not 0 < gamma_min <= 1:
        raise ValueError(f"{fn}: gamma_min must be in (0, 1], got {gamma_min!r}")
    b = validate_batch(fn, mask, advantages, logp=logp, old_logp=old_logp, rollout_logp=rollout_logp)
    if not isinstance(router_shift, torch.Tensor) or router_shift.shape != mask.shape:
        raise ValueError(
            f"{fn}: router_shift has shape {tuple(getattr(router_shift, 'shape', ()))} but mask has shape "
            f"{tuple(mask.shape)}; expected [n, T]"
        )
    delta = router_shift.detach().to(b["logp"].dtype)
    bad = (~torch.isfinite(delta) | (delta < 0)) & b.mask
    if bad.any():
        raise ValueError(f"{fn}: router_shift has {int(bad.sum())} negative or NaN/inf value(s) at response tokens")
    delta = torch.where(b.mask, delta, torch.zeros((), dtype=delta.dtype))
    gamma = torch.exp(-delta)
    gamma_tilde = gamma.clamp(min=gamma_min)
    adv = b.advantages
    log_r = torch.log(gamma_tilde) + b["logp"] - b["old_logp"]
    lo, hi = math.log(1.0 - eps_low), math.log(1.0 + eps_high)
    c = torch.where(adv > 0, log_r.clamp(max=hi), torch.where(adv < 0, log_r.clamp(min=lo), log_r))
    keep = clip_mask(torch.exp(log_r.detach()), adv, eps_low, eps_high)
    nonempty = b.lengths > 0
    s = torch.exp(_sequence_mean(c, b))
    objective = torch.where(nonempty, s * b.response_advantages, torch.zeros_like(s)).sum() / b.num_responses
    stats = _base_stats(b, clip_removed=~keep, masked=None, weight_values=s.detach()[nonempty])
    stats["router_shift_mean"] = float(masked_sum(delta, b.mask) / b.num_tokens)
    stats["gamma_floor_fraction"] = _fraction(gamma < gamma_min, b.mask)
    return -objective, stats
# --8<-- [end:rspo]


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
Objective = Callable[..., "tuple[torch.Tensor, dict[str, float]]"]

# --8<-- [start:objectives-registry]
#: Every objective by name; all share the call ``f(logp, old_logp, rollout_logp, advantages, mask, **options)``.
OBJECTIVES: dict[str, Objective] = {
    "minirl": minirl_loss,
    "grpo": grpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
    "cispo": cispo_loss,
    "gspo": gspo_loss,
    "gspo_token": gspo_token_loss,
    "rspo": rspo_loss,
    "icepop": icepop_loss,
    "seq_tis": seq_tis_loss,
    "seq_mis": seq_mis_loss,
}
# --8<-- [end:objectives-registry]


def compute_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **options,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Call the objective registered under ``name`` (see :data:`OBJECTIVES`) with ``options``."""
    try:
        fn = OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}") from None
    return fn(logp, old_logp, rollout_logp, advantages, mask, **options)

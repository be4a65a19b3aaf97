"""The one input check every objective and metric runs, and the masked reductions they share.

Conventions (every function of :mod:`reference_impl.objectives` and :mod:`reference_impl.metrics`):

* log-probs ``[n, T]`` must be finite and ≤ 0 (up to :data:`POSITIVE_LOGP_TOLERANCE`) at response
  tokens; padding may hold anything (NaN included) and never reaches a loss, a gradient or a statistic;
* ``mask`` ``[n, T]`` is 0/1 float or bool; a batch with no response token is an error;
* arithmetic runs in float32 (float64 if a log-prob input is float64), whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["POSITIVE_LOGP_TOLERANCE", "Batch", "validate_batch", "masked_sum", "masked_mean"]

#: Largest log-prob accepted as "≤ 0" (rounding in a log-softmax can land a hair above zero).
POSITIVE_LOGP_TOLERANCE = 1e-5



@dataclass
class Batch:
    """Validated inputs: log-probs upcast and zeroed outside the mask (padding can hold NaN).

    Attributes:
        logps: name -> ``[n, T]`` float tensor (graph kept for ``logp``), 0 at padding.
        mask: ``[n, T]`` bool.
        advantages: ``[n, T]`` float (an ``[n]`` input broadcast over tokens), 0 at padding, or None.
        response_advantages: ``[n]`` float when advantages were given per response (0 for an empty
            response), else None.
        lengths: ``[n]`` float, response lengths |y_i|.
        num_tokens: Σ_i |y_i| (> 0).
        num_responses: n.
    """

    logps: dict[str, torch.Tensor]
    mask: torch.Tensor
    advantages: torch.Tensor | None
    response_advantages: torch.Tensor | None
    lengths: torch.Tensor
    num_tokens: int
    num_responses: int

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.logps[name]


def validate_batch(
    fn: str,
    mask: torch.Tensor,
    advantages: torch.Tensor | None = None,
    *,
    token_advantages: bool = False,
    **logps: torch.Tensor | None,
) -> Batch:
    """The one input check every objective and metric runs.

    Args:
        fn: name of the calling function, used in error messages.
        mask: ``[n, T]`` 0/1 float or bool.
        advantages: ``[n]`` (or ``[n, T]`` when ``token_advantages``), or None.
        token_advantages: whether per-token advantages ``[n, T]`` are accepted.
        **logps: the log-prob tensors by name (``logp=…, old_logp=…``); None entries are skipped.

    Raises:
        ValueError: shapes that disagree (naming both shapes), non-0/1 mask values, NaN/inf or
            positive log-probs at response tokens (naming the tensor and the count), non-finite
            advantages at response tokens, or a batch without any response token.
        TypeError: non-tensor inputs.
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{fn}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{fn}: mask must have shape [n, T], got {tuple(mask.shape)}")
    given = {k: v for k, v in logps.items() if v is not None}
    dtype = torch.float32
    for name, x in given.items():
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"{fn}: {name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x))}")
        if x.shape != mask.shape:
            raise ValueError(
                f"{fn}: {name} has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}; "
                "every log-prob tensor and the mask must be [n, T]"
            )
        if x.dtype == torch.float64:
            dtype = torch.float64
    if mask.dtype == torch.bool:
        mask_b = mask
    else:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"{fn}: mask must hold only 0 and 1, got values {torch.unique(mask)[:8].tolist()}")
        mask_b = mask != 0
    mask_b = mask_b.detach()
    n = mask.shape[0]
    num_tokens = int(mask_b.sum())
    if num_tokens == 0:
        raise ValueError(
            f"{fn}: the batch has no response token (mask of shape {tuple(mask.shape)} is all zero); "
            "there is nothing to optimize"
        )

    clean: dict[str, torch.Tensor] = {}
    for name, x in given.items():
        xd = x.detach()
        bad = ~torch.isfinite(xd) & mask_b
        if bad.any():
            i, t = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(
                f"{fn}: {name} has {int(bad.sum())} NaN/inf value(s) at response tokens "
                f"(first at response {i}, token {t}: {float(xd[i, t])})"
            )
        pos = (xd > POSITIVE_LOGP_TOLERANCE) & mask_b
        if pos.any():
            i, t = (int(v) for v in torch.nonzero(pos)[0])
            raise ValueError(
                f"{fn}: {name} has {int(pos.sum())} positive log-prob(s) at response tokens "
                f"(first at response {i}, token {t}: {float(xd[i, t]):.3g}); expected log-probabilities <= 0"
            )
        # where() keeps the gradient at response tokens and gives exactly 0 elsewhere, even for NaN padding.
        clean[name] = torch.where(mask_b, x.to(dtype), torch.zeros((), dtype=dtype))

    adv = adv_row = None
    if advantages is not None:
        if not isinstance(advantages, torch.Tensor):
            raise TypeError(f"{fn}: advantages must be a torch.Tensor, got {type(advantages).__name__}")
        if advantages.shape == (n,):
            adv = advantages.detach().to(dtype)[:, None].expand(mask.shape)
        elif token_advantages and advantages.shape == mask.shape:
            adv = advantages.detach().to(dtype)
        else:
            allowed = f"[{n}]" + (f" or {list(mask.shape)}" if token_advantages else "")
            raise ValueError(
                f"{fn}: advantages has shape {tuple(advantages.shape)}, expected {allowed} "
                f"(mask has shape {tuple(mask.shape)})"
            )
        bad = ~torch.isfinite(adv) & mask_b
        if bad.any():
            raise ValueError(f"{fn}: advantages has {int(bad.sum())} NaN/inf value(s) at response tokens")
        adv = torch.where(mask_b, adv, torch.zeros((), dtype=dtype))
        if advantages.dim() == 1:
            adv_row = torch.where(mask_b.any(dim=1), advantages.detach().to(dtype), torch.zeros((), dtype=dtype))

    return Batch(
        logps=clean,
        mask=mask_b,
        advantages=adv,
        response_advantages=adv_row,
        lengths=mask_b.sum(dim=1).to(dtype),
        num_tokens=num_tokens,
        num_responses=n,
    )


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ of ``x`` over positions where ``mask`` is True (over ``dim``, or everything)."""
    masked = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``x`` over positions where ``mask`` is True, as a Python float; NaN-safe.

    Positions outside the mask may hold NaN or inf (padding) and never reach the result. An empty
    mask gives NaN (there is nothing to average), never a made-up 0.
    """
    if x.shape != mask.shape:
        raise ValueError(f"masked_mean: x has shape {tuple(x.shape)} but mask has shape {tuple(mask.shape)}")
    keep = mask.to(torch.bool)
    count = int(keep.sum())
    if count == 0:
        return float("nan")
    return float(masked_sum(x.detach().to(torch.float64), keep) / count)

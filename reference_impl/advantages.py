"""Group-relative advantages: MiniRL's and Dr. GRPO's Â_i = R_i − mean of the group, GRPO's ÷ std."""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["group_advantages"]


# --8<-- [start:group-advantages]
def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int],
    normalize_std: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages Â_i = R_i − mean_{j in group(i)} R_j (optionally / (std + eps)).

    Without ``normalize_std`` this is MiniRL's advantage (arXiv 2512.01374, the paper calls it
    "group normalization" though it divides by nothing) and Dr. GRPO's (arXiv 2503.20783); with it,
    GRPO's (arXiv 2402.03300): Â_i = (R_i − mean) / (std + eps), std with Bessel's correction (as
    TRL and verl compute it); a group of one response has std 0.

    A group whose rewards are all equal gets Â = 0 **exactly** for every response (set explicitly,
    not left to floating-point cancellation): it contributes no gradient. DAPO's dynamic sampling
    drops such groups before the update.

    Args:
        rewards: ``[n]`` rewards R(x, y).
        group_ids: ``[n]`` integers naming the prompt of each response.
        normalize_std: divide by the group's std + ``eps`` (GRPO).
        eps: added to the std.

    Returns:
        ``[n]`` advantages (float32, float64 if ``rewards`` is float64).
    """
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must have shape [n], got {tuple(rewards.shape)}")
    group_ids = torch.as_tensor(group_ids)
    if group_ids.dim() != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_advantages: group_ids has shape {tuple(group_ids.shape)} but rewards has shape "
            f"{tuple(rewards.shape)}; expected one group id per reward"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_advantages: group_ids must be integers, got {group_ids.dtype}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dtype)
    if not torch.isfinite(r).all():
        raise ValueError(f"group_advantages: rewards has {int((~torch.isfinite(r)).sum())} NaN/inf value(s)")
    if r.numel() == 0:
        return r.clone()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    g = int(inverse.max()) + 1
    count = torch.zeros(g, dtype=dtype).index_add_(0, inverse, torch.ones_like(r))
    mean = torch.zeros(g, dtype=dtype).index_add_(0, inverse, r) / count
    adv = r - mean[inverse]
    gmax = torch.full((g,), -math.inf, dtype=dtype).scatter_reduce(0, inverse, r, "amax")
    gmin = torch.full((g,), math.inf, dtype=dtype).scatter_reduce(0, inverse, r, "amin")
    constant = (gmax == gmin)[inverse]
    if normalize_std:
        sq = torch.zeros(g, dtype=dtype).index_add_(0, inverse, adv * adv)
        std = torch.where(count > 1, (sq / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(sq))
        adv = adv / (std[inverse] + eps)
    return torch.where(constant, torch.zeros_like(adv), adv)
# --8<-- [end:group-advantages]

"""Next-token log-probabilities and entropies from logits: the one place every engine computes them.

* :func:`next_token_logprobs`: ``logp[:, t] = log softmax(logits[:, t] / temperature)[tokens[:, t+1]]``,
  the alignment every log-prob tensor of the package follows (column ``t`` scores ``tokens[:, t+1]``);
* :func:`token_logprobs_and_entropy`: the chunked kernel under it, which never builds a second
  ``[N, V]`` float32 tensor (forward or backward).
"""

from __future__ import annotations


import torch

__all__ = ["next_token_logprobs", "next_token_logprobs_and_entropy", "token_logprobs_and_entropy"]


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


def _shifted(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of positions ``0 .. S-2`` (tempered) and the tokens they predict, ``1 .. S-1``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(tokens.shape)} in [n, S]")
    scaled = logits[:, :-1] if temperature == 1.0 else logits[:, :-1] / temperature
    return scaled, tokens[:, 1:]


def next_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``logp[:, t] = log softmax(logits[:, t] / temperature)[tokens[:, t+1]]``, shape ``[n, S-1]``.

    ``logits`` ``[n, S, V]`` from a forward over ``tokens`` ``[n, S]``; computed by the chunked
    :func:`token_logprobs_and_entropy` (no second full-vocabulary fp32 tensor).
    """
    logp, _ = token_logprobs_and_entropy(*_shifted(logits, tokens, temperature), return_entropy=False)
    return logp


def next_token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`next_token_logprobs` and the (detached) full-vocabulary entropy at each position, ``[n, S-1]`` each."""
    return token_logprobs_and_entropy(*_shifted(logits, tokens, temperature))

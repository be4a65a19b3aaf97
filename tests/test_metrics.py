"""Metrics: KL estimates and F(τ) by hand, routing flip rate on constructed routes, and the chunked
log-prob/entropy against the naive log_softmax (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl.metrics import (
    clip_fraction,
    extreme_token_fraction,
    kl_k1,
    kl_k3,
    mean_entropy,
    mismatch_metrics,
    routing_disagreement,
    routing_flip_rate,
    token_logprobs_and_entropy,
)
from reference_impl.objectives import minirl_loss
from reference_impl.routing import RoutingTrace

LN = math.log


def constructed():
    """Two responses; the second has one padding token holding NaN."""
    rollout = torch.tensor([[LN(0.5), LN(0.2), LN(0.9)], [LN(0.1), LN(0.6), float("nan")]])
    old = torch.tensor([[LN(0.5), LN(0.5), LN(0.3)], [LN(0.3), LN(0.6), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float32)
    return rollout, old, mask


def test_kl_estimates_match_hand_computation():
    rollout, old, mask = constructed()
    pairs = [(0.5, 0.5), (0.2, 0.5), (0.9, 0.3), (0.1, 0.3), (0.6, 0.6)]  # (μ, π_old)
    k1 = sum(LN(m) - LN(p) for m, p in pairs) / 5
    k3 = sum(p / m - 1 - LN(p / m) for m, p in pairs) / 5
    assert kl_k1(rollout, old, mask) == pytest.approx(k1, rel=1e-5)
    assert kl_k3(rollout, old, mask) == pytest.approx(k3, rel=1e-5)
    assert mismatch_metrics(rollout, old, mask)["kl_k3"] == pytest.approx(k3, rel=1e-5)


def test_k3_is_nonnegative_and_zero_without_mismatch():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 0.1, 2.0):
        old = -torch.rand(8, 16, generator=g) * 4
        rollout = (old + scale * torch.randn(8, 16, generator=g)).clamp(max=0)
        mask = torch.ones(8, 16)
        assert kl_k3(rollout, old, mask) >= 0
    assert kl_k3(old, old, mask) == 0.0 and kl_k1(old, old, mask) == 0.0


def test_k3_estimates_kl_of_mu_from_pi_old_on_tokens_sampled_from_mu():
    """Sampled from μ, mean(ρ − 1 − log ρ) → KL(μ‖π_old) (not KL(π_old‖μ))."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.9, 0.05, 0.05])
    pi_old = torch.tensor([0.3, 0.3, 0.4])
    tokens = torch.multinomial(mu, 200_000, replacement=True, generator=g)
    rollout = mu.log()[tokens][None]
    old = pi_old.log()[tokens][None]
    mask = torch.ones_like(rollout)
    forward = float((mu * (mu / pi_old).log()).sum())  # KL(μ‖π_old)
    reverse = float((pi_old * (pi_old / mu).log()).sum())
    assert kl_k3(rollout, old, mask) == pytest.approx(forward, rel=0.02)
    assert kl_k1(rollout, old, mask) == pytest.approx(forward, rel=0.03)
    assert abs(forward - reverse) > 0.2  # the two directions are far apart here


def test_extreme_token_fraction_on_a_constructed_example():
    rollout, old, mask = constructed()
    # ratios π_old/μ: 1, 2.5, 1/3, 3, 1 → beyond τ=2 in either direction: 2.5, 1/3, 3
    assert extreme_token_fraction(rollout, old, mask) == pytest.approx(3 / 5)
    assert extreme_token_fraction(rollout, old, mask, tau=2.8) == pytest.approx(2 / 5)
    assert extreme_token_fraction(rollout, old, mask, tau=10) == 0.0
    with pytest.raises(ValueError, match="tau must be > 1"):
        extreme_token_fraction(rollout, old, mask, tau=0.5)


def test_token_metrics_validate_inputs():
    rollout, old, mask = constructed()
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 2\) but mask has shape \(2, 3\)"):
        kl_k3(rollout, old[:, :2], mask)
    bad = old.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"old_logp has 1 NaN/inf"):
        kl_k1(rollout, bad, mask)
    with pytest.raises(ValueError, match="no response token"):
        kl_k3(rollout, old, torch.zeros_like(mask))


# ------------------------------------------------------------------------------- routing
def test_routing_flip_rate_on_constructed_routes():
    # 2 tokens, 2 layers, top-2
    old = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])
    new = torch.tensor([[[1, 0], [2, 9]], [[8, 9], [6, 7]]])
    # per (token, layer): 0 (order ignored), 1/2, 2/2, 0
    assert routing_flip_rate(old, new) == pytest.approx((0 + 0.5 + 1 + 0) / 4)
    torch.testing.assert_close(routing_flip_rate(old, new, per_layer=True), torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert routing_flip_rate(old, new, valid=torch.tensor([True, False])) == pytest.approx(0.25)
    assert routing_flip_rate(old, old) == 0.0
    with pytest.raises(ValueError, match="old_routes has shape"):
        routing_flip_rate(old, new[:, :1])
    with pytest.raises(ValueError, match="no valid token"):
        routing_flip_rate(old, new, valid=torch.tensor([False, False]))


def test_routing_flip_rate_and_disagreement_accept_traces():
    old = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [2, 3]]])
    new = torch.tensor([[[1, 0], [2, 9]], [[8, 9], [6, 7]], [[5, 6], [7, 8]]])
    a = RoutingTrace(old, num_experts=16)
    b = RoutingTrace(new, num_experts=16, valid=torch.tensor([True, True, False]))
    assert routing_flip_rate(a, b) == pytest.approx(1.5 / 4)
    d = routing_disagreement(a, b)
    assert d == {"router_disagreement": 0.5, "token_disagreement": 1.0, "mean_differing_layers": 1.0, "num_tokens": 2, "num_rows": 3}
    with pytest.raises(TypeError, match="two RoutingTrace"):
        routing_flip_rate(a, new)


# --------------------------------------------------------------------- log-probs, entropy
def naive(logits, targets):
    logq = torch.log_softmax(logits.float(), dim=-1)
    return logq.gather(-1, targets[..., None]).squeeze(-1), -(logq.exp() * logq).sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunked_logprobs_equal_naive_in_fp32(chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 25, 50, generator=g)).requires_grad_(True)
    targets = torch.randint(50, (2, 25), generator=g)
    weights = torch.randn(2, 25, generator=g)
    logp, ent = token_logprobs_and_entropy(logits, targets, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
    ref_logp, ref_ent = naive(logits, targets)
    (ref_grad,) = torch.autograd.grad((ref_logp * weights).sum(), logits)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert not ent.requires_grad and logp.dtype == torch.float32


def test_chunked_logprobs_are_close_to_naive_in_bf16():
    g = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(40, 300, generator=g)).to(torch.bfloat16).requires_grad_(True)
    targets = torch.randint(300, (40,), generator=g)
    logp, ent = token_logprobs_and_entropy(logits, targets, chunk_size=16)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    ref_logp, ref_ent = naive(logits, targets)
    (ref_grad,) = torch.autograd.grad(ref_logp.sum(), logits)
    assert logp.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(logp, ref_logp, rtol=1e-5, atol=1e-5)  # both computed in fp32 from bf16
    torch.testing.assert_close(ent, ref_ent.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)


def test_chunked_logprobs_match_fp64_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(7, (5,), generator=g)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x, targets, chunk_size=2, return_entropy=False)[0], (logits,)
    )


def test_entropy_handles_masked_vocabulary_and_validates_targets():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    logp, ent = token_logprobs_and_entropy(logits, torch.tensor([1]))
    assert float(logp) == pytest.approx(LN(0.5)) and float(ent) == pytest.approx(LN(2))
    with pytest.raises(ValueError, match="target id 4 out of range for vocabulary size 4"):
        token_logprobs_and_entropy(logits, torch.tensor([4]))
    with pytest.raises(ValueError, match="targets has shape"):
        token_logprobs_and_entropy(logits, torch.tensor([1, 2]))
    _, none = token_logprobs_and_entropy(logits, torch.tensor([0]), return_entropy=False)
    assert none is None


def test_mean_entropy_and_clip_fraction_summaries():
    ent = torch.tensor([[1.0, 3.0, 100.0], [2.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert mean_entropy(ent, mask) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 9, generator=g) * 2
    logp = (old + 0.3 * torch.randn(4, 9, generator=g)).clamp(max=0)
    adv = torch.randn(4, generator=g)
    m = torch.ones(4, 9)
    _, stats = minirl_loss(logp, old, old, adv, m)
    assert clip_fraction(logp, old, adv, m) == pytest.approx(stats["clip_fraction"])


def _exact_variance(estimator, mu: list[float], pi_old: list[float]) -> tuple[float, float]:
    """Mean and variance under x ~ μ of a one-token estimate, from the estimator's value on each token."""
    values = [
        estimator(torch.tensor([[LN(m)]]), torch.tensor([[LN(p)]]), torch.ones(1, 1)) for m, p in zip(mu, pi_old)
    ]
    mean = sum(m * v for m, v in zip(mu, values))
    return mean, sum(m * (v - mean) ** 2 for m, v in zip(mu, values))


def test_k3_variance_is_lower_only_near_ratio_one():
    """Schulman's note (2020): k3 has low variance when μ ≈ π_old; the docs' concepts page quotes both cases.

    Far from ρ ≈ 1 (a token that μ samples often and π_old gives half its probability, and one the
    other way round) k3's variance exceeds k1's by two orders of magnitude.
    """
    kl = lambda mu, pi: sum(m * LN(m / p) for m, p in zip(mu, pi))  # noqa: E731
    near_mu, near_pi = [0.5, 0.3, 0.2], [0.48, 0.31, 0.21]
    far_mu, far_pi = [0.98, 0.01, 0.01], [0.50, 0.49, 0.01]
    for mu, pi in [(near_mu, near_pi), (far_mu, far_pi)]:
        for est in (kl_k1, kl_k3):  # both unbiased for KL(μ ‖ π_old)
            assert _exact_variance(est, mu, pi)[0] == pytest.approx(kl(mu, pi), rel=1e-3)
    _, var_k1 = _exact_variance(kl_k1, near_mu, near_pi)
    _, var_k3 = _exact_variance(kl_k3, near_mu, near_pi)
    assert var_k3 < var_k1 / 20
    _, var_k1 = _exact_variance(kl_k1, far_mu, far_pi)
    _, var_k3 = _exact_variance(kl_k3, far_mu, far_pi)
    assert round(var_k1, 2) == 0.21 and round(var_k3, 1) == 19.1  # the numbers the concepts page gives

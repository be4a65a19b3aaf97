"""Objectives: each against an independent per-token Python loop (values and gradients), the
MiniRL reductions and ablations, the first-order approximation, and bad input.

The reference loops below use plain Python floats and ``math``; they share nothing with the
vectorized code. Their gradients are written by hand (d loss / d logp_{i,t}), treating every sg[·]
as a constant, exactly as the papers define the surrogate.
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl.objectives import (
    OBJECTIVES,
    compute_loss,
    cispo_loss,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    group_advantages,
    gspo_loss,
    gspo_token_loss,
    icepop_loss,
    minirl_loss,
    router_shift,
    rspo_loss,
    seq_mis_loss,
    seq_tis_loss,
    sequence_level_objective,
    token_level_objective,
)

N, T = 6, 7


def make_batch(seed: int = 0, n: int = N, t: int = T, staleness: float = 0.3, mismatch: float = 0.3):
    """Random float64 batch: partial masks, one empty response, log-probs <= 0."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3 - 0.05
    rollout = (old + mismatch * torch.randn(n, t, generator=g, dtype=torch.float64)).clamp(max=0)
    logp = (old + staleness * torch.randn(n, t, generator=g, dtype=torch.float64)).clamp(max=0)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = 0  # an empty response
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return dict(logp=logp, old_logp=old, rollout_logp=rollout, advantages=adv, mask=mask)


def lists(batch):
    return (batch[k].tolist() for k in ("logp", "old_logp", "rollout_logp", "advantages", "mask"))


def run(fn, batch, **kw):
    logp = batch["logp"].clone().requires_grad_(True)
    loss, stats = fn(logp, batch["old_logp"], batch["rollout_logp"], batch["advantages"], batch["mask"], **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, stats


def zeros(n=N, t=T):
    return [[0.0] * t for _ in range(n)]


# ------------------------------------------------------------------------- reference loops
def ref_ppo(r, a, eps_low, eps_high):
    """(min(r A, clip(r) A), d/dlogp of it)."""
    value = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    removed = (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low)
    return value, 0.0 if removed else r * a


def ref_minirl(batch, eps_low=0.2, eps_high=0.27, tis_cap=5.0, tis_mode="token_weight",
               length_norm=False, train_infer_is=True, normalizer=None):
    lp, old, mu, adv, mask = lists(batch)
    n = len(lp)
    norm = n if normalizer is None else normalizer
    total, grad = 0.0, zeros(n, len(lp[0]))
    for i in range(n):
        length = sum(mask[i])
        for t in range(len(lp[i])):
            if not mask[i][t]:
                continue
            r = math.exp(lp[i][t] - old[i][t])
            if not train_infer_is:
                w = r
            elif tis_mode == "token_weight":
                w = math.exp(lp[i][t] - mu[i][t])
                if tis_cap is not None:
                    w = min(w, tis_cap)
            else:
                d = math.exp(old[i][t] - mu[i][t])
                w = (min(d, tis_cap) if tis_cap is not None else d) * r
            a = adv[i]
            m = 0.0 if (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low) else 1.0
            c = 1.0 / length if length_norm else 1.0
            total += c * m * w * a * lp[i][t]
            grad[i][t] = -c * m * w * a / norm
    return -total / norm, grad


def ref_clipped(batch, eps_low, eps_high, agg, weight=None, max_len=None, kl_coef=0.0, ref_logp=None):
    """Σ weight · PPO term with agg in {"seq_mean", "max_len", "token"}; optional k3 KL."""
    lp, old, mu, adv, mask = lists(batch)
    ref = ref_logp.tolist() if ref_logp is not None else None
    n, t_max = len(lp), len(lp[0])
    num_tokens = sum(sum(row) for row in mask)
    total, grad = 0.0, zeros(n, t_max)
    for i in range(n):
        length = sum(mask[i])
        if agg == "seq_mean":
            c = 1.0 / (n * length) if length else 0.0
        elif agg == "max_len":
            c = 1.0 / (n * max_len)
        else:
            c = 1.0 / num_tokens
        for t in range(t_max):
            if not mask[i][t]:
                continue
            r = math.exp(lp[i][t] - old[i][t])
            w = 1.0 if weight is None else weight(i, t)
            value, dvalue = ref_ppo(r, adv[i], eps_low, eps_high)
            term, dterm = w * value, w * dvalue
            if kl_coef:
                x = ref[i][t] - lp[i][t]
                term -= kl_coef * (math.exp(x) - x - 1)
                dterm -= kl_coef * (-math.exp(x) + 1)
            total += c * term
            grad[i][t] = -c * dterm
    return -total, grad


def ref_cispo(batch, eps_low, eps_high, token_adv=None):
    lp, old, mu, adv, mask = lists(batch)
    n, t_max = len(lp), len(lp[0])
    num_tokens = sum(sum(row) for row in mask)
    total, grad = 0.0, zeros(n, t_max)
    for i in range(n):
        for t in range(t_max):
            if not mask[i][t]:
                continue
            r = math.exp(lp[i][t] - old[i][t])
            w = min(r, 1 + eps_high)
            if eps_low is not None:
                w = max(w, 1 - eps_low)
            a = token_adv[i][t] if token_adv is not None else adv[i]
            total += w * a * lp[i][t] / num_tokens
            grad[i][t] = -w * a / num_tokens
    return -total, grad


def ref_gspo(batch, eps_low, eps_high):
    lp, old, mu, adv, mask = lists(batch)
    n, t_max = len(lp), len(lp[0])
    total, grad = 0.0, zeros(n, t_max)
    for i in range(n):
        toks = [t for t in range(t_max) if mask[i][t]]
        if not toks:
            continue
        s = math.exp(sum(lp[i][t] - old[i][t] for t in toks) / len(toks))
        value, ds = ref_ppo(s, adv[i], eps_low, eps_high)  # ds = s·A if unclipped: d/dlog s
        total += value / n
        for t in toks:
            grad[i][t] = -ds / (len(toks) * n)
    return -total, grad


def ref_gspo_token(batch, token_adv, eps_low, eps_high):
    lp, old, mu, adv, mask = lists(batch)
    n, t_max = len(lp), len(lp[0])
    total, grad = 0.0, zeros(n, t_max)
    for i in range(n):
        toks = [t for t in range(t_max) if mask[i][t]]
        if not toks:
            continue
        s = math.exp(sum(lp[i][t] - old[i][t] for t in toks) / len(toks))
        for t in toks:
            value, dv = ref_ppo(s, token_adv[i][t], eps_low, eps_high)  # d s_{i,t}/d logp_t = s
            total += value / (len(toks) * n)
            grad[i][t] = -dv / (len(toks) * n)
    return -total, grad


def ref_rspo(batch, delta, gamma_min, eps_low, eps_high):
    lp, old, mu, adv, mask = lists(batch)
    delta = delta.tolist()
    n, t_max = len(lp), len(lp[0])
    total, grad = 0.0, zeros(n, t_max)
    for i in range(n):
        toks = [t for t in range(t_max) if mask[i][t]]
        if not toks:
            continue
        cs, live = [], []
        for t in toks:
            g = max(math.exp(-delta[i][t]), gamma_min)
            rr = g * math.exp(lp[i][t] - old[i][t])
            if adv[i] > 0 and rr > 1 + eps_high:
                cs.append(math.log(1 + eps_high))
                live.append(False)
            elif adv[i] < 0 and rr < 1 - eps_low:
                cs.append(math.log(1 - eps_low))
                live.append(False)
            else:
                cs.append(math.log(rr))
                live.append(True)
        s = math.exp(sum(cs) / len(toks))
        total += s * adv[i] / n
        for t, alive in zip(toks, live):
            grad[i][t] = -(s * adv[i] / len(toks) / n if alive else 0.0)
    return -total, grad


def icepop_weight(batch, alpha=0.5, beta=5.0):
    old, mu = batch["old_logp"].tolist(), batch["rollout_logp"].tolist()

    def w(i, t):
        k = math.exp(old[i][t] - mu[i][t])
        return k if alpha <= k <= beta else 0.0

    return w


def rollout_weight(batch, cap, level, truncate):
    old, mu, mask = batch["old_logp"].tolist(), batch["rollout_logp"].tolist(), batch["mask"].tolist()
    seq = [math.exp(sum(o - m for o, m, k in zip(old[i], mu[i], mask[i]) if k)) for i in range(len(old))]

    def w(i, t):
        rho = seq[i] if level == "sequence" else math.exp(old[i][t] - mu[i][t])
        if truncate:
            return min(rho, cap)
        return rho if rho <= cap else 0.0

    return w


def check(loss, grad, ref):
    ref_loss, ref_grad = ref
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-9, abs_tol=1e-12), (loss.item(), ref_loss)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ against the loops
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tis_cap": 1.1},
        {"tis_cap": 1.1, "tis_mode": "discrepancy"},
        {"tis_cap": None},
        {"length_norm": True},
        {"train_infer_is": False},
        {"normalizer": 3.5, "eps_low": 0.1, "eps_high": 0.15},
    ],
)
def test_minirl_matches_the_per_token_loop(seed, kw):
    batch = make_batch(seed)
    loss, grad, stats = run(minirl_loss, batch, **kw)
    check(loss, grad, ref_minirl(batch, **kw))
    assert 0 < stats["clip_fraction"] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_family_matches_the_per_token_loop(seed):
    batch = make_batch(seed)
    check(*run(grpo_loss, batch)[:2], ref_clipped(batch, 0.2, 0.2, "seq_mean"))
    check(*run(dr_grpo_loss, batch)[:2], ref_clipped(batch, 0.2, 0.2, "max_len", max_len=T))
    check(*run(dr_grpo_loss, batch, max_len=64)[:2], ref_clipped(batch, 0.2, 0.2, "max_len", max_len=64))
    check(*run(dapo_loss, batch)[:2], ref_clipped(batch, 0.2, 0.28, "token"))
    check(*run(icepop_loss, batch)[:2], ref_clipped(batch, 0.2, 0.2, "seq_mean", weight=icepop_weight(batch)))


def test_grpo_kl_term_matches_the_loop():
    batch = make_batch(3)
    ref_logp = (batch["old_logp"] + 0.2 * torch.randn(N, T, dtype=torch.float64)).clamp(max=0)
    loss, grad, stats = run(grpo_loss, batch, kl_coef=0.05, ref_logp=ref_logp)
    check(loss, grad, ref_clipped(batch, 0.2, 0.2, "seq_mean", kl_coef=0.05, ref_logp=ref_logp))
    assert stats["kl_ref"] > 0
    with pytest.raises(ValueError, match="needs ref_logp"):
        grpo_loss(batch["logp"], batch["old_logp"], None, batch["advantages"], batch["mask"], kl_coef=0.1)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_seq_tis_and_mis_match_the_loop(level):
    batch = make_batch(4, mismatch=0.15)
    for fn, truncate, key in ((seq_tis_loss, True, "tis_cap"), (seq_mis_loss, False, "mis_cap")):
        for cap in (2.0, 1.05):
            loss, grad, stats = run(fn, batch, level=level, **{key: cap})
            check(loss, grad, ref_clipped(batch, 0.2, 0.2, "token", weight=rollout_weight(batch, cap, level, truncate)))


def test_seq_mis_masks_whole_responses():
    batch = make_batch(5)
    batch["rollout_logp"] = batch["old_logp"].clone()
    batch["rollout_logp"][0] -= 1.0  # response 0: ρ = e^{|y_0|} > 2, masked entirely
    loss, grad, stats = run(seq_mis_loss, batch)
    assert grad[0].abs().sum() == 0 and grad[2:].abs().sum() > 0
    assert stats["masked_fraction"] == pytest.approx(float(batch["mask"][0].sum() / batch["mask"].sum()))


@pytest.mark.parametrize("eps_low", [None, 0.1])
def test_cispo_matches_the_loop_and_keeps_every_gradient(eps_low):
    batch = make_batch(6, staleness=0.6)
    loss, grad, stats = run(cispo_loss, batch, eps_low=eps_low, eps_high=0.3)
    check(loss, grad, ref_cispo(batch, eps_low, 0.3))
    assert stats["clip_fraction"] == 0.0 and stats["weight_clip_fraction"] > 0
    nonzero_adv = batch["mask"].bool() & (batch["advantages"][:, None] != 0)
    assert (grad[nonzero_adv] != 0).all()
    token_adv = torch.randn(N, T, dtype=torch.float64)
    loss, grad, _ = run(cispo_loss, dict(batch, advantages=token_adv), eps_low=eps_low, eps_high=0.3)
    check(loss, grad, ref_cispo(batch, eps_low, 0.3, token_adv=token_adv.tolist()))


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.05)])
def test_gspo_matches_the_loop(eps):
    batch = make_batch(7, staleness=0.1)
    loss, grad, stats = run(gspo_loss, batch, eps_low=eps[0], eps_high=eps[1])
    check(loss, grad, ref_gspo(batch, *eps))
    token_adv = torch.randn(N, T, dtype=torch.float64)
    loss, grad, _ = run(gspo_token_loss, dict(batch, advantages=token_adv), eps_low=eps[0], eps_high=eps[1])
    check(loss, grad, ref_gspo_token(batch, token_adv.tolist(), *eps))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_equals_gspo_with_constant_advantages(seed):
    batch = make_batch(seed, staleness=0.05)
    for eps in ((3e-4, 4e-4), (0.02, 0.03)):
        loss_a, grad_a, stats_a = run(gspo_loss, batch, eps_low=eps[0], eps_high=eps[1])
        loss_b, grad_b, stats_b = run(gspo_token_loss, batch, eps_low=eps[0], eps_high=eps[1])
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(grad_a, grad_b, rtol=1e-12, atol=1e-15)
        assert stats_a["clip_fraction"] == stats_b["clip_fraction"]


def test_router_shift_matches_the_loop():
    g = torch.Generator().manual_seed(0)
    n, t, layers, experts, k = 2, 3, 2, 5, 2
    old = torch.log_softmax(torch.randn(n, t, layers, experts, generator=g, dtype=torch.float64), -1)
    new = torch.log_softmax(old + 0.3 * torch.randn(n, t, layers, experts, generator=g, dtype=torch.float64), -1)
    ids = torch.topk(old, k, dim=-1).indices
    delta = router_shift(old, new, ids)
    o, nw, e = old.tolist(), new.tolist(), ids.tolist()
    for i in range(n):
        for j in range(t):
            d = sum(abs(nw[i][j][l][x] - o[i][j][l][x]) for l in range(layers) for x in e[i][j][l]) / (layers * k)
            assert math.isclose(float(delta[i, j]), d, rel_tol=1e-12)
    with pytest.raises(ValueError, match="old_expert_ids has shape"):
        router_shift(old, new, ids[..., :1, :])
    with pytest.raises(ValueError, match="out of range"):
        router_shift(old, new, ids + experts)


@pytest.mark.parametrize("gamma_min", [0.8, 0.95])
def test_rspo_matches_the_loop(gamma_min):
    batch = make_batch(8, staleness=0.2)
    delta = torch.rand(N, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3
    loss, grad, stats = run(rspo_loss, batch, router_shift=delta, gamma_min=gamma_min)
    from reference_impl.objectives import _RSPO_EPS_HIGH, _RSPO_EPS_LOW

    check(loss, grad, ref_rspo(batch, delta, gamma_min, _RSPO_EPS_LOW, _RSPO_EPS_HIGH))
    check(*run(rspo_loss, batch, router_shift=delta, gamma_min=gamma_min, eps_low=0.05, eps_high=0.05)[:2],
          ref_rspo(batch, delta, gamma_min, 0.05, 0.05))
    assert 0 < stats["gamma_floor_fraction"] < 1


def test_rspo_without_router_shift_is_clipped_geometric_mean():
    """Δ = 0 gives γ̃ = 1: RSPO reduces to token-clipped geometric-mean aggregation."""
    batch = make_batch(9, staleness=0.02)
    loss, grad, _ = run(rspo_loss, batch, router_shift=torch.zeros(N, T, dtype=torch.float64))
    check(loss, grad, ref_gspo(batch, 1.0, 1.0))  # nothing clipped at this staleness: plain s_i Â_i


# ------------------------------------------------------------------- MiniRL semantics
def test_minirl_gradient_without_tis_is_clip_masked_is_weighted_score():
    """tis_cap=None: ∇loss = −Σ_t M_t (π_θ/μ_old) Â ∇log π_θ / normalizer."""
    batch = make_batch(10)
    _, grad, _ = run(minirl_loss, batch, tis_cap=None, normalizer=2.5)
    lp, old, mu, adv, mask = (batch[k] for k in ("logp", "old_logp", "rollout_logp", "advantages", "mask"))
    r = torch.exp(lp - old)
    a = adv[:, None]
    m = ~(((a > 0) & (r > 1.27)) | ((a < 0) & (r < 0.8)))
    expected = -(m * torch.exp(lp - mu) * a * mask) / 2.5
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_minirl_on_policy_reduces_to_train_infer_weighted_reinforce():
    batch = make_batch(11)
    batch["logp"] = batch["old_logp"].clone()
    loss, grad, stats = run(minirl_loss, batch, tis_cap=None)
    old, mu, adv, mask = (batch[k] for k in ("old_logp", "rollout_logp", "advantages", "mask"))
    weight = torch.exp(old - mu) * mask
    expected_loss = -(weight * adv[:, None] * old).sum() / N
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, -(weight * adv[:, None]) / N, rtol=1e-12, atol=1e-15)
    assert stats["clip_fraction"] == 0.0


def test_tis_modes_truncate_what_they_document():
    """token_weight truncates π/μ; discrepancy truncates only π_old/μ and keeps the staleness factor."""
    ln = math.log
    # token a: π_old/μ = 8, r = 0.5 → π/μ = 4;  b: π_old/μ = 2, r = 1.2;  c: π_old/μ = 4.5, r = 1.2 → π/μ = 5.4
    old = torch.tensor([[-3.0, -3.0, -3.0]], dtype=torch.float64)
    mu = old - torch.tensor([[ln(8), ln(2), ln(4.5)]], dtype=torch.float64)
    lp = old + torch.tensor([[ln(0.5), ln(1.2), ln(1.2)]], dtype=torch.float64)
    batch = dict(logp=lp, old_logp=old, rollout_logp=mu, advantages=torch.tensor([1.0], dtype=torch.float64),
                 mask=torch.ones(1, 3, dtype=torch.float64))
    _, g_tok, s_tok = run(minirl_loss, batch, tis_cap=5.0, tis_mode="token_weight")
    _, g_dis, s_dis = run(minirl_loss, batch, tis_cap=5.0, tis_mode="discrepancy")
    _, g_none, _ = run(minirl_loss, batch, tis_cap=None)
    torch.testing.assert_close(-g_tok, torch.tensor([[4.0, 2.4, 5.0]], dtype=torch.float64))
    torch.testing.assert_close(-g_dis, torch.tensor([[5 * 0.5, 2.4, 5.4]], dtype=torch.float64))
    torch.testing.assert_close(-g_none, torch.tensor([[4.0, 2.4, 5.4]], dtype=torch.float64))
    assert s_tok["tis_fraction"] == pytest.approx(1 / 3) and s_dis["tis_fraction"] == pytest.approx(1 / 3)


def test_tis_modes_agree_when_nothing_is_truncated():
    batch = make_batch(12, mismatch=0.05)
    _, g_tok, _ = run(minirl_loss, batch, tis_cap=5.0, tis_mode="token_weight")
    _, g_dis, _ = run(minirl_loss, batch, tis_cap=5.0, tis_mode="discrepancy")
    torch.testing.assert_close(g_tok, g_dis, rtol=1e-12, atol=1e-15)


def test_minirl_length_norm_divides_each_response_by_its_length():
    batch = make_batch(13)
    _, g_plain, _ = run(minirl_loss, batch)
    _, g_norm, _ = run(minirl_loss, batch, length_norm=True)
    lengths = batch["mask"].sum(1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(g_norm, g_plain / lengths, rtol=1e-12, atol=1e-15)


def test_minirl_without_train_infer_is_drops_the_discrepancy_factor():
    batch = make_batch(14, mismatch=1.0)
    batch["logp"] = batch["old_logp"].clone()  # on-policy: weight 1, plain Â · log π
    _, grad, _ = run(minirl_loss, batch, train_infer_is=False)
    torch.testing.assert_close(grad, -(batch["advantages"][:, None] * batch["mask"]) / N)
    batch = make_batch(14, mismatch=1.0)  # off-policy: weight r_t (staleness only), still clip-masked
    _, grad, _ = run(minirl_loss, batch, train_infer_is=False)
    check(*run(minirl_loss, batch, train_infer_is=False)[:2], ref_minirl(batch, train_infer_is=False))
    _, grad_is, _ = run(minirl_loss, batch)
    assert not torch.allclose(grad, grad_is)


def test_token_objective_is_first_order_approximation_of_sequence_objective():
    """Eq. 1 vs Eq. 3 of arXiv 2512.01374: same gradient at π = μ; the gap grows with the mismatch."""
    g = torch.Generator().manual_seed(0)
    n, t, vocab = 8, 12, 10
    logits = torch.randn(n, t, vocab, generator=g, dtype=torch.float64)
    tokens = torch.randint(vocab, (n, t), generator=g)
    noise = torch.randn(n, t, vocab, generator=g, dtype=torch.float64)
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.ones(n, t, dtype=torch.float64)

    def logp_of(x):
        return torch.log_softmax(x, -1).gather(-1, tokens[..., None]).squeeze(-1)

    gaps = []
    for sigma in (0.0, 0.05, 0.1, 0.2):
        logp = logp_of(logits).requires_grad_(True)  # θ = θ_old
        mu = logp_of(logits + sigma * noise)
        (g_seq,) = torch.autograd.grad(sequence_level_objective(logp, mu, rewards, mask), logp)
        (g_tok,) = torch.autograd.grad(token_level_objective(logp, mu, rewards, mask), logp)
        gaps.append(float((g_seq - g_tok).norm() / g_tok.norm()))
    assert gaps[0] < 1e-12
    assert gaps[1] < gaps[2] < gaps[3], gaps


# ------------------------------------------------------------------------ bad input
ALL = sorted(OBJECTIVES)


def call(name, batch, **kw):
    if name == "rspo":
        kw.setdefault("router_shift", torch.zeros_like(batch["mask"], dtype=torch.float64))
    return compute_loss(name, batch["logp"], batch["old_logp"], batch["rollout_logp"], batch["advantages"],
                        batch["mask"], **kw)


@pytest.mark.parametrize("name", ALL)
def test_mismatched_shapes_are_named(name):
    batch = make_batch()
    bad = dict(batch, old_logp=batch["old_logp"][:, :-1])
    with pytest.raises(ValueError, match=r"old_logp has shape \(6, 6\) but mask has shape \(6, 7\)"):
        call(name, bad)
    with pytest.raises(ValueError, match=r"advantages has shape \(5,\)"):
        call(name, dict(batch, advantages=batch["advantages"][:5]))


@pytest.mark.parametrize("name", ALL)
def test_nan_or_inf_at_response_tokens_is_an_error(name):
    batch = make_batch()
    bad = dict(batch, rollout_logp=batch["rollout_logp"].clone())
    bad["rollout_logp"][0, 0] = float("nan")
    bad["rollout_logp"][2, 0] = float("-inf")
    if name in ("grpo", "dr_grpo", "dapo", "cispo", "gspo", "gspo_token", "rspo"):
        bad = dict(bad, old_logp=bad.pop("rollout_logp"), rollout_logp=None)
        tensor = "old_logp"
    else:
        tensor = "rollout_logp"
    with pytest.raises(ValueError, match=rf"{tensor} has 2 NaN/inf value\(s\) at response tokens"):
        call(name, bad)


@pytest.mark.parametrize("name", ALL)
def test_nan_in_padding_is_ignored(name):
    batch = make_batch()
    pad = batch["mask"] == 0
    for key in ("logp", "old_logp", "rollout_logp"):
        batch[key] = batch[key].masked_fill(pad, float("nan"))
    logp = batch["logp"].clone().requires_grad_(True)
    loss, stats = call(name, dict(batch, logp=logp))
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[pad] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_positive_log_probs_are_rejected(name):
    batch = make_batch()
    batch["logp"] = batch["logp"].clone()
    batch["logp"][0, 0] = 0.5
    with pytest.raises(ValueError, match=r"logp has 1 positive log-prob"):
        call(name, batch)


@pytest.mark.parametrize("name", ALL)
def test_empty_response_contributes_nothing(name):
    batch = make_batch()  # response 1 is empty
    logp = batch["logp"].clone().requires_grad_(True)
    loss, stats = call(name, dict(batch, logp=logp))
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and (grad[1] == 0).all() and grad.abs().sum() > 0
    assert all(math.isfinite(v) for v in stats.values())
    # the empty response's advantage does not matter
    other = dict(batch, advantages=batch["advantages"].clone())
    other["advantages"][1] = 123.0
    assert call(name, other)[0].item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_batch_without_response_tokens_is_an_error(name):
    batch = make_batch()
    with pytest.raises(ValueError, match="no response token"):
        call(name, dict(batch, mask=torch.zeros_like(batch["mask"])))


def test_bool_and_float_masks_agree_and_other_values_are_rejected():
    batch = make_batch()
    a = call("minirl", batch)[0]
    b = call("minirl", dict(batch, mask=batch["mask"].bool()))[0]
    assert float(a) == float(b)
    with pytest.raises(ValueError, match="only 0 and 1"):
        call("minirl", dict(batch, mask=batch["mask"] * 0.5))


def test_per_token_advantages_only_where_the_paper_allows_them():
    batch = make_batch()
    token_adv = batch["advantages"][:, None].expand(N, T).contiguous()
    for name in ("cispo", "gspo_token"):
        a, b = call(name, batch)[0], call(name, dict(batch, advantages=token_adv))[0]
        assert float(a) == pytest.approx(float(b), rel=1e-12)
    with pytest.raises(ValueError, match=r"expected \[6\]"):
        call("minirl", dict(batch, advantages=token_adv))


def test_low_precision_inputs_are_computed_in_float32():
    batch = {k: (v.to(torch.bfloat16) if k != "advantages" else v.float()) for k, v in make_batch().items()}
    logp = batch["logp"].clone().requires_grad_(True)
    loss, _ = call("minirl", dict(batch, logp=logp))
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16


def test_registry_is_uniform_and_unknown_names_are_rejected():
    assert set(OBJECTIVES) == {"minirl", "grpo", "dr_grpo", "dapo", "cispo", "gspo", "gspo_token", "rspo",
                               "icepop", "seq_tis", "seq_mis"}
    batch = make_batch()
    for name in OBJECTIVES:
        loss, stats = call(name, batch)
        assert loss.dim() == 0
        for key in ("clip_fraction", "masked_fraction", "is_weight_p50", "is_weight_p99", "is_weight_max"):
            assert isinstance(stats[key], float), (name, key)
        if name not in ("grpo", "dr_grpo", "dapo", "cispo", "gspo", "gspo_token", "rspo"):
            assert "train_infer_ratio_mean" in stats
    with pytest.raises(ValueError, match="unknown objective 'ppo'"):
        compute_loss("ppo", *(batch[k] for k in ("logp", "old_logp", "rollout_logp", "advantages", "mask")))


def test_icepop_masks_tokens_outside_the_band():
    batch = make_batch(15, mismatch=1.0)
    _, grad, stats = run(icepop_loss, batch)
    k = torch.exp(batch["old_logp"] - batch["rollout_logp"])
    outside = ((k < 0.5) | (k > 5.0)) & batch["mask"].bool()
    assert outside.any() and (grad[outside] == 0).all()
    assert stats["masked_fraction"] == pytest.approx(float(outside.sum() / batch["mask"].sum()))


def test_is_weight_quantiles_describe_the_untruncated_weight():
    batch = make_batch(16, mismatch=1.0)
    _, _, stats = run(minirl_loss, batch, tis_cap=1.5)
    w = torch.exp(batch["logp"] - batch["rollout_logp"])[batch["mask"].bool()]
    assert stats["is_weight_max"] == pytest.approx(float(w.max()))
    assert stats["is_weight_p50"] == pytest.approx(float(w.median()), rel=0.2)
    assert stats["tis_fraction"] == pytest.approx(float((w > 1.5).float().mean()))


# -------------------------------------------------------------------------- advantages
def test_group_advantages_subtract_the_group_mean():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, ids)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, -0.25]))
    std0 = math.sqrt(sum((r - 0.5) ** 2 for r in (1, 0, 0, 1)) / 3)
    std1 = math.sqrt(2 * 0.25**2 / 1)
    normed = group_advantages(rewards, ids, normalize_std=True, eps=0.0)
    torch.testing.assert_close(normed, torch.tensor([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0,
                                                     0.25 / std1, -0.25 / std1]))


def test_groups_with_identical_rewards_get_exactly_zero_advantage():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7])
    ids = [3, 3, 3, 8, 8, 9]  # group 9 is a single response
    for normalize_std in (False, True):
        adv = group_advantages(rewards, ids, normalize_std=normalize_std)
        assert (adv[:3] == 0).all() and adv[5] == 0 and adv[3] > 0 > adv[4]
    batch = make_batch()
    batch["advantages"] = torch.zeros(N, dtype=torch.float64)
    for name in ALL:
        logp = batch["logp"].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(call(name, dict(batch, logp=logp))[0], logp)
        assert (grad == 0).all(), name


def test_group_advantages_validate_lengths():
    with pytest.raises(ValueError, match="one group id per reward"):
        group_advantages(torch.zeros(4), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN/inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), [0, 0])

"""Our objectives against line-by-line transcriptions of verl's and slime's losses.

Each ``verl_*`` / ``slime_*`` function below transcribes, in our own words and tensor layout
(``[n, T]`` with a 0/1 mask instead of slime's concatenated per-sample tensors), the loss code of
one framework commit:

* verl ``VERL_COMMIT``: ``verl/trainer/ppo/core_algos.py`` (``agg_loss``,
  ``compute_policy_loss_vanilla``, ``compute_policy_loss_gspo``, ``compute_policy_loss_cispo``,
  ``compute_grpo_outcome_advantage``) and ``verl/trainer/ppo/rollout_corr_helper.py``
  (``compute_rollout_correction_weights``, ``compute_rollout_rejection_mask``);
* slime ``SLIME_COMMIT``: ``slime/utils/ppo_utils.py`` (``compute_policy_loss``,
  ``compute_cispo_loss``, ``compute_gspo_kl``), ``slime/backends/megatron_utils/loss.py``
  (``policy_loss_function``, ``vanilla_tis_function``, ``icepop_function``, the final
  ``× num_microbatches / step_global_batch_size`` scaling), ``.../cp_utils.py``
  (``get_sum_of_sample_mean``) and ``slime/ray/rollout.py`` (``_post_process_rewards``).

Every test names the framework setting of one row of the mapping table in docs_en/frameworks.md
("Which framework settings compute our losses") and asserts that our function gives the same loss
and the same gradient, or, for a documented convention difference, exactly the stated relation.
Data parallelism is 1 (verl's ``dp_size``; slime's DP world size and one micro-batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from reference_impl.objectives import (
    cispo_loss,
    dapo_loss,
    dr_grpo_loss,
    grpo_loss,
    group_advantages,
    gspo_loss,
    icepop_loss,
    seq_mis_loss,
    seq_tis_loss,
)

VERL_COMMIT = "b178a3cd56f58b2d502255daba591e92833930a7"  # volcengine/verl, 2026-01-29
SLIME_COMMIT = "624b824a898ab0ec1fcb4d373004c7f3852bf515"  # THUDM/slime, 2026-08-21
VERL_SAFETY_BOUND = 20.0  # rollout_corr_helper.SAFETY_BOUND


# ------------------------------------------------------------------------------ verl
def verl_agg_loss(loss_mat, mask, mode, loss_scale_factor=None):
    """core_algos.agg_loss with dp_size = 1 and no global batch info."""
    if mode == "token-mean":
        return (loss_mat * mask).sum() / mask.sum()
    if mode == "seq-mean-token-sum":
        seq = (loss_mat * mask).sum(-1)
        nonempty = (mask.sum(-1) > 0).to(loss_mat.dtype)
        return (seq * nonempty).sum() / nonempty.sum()
    if mode == "seq-mean-token-mean":
        count = mask.sum(-1)
        seq = (loss_mat * mask).sum(-1) / (count + 1e-8)
        nonempty = (count > 0).to(loss_mat.dtype)
        return (seq * nonempty).sum() / nonempty.sum()
    if mode == "seq-mean-token-sum-norm":
        scale = mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return (loss_mat * mask).sum(-1).sum() / scale
    raise ValueError(mode)


def verl_vanilla(old_logp, logp, adv, mask, mode, clip_low, clip_high, clip_c=3.0, rollout_is_weights=None):
    """compute_policy_loss_vanilla: log-ratio clamp ±20, clip, dual-clip for Â < 0 (clip_ratio_c, default 3)."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    loss1 = -adv * ratio
    loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(loss1, loss2)
    dual = torch.minimum(-adv * clip_c, clipped)
    pg = torch.where(adv < 0, dual, clipped)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    return verl_agg_loss(pg, mask, mode)


def verl_gspo(old_logp, logp, adv, mask, clip_low, clip_high):
    """compute_policy_loss_gspo: s_i,t = sg[s_i]·π/sg[π], log clamped at 10, always seq-mean-token-mean."""
    lengths = mask.sum(-1).clamp(min=1)
    log_s = ((logp - old_logp) * mask).sum(-1) / lengths
    log_st = torch.clamp(logp - logp.detach() + log_s.detach()[:, None], max=10.0)
    s = torch.exp(log_st)
    pg = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - clip_low, 1 + clip_high))
    return verl_agg_loss(pg, mask, "seq-mean-token-mean")


def verl_cispo(old_logp, logp, adv, mask, mode, clip_low, clip_high):
    """compute_policy_loss_cispo: −sg[clip(r, 1 − low, 1 + high)] Â log π, log-ratio clamp ±20."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    pg = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high).detach() * adv * logp
    return verl_agg_loss(pg, mask, mode)


def verl_rollout_is_weights(old_logp, rollout_logp, mask, level, threshold):
    """compute_rollout_correction_weights (no batch normalisation): truncated, detached π_old/μ."""
    log_ratio = old_logp - rollout_logp
    if level == "token":
        w = torch.exp(torch.clamp(log_ratio, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND))
    else:
        total = (log_ratio * mask).sum(-1, keepdim=True)
        w = torch.exp(torch.clamp(total, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)).expand_as(log_ratio)
    return (w * mask).clamp(max=threshold).detach()


def verl_rs_seq_sum_k1(old_logp, rollout_logp, mask, lower, upper):
    """compute_rollout_rejection_mask for rollout_rs="seq_sum_k1", threshold "lower_upper": the new mask."""
    log_ratio = torch.clamp(old_logp - rollout_logp, -VERL_SAFETY_BOUND, VERL_SAFETY_BOUND)
    seq_stat = (-log_ratio * mask).sum(-1)
    keep = (seq_stat >= math.log(lower)) & (seq_stat <= math.log(upper))
    return mask * keep[:, None].to(mask.dtype)


def verl_grpo_advantage(scores, index, epsilon=1e-6, norm_adv_by_std=True):
    """compute_grpo_outcome_advantage: a singleton group gets mean 0 and std 1."""
    out = scores.clone()
    for g in set(index):
        members = [i for i, j in enumerate(index) if j == g]
        group = scores[members]
        mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if len(members) == 1 else (group.mean(), group.std())
        for i in members:
            out[i] = (scores[i] - mean) / (std + epsilon) if norm_adv_by_std else scores[i] - mean
    return out


# ----------------------------------------------------------------------------- slime
def slime_policy_loss(old_logp, logp, adv, eps_clip, eps_clip_high, eps_clip_c=None):
    """ppo_utils.compute_policy_loss on ppo_kl = old − new (per token)."""
    ratio = torch.exp(-(old_logp - logp))
    loss1 = -ratio * adv
    loss2 = -ratio.clamp(1 - eps_clip, 1 + eps_clip_high) * adv
    clipped = torch.maximum(loss1, loss2)
    if eps_clip_c is None:
        return clipped
    return torch.where(adv < 0, torch.minimum(-eps_clip_c * adv, clipped), clipped)


def slime_reduce(pg, mask, per_token_loss):
    """get_sum_of_sample_mean (one sample per rollout: denominator |y_i|) or sum_of_token, then the
    final scaling: × num_microbatches / step_global_batch_size (= 1/n with one micro-batch) by
    default, or Megatron's division by the number of tokens with --calculate-per-token-loss."""
    if per_token_loss:
        return (pg * mask).sum() / mask.sum(-1).clamp(min=1).sum()
    per_sample = (pg * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_sample.sum() / mask.shape[0]


def slime_gspo_ratio_kl(old_logp, logp, mask):
    """ppo_utils.compute_gspo_kl: the sequence mean of old − new, expanded to every token."""
    kl = ((old_logp - logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return kl[:, None].expand_as(logp)


def slime_rewards(raw, n_samples_per_prompt, std_normalization=True):
    """rollout._post_process_rewards for grpo/gspo/cispo (std normalisation is switched off by
    slime when n_samples_per_prompt == 1)."""
    r = raw.reshape(-1, n_samples_per_prompt)
    r = r - r.mean(-1, keepdim=True)
    if std_normalization and n_samples_per_prompt > 1:
        r = r / (r.std(-1, keepdim=True) + 1e-6)
    return r.flatten()


# ------------------------------------------------------------------------------ data
def batch(seed=0, n=6, T=7, spread=0.3, empty=False):
    """Log-probs (float64), a ragged mask, per-response advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(n, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = (rollout + spread * torch.randn(n, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    logp = (old + spread * torch.randn(n, T, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    lengths = torch.randint(2, T + 1, (n,), generator=g)
    if empty:
        lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, old, rollout, adv, mask


def values_and_grads(loss_fn, logp):
    """Loss value and d loss / d logp for a loss built from a fresh leaf copy of ``logp``."""
    leaf = logp.clone().requires_grad_(True)
    loss = loss_fn(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


def assert_same(ours_fn, theirs_fn, logp, mask, scale=1.0):
    """ours · scale == theirs, in value and in gradient at response tokens (rtol 1e-7 leaves room
    for verl's + 1e-8 in the seq-mean-token-mean denominator, nothing more)."""
    ours, g_ours = values_and_grads(ours_fn, logp)
    theirs, g_theirs = values_and_grads(theirs_fn, logp)
    assert theirs.abs() > 1e-3  # a loss that could differ
    torch.testing.assert_close(ours * scale, theirs, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(g_ours * mask * scale, g_theirs * mask, rtol=1e-7, atol=1e-12)


def tok(adv, mask):
    """Per-response advantages broadcast over tokens, as verl and slime store them."""
    return adv[:, None] * mask


# ------------------------------------------------------------------------------ rows
def test_grpo_equals_verl_seq_mean_token_mean_and_slime_default():
    """grpo_loss(eps=0.2) = verl policy_loss=vanilla, loss_agg_mode=seq-mean-token-mean, clip_ratio=0.2
    = slime --advantage-estimator grpo --eps-clip 0.2 (per-sample mean, the default reducer)."""
    logp, old, rollout, adv, mask = batch()
    assert torch.exp(logp - old).max() < 3.0  # verl's dual clip (c = 3) inactive on this batch
    ours = lambda lp: grpo_loss(lp, old, rollout, adv, mask, eps=0.2)[0]  # noqa: E731
    assert_same(ours, lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "seq-mean-token-mean", 0.2, 0.2), logp, mask)
    assert_same(ours, lambda lp: slime_reduce(slime_policy_loss(old, lp, tok(adv, mask), 0.2, 0.2), mask, False), logp, mask)


def test_dapo_equals_verl_token_mean_and_slime_per_token_loss():
    """dapo_loss(0.2, 0.28) = verl vanilla, token-mean, clip_ratio_low=0.2, clip_ratio_high=0.28
    = slime --eps-clip 0.2 --eps-clip-high 0.28 --calculate-per-token-loss."""
    logp, old, rollout, adv, mask = batch(seed=1)
    ours = lambda lp: dapo_loss(lp, old, rollout, adv, mask, eps_low=0.2, eps_high=0.28)[0]  # noqa: E731
    assert_same(ours, lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "token-mean", 0.2, 0.28), logp, mask)
    assert_same(ours, lambda lp: slime_reduce(slime_policy_loss(old, lp, tok(adv, mask), 0.2, 0.28), mask, True), logp, mask)


@pytest.mark.parametrize("max_len", [7, 16])
def test_dr_grpo_is_verl_seq_mean_token_sum_norm_divided_by_n(max_len):
    """verl's seq-mean-token-sum-norm divides Σ_i Σ_t by loss_scale_factor only (default: the padded
    width T), not by the number of responses: verl = n · dr_grpo_loss(max_len = loss_scale_factor)."""
    logp, old, rollout, adv, mask = batch(seed=2)
    n = mask.shape[0]
    ours = lambda lp: dr_grpo_loss(lp, old, rollout, adv, mask, eps=0.2, max_len=max_len)[0]  # noqa: E731
    theirs = lambda lp: verl_agg_loss(  # noqa: E731
        _verl_vanilla_matrix(old, lp, tok(adv, mask), 0.2, 0.2), mask, "seq-mean-token-sum-norm", loss_scale_factor=max_len
    )
    assert_same(ours, theirs, logp, mask, scale=n)


def _verl_vanilla_matrix(old_logp, logp, adv, clip_low, clip_high, clip_c=3.0):
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    clipped = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    return torch.where(adv < 0, torch.minimum(-adv * clip_c, clipped), clipped)


def test_seq_mean_token_sum_is_dr_grpo_with_unit_max_len():
    """verl seq-mean-token-sum = Σ_i Σ_t / n = dr_grpo_loss(max_len=1) when no response is empty."""
    logp, old, rollout, adv, mask = batch(seed=3)
    ours = lambda lp: dr_grpo_loss(lp, old, rollout, adv, mask, eps=0.2, max_len=1)[0]  # noqa: E731
    assert_same(ours, lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "seq-mean-token-sum", 0.2, 0.2), logp, mask)


def test_empty_responses_verl_seq_means_divide_by_non_empty_responses():
    """verl's seq-mean modes divide by the non-empty responses; ours by all n (an empty one counts)."""
    logp, old, rollout, adv, mask = batch(seed=4, empty=True)
    n, nonempty = mask.shape[0], int((mask.sum(-1) > 0).sum())
    assert nonempty == n - 1
    ours = lambda lp: grpo_loss(lp, old, rollout, adv, mask, eps=0.2)[0]  # noqa: E731
    theirs = lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "seq-mean-token-mean", 0.2, 0.2)  # noqa: E731
    assert_same(ours, theirs, logp, mask, scale=n / nonempty)


def test_verl_dual_clip_default_caps_negative_advantage_tokens_and_ours_does_not():
    """verl applies dual clip (clip_ratio_c = 3) by default: for Â < 0 and r > 3 the token's loss is
    −3Â, a constant with no gradient. Our objectives (and slime without --eps-clip-c) keep r·Â.
    With slime --eps-clip-c 3, slime equals verl."""
    logp, old, rollout, adv, mask = batch(seed=5)
    adv = adv.abs()
    adv[0] = -1.0
    logp = logp.clone()
    logp[0, 0] = old[0, 0] + math.log(4.0)  # r = 4 > 3 on a negative-advantage token
    ours = lambda lp: grpo_loss(lp, old, rollout, adv, mask, eps=0.2)[0]  # noqa: E731
    verl = lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "seq-mean-token-mean", 0.2, 0.2)  # noqa: E731
    slime_c = lambda lp: slime_reduce(  # noqa: E731
        slime_policy_loss(old, lp, tok(adv, mask), 0.2, 0.2, eps_clip_c=3.0), mask, False
    )
    v_ours, g_ours = values_and_grads(ours, logp)
    v_verl, g_verl = values_and_grads(verl, logp)
    n, len0 = mask.shape[0], mask[0].sum()
    # the capped token contributes (−3Â)/|y_0|/n to verl's loss and (−4Â)/|y_0|/n to ours
    torch.testing.assert_close(v_ours - v_verl, torch.tensor(-(4.0 - 3.0) * -1.0 / len0.item() / n, dtype=v_ours.dtype))
    assert g_verl[0, 0] == 0 and g_ours[0, 0] != 0
    assert_same(verl, slime_c, logp, mask)


def test_verl_clamps_the_log_ratio_at_20():
    """verl clamps log(π/π_old) to [−20, 20] before exp (vanilla, CISPO); we do not."""
    logp, old, rollout, adv, mask = batch(seed=6)
    adv = adv.abs()  # Â > 0: a huge ratio is clipped at 1 + ε either way
    logp = logp.clone()
    old = old.clone()
    old[0, 0] = logp[0, 0] - 25.0
    v_ours, _ = values_and_grads(lambda lp: grpo_loss(lp, old, rollout, adv, mask, eps=0.2)[0], logp)
    v_verl, _ = values_and_grads(
        lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "seq-mean-token-mean", 0.2, 0.2), logp
    )
    torch.testing.assert_close(v_ours, v_verl)  # clipped: same value despite the clamp


def test_gspo_equals_verl_gspo_and_slime_gspo():
    """gspo_loss(3e-4, 4e-4) = verl policy_loss=gspo (seq-mean-token-mean forced), clip_ratio_low=3e-4,
    clip_ratio_high=4e-4 = slime --advantage-estimator gspo --eps-clip 3e-4 --eps-clip-high 4e-4."""
    logp, old, rollout, adv, mask = batch(seed=7, spread=3e-4)
    ours = lambda lp: gspo_loss(lp, old, rollout, adv, mask, eps_low=3e-4, eps_high=4e-4)[0]  # noqa: E731
    assert_same(ours, lambda lp: verl_gspo(old, lp, tok(adv, mask), mask, 3e-4, 4e-4), logp, mask)
    slime = lambda lp: slime_reduce(  # noqa: E731
        slime_policy_loss(slime_gspo_ratio_kl(old, lp, mask), torch.zeros_like(lp), tok(adv, mask), 3e-4, 4e-4), mask, False
    )
    assert_same(ours, slime, logp, mask)


def test_cispo_equals_verl_cispo_and_slime_cispo_per_token():
    """cispo_loss(eps_low=None, eps_high=4) = verl policy_loss=cispo, token-mean, clip_ratio_low=1.0
    (lower bound 0: none), clip_ratio_high=4.0 = slime --advantage-estimator cispo --eps-clip 1.0
    --eps-clip-high 4.0 --calculate-per-token-loss."""
    logp, old, rollout, adv, mask = batch(seed=8, spread=1.5)
    assert torch.exp(logp - old).max() > 5.0  # some weights are clipped at 1 + ε_high
    ours = lambda lp: cispo_loss(lp, old, rollout, adv, mask, eps_low=None, eps_high=4.0)[0]  # noqa: E731
    assert_same(ours, lambda lp: verl_cispo(old, lp, tok(adv, mask), mask, "token-mean", 1.0, 4.0), logp, mask)
    slime = lambda lp: slime_reduce(  # noqa: E731
        -torch.clamp(torch.exp(lp - old), 0.0, 5.0).detach() * tok(adv, mask) * lp, mask, True
    )
    assert_same(ours, slime, logp, mask)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_seq_tis_equals_verl_rollout_correction_is(level):
    """seq_tis_loss(tis_cap=2, level) = verl vanilla token-mean + algorithm.rollout_correction
    rollout_is=<level>, rollout_is_threshold=2.0 (decoupled mode; dual clip inactive here)."""
    logp, old, rollout, adv, mask = batch(seed=9, spread=0.4)
    rollout = rollout.clone()
    rollout[0, :2] -= 1.0  # response 0: the engine gave its first tokens far less probability
    weights = verl_rollout_is_weights(old, rollout, mask, level, 2.0)
    assert (weights == 2.0).any() and ((weights < 2.0) & (mask > 0)).any()  # the cap binds on some, not all
    ours = lambda lp: seq_tis_loss(lp, old, rollout, adv, mask, tis_cap=2.0, level=level)[0]  # noqa: E731
    theirs = lambda lp: verl_vanilla(old, lp, tok(adv, mask), mask, "token-mean", 0.2, 0.2, rollout_is_weights=weights)  # noqa: E731
    assert_same(ours, theirs, logp, mask)


def test_token_tis_equals_slime_use_tis_per_token_loss():
    """seq_tis_loss(tis_cap=2, level="token") = slime --use-tis (tis_clip 2, tis_clip_low 0)
    --calculate-per-token-loss."""
    logp, old, rollout, adv, mask = batch(seed=10, spread=0.5)
    ours = lambda lp: seq_tis_loss(lp, old, rollout, adv, mask, tis_cap=2.0, level="token")[0]  # noqa: E731
    w = torch.clamp(torch.exp(old - rollout), min=0.0, max=2.0)
    slime = lambda lp: slime_reduce(slime_policy_loss(old, lp, tok(adv, mask), 0.2, 0.2) * w, mask, True)  # noqa: E731
    assert_same(ours, slime, logp, mask)


def test_seq_mis_is_verl_seq_is_rs_with_a_different_normaliser():
    """verl's Seq-MIS preset (rollout_is=sequence, threshold 2.0; rollout_rs=seq_sum_k1, "0.5_2.0")
    drops a rejected response from the token-mean's denominator; seq_mis_loss(mis_cap=2) keeps its
    tokens there: verl = ours · Σ_i |y_i| / Σ_kept |y_i|. (verl also rejects ρ < 0.5; none here.)"""
    logp, old, rollout, adv, mask = batch(seed=11, spread=0.05)
    rollout = rollout.clone()
    rollout[2, :2] -= 1.0  # response 2: ρ grows by e² to > 2, rejected by both
    rho = torch.exp(((old - rollout) * mask).sum(-1))
    assert rho[2] > 2 and ((rho > 0.5) & (rho <= 2)).sum() == mask.shape[0] - 1
    kept = verl_rs_seq_sum_k1(old, rollout, mask, 0.5, 2.0)
    weights = verl_rollout_is_weights(old, rollout, mask, "sequence", 2.0)
    ours = lambda lp: seq_mis_loss(lp, old, rollout, adv, mask, mis_cap=2.0)[0]  # noqa: E731
    theirs = lambda lp: verl_vanilla(old, lp, tok(adv, mask), kept, "token-mean", 0.2, 0.2, rollout_is_weights=weights)  # noqa: E731
    assert_same(ours, theirs, logp, mask, scale=float(mask.sum() / kept.sum()))


def test_icepop_equals_slime_icepop_function_default_reducer():
    """icepop_loss(α=0.5, β=5) = slime --use-tis --custom-tis-function-path
    slime.backends.megatron_utils.loss.icepop_function --tis-clip-low 0.5 --tis-clip 5 (per-sample mean)."""
    logp, old, rollout, adv, mask = batch(seed=12, spread=1.0)
    k = torch.exp(old - rollout)
    assert (((k < 0.5) | (k > 5)) & (mask > 0)).any()
    ours = lambda lp: icepop_loss(lp, old, rollout, adv, mask, alpha=0.5, beta=5.0)[0]  # noqa: E731
    w = torch.where((k >= 0.5) & (k <= 5.0), k, torch.zeros_like(k))
    slime = lambda lp: slime_reduce(slime_policy_loss(old, lp, tok(adv, mask), 0.2, 0.2) * w, mask, False)  # noqa: E731
    assert_same(ours, slime, logp, mask)


def test_grpo_advantages_match_verl_and_slime_except_singleton_groups():
    """group_advantages(normalize_std=True) = verl compute_grpo_outcome_advantage = slime's reward
    post-processing for groups of ≥ 2 responses; a singleton group gets 0 from us and from slime
    (which switches std normalisation off when n_samples_per_prompt = 1) but R/(1 + ε) from verl
    (mean 0, std 1)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    ids = [0, 0, 0, 0, 1, 1, 1, 1]
    ours = group_advantages(rewards, ids, normalize_std=True)
    torch.testing.assert_close(ours, verl_grpo_advantage(rewards, ids), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours, slime_rewards(rewards, 4), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        group_advantages(rewards, ids, normalize_std=False), verl_grpo_advantage(rewards, ids, norm_adv_by_std=False)
    )
    single = torch.tensor([0.7, 0.3], dtype=torch.float64)
    assert group_advantages(single, [0, 1], normalize_std=True).abs().max() == 0
    assert slime_rewards(single, 1).abs().max() == 0
    torch.testing.assert_close(verl_grpo_advantage(single, [0, 1]), single / (1 + 1e-6))


def test_every_row_of_the_docs_mapping_table_names_a_test_here():
    """docs_en/frameworks.md and docs_zh/frameworks.md, section loss-mapping: each named test exists."""
    import re
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    here = sys.modules[__name__]
    for page in ("docs_en/frameworks.md", "docs_zh/frameworks.md"):
        text = (root / page).read_text(encoding="utf-8")
        section = text.split("{ #loss-mapping }", 1)[1].split("\n## ", 1)[0]
        named = set(re.findall(r"`(test_[a-z0-9_]+)(?:\[[a-z]+\])?`", section))
        assert len(named) >= 12, page
        missing = sorted(n for n in named if not callable(getattr(here, n, None)))
        assert not missing, f"{page} names tests that do not exist: {missing}"

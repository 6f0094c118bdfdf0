"""GRPO's advantages, clipped loss and k3 KL against float64 references written from the papers' formulas.

The references loop over groups, sequences and tokens the way the formulas are written (DeepSeekMath eq. 3 and
its outcome-supervision advantage, DAPO's clip-higher and token-level sum, Dr. GRPO's advantage without the std,
Schulman's k3), in float64; the gradient reference is the same formula run through jax with x64 enabled for
that test only.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emoqwen_jax.rl.grpo import group_advantages, k3_kl, normalize_tokens, policy_loss


def ref_advantages(rewards, group_size, std_normalize, eps=1e-4):
    out = []
    for g in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[g:g + group_size]]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # unbiased, as TRL
        out += [(r - mean) / (std + eps) if std_normalize else r - mean for r in group]
    return np.array(out)


def ref_objective(xp, logp, old, adv, mask, clip_low, clip_high, beta, ref, normalization):
    """−J (to minimise) by the published formulas; ``xp`` is numpy or jax.numpy (for the gradient)."""
    rows = []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i][t]:
                continue
            ratio = xp.exp(logp[i, t] - old[i, t])
            surrogate = xp.minimum(ratio * adv[i], xp.clip(ratio, 1 - clip_low, 1 + clip_high) * adv[i])
            kl = ref[i, t] - logp[i, t]  # log(π_ref / π)
            k3 = xp.exp(kl) - kl - 1  # π_ref/π − log(π_ref/π) − 1
            terms.append(-(surrogate - beta * k3))
        rows.append(terms)
    if normalization == "sequence":  # 1/G Σ_i 1/|o_i| Σ_t (rows without tokens do not count)
        kept = [sum(r) / len(r) for r in rows if r]
        return sum(kept) / len(kept)
    flat = [x for r in rows for x in r]  # 1/Σ|o_i| Σ_i Σ_t
    return sum(flat) / len(flat)


def _case(seed, b=6, t=7, spread=0.3):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-1.5, 0.6, (b, t))
    old = logp + rng.normal(0, spread, (b, t))  # ratios on both sides of both clip bounds
    ref = logp + rng.normal(0, 0.4, (b, t))
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None] < lengths[:, None]  # right-padded completions of different lengths
    adv = rng.normal(0, 1, b)
    return logp, old, ref, mask, adv


@pytest.mark.parametrize("std_normalize", [True, False])
def test_advantages_equal_the_group_formula_and_all_equal_groups_give_zero(std_normalize):
    rewards = np.array([1, 0, 1, 1, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 2, 1, 1, 1, 1], np.float64)
    ours = np.asarray(group_advantages(jnp.asarray(rewards, jnp.float32), 4, std_normalize=std_normalize))
    want = ref_advantages(rewards, 4, std_normalize)
    assert np.max(np.abs(ours - want)) <= 1e-6 * np.max(np.abs(want))
    assert np.all(ours[4:8] == 0) and np.all(ours[12:] == 0)  # all-equal groups: no signal


def test_advantages_reject_a_group_of_one_and_uneven_groups():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(jnp.zeros(4), 1)
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(jnp.zeros(6), 4)


def test_k3_equals_its_formula_and_is_unbiased_for_kl():
    logp, _, ref, _, _ = _case(1)
    want = np.exp(ref - logp) - (ref - logp) - 1
    ours = np.asarray(k3_kl(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32)))
    assert np.max(np.abs(ours - want)) <= 1e-6 * np.max(np.abs(want)) and ours.min() >= 0
    # E_{x~p}[k3] = KL(p || q) for two categorical distributions (exact expectation, float64)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
    expectation = sum(pi * float(k3_kl(jnp.log(pi), jnp.log(qi))) for pi, qi in zip(p, q, strict=True))
    assert abs(expectation - np.sum(p * np.log(p / q))) <= 1e-5 * np.sum(p * np.log(p / q))


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("clip_high, beta", [(None, 0.0), (0.28, 0.0), (None, 0.04), (0.28, 0.1)])
def test_loss_equals_the_published_objective(normalization, clip_high, beta):
    logp, old, ref, mask, adv = _case(2)
    adv[2] = 0.0  # a member of an all-equal group
    mask[4] = False  # a filler row with no completion tokens
    def f32(x):
        return jnp.asarray(x, jnp.float32)
    loss, metrics = policy_loss(f32(logp), f32(old), f32(adv), jnp.asarray(mask), clip_eps=0.2,
                                clip_eps_high=clip_high, beta=beta, ref_logp=f32(ref) if beta else None,
                                normalization=normalization)
    want = ref_objective(np, logp, old, adv, mask, 0.2, 0.2 if clip_high is None else clip_high, beta, ref,
                         normalization)
    assert abs(float(loss) - want) <= 1e-5 * max(abs(want), 1e-3)
    ratio = np.exp(logp - old)
    high = 1 + (0.2 if clip_high is None else clip_high)
    clipped = ((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > high) & (adv[:, None] > 0))
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped[mask].mean(), abs=1e-6)
    assert 0 < clipped[mask].mean() < 1  # the case exercises both sides of the clip


def test_the_two_normalizations_differ_on_ragged_lengths_and_agree_on_equal_ones():
    x = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    ragged = jnp.asarray([[True, True, True, True], [True, False, False, False]])
    assert float(normalize_tokens(x, ragged, "sequence")) == pytest.approx(2.0)  # (1 + 3) / 2
    assert float(normalize_tokens(x, ragged, "token")) == pytest.approx(7 / 5)  # (4 + 3) / 5
    full = jnp.ones_like(ragged)
    assert float(normalize_tokens(x, full, "sequence")) == pytest.approx(float(normalize_tokens(x, full, "token")))
    with pytest.raises(ValueError, match="choose one of"):
        normalize_tokens(x, full, "mean")


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_gradient_equals_jax_grad_of_the_float64_reference(normalization):
    logp, old, ref, mask, adv = _case(3)
    kw = {"clip_eps": 0.2, "clip_eps_high": 0.28, "beta": 0.05, "normalization": normalization}
    def f32(x):
        return jnp.asarray(x, jnp.float32)
    ours = np.asarray(jax.grad(lambda lp: policy_loss(lp, f32(old), f32(adv), jnp.asarray(mask), ref_logp=f32(ref),
                                                      **kw)[0])(f32(logp)))
    with jax.enable_x64(True):
        def f64(x):
            return jnp.asarray(x, jnp.float64)
        want = np.asarray(jax.grad(lambda lp: ref_objective(jnp, lp, f64(old), f64(adv), mask, 0.2, 0.28, 0.05,
                                                            f64(ref), normalization))(f64(logp)))
    assert want.dtype == np.float64 and np.all(want[~mask] == 0)
    assert np.max(np.abs(ours - want)) <= 1e-5 * np.max(np.abs(want))
    # clipped tokens (ratio past the bound on the advantage's side) pass no policy gradient, only the KL's
    ratio = np.exp(logp - old)
    dead = mask & (((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.28) & (adv[:, None] > 0)))
    assert dead.any()


def test_beta_without_reference_is_an_error_and_beta_zero_needs_none():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(z, z, jnp.zeros(2), jnp.ones((2, 3), bool), clip_eps=0.2, beta=0.1)
    loss, metrics = policy_loss(z, z, jnp.ones(2), jnp.ones((2, 3), bool), clip_eps=0.2)
    assert float(loss) == -1.0 and float(metrics["kl"]) == 0.0  # ratio 1, A = 1: −A

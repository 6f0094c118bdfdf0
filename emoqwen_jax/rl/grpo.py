"""GRPO's arithmetic: group-normalised advantages, the clipped policy-ratio loss per token, the k3 KL estimator.

Notation (B rows = prompts × G completions, rows of one prompt adjacent; T token positions of a row):

  advantage    A_i = (r_i − mean(r_group)) / (std(r_group) + eps)        GRPO (DeepSeekMath, arXiv:2402.03300)
               A_i =  r_i − mean(r_group)                                Dr. GRPO (arXiv:2503.20783): no std
               std is the unbiased (n − 1) one, as TRL's GRPOTrainer (the trainer R1-Omni used) computes it;
               a group whose rewards are all equal has A = 0 for every member.
  ratio        ρ_t = exp(log π(o_t) − log π_old(o_t))
  policy term  L_t = −min(ρ_t A, clip(ρ_t, 1 − clip_eps, 1 + clip_eps_high) A)
               clip_eps_high = clip_eps unless set (DAPO, arXiv:2503.14476, "clip-higher": a larger upper bound)
  KL term      k3_t = exp(log π_ref − log π) − (log π_ref − log π) − 1    (Schulman, "Approximating KL
               divergence", 2020: unbiased for KL(π‖π_ref) under samples of π, and never negative)
  per token    ℓ_t = L_t + beta · k3_t            (beta = 0: no reference model at all)
  loss         'sequence': mean over each row's tokens, then mean over the rows that have tokens (GRPO)
               'token':    sum over every token of the batch / the number of tokens (DAPO)

Shapes: per-token arrays are float[B, T] with a mask bool[B, T] (False on prompt, padding and everything
after a completion's end); advantages are float[B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("sequence", "token")
ADVANTAGE_EPS = 1e-4  # added to the group std (TRL's value)


def group_advantages(rewards: jax.Array, group_size: int, *, std_normalize: bool = True,
                     eps: float = ADVANTAGE_EPS) -> jax.Array:
    """float[B] rewards (rows of a prompt's group adjacent, B = prompts × ``group_size``) -> float[B] advantages."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if std_normalize:
        centred = centred / (groups.std(axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Schulman's k3 estimate of KL(π‖π_ref) per sampled token: float[...] -> float[...] (>= 0)."""
    log_ratio = ref_logp - logp
    return jnp.exp(log_ratio) - log_ratio - 1.0


def normalize_tokens(per_token: jax.Array, mask: jax.Array, normalization: str) -> jax.Array:
    """float[B, T] -> scalar by ``normalization`` ('sequence' or 'token', module docstring)."""
    mask = mask.astype(per_token.dtype)
    summed = (per_token * mask).sum(axis=1)
    counts = mask.sum(axis=1)
    if normalization == "sequence":
        rows = (counts > 0).astype(per_token.dtype)
        return (summed / jnp.maximum(counts, 1.0)).sum() / jnp.maximum(rows.sum(), 1.0)
    if normalization == "token":
        return summed.sum() / jnp.maximum(counts.sum(), 1.0)
    raise ValueError(f"normalization={normalization!r}; choose one of {NORMALIZATIONS}")


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_eps: float, clip_eps_high: float | None = None, beta: float = 0.0,
                ref_logp: jax.Array | None = None, normalization: str = "sequence"
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO objective (to minimise) and its diagnostics.

    logp float[B, T]: log π of each completion token under the policy being trained (the gradient flows through
    it); old_logp float[B, T]: the same under the policy that sampled (recorded at sampling time);
    advantages float[B]; mask bool[B, T]; ref_logp float[B, T] (needed when beta > 0).
    Metrics (token means over the mask): ``kl`` (k3; 0 without a reference), ``clip_fraction`` (tokens whose
    ratio is clipped on the side that stops the gradient: ρ < 1 − ε with A < 0, or ρ > 1 + ε_high with A > 0),
    ``policy_loss`` (the clipped term alone, normalised as the loss)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; choose one of {NORMALIZATIONS}")
    if beta and ref_logp is None:
        raise ValueError(f"beta={beta} needs ref_logp (the reference model's log-probabilities)")
    high = clip_eps if clip_eps_high is None else clip_eps_high
    adv = advantages[:, None].astype(logp.dtype)
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(logp)
    per_token = pg + beta * kl if beta else pg
    m = mask.astype(logp.dtype)
    tokens = jnp.maximum(m.sum(), 1.0)
    is_clipped = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + high) & (adv > 0))
    metrics = {"kl": jax.lax.stop_gradient((kl * m).sum() / tokens),
               "clip_fraction": (is_clipped * m).sum() / tokens,
               "policy_loss": jax.lax.stop_gradient(normalize_tokens(pg, mask, normalization))}
    return normalize_tokens(per_token, mask, normalization), metrics

"""Next-token cross-entropy as transformers' causal LMs compute it (``ForCausalLMLoss``): the logits at position i
predict ``labels[i + 1]``, positions labelled ``IGNORE`` (-100) count for nothing, and the loss is the mean
over the labelled targets. The trainer's memory-saving version is ``emoqwen_jax.train.loss``; both reduce to
the sums here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emoqwen_jax.tokens import IGNORE


def cross_entropy_sums(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and the number of labelled tokens (float32 scalars).

    logits float[B, L, V] (any float dtype; computed in float32), labels int[B, L]."""
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logits = logits[:, :-1].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    return nll.sum(), valid.sum().astype(jnp.float32)


def packed_targets(labels: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """int[B, L]: ``labels`` with each packed sample's first token made IGNORE (None: ``labels``), so no sample
    learns to predict the next one's first token — alone in its row that token is never a target either."""
    if segment_ids is None:
        return labels
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(starts, IGNORE, labels)


def token_mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """The mean over labelled tokens (0 when there are none, where transformers would give NaN)."""
    return total / jnp.maximum(count, 1.0)

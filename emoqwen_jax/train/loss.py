"""The training objective: next-token cross-entropy on labelled (assistant) tokens + compressor aux losses.

``labels`` int[B, L] are aligned with ``input_ids`` (HF convention): position i holds the token the model
should produce *at* i, -100 where nothing is learned; the shift happens here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.model import EmotionQwen
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


def loss_fn(model: EmotionQwen, batch: ModelInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token loss + the compressor's weighted aux loss; metrics for logging. ``batch`` carries labels."""
    batch = ModelInputs.coerce(batch)
    out = model.forward(batch)
    total, count = cross_entropy_sums(out.logits, packed_targets(batch.text.labels, batch.text.segment_ids))
    lm_loss = total / jnp.maximum(count, 1.0)
    loss = lm_loss + out.aux_loss
    valid = (jnp.zeros((0,), jnp.float32) if batch.vision is None
             else batch.vision.item_valid.astype(jnp.float32))
    gate = (out.gate_weights * valid[:, None]).sum(0) / jnp.maximum(valid.sum(), 1.0)  # mean weight per expert
    metrics = {"loss": loss, "lm_loss": lm_loss, "aux_loss": out.aux_loss, "tokens": count, "gate_weights": gate,
               **{k: v for k, v in out.aux.items() if k != "aux_loss"}}
    return loss, metrics

"""The training objective: next-token cross-entropy on labelled (assistant) tokens + compressor aux losses.

``labels`` int[B, L] are aligned with ``input_ids`` (HF convention): position i holds the token the model
should produce *at* i, -100 where nothing is learned; the shift happens here. The value is the one the model's
Hugging Face-style call returns as ``.loss`` (full logits, ``emoqwen_jax.model.cross_entropy``), computed without
ever holding the [B, L, V] logits.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.model import EmotionQwen
from emoqwen_jax.model.cross_entropy import cross_entropy_sums, packed_targets, token_mean  # noqa: F401 (re-exported)
from emoqwen_jax.tokens import IGNORE

LOSS_CHUNK = 256  # labelled positions per cross-entropy chunk: float32 [B, 256, V] logits at a time (156 MB at V=152k)


@jax.custom_vjp
def _permute_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """``x[b, order[b]]`` for x float[B, N, D] and a permutation order int[B, N] of each row."""
    return jnp.take_along_axis(x, order[..., None], axis=1)


def _permute_fwd(x, order):
    return _permute_rows(x, order), order


def _permute_bwd(order, g):
    # The cotangent of a permutation is the inverse permutation: a gather, not XLA's scatter-add.
    inverse = jnp.argsort(order, axis=1)
    return jnp.take_along_axis(g, inverse[..., None], axis=1), None


_permute_rows.defvjp(_permute_fwd, _permute_bwd)


def chunked_cross_entropy_sums(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], labels: jax.Array,
                               chunk: int = LOSS_CHUNK) -> tuple[jax.Array, jax.Array]:
    """``cross_entropy_sums(head(hidden), labels)`` without ever holding float32 [B, L, V] logits, and with
    the LM head run only where there are labels.

    Each row's labelled positions are moved to its front (a stable permutation; its gradient is the inverse
    permutation), the rows are cut into ``chunk`` positions, and a ``lax.scan`` computes each chunk's logits,
    their log-sum-exp and the target logit; a chunk past the longest row's label count is skipped
    (``lax.cond``): prompts, vision tokens and padding never reach the [D, V] head. ``jax.checkpoint`` makes
    the backward pass recompute a chunk's logits instead of keeping them: memory O(B · chunk · V).

    hidden float[B, L, D] (final-normed decoder states), head: float[B, c, D] -> float32[B, c, V],
    labels int[B, L]."""
    b, length, d = hidden.shape
    n = length - 1
    chunk = max(1, min(chunk, n))
    targets = labels[:, 1:]
    valid = targets != IGNORE
    count = valid.sum(1)
    order = jnp.argsort(jnp.logical_not(valid).astype(jnp.int32), axis=1, stable=True)  # labelled first
    x = _permute_rows(hidden[:, :-1], order)
    targets = jnp.take_along_axis(targets, order, axis=1)
    pad = -n % chunk
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    x = x.reshape(b, -1, chunk, d).swapaxes(0, 1)  # [C, B, chunk, D]
    targets = targets.reshape(b, -1, chunk).swapaxes(0, 1)
    needed = count.max()  # chunks at or past it hold no label in any row

    def logits_nll(x, t):
        logits = head(x).astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(t != IGNORE, logz - picked, 0.0).sum()

    # The cond sits inside the checkpoint: the scan then saves only each chunk's inputs, and the head's weights
    # stay loop constants (a cond outside would hand them back as per-chunk residuals: [C, D, V]).
    @jax.checkpoint
    def chunk_nll(x, t, live):
        return jax.lax.cond(live, logits_nll, lambda *_: jnp.zeros((), jnp.float32), x, t)

    def body(total, xs):
        i, xc, tc = xs
        return total + chunk_nll(xc, tc, i * chunk < needed), None

    steps = jnp.arange(x.shape[0], dtype=jnp.int32)
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (steps, x, targets))
    return total, count.sum().astype(jnp.float32)


def loss_fn(model: EmotionQwen, batch: ModelInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean token loss (chunked: no [B, L, V] logits) + the compressor's weighted aux loss; metrics for logging.
    ``batch`` carries labels. ``metrics["tokens"]`` (labelled targets) is the weight gradient accumulation gives
    this micro-batch (``emoqwen_jax.train.optim.accumulate_tokens``)."""
    hidden, gate_weights, aux = model.hidden_states(batch)
    targets = packed_targets(batch.text.labels, batch.text.segment_ids)
    total, count = chunked_cross_entropy_sums(hidden, model.language_model.logits, targets)
    lm_loss = token_mean(total, count)
    loss = lm_loss + aux["aux_loss"]
    valid = (jnp.zeros((0,), jnp.float32) if batch.vision is None
             else batch.vision.item_valid.astype(jnp.float32))
    gate = (gate_weights * valid[:, None]).sum(0) / jnp.maximum(valid.sum(), 1.0)  # mean weight per expert
    metrics = {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux["aux_loss"], "tokens": count, "gate_weights": gate,
               **{k: v for k, v in aux.items() if k != "aux_loss"}}
    return loss, metrics

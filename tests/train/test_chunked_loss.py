"""The chunked cross-entropy equals the full one (values and gradients, float32, 1e-6) and the training loss
never materialises float32 [B, L, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emoqwen_jax.train.loss import IGNORE, chunked_cross_entropy_sums, cross_entropy_sums


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-30))


@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_equals_full_loss_and_gradients(chunk):
    rng = np.random.default_rng(0)
    b, length, d, vocab = 2, 23, 12, 97
    hidden = jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, vocab)) * 0.5, jnp.float32)
    labels = rng.integers(0, vocab, (b, length))
    labels[0, :5] = IGNORE  # a prompt
    labels[1, 15:] = IGNORE  # right padding
    labels[1, [2, 3, 9]] = IGNORE  # labels scattered between gaps (the compaction must keep them in order)
    labels = jnp.asarray(labels, jnp.int32)

    def full(h, w):
        total, count = cross_entropy_sums(h @ w, labels)
        return total / count

    def chunked(h, w):
        total, count = chunked_cross_entropy_sums(h, lambda x: x @ w, labels, chunk=chunk)
        return total / count

    assert _rel(chunked(hidden, w), full(hidden, w)) <= 1e-6
    got = jax.grad(chunked, argnums=(0, 1))(hidden, w)
    want = jax.grad(full, argnums=(0, 1))(hidden, w)
    for g, r in zip(got, want, strict=True):
        assert _rel(g, r) <= 1e-6
    assert float(chunked_cross_entropy_sums(hidden, lambda x: x @ w, labels, chunk=chunk)[1]) == float(
        (labels[:, 1:] != IGNORE).sum())


def test_no_full_logits_in_the_compiled_gradient():
    """XLA's buffers for the gradient stay far below one float32 [B, L, V] logits array."""
    b, length, d, vocab = 2, 1024, 16, 4096
    hidden = jax.ShapeDtypeStruct((b, length, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((b, length), jnp.int32)

    def loss(h, w, y):
        return chunked_cross_entropy_sums(h, lambda x: x @ w, y, chunk=64)[0]

    mem = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, w, labels).compile().memory_analysis()
    full_logits = b * length * vocab * 4
    assert mem.temp_size_in_bytes < full_logits / 4, (mem.temp_size_in_bytes, full_logits)


def test_the_head_runs_only_on_chunks_holding_labels():
    """Rows with 3 and 5 labels among 40 positions: with chunk 4 only two chunks (8 positions a row) reach the
    head, counted by a host callback inside the head; the loss still equals the full one."""
    rng = np.random.default_rng(1)
    b, length, d, vocab, chunk = 2, 41, 8, 31, 4
    hidden = jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, vocab)), jnp.float32)
    labels = np.full((b, length), IGNORE)
    labels[0, [4, 20, 33]] = rng.integers(0, vocab, 3)
    labels[1, [1, 2, 17, 30, 40]] = rng.integers(0, vocab, 5)
    labels = jnp.asarray(labels, jnp.int32)
    calls = []

    def head(x):
        jax.debug.callback(lambda: calls.append(1))
        return x @ w

    total, count = jax.jit(lambda h: chunked_cross_entropy_sums(h, head, labels, chunk=chunk))(hidden)
    jax.effects_barrier()
    assert len(calls) == 2  # ceil(5 / 4) chunks of the 10 the rows are cut into
    assert float(count) == 8
    want, _ = cross_entropy_sums(hidden @ w, labels)
    assert _rel(total, want) <= 1e-6

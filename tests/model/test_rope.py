"""The rotary tables are computed once: XLA:CPU must not fuse sin/cos into every rotation and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np

from emoqwen_jax.model.rope import apply_rotary, cos_sin, mrope, vision_rotary


def test_cos_sin_equals_the_plain_functions_bitwise():
    emb = jnp.asarray(np.random.default_rng(0).uniform(-50, 50, (7, 16)).astype(np.float32))
    cos, sin = jax.jit(cos_sin)(emb)
    np.testing.assert_array_equal(np.asarray(cos), np.asarray(jax.jit(jnp.cos)(emb)))
    np.testing.assert_array_equal(np.asarray(sin), np.asarray(jax.jit(jnp.sin)(emb)))
    empty = cos_sin(jnp.zeros((0, 16), jnp.float32))  # no patches: no conditional on an empty table
    assert empty[0].shape == (0, 16)


def _sines_in_compiled_grad(tables_fn, *table_args):
    """sine ops in the compiled gradient of three 'layers' that rotate q and k with the same tables."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)).astype(np.float32))

    def loss(q, *args):
        cos, sin = tables_fn(*args)
        x = q
        for _ in range(3):
            x = jnp.tanh(apply_rotary(x, cos, sin))
        return jnp.sum(x ** 2)

    return jax.jit(jax.grad(loss)).lower(q, *table_args).compile().as_text().count(" sine(")


def test_tables_are_materialised_once_on_cpu():
    assert jax.default_backend() == "cpu"
    positions = jnp.asarray(np.random.default_rng(2).integers(0, 40, (3, 2, 5)), jnp.int32)
    # one conditional: its two (identical) branches hold the only sine ops
    assert _sines_in_compiled_grad(lambda p: mrope(p, 8, 10000.0, (1, 1, 2)), positions) == 2
    pos_hw = jnp.asarray(np.random.default_rng(3).integers(0, 16, (5, 2)), jnp.int32)
    assert _sines_in_compiled_grad(lambda p: tuple(t[None] for t in vision_rotary(p, 8, 10000.0)), pos_hw) == 2
    # the plain formulation is what this guards against: XLA re-evaluates sin in the consumers
    plain = lambda p: tuple(f(p.astype(jnp.float32)[0, ..., None] * jnp.ones(8)) for f in (jnp.cos, jnp.sin))  # noqa: E731
    assert _sines_in_compiled_grad(plain, positions) > 2

"""``optim.adamw`` against optax's ``chain(clip_by_global_norm, adamw)``, its non-finite skip, and the memory
layout it exists for (no copies of the donated moments)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerance import assert_close_rel

from emoqwen_jax.train.optim import adamw, skip_nonfinite

LR = optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=2, decay_steps=8)
HYPER = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


def _params():
    keys = jax.random.split(jax.random.key(0), 3)
    return {"w": jax.random.normal(keys[0], (4, 6)), "b": jax.random.normal(keys[1], (6,)),
            "experts": jax.random.normal(keys[2], (3, 5, 2))}


def _grads(step: int, scale: float):
    keys = jax.random.split(jax.random.key(100 + step), 3)
    shapes = {"w": (4, 6), "b": (6,), "experts": (3, 5, 2)}
    return {k: scale * jax.random.normal(kk, s) for kk, (k, s) in zip(keys, shapes.items())}


@pytest.mark.parametrize("pass_norm", [False, True])
def test_adamw_equals_optax_clip_and_adamw_with_clipping_on_and_off(pass_norm):
    ours = adamw(LR, clip_norm=1.0, **HYPER)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(LR, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p), **HYPER))
    p_ours = p_ref = _params()
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    for step, scale in enumerate([0.01, 3.0, 0.2, 10.0, 0.05]):  # norms below and above clip_norm
        g = _grads(step, scale)
        norm = optax.global_norm(g) if pass_norm else None
        u, s_ours = ours.update(g, s_ours, p_ours, grad_norm=norm)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
            assert_close_rel(a, b, 1e-6, what=f"parameters after step {step}")
    assert_close_rel(s_ours.mu["w"], s_ref[1][0].mu["w"], 1e-6, what="first moment")
    assert_close_rel(s_ours.nu["b"], s_ref[1][0].nu["b"], 1e-6, what="second moment")
    assert int(s_ours.count) == 5


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_nonfinite_step_leaves_the_state_and_gives_zero_updates(accumulate):
    tx = adamw(LR, clip_norm=1.0, **HYPER)
    if accumulate:
        tx = skip_nonfinite(optax.MultiSteps(tx, every_k_schedule=2))
    p = _params()
    state = tx.update(_grads(0, 0.5), tx.init(p), p, finite=jnp.bool_(True))[1]  # moments no longer zero
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(1, 0.5))
    u, new = jax.jit(lambda g, s: tx.update(g, s, p, finite=jnp.bool_(False)))(bad, state)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(u))


def test_donated_update_does_not_copy_the_moments():
    """The reason ``adamw`` exists: optax's chain followed by the step's ``where(finite, new, old)`` makes XLA
    copy each donated moment before updating it in place (2x the memory traffic of the update)."""
    tx = adamw(LR, clip_norm=1.0, **HYPER)
    shape = (8, 64, 32)
    p = {"w": jnp.ones(shape)}

    def step(p, s, g):
        norm = optax.global_norm(g)
        finite = jnp.isfinite(norm)
        u, s = tx.update(g, s, p, finite=finite, grad_norm=norm)
        return jax.tree.map(lambda a, b: jnp.where(finite, a + b, a), p, u), s

    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(p, tx.init(p), p).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line and "f32[8,64,32]" in line]
    assert not copies, copies
    assert "f32[8,64,32]" in hlo

"""Scale-mode routing: capacity and drops, the load-balancing and z losses, against independent numpy."""

import jax.numpy as jnp
import numpy as np
import pytest

from emoqwen_jax.model import moe

E, K = 4, 2


def scale_experts(buffers, params):
    """Expert e multiplies its rows by params[0][e] (so outputs are easy to predict)."""
    return buffers * params[0][:, None, None]


def numpy_reference(x, logits, valid, cap):
    """Priority dispatch written out: all first choices (token order), then all second choices."""
    t = x.shape[0]
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    top = np.take_along_axis(logits, order, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    load = np.zeros(E, int)
    kept = np.zeros((t, K), bool)
    for slot in range(K):
        for i in range(t):
            if valid[i]:
                e = order[i, slot]
                if load[e] < cap:
                    kept[i, slot] = True
                    load[e] += 1
    scales = np.arange(1, E + 1, dtype=np.float32)
    y = np.zeros_like(x)
    for i in range(t):
        for slot in range(K):
            if kept[i, slot]:
                y[i] += w[i, slot] * scales[order[i, slot]] * x[i]
    dropped_assign = int(valid.sum() * K - kept.sum())
    dropped_tokens = int((valid & ~kept.any(1)).sum())
    return y, dropped_assign, dropped_tokens, order


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 0.0])
def test_capacity_drops_match_numpy(capacity_factor):
    rng = np.random.default_rng(0)
    t = 24
    x = rng.standard_normal((t, 6)).astype(np.float32)
    logits = rng.standard_normal((t, E)).astype(np.float32)
    logits[:, 0] += 3.0  # most tokens prefer expert 0: it overflows
    valid = np.ones(t, bool)
    valid[-3:] = False  # padding tokens are never routed
    cap = moe.capacity(t, E, K, capacity_factor)
    ref_y, ref_assign, ref_tokens, _ = numpy_reference(x, logits, valid, cap)
    y, sums, counts = moe.token_moe(jnp.asarray(x), jnp.asarray(logits), jnp.asarray(valid),
                                    (jnp.arange(1, E + 1, dtype=jnp.float32),), scale_experts, top_k=K,
                                    capacity_factor=capacity_factor, dispatch="einsum")
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-6)
    assert int(counts["dropped_assignments"]) == ref_assign
    assert int(counts["dropped_tokens"]) == ref_tokens
    if capacity_factor <= 0:
        assert ref_assign == 0 and cap == t  # dropless
    elif capacity_factor == 0.5:
        assert ref_tokens > 0  # the fallback is exercised: those rows are exactly zero
        dropped_rows = np.flatnonzero(valid & (np.abs(ref_y).sum(1) == 0))
        assert np.all(np.asarray(y)[dropped_rows] == 0)
    assert np.all(np.asarray(y)[~valid] == 0)


def test_load_balancing_and_z_loss_match_numpy():
    rng = np.random.default_rng(1)
    t = 10
    logits = rng.standard_normal((t, E)).astype(np.float32) * 2
    valid = np.ones(t, bool)
    valid[7:] = False
    ids, _, probs = moe.route(jnp.asarray(logits), K)
    lb, z = moe.aux_losses(moe.aux_sums(jnp.asarray(logits), probs, ids, jnp.asarray(valid)), K)
    # Independent: fraction of the k-assignments per expert and mean softmax probability, valid tokens only.
    lv = logits[valid]
    choice = np.argsort(-lv, axis=-1)[:, :K]
    fraction = np.bincount(choice.ravel(), minlength=E) / (len(lv) * K)
    p = np.exp(lv - lv.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected_lb = E * np.sum(fraction * p.mean(0))
    lse = np.log(np.exp(lv).sum(-1))
    np.testing.assert_allclose(float(lb), expected_lb, rtol=1e-6)
    np.testing.assert_allclose(float(z), np.mean(lse**2), rtol=1e-6)
    # Perfect balance gives the minimum 1.0 for a uniform router.
    uniform = jnp.zeros((8, E))
    ids_u = jnp.asarray(np.stack([np.arange(8) % E, (np.arange(8) + 1) % E], 1))
    lb_u, _ = moe.aux_losses(moe.aux_sums(uniform, jnp.full((8, E), 1 / E), ids_u, jnp.ones(8, bool)), K)
    np.testing.assert_allclose(float(lb_u), 1.0, rtol=1e-6)


def test_ragged_dispatch_is_a_clear_error_on_this_backend():
    with pytest.raises(ValueError, match="ragged"):
        moe.token_moe(jnp.zeros((4, 2)), jnp.zeros((4, E)), jnp.ones(4, bool), (jnp.ones(E),), scale_experts,
                      top_k=K, capacity_factor=1.0, dispatch="ragged")

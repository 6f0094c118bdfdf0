"""Scale-mode routing against a float64 numpy per-token reference (drops included), for every dispatch mode,
on one device and sharded over 8 host devices; the GSPMD path's compiled collectives."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from tolerance import assert_close_rel

from emoqwen_jax.model import moe
from emoqwen_jax.model.moe_dispatch import token_moe
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.parallel import DEFAULT_RULES, make_mesh

E, K, I, O = 8, 2, 6, 5


class TanhExperts:
    """Expert e: tanh(x @ W[e]) — distinct per expert, easy to write in numpy."""

    def apply(self, buffers, params, rows=None):
        return jnp.tanh(moe.expert_matmul(buffers, params[0], rows))

    def apply_ragged(self, rows, group_sizes, params):
        return jnp.tanh(jax.lax.ragged_dot(rows, params[0], group_sizes))


def numpy_reference(x, logits, valid, w, cap, group_size):
    """Per group of ``group_size`` tokens: all first choices (token order), then all second choices, each kept
    while its expert has fewer than ``cap`` rows (``cap=None``: dropless). float64 throughout."""
    x, logits, w = (np.asarray(a, np.float64) for a in (x, logits, w))
    t = x.shape[0]
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :K]
    top = np.take_along_axis(logits, order, -1)
    gate = np.exp(top - top.max(-1, keepdims=True))
    gate /= gate.sum(-1, keepdims=True)
    kept = np.zeros((t, K), bool)
    for start in range(0, t, group_size):
        load = np.zeros(E, int)
        for slot in range(K):
            for i in range(start, min(start + group_size, t)):
                e = order[i, slot]
                if valid[i] and (cap is None or load[e] < cap):
                    kept[i, slot] = True
                    load[e] += 1
    y = np.zeros((t, O))
    for i in range(t):
        for slot in range(K):
            if kept[i, slot]:
                y[i] += gate[i, slot] * np.tanh(x[i] @ w[order[i, slot]])
    return y, int(valid.sum() * K - kept.sum()), int((valid & ~kept.any(1)).sum())


def make_inputs(t, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, I)).astype(np.float32)
    logits = rng.standard_normal((t, E)).astype(np.float32)
    logits[:, 0] += 2.0  # most tokens prefer expert 0: it overflows
    valid = np.ones(t, bool)
    valid[-3:] = False  # padding tokens are never routed
    w = rng.standard_normal((E, I, O)).astype(np.float32) * 0.5
    return x, logits, valid, w


def run(x, logits, valid, w, dispatch, capacity_factor, group_size):
    return token_moe(jnp.asarray(x), jnp.asarray(logits), jnp.asarray(valid), (jnp.asarray(w),), TanhExperts(),
                         top_k=K, capacity_factor=capacity_factor, group_size=group_size, dispatch=dispatch)


CASES = [("einsum", 1.0), ("einsum", 0.5), ("einsum", 0.0), ("shard_map", 1.0), ("shard_map", 0.0), ("ragged", 1.0)]


@pytest.mark.parametrize("dispatch,capacity_factor", CASES)
@pytest.mark.parametrize("t", [64, 61])  # 61: the last group is padded
def test_dispatch_matches_float64_reference(dispatch, capacity_factor, t):
    x, logits, valid, w = make_inputs(t)
    group_size = 16
    dropless = dispatch == "ragged" or capacity_factor <= 0
    cap = None if dropless else moe.capacity(group_size, E, K, capacity_factor)
    ref_y, ref_assign, ref_tokens = numpy_reference(x, logits, valid, w, cap, group_size)
    y, _, counts = run(x, logits, valid, w, dispatch, capacity_factor, group_size)
    assert_close_rel(y, ref_y, 1e-5, what=dispatch)
    assert int(counts["dropped_assignments"]) == ref_assign
    assert int(counts["dropped_tokens"]) == ref_tokens
    if dropless:
        assert ref_assign == 0
    else:
        assert ref_assign > 0  # capacity binds: the drop path is exercised
    if capacity_factor == 0.5:
        assert ref_tokens > 0  # a token lost both choices: its row is exactly zero
        rows = np.flatnonzero(valid & (np.abs(ref_y).sum(1) == 0))
        assert np.all(np.asarray(y)[rows] == 0)
    assert np.all(np.asarray(y)[~valid] == 0)


def test_capacity_is_per_group():
    assert moe.capacity(64, 8, 2, 1.25) == 20
    assert moe.capacity(64, 8, 2, 0.0) == 64  # dropless: an expert gets at most one row per token
    assert moe.capacity(4, 64, 2, 1.0) == 1
    # A group's drops depend only on its own tokens: the same group gives the same rows in any batch.
    x, logits, valid, w = make_inputs(64)
    y, _, _ = run(x, logits, valid, w, "einsum", 1.0, 16)
    y2, _, _ = run(x[16:32], logits[16:32], valid[16:32], w, "einsum", 1.0, 16)
    assert_close_rel(np.asarray(y)[16:32], y2, 1e-5, what="group alone")  # matmul rounding
    np.testing.assert_array_equal(np.asarray(y)[16:32] == 0, np.asarray(y2) == 0)  # the same dropped tokens


def test_load_balancing_and_z_loss_match_numpy():
    rng = np.random.default_rng(1)
    t = 10
    logits = rng.standard_normal((t, E)).astype(np.float32) * 2
    valid = np.ones(t, bool)
    valid[7:] = False
    ids, _, probs = moe.route(jnp.asarray(logits), K)
    lb, z = moe.aux_losses(moe.aux_sums(jnp.asarray(logits), probs, ids, jnp.asarray(valid)), K)
    # Independent: fraction of the k-assignments per expert and mean softmax probability, valid tokens only.
    lv = logits[valid].astype(np.float64)
    choice = np.argsort(-lv, axis=-1)[:, :K]
    fraction = np.bincount(choice.ravel(), minlength=E) / (len(lv) * K)
    p = np.exp(lv - lv.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(float(lb), E * np.sum(fraction * p.mean(0)), rtol=1e-6)
    np.testing.assert_allclose(float(z), np.mean(np.log(np.exp(lv).sum(-1)) ** 2), rtol=1e-6)
    # Perfect balance gives the minimum 1.0 for a uniform router.
    uniform = jnp.zeros((8, E))
    ids_u = jnp.asarray(np.stack([np.arange(8) % E, (np.arange(8) + 1) % E], 1))
    lb_u, _ = moe.aux_losses(moe.aux_sums(uniform, jnp.full((8, E), 1 / E), ids_u, jnp.ones(8, bool)), K)
    np.testing.assert_allclose(float(lb_u), 1.0, rtol=1e-6)


def test_unknown_dispatch_and_group_size_are_clear_errors():
    x, logits, valid, w = make_inputs(16)
    with pytest.raises(ValueError, match="choose one of .*ragged"):
        run(x, logits, valid, w, "dense", 1.0, 8)
    with pytest.raises(ValueError, match="group_size=0"):
        run(x, logits, valid, w, "einsum", 1.0, 0)


def _loss_and_grads(dispatch, capacity_factor, group_size):
    def loss(x, logits, w, valid):
        y, sums, counts = token_moe(x, logits, valid, (w,), TanhExperts(), top_k=K,
                                        capacity_factor=capacity_factor, group_size=group_size, dispatch=dispatch)
        lb, z = moe.aux_losses(sums, K)
        target = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        return jnp.sum(y * target) + 0.1 * lb + 0.01 * z, counts

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


MESHES = (dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2))


def _on_mesh(mesh, x, logits, w, valid):
    """``_loss_and_grads``' arguments placed on ``mesh``: tokens over the batch and expert axes, experts over
    ``expert``."""
    tok = NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert")))
    return (jax.device_put(x, tok), jax.device_put(logits, tok),
            jax.device_put(w, NamedSharding(mesh, PartitionSpec("expert"))), jax.device_put(valid, tok))


@pytest.mark.parametrize("dispatch,capacity_factor", [("einsum", 1.0), ("einsum", 0.0), ("shard_map", 1.0),
                                                      ("shard_map", 0.0), ("ragged", 1.0)])
def test_sharded_equals_single_device(dispatch, capacity_factor):
    """Loss, drops and every gradient on 8 devices equal one device's (the routing groups do not move)."""
    x, logits, valid, w = make_inputs(128, seed=3)
    fn = _loss_and_grads(dispatch, capacity_factor, group_size=16)
    (ref, ref_counts), ref_grads = fn(x, logits, w, valid)
    if capacity_factor > 0 and dispatch != "ragged":
        assert float(ref_counts["dropped_assignments"]) > 0
    for mesh_cfg in MESHES:
        mesh = make_mesh(mesh_cfg)
        args = _on_mesh(mesh, x, logits, w, valid)
        with axis_rules(mesh, DEFAULT_RULES):
            (loss, counts), grads = fn(*args)
        np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5, err_msg=str(mesh_cfg))
        assert float(counts["dropped_assignments"]) == float(ref_counts["dropped_assignments"]), mesh_cfg
        for got, want in zip(grads, ref_grads, strict=True):
            err = float(jnp.abs(got - want).max() / jnp.maximum(jnp.abs(want).max(), 1e-30))
            assert err <= 1e-5, (mesh_cfg, err)


def _collectives(hlo: str) -> dict[str, list[str]]:
    """Result shapes of each collective in compiled HLO text."""
    out: dict[str, list[str]] = {}
    for line in hlo.splitlines():
        m = re.search(r"= (\(.*?\)|\S+) (all-to-all|all-gather|all-reduce|collective-permute)(-start)?\(", line)
        if m:
            out.setdefault(m.group(2), []).append(m.group(1))
    return out


def test_gspmd_dispatch_compiles_to_all_to_all_without_gathering_tokens():
    mesh = make_mesh(dict(data=2, expert=4))
    x, logits, valid, w = make_inputs(128, seed=3)
    args = _on_mesh(mesh, x, logits, w, valid)
    with axis_rules(mesh, DEFAULT_RULES):
        hlo = _loss_and_grads("einsum", 1.0, 16).lower(*args).compile().as_text()
    ops = _collectives(hlo)
    assert len(ops.get("all-to-all", [])) >= 2, ops  # to the experts and back (and again in the backward)
    # No tensor is ever gathered, and no all-reduce is token-sized (they are the aux statistics and the
    # expert-weight gradients summed over the data axis).
    assert "all-gather" not in ops, ops
    token_elements = x.shape[0] * min(I, O)
    for result in ops.get("all-reduce", []):
        for shape in re.findall(r"\[([\d,]*)\]", result):
            assert np.prod([int(d) for d in shape.split(",") if d]) < token_elements, ops


def test_compact_path_skips_padding_with_the_same_result_and_gradients():
    """One device packs each expert's kept rows first and multiplies only the rows some expert needs; with a
    balanced router that is fewer than G * C, and the result and every gradient equal the padded path's."""
    t, group_size, factor = 256, 32, 1.25
    x, _, valid, w = make_inputs(t, seed=5)
    logits = np.random.default_rng(6).standard_normal((t, E)).astype(np.float32)  # balanced: no favourite
    cap = moe.capacity(group_size, E, K, factor)
    ids, _, _ = moe.route(jnp.asarray(logits), K)
    slot, keep = jax.vmap(lambda e, v: moe.group_slots(e, v, E, cap))(moe.to_groups(ids, group_size),
                                                                       moe.to_groups(jnp.asarray(valid), group_size))
    _, _, used = moe.compact_rows(slot, keep, E, cap)
    sizes = moe.compact_sizes(t // group_size * cap)
    assert int(used.max()) <= sizes[-2] < sizes[-1]  # a smaller matmul than the padded layout's is chosen
    assert int(used.sum()) == int(keep.sum())
    ref_y, ref_assign, _ = numpy_reference(x, logits, valid, w, cap, group_size)
    y, _, counts = run(x, logits, valid, w, "einsum", factor, group_size)
    assert_close_rel(y, ref_y, 1e-5, what="compact")
    assert int(counts["dropped_assignments"]) == ref_assign > 0

    def loss(path):
        def f(x, logits, w):
            ids, weights, _ = moe.route(logits, K)
            kw = dict(num_experts=E, cap=cap, group_size=group_size)
            if path == "compact":
                y, _ = moe.run_compact(x, ids, weights, jnp.asarray(valid), (w,), TanhExperts(), **kw)
            else:
                y, _ = moe.run_grouped(x, ids, weights, jnp.asarray(valid), (w,), TanhExperts(), annotate=False, **kw)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    args = (jnp.asarray(x), jnp.asarray(logits), jnp.asarray(w))
    (got, got_grads), (want, want_grads) = loss("compact")(*args), loss("grouped")(*args)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, r in zip(got_grads, want_grads, strict=True):
        assert_close_rel(g, r, 1e-5, what="gradient")


def test_ragged_all_to_all_branch_traces_differentiates_and_lowers(monkeypatch):
    """The GPU/TPU branch of the dropless shard_map path (``ragged_all_to_all``; XLA:CPU cannot run it, so
    ``test_sharded_equals_single_device`` covers the padded all-to-all instead): forward and backward lower
    with two ragged all-to-alls each way on (data=2, expert=4)."""
    from emoqwen_jax.model import moe_dispatch

    monkeypatch.setattr(moe_dispatch, "_has_ragged_all_to_all", lambda: True)
    mesh = make_mesh(dict(data=2, expert=4))
    x, logits, valid, w = make_inputs(128, seed=3)
    args = _on_mesh(mesh, x, logits, w, valid)
    with axis_rules(mesh, DEFAULT_RULES):
        text = _loss_and_grads("ragged", 1.0, 16).lower(*args).as_text()
    assert text.count("ragged_all_to_all") == 4, text.count("ragged_all_to_all")
    assert "all_to_all" in text.replace("ragged_all_to_all", "")  # the per-expert counts still use a plain one

"""The Hybrid Compressor (paper mode) against an independent numpy implementation.

Reference: each expert is a Qwen2.5-VL patch merger written in float64 numpy (``torch_load.np_merger``), the
gate is the published structure (self-attention -> [Linear -> ReLU -> LayerNorm] x 2 -> Linear -> softmax)
written in numpy, and the output is the per-item gate-weighted sum of the experts. Every parameter is random
(two *different* experts, non-zero biases, norm scales around 1); three items of different sizes share one
flat sequence with padding patches and a padding item slot.
"""

import hf_oracle as O
import numpy as np
import pytest
import torch_load as TL
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.model.compressor import HybridCompressor
from emoqwen_jax.model.config import CompressorConfig, VisionConfig

VISION = VisionConfig(depth=1, hidden_size=40, num_heads=2, intermediate_size=56, window_size=56,
                      fullatt_block_indexes=())
OUT = 28
SPEC = layout.LayoutSpec(window_size=VISION.window_size)
GRIDS = np.array([(1, 4, 6), (2, 4, 4), (1, 2, 2)])  # 24 + 32 + 4 patches
TOL = 1e-5


def _compressor(seed=0, **overrides):
    cfg = CompressorConfig(**{"gate_num_heads": 4, "gate_hidden_size": 24, **overrides})
    cfg.validate(VISION.hidden_size)
    comp = TL.build(lambda: HybridCompressor(cfg, VISION, OUT, rngs=nnx.Rngs(0)))
    return TL.randomize_nnx_(comp, seed), cfg


@nnx.jit(static_argnums=3)
def _run(comp, features, patch_item, num_items):
    """-> (tokens float[U, Dout], gate weights float32[G, E]) (any further outputs, e.g. aux losses, dropped)."""
    return comp(features, patch_item, num_items)[:2]


def _inputs(pad_patches_to=72, pad_items_to=4, pad_value_seed=1):
    lay = layout.vision_layout(GRIDS, SPEC, pad_patches_to=pad_patches_to, pad_items_to=pad_items_to)
    p = int(GRIDS.prod(-1).sum())
    features = np.random.default_rng(0).standard_normal((pad_patches_to, VISION.hidden_size)).astype(np.float32)
    features[p:] = 30.0 * np.random.default_rng(pad_value_seed).standard_normal(features[p:].shape)  # garbage
    return features, lay["vision_patch_item"], pad_items_to


# ---- numpy reference ----------------------------------------------------------------------------------------
def _p(var):
    return np.asarray(var[...], np.float64)


def _np_linear(lin, x):
    return x @ _p(lin.kernel) + (_p(lin.bias) if lin.bias is not None else 0.0)


def _np_layer_norm(ln, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * _p(ln.weight) + _p(ln.bias)


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_self_attention(att, x, num_heads):
    """torch nn.MultiheadAttention semantics for x float[T, D] (one sequence, no mask)."""
    t, d = x.shape
    h = d // num_heads
    q, k, v = (_np_linear(lin, x).reshape(t, num_heads, h).transpose(1, 0, 2)
               for lin in (att.q_proj, att.k_proj, att.v_proj))
    probs = _np_softmax(q @ k.transpose(0, 2, 1) / np.sqrt(h))
    return _np_linear(att.out_proj, (probs @ v).transpose(1, 0, 2).reshape(t, d))


def np_gate(gate, cfg, features, patch_item, num_items):
    """float64[num_items, E] weights; rows of padding item slots are left at NaN (not compared)."""
    out = np.full((num_items, cfg.num_experts), np.nan)
    for g in range(num_items):
        x = np.asarray(features, np.float64)[patch_item == g]
        if not len(x):
            continue
        if cfg.gate_input == "pooled":
            pooled = _np_self_attention(gate.attention, x.mean(0, keepdims=True), cfg.gate_num_heads)[0]
        else:
            pooled = _np_self_attention(gate.attention, x, cfg.gate_num_heads).mean(0)
        y = _np_layer_norm(gate.norm1, np.maximum(_np_linear(gate.fc1, pooled), 0))
        y = _np_layer_norm(gate.norm2, np.maximum(_np_linear(gate.fc2, y), 0))
        out[g] = _np_softmax(_np_linear(gate.head, y))
    return out


def np_mix(comp, weights, features, patch_item):
    """Per-unit gate-weighted sum of the numpy experts; padding units are 0."""
    unit_item = patch_item.reshape(-1, VISION.merge_unit)[:, 0]
    num_experts = comp.experts.ln_q_weight.shape[0]
    experts = np.stack([TL.np_expert(comp.experts, e, features) for e in range(num_experts)])  # [E, U, D]
    w = np.where((unit_item >= 0)[:, None], np.asarray(weights, np.float64)[np.maximum(unit_item, 0)], 0.0)
    return np.einsum("eud,ue->ud", experts, w)


# ---- tests --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_experts():
    comp, cfg = _compressor(seed=3)
    assert np.abs(_p(comp.experts.mlp_0_kernel)[0] - _p(comp.experts.mlp_0_kernel)[1]).max() > 1e-2
    return comp, cfg


def test_output_is_gate_weighted_sum_of_two_different_experts(two_experts):
    comp, _ = two_experts
    features, patch_item, g = _inputs()
    tokens, weights = _run(comp, features, patch_item, g)
    assert tokens.shape == (len(features) // 4, OUT) and weights.shape == (g, 2)
    ref = np_mix(comp, weights, features, patch_item)
    valid = patch_item.reshape(-1, 4)[:, 0] >= 0
    assert O.rel_err(np.asarray(tokens)[valid], ref[valid]) <= TOL
    assert np.all(np.asarray(tokens)[~valid] == 0)  # padding units carry nothing
    # The two experts really differ, and both weights matter for every item.
    w = np.asarray(weights)[:3]
    assert np.all(w > 0.05) and np.abs(TL.np_expert(comp.experts, 0, features) -
                                       TL.np_expert(comp.experts, 1, features)).max() > 1e-2


@pytest.mark.parametrize("gate_input", ["pooled", "tokens"])
def test_gate_matches_numpy_sums_to_one_and_ignores_padding(gate_input):
    comp, cfg = _compressor(seed=5, gate_input=gate_input)
    features, patch_item, g = _inputs()
    tokens, weights = _run(comp, features, patch_item, g)
    weights = np.asarray(weights)
    np.testing.assert_allclose(weights[:3].sum(-1), 1.0, rtol=1e-6)
    assert O.rel_err(weights[:3], np_gate(comp.gate, cfg, features, patch_item, g)[:3]) <= TOL
    # Other padding: more padding patches with other garbage, more item slots -> same real outputs.
    f2, pi2, g2 = _inputs(pad_patches_to=96, pad_items_to=6, pad_value_seed=7)
    tokens2, weights2 = _run(comp, f2, pi2, g2)
    assert O.rel_err(np.asarray(weights2)[:3], weights[:3]) <= 1e-6
    assert O.rel_err(np.asarray(tokens2)[:15], np.asarray(tokens)[:15]) <= 1e-6  # 60 real patches = 15 units


def test_gate_weights_are_per_item(two_experts):
    """Each item's weights equal the gate run on that item alone (every other patch marked padding): no
    item influences another."""
    comp, _ = two_experts
    features, patch_item, g = _inputs()
    _, weights = _run(comp, features, patch_item, g)
    for item in range(3):
        _, w_alone = _run(comp, features, np.where(patch_item == item, 0, -1).astype(np.int32), g)
        assert O.rel_err(w_alone[0], weights[item]) <= 1e-6
    assert np.abs(np.asarray(weights)[0] - np.asarray(weights)[1]).max() > 1e-4  # items really differ


def test_identical_experts_equal_one_merger():
    comp, _ = _compressor(seed=9)
    for name in ("ln_q_weight", "mlp_0_kernel", "mlp_0_bias", "mlp_2_kernel", "mlp_2_bias"):
        var = getattr(comp.experts, name)
        var[...] = var[...].at[1].set(var[...][0])
    single, _ = _compressor(seed=0, num_experts=1, expert_names=())
    for name in ("ln_q_weight", "mlp_0_kernel", "mlp_0_bias", "mlp_2_kernel", "mlp_2_bias"):
        getattr(single.experts, name)[...] = getattr(comp.experts, name)[...][:1]
    features, patch_item, g = _inputs()
    tokens, _ = _run(comp, features, patch_item, g)
    ref, _ = _run(single, features, patch_item, g)
    valid = patch_item.reshape(-1, 4)[:, 0] >= 0
    assert O.rel_err(np.asarray(tokens)[valid], np.asarray(ref)[valid]) <= 1e-6


def test_single_expert_has_no_gate_and_is_the_merger():
    comp, _ = _compressor(seed=11, num_experts=1, expert_names=())
    assert comp.gate is None
    features, patch_item, g = _inputs()
    tokens, weights = _run(comp, features, patch_item, g)
    np.testing.assert_array_equal(weights, np.ones((g, 1), np.float32))
    assert O.rel_err(tokens, TL.np_expert(comp.experts, 0, features)) <= TOL


def test_tokens_follow_the_unit_order_given():
    """Units are contiguous groups of 4 patches in the order given: permuting whole groups permutes tokens."""
    comp, _ = _compressor(seed=13)
    features, patch_item, g = _inputs()
    perm = np.random.default_rng(2).permutation(len(features) // 4)
    regroup = lambda x: x.reshape(-1, 4, *x.shape[1:])[perm].reshape(x.shape)  # noqa: E731
    tokens, _ = _run(comp, features, patch_item, g)
    tokens_p, _ = _run(comp, regroup(features), regroup(patch_item), g)
    assert O.rel_err(np.asarray(tokens_p), np.asarray(tokens)[perm]) <= 1e-6



# ---- scale mode ---------------------------------------------------------------------------------------------
def _np_token_mode(comp, features, patch_item, k, cap, group_size):
    """Float64 reference of token routing: router logits, top-k softmax, per-group capacity with first choices
    first (``cap=None``: dropless), each expert the numpy merger."""
    units = features.reshape(-1, 4 * VISION.hidden_size).astype(np.float64)
    valid = np.asarray(patch_item).reshape(-1, 4)[:, 0] >= 0
    logits = units @ _p(comp.router.kernel)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(logits, order, -1)
    w = np.exp(top - top.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    outs = np.stack([TL.np_expert(comp.experts, e, features) for e in range(logits.shape[1])])  # [E, U, O]
    y = np.zeros((len(units), OUT))
    for start in range(0, len(units), group_size):
        load = np.zeros(logits.shape[1], int)
        for slot in range(k):
            for u in range(start, min(start + group_size, len(units))):
                e = order[u, slot]
                if valid[u] and (cap is None or load[e] < cap):
                    load[e] += 1
                    y[u] += w[u, slot] * outs[e, u]
    return y


@pytest.mark.parametrize("dispatch,capacity_factor", [("einsum", 1.0), ("einsum", 0.0), ("ragged", 1.0)])
def test_token_mode_matches_numpy_mergers(dispatch, capacity_factor):
    """Four different merger experts, top-2, groups of 6 units: the capacity paths (drops included) and the
    dropless ragged_dot path equal the per-token float64 reference."""
    from emoqwen_jax.model.moe import capacity

    comp, cfg = _compressor(seed=5, routing="token", num_experts=4, top_k=2, group_size=6, dispatch=dispatch,
                            capacity_factor=capacity_factor)
    features, patch_item, g = _inputs()
    tokens, _ = _run(comp, features, patch_item, g)
    dropless = dispatch == "ragged" or capacity_factor <= 0
    ref = _np_token_mode(comp, features, patch_item, 2, None if dropless else capacity(6, 4, 2, capacity_factor), 6)
    assert O.rel_err(np.asarray(tokens), ref) <= TOL
    if not dropless:  # capacity binds somewhere: the reference differs from the dropless one
        assert O.rel_err(ref, _np_token_mode(comp, features, patch_item, 2, None, 6)) > 1e-3

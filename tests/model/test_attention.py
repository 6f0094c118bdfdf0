"""``emoqwen_jax.model.attention``: every CPU implementation equals dense masked attention (values and
gradients, float32, 1e-5) with segments, padding, causality, GQA and a KV-cache offset; the ViT attends within
frames of any size; the choice is validated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model.attention import attention, resolve
from emoqwen_jax.model.config import VisionConfig
from emoqwen_jax.model.vision import VisionTransformer, _period

TOL = 1e-5


def _reference(q, k, v, qseg, kseg, causal, offset, scale):
    """Plain float64 numpy attention (the definition in the module docstring)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    k, v = np.repeat(k, n // kh, axis=2), np.repeat(v, n // kh, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
    mask = np.asarray(qseg)[:, :, None] == np.asarray(kseg)[:, None, :]
    if causal:
        mask &= np.arange(s)[None, None, :] <= (np.arange(t) + offset)[None, :, None]
    logits = np.where(mask[:, None], logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.where(mask[:, None], np.exp(logits - np.where(np.isfinite(m), m, 0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def _qkv(b, t, s, n, kh, h, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h))]


# Row 0: two samples then padding (a packed decoder row); row 1: one sample and a long padding tail.
SEGMENTS = np.array([[1] * 9 + [2] * 21 + [0] * 7, [5] * 25 + [0] * 12])


@pytest.mark.parametrize("impl,causal,block", [("xla", True, 0), ("xla", False, 0), ("blockwise", True, 8),
                                               ("blockwise", False, 16), ("blockwise", True, 512)])
def test_values_and_gradients_equal_reference(impl, causal, block):
    q, k, v = _qkv(2, 37, 37, 6, 2, 8)  # GQA: 3 query heads per KV head; 37 positions: blocks do not divide
    seg = jnp.asarray(SEGMENTS)
    run = lambda q, k, v: attention(q, k, v, scale=0.35, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,  # noqa: E731
                                    implementation=impl, block_size=block)
    ref = _reference(q, k, v, SEGMENTS, SEGMENTS, causal, 0, 0.35)
    assert _rel(run(q, k, v), ref) <= TOL
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    dense = lambda q, k, v: attention(q, k, v, scale=0.35, q_segment_ids=seg, kv_segment_ids=seg,  # noqa: E731
                                      causal=causal, implementation="xla", block_size=4096)
    got = jax.grad(lambda *x: jnp.sum(run(*x) * w), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *x: jnp.sum(dense(*x) * w), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        assert _rel(g, r) <= TOL


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_kv_cache_offset(impl):
    """T new queries written at slot `offset` of an S-slot cache (left padding 0, unwritten slots hidden)."""
    q, k, v = _qkv(2, 3, 20, 4, 2, 8, seed=2)
    qseg = np.ones((2, 3), np.int32)
    kseg = np.ones((2, 20), np.int32)
    kseg[1, :4] = 0  # row 1: 4 left-padding slots
    kseg[:, 14:] = 0  # slots after the new tokens are not valid yet
    got = attention(q, k, v, scale=0.3, q_segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.asarray(kseg),
                    causal=True, q_offset=jnp.int32(11), implementation=impl, block_size=8)
    assert _rel(got, _reference(q, k, v, qseg, kseg, True, 11, 0.3)) <= TOL


def test_band_paths_equal_reference():
    """Segments of at most `band` contiguous positions (the ViT's windows): the 3-block xla path and the
    banded blockwise path equal dense attention, padding (-1) included."""
    seg = np.concatenate([np.repeat(np.arange(7), [5, 13, 3, 13, 9, 1, 12]), -np.ones(11, int)])[None]
    q, k, v = _qkv(1, seg.shape[1], seg.shape[1], 3, 3, 8, seed=3)
    ref = _reference(q, k, v, seg, seg, False, 0, 0.3)
    real = seg[0] >= 0
    for impl, block in (("xla", 16), ("blockwise", 16), ("blockwise", 8)):
        got = attention(q, k, v, scale=0.3, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
                        implementation=impl, block_size=block, band=13)
        assert _rel(np.asarray(got)[0, real], ref[0, real]) <= TOL, impl


def test_blockwise_bfloat16_runs_and_is_close():
    q, k, v = _qkv(2, 37, 37, 4, 2, 16, seed=4)
    seg = jnp.asarray(SEGMENTS)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention(*bf, scale=0.25, q_segment_ids=seg, kv_segment_ids=seg, causal=True, implementation="blockwise",
                    block_size=16)
    assert out.dtype == jnp.bfloat16
    ref = _reference(*bf, SEGMENTS, SEGMENTS, True, 0, 0.25)
    assert _rel(out.astype(jnp.float32), ref) <= 2e-2  # bfloat16 inputs and probabilities


def test_choice_is_validated_and_auto_picks_by_length():
    with pytest.raises(ValueError, match="model.attention='flash'"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="model.remat"):
        ModelConfig(remat="everything")
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="needs a TPU"):
            resolve("splash", 128)
        with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
            resolve("cudnn", 128)
        assert resolve("auto", 128) == "xla"
        assert resolve("auto", 8192) == "blockwise"


# ---- the ViT: frames of any size --------------------------------------------------------------------------------
def _vit(attention_impl, frame_block=0, scan=False):
    cfg = VisionConfig(depth=4, hidden_size=24, num_heads=2, intermediate_size=40, window_size=56,
                       fullatt_block_indexes=(1, 3), frame_block=frame_block)
    return VisionTransformer(cfg, rngs=nnx.Rngs(0), attention=attention_impl, attention_block=32,
                             scan_layers=scan), cfg


def _vit_inputs(cfg, grids, pad_to):
    lay = layout.vision_layout(np.array(grids), layout.LayoutSpec(window_size=cfg.window_size), pad_patches_to=pad_to)
    pixels = np.random.default_rng(1).standard_normal((pad_to, cfg.patch_dim)).astype(np.float32)
    return pixels, dict(pos_hw=lay["vision_pos_hw"], window_index=lay["vision_window_index"],
                        frame_segment=lay["vision_frame_segment"], window_segment=lay["vision_window_segment"]), lay


@pytest.mark.parametrize("impl,frame_block,scan", [("blockwise", 0, False), ("blockwise", 16, True), ("xla", 0, True)])
def test_vit_frames_larger_than_a_block_equal_dense(impl, frame_block, scan):
    """A 12x20-patch frame (240 patches) is many blocks long: still exact, no NaN, with or without scan."""
    grids = [(1, 12, 20), (2, 4, 8), (1, 2, 2)]
    dense, cfg = _vit("xla")
    dense.blocks[1].attn.band = dense.blocks[3].attn.band = None  # reference: plain dense frame masks
    for blk in (0, 2):
        dense.blocks[blk].attn.band = None  # and dense window masks
    other, _ = _vit(impl, frame_block, scan)
    nnx.update(other, nnx.state(dense))
    pixels, kw, lay = _vit_inputs(cfg, grids, 336)
    real = lay["vision_frame_segment"] >= 0
    ref = np.asarray(jax.jit(lambda p: dense(p, **kw))(pixels))[real]
    got = np.asarray(jax.jit(lambda p: other(p, **kw))(pixels))
    assert np.isfinite(got).all()
    assert _rel(got[real], ref) <= TOL


def test_vit_period_groups_window_and_full_layers():
    assert _period(32, {7, 15, 23, 31}) == 8
    assert _period(8, {3, 7}) == 4
    assert _period(2, {1}) == 2
    assert _period(5, {1}) == 5  # no repeating pattern: one group (the loop)


def test_auto_window_layers_shard_the_patch_axis_without_gathering_it():
    """On a patch axis split over 8 devices, 'auto' gives the window layers (a band) the banded blocks: the
    compiled gradient has halo exchanges but no all-gather, and equals one device's result. (Blockwise's scan
    over query blocks all-gathers q, k and v and repeats every block on every device.)"""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from emoqwen_jax.model.sharding import axis_rules

    t, n, h, band = 8 * 64, 2, 8, 16
    q, k, v = _qkv(1, t, t, n, n, h, seed=3)
    seg = jnp.asarray(np.repeat(np.arange(t // 12 + 1), 12)[:t][None], jnp.int32)  # windows of 12 (< band)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))

    def loss(q, k, v):
        out = attention(q, k, v, scale=h**-0.5, q_segment_ids=seg, kv_segment_ids=seg, implementation="auto",
                        band=band)
        return (out * out).sum()

    want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    split = NamedSharding(mesh, PartitionSpec(None, "data"))
    with axis_rules(mesh, [("units", "data")]):
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        args = [jax.device_put(x, split) for x in (q, k, v)]
        hlo = fn.lower(*args).compile().as_text()
        got = fn(*args)
    assert "all-gather" not in hlo and "collective-permute" in hlo
    for g, r in zip(got, want):
        assert _rel(g, r) <= 1e-5

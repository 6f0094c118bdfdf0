"""Block-local segment attention (the ViT's window layers, and full layers with ``vision.frame_block``) equals
dense masked attention; the frame-length guard turns a too-long frame into NaN."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.model.config import VisionConfig
from emoqwen_jax.model.layers import dot_product_attention, local_segment_attention
from emoqwen_jax.model.vision import VisionTransformer, longest_run

TOL = 1e-5


@pytest.mark.parametrize("block", [16, 13])
def test_local_equals_dense_on_real_segments(block):
    rng = np.random.default_rng(0)
    seg = np.concatenate([np.repeat(np.arange(7), [5, 13, 3, 13, 9, 1, 12]), -np.ones(11, int)])  # 67 positions
    q, k, v = (jnp.asarray(rng.standard_normal((seg.size, 3, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(seg[:, None] == seg[None, :])[None, None]
    ref = dot_product_attention(q[None], k[None], v[None], mask, scale=0.3)[0]
    got = local_segment_attention(q, k, v, jnp.asarray(seg), block=block, scale=0.3)
    assert got.shape == ref.shape
    real = seg >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=TOL, rtol=TOL)
    assert np.isfinite(np.asarray(got)).all()


def test_longest_run_ignores_padding():
    seg = jnp.asarray([0, 0, 1, 1, 1, 2, -1, -1, -1, -1, -1])
    assert int(longest_run(seg)) == 3


def _vit(frame_block):
    cfg = VisionConfig(depth=2, hidden_size=24, num_heads=2, intermediate_size=40, window_size=56,
                       fullatt_block_indexes=(1,), frame_block=frame_block)
    return VisionTransformer(cfg, rngs=nnx.Rngs(0)), cfg


def _inputs(cfg, grids, pad_to):
    lay = layout.vision_layout(np.array(grids), layout.LayoutSpec(window_size=cfg.window_size), pad_patches_to=pad_to)
    pixels = np.random.default_rng(1).standard_normal((pad_to, cfg.patch_dim)).astype(np.float32)
    return pixels, dict(pos_hw=lay["vision_pos_hw"], window_index=lay["vision_window_index"],
                        frame_segment=lay["vision_frame_segment"], window_segment=lay["vision_window_segment"]), lay


def test_vit_with_frame_block_equals_dense():
    grids = [(1, 6, 10), (2, 4, 8), (1, 2, 2)]  # frames of 60, 32, 4 patches; window 56 px = 16 patches
    dense, cfg = _vit(0)
    local, _ = _vit(64)
    nnx.update(local, nnx.state(dense))
    pixels, kw, lay = _inputs(cfg, grids, 160)
    real = lay["vision_frame_segment"] >= 0
    ref = np.asarray(jax.jit(lambda p: dense(p, **kw))(pixels))[real]
    got = np.asarray(jax.jit(lambda p: local(p, **kw))(pixels))[real]
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=TOL)


def test_frame_longer_than_frame_block_gives_nan():
    local, cfg = _vit(32)
    pixels, kw, _ = _inputs(cfg, [(1, 6, 10)], 64)  # one 60-patch frame > 32
    assert np.isnan(np.asarray(local(pixels, **kw))).all()
    with pytest.raises(ValueError, match="frame_block"):
        dataclasses.replace(cfg, frame_block=-1).validate()

"""Scanned layers (``model.scan_layers``) and remat policies change neither the loss nor the gradients, and
leave the parameter tree (``layers/3/...`` paths) untouched."""

import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.train.loss import loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # compiles scanned and rematerialised stacks


def _config(**runtime):
    cfg = ModelConfig.from_dict(emotion_qwen.get_config("tiny").model.to_dict())
    # 4 ViT blocks with full attention in 1 and 3: two scanned groups of (window, full).
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, depth=4, fullatt_block_indexes=(1, 3)),
                               **runtime)


def _batch(model):
    cfg = model.config
    grid = (2, 4, 6)
    rng = np.random.default_rng(0)
    row = [5, cfg.vision_start_token_id, *[cfg.video_token_id] * 12, cfg.vision_end_token_id, *rng.integers(0, 900, 9)]
    ids = np.asarray([row, row[:14] + [0] * (len(row) - 14)], np.int32)
    mask = (np.arange(len(row))[None] < np.array([[len(row)], [14]])).astype(np.int32)
    ids[1, 14:] = 0
    pix = rng.standard_normal((2 * int(np.prod(grid)), cfg.vision.patch_dim)).astype(np.float32)
    batch = model.prepare_inputs(ids, mask, None, None, pix, np.array([grid, grid]), [1.0, 1.0],
                                 labels=np.where(mask > 0, ids, -100))
    return jax.tree.map(jnp.asarray, batch)


def _loss_and_grads(model, batch):
    return nnx.jit(lambda m, b: nnx.value_and_grad(lambda m_: loss_fn(m_, b)[0])(m))(model, batch)


@pytest.mark.parametrize("remat", ["block", "dots_saveable"])
def test_scan_and_remat_equal_the_loop(remat):
    plain = EmotionQwen(_config(), rngs=nnx.Rngs(0))
    scanned = EmotionQwen(_config(scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
    assert jax.tree.structure(nnx.state(plain, nnx.Param)) == jax.tree.structure(nnx.state(scanned, nnx.Param))
    assert 3 in nnx.to_pure_dict(nnx.state(scanned, nnx.Param))["visual"]["blocks"]  # per-layer paths kept
    batch = _batch(plain)
    (l0, g0), (l1, g1) = _loss_and_grads(plain, batch), _loss_and_grads(scanned, batch)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for x, y in zip(jax.tree.leaves(nnx.to_pure_dict(g1)), jax.tree.leaves(nnx.to_pure_dict(g0)), strict=True):
        assert float(jnp.abs(x - y).max()) <= 1e-5 * max(float(jnp.abs(y).max()), 1e-30)

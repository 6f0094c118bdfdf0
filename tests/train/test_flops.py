"""Analytic FLOPs (``emoqwen_jax.train.flops``) against XLA's own count of the compiled step.

``batch_train_flops(..., implementation=True)`` counts the matmuls our code runs; XLA's ``cost_analysis``
counts those plus every elementwise op (softmax, norms, rotary, masks, activations, the loss), which the
analytic count leaves out by design. With head dims of 64 and widths of 128+ those are a few percent, so the
analytic count must sit within 5% below-or-at XLA's (never above: it counts a subset). Model FLOPs (what MFU
uses) are at most the implementation's.
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.train import flops
from emoqwen_jax.train.loss import loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # compiles train steps for XLA's cost analysis

TOL = 0.05
GRIDS = {"image+video": ((1, 8, 12), (4, 8, 8)), "video": ((6, 8, 8),)}


def _config(routing: str, frame_block: int):
    config = emotion_qwen.get_config("tiny")
    config.model.vision.update(hidden_size=128, num_heads=2, intermediate_size=256, depth=2, window_size=56,
                               fullatt_block_indexes=(1,))
    config.model.vision.frame_block = frame_block
    config.model.text.update(hidden_size=128, num_heads=2, num_kv_heads=1, intermediate_size=384,
                             mrope_section=(8, 12, 12))
    config.model.compressor.update(gate_num_heads=2, gate_hidden_size=64)
    if routing == "token":
        config.model.compressor.update(routing="token", num_experts=4, expert_names=(), top_k=2,
                                       capacity_factor=1.0)
    return ModelConfig.from_run_config(config)


def _batch(mc, grids):
    rng = np.random.default_rng(0)
    rows, images, videos = [], [], []
    for grid in grids:
        (images if grid[0] == 1 else videos).append(grid)
    for grid in images + videos:
        pad = mc.image_token_id if grid[0] == 1 else mc.video_token_id
        rows.append([*rng.integers(0, 900, 5), mc.vision_start_token_id, *[pad] * (int(np.prod(grid)) // 4),
                     mc.vision_end_token_id, *rng.integers(0, 900, 9)])
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    pix = lambda g: rng.standard_normal((int(np.prod(np.array(g), -1).sum()), 1176)).astype(np.float32) if g else None  # noqa: E731
    model = nnx.eval_shape(lambda: EmotionQwen(mc, rngs=nnx.Rngs(0)))
    batch = model.prepare_inputs(ids, mask, pix(images), np.array(images) if images else None, pix(videos),
                                 np.array(videos) if videos else None, [1.0] * len(videos) if videos else None,
                                 labels=np.where(mask > 0, ids, -100))
    return batch


def _xla_train_flops(mc, batch) -> float:
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, b):
        return loss_fn(nnx.merge(graphdef, p), b)[0]

    cost = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("routing,frame_block,grids", [("sample", 0, "image+video"), ("sample", 64, "video"),
                                                       ("token", 0, "image+video")])
def test_analytic_matches_xla(routing, frame_block, grids):
    mc = _config(routing, frame_block)
    batch = _batch(mc, GRIDS[grids])
    ours = flops.batch_train_flops(mc, batch, implementation=True)
    xla = _xla_train_flops(mc, batch)
    assert 1 - TOL <= ours / xla <= 1.0 + 1e-3, (ours, xla, ours / xla)
    assert flops.batch_train_flops(mc, batch) <= ours


def test_segment_pairs_and_count_only_formula():
    assert flops.segment_pairs(np.array([0, 0, 1, 1, 1, -1, -1])) == 4 + 9
    mc = _config("sample", 0)
    # Count-only estimate with the layout's own window/frame sizes equals the layout-based model count
    # for a single un-padded video whose windows are all full.
    batch = _batch(mc, ((4, 8, 8),))
    exact = flops.batch_train_flops(mc, batch)
    approx = flops.train_flops(mc, tokens=int(batch.text.attention_mask.sum()), patches=256, window_tokens=16,
                               frame_tokens=64, items=1)
    assert approx == pytest.approx(exact, rel=1e-9)

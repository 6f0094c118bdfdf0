"""Sequence packing end to end: demo samples (images and videos) through the real collate and layout, packed
two per row, give the unpacked batch's logits, positions, loss and gradients (float32, tiny config, 1e-5)."""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tolerance import assert_close_rel

from emoqwen_jax.data.manifests import load_manifest
from emoqwen_jax.data.packing import merge_row
from emoqwen_jax.data.pipeline import Collate
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.model import EmotionQwen, ModelConfig, layout_spec
from emoqwen_jax.tokens import tokenizer_info
from emoqwen_jax.train import batching, flops
from emoqwen_jax.train.loss import loss_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # compiles packed and padded train steps

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(demo_dir):
    config = emotion_qwen.get_config("tiny")
    mcfg = ModelConfig.from_run_config(config)
    records = load_manifest(str(demo_dir / "train.jsonl"), str(demo_dir))
    processor = SampleProcessor(config.data)
    images = [s for s in map(processor.map, records) if len(s["image_grid_thw"])][:2]
    videos = [s for s in map(processor.map, records) if len(s["video_grid_thw"])][:2]
    # Order the unpacked rows so their visual items are listed in the same order as in the packed rows
    # (image 0, image 1, video 0, video 1 in both): the same items, the same compressor routing.
    unpacked_samples = [images[0], videos[0], images[1], videos[1]]
    packed_rows = [merge_row([images[0], videos[0]]), merge_row([images[1], videos[1]])]
    pad_id = tokenizer_info(mcfg.text.vocab_size).pad_id
    spec = layout_spec(mcfg)

    def inputs(samples):
        collate = Collate(len(samples), config.data.length_buckets, config.data.patch_buckets, pad_id)
        batch = collate(samples)
        sizes = batching.agreed_sizes([batching.needs(batch)], len(samples))
        return batching.shard_inputs(batch, spec, sizes, pad_id=pad_id)

    unpacked, packed = inputs(unpacked_samples), inputs(packed_rows)
    assert unpacked.vision.item_valid.shape == packed.vision.item_valid.shape == (4,)  # the same 4 item slots
    return mcfg, unpacked, packed


def test_packed_rows_have_restarting_positions_and_segments(setup):
    _, unpacked, packed = setup
    seg = packed.text.segment_ids
    assert set(np.unique(seg)) == {0, 1, 2} and (seg[packed.text.attention_mask == 0] == 0).all()
    for row in range(2):
        for k in range(2):
            where = seg[row] == k + 1
            alone = 2 * row + k
            n = int(unpacked.text.attention_mask[alone].sum())
            assert where.sum() == n
            np.testing.assert_array_equal(packed.text.position_ids[:, row, where],
                                          unpacked.text.position_ids[:, alone, :n])  # restart per sample
            np.testing.assert_array_equal(packed.text.labels[row, where], unpacked.text.labels[alone, :n])


def test_packed_loss_and_gradients_equal_unpacked(setup):
    mcfg, unpacked, packed = setup
    assert packed.text.input_ids.size < unpacked.text.input_ids.size  # fewer padding slots
    model = EmotionQwen(mcfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(p, batch):
        def loss(p):
            m = nnx.merge(graphdef, p)
            value, metrics = loss_fn(m, batch)
            return value, (metrics, m.forward(batch).logits)

        (value, (metrics, logits)), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return value, metrics, logits, grads

    a_loss, a_metrics, a_logits, a_grads = run(params, unpacked)
    b_loss, b_metrics, b_logits, b_grads = run(params, packed)
    assert float(a_metrics["tokens"]) == float(b_metrics["tokens"]) > 0
    np.testing.assert_allclose(float(b_loss), float(a_loss), rtol=TOL)
    np.testing.assert_allclose(float(b_metrics["aux_loss"]), float(a_metrics["aux_loss"]), rtol=TOL, atol=1e-7)
    seg = np.asarray(packed.text.segment_ids)
    for row in range(2):
        for k in range(2):
            where = seg[row] == k + 1
            n = int(where.sum())
            assert_close_rel(np.asarray(b_logits)[row, where], np.asarray(a_logits)[2 * row + k, :n], TOL,
                             what=f"logits of row {row} sample {k}")
    flat_a, flat_b = jax.tree.leaves(a_grads), jax.tree.leaves(b_grads)
    assert len(flat_a) == len(flat_b)
    scale = max(float(np.abs(g).max()) for g in flat_a)
    assert scale > 0
    for ga, gb in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=TOL, atol=TOL * scale)
    # One segment per row (the attention mask; same shapes, no recompile) attends across samples: a loss this
    # test's tolerance tells apart.
    leaky = run(params, packed.replace(segment_ids=packed.text.attention_mask))[0]
    assert abs(float(leaky) - float(a_loss)) > TOL * abs(float(a_loss))


def test_packed_flops_count_pairs_within_samples(setup):
    mcfg, unpacked, packed = setup
    assert flops.batch_train_flops(mcfg, packed) == pytest.approx(flops.batch_train_flops(mcfg, unpacked))


@pytest.mark.slow
def test_metrics_log_the_real_token_fraction(tmp_path, demo_dir):
    from config_files import load_config
    from train_configs import write_config

    from emoqwen_jax.train.metrics import read_metrics
    from emoqwen_jax.train.trainer import train_and_evaluate

    fractions = {}
    for packing in (False, True):
        root = tmp_path / str(packing)
        root.mkdir()
        config = load_config(write_config(root / "cfg.py", demo_dir, stages=("stage2_emotion",), steps=2,
                                          every=100, extra=f"c.data.packing = {packing}\nc.train.log_every = 1"))
        config.workdir = str(root / "run")
        train_and_evaluate(config)
        rows = read_metrics(config.workdir)
        assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
        fractions[packing] = [r["real_token_fraction"] for r in rows]
        assert all(0.0 < f <= 1.0 for f in fractions[packing])
    assert np.mean(fractions[True]) > np.mean(fractions[False])  # packing fills the rows


def test_plan_shapes_and_batching_carry_segment_ids(setup):
    from emoqwen_jax import inputs as I
    from emoqwen_jax.train.plan import video_batch_shapes

    mcfg, _, packed = setup
    shapes = video_batch_shapes(mcfg, 2, 2, 56, 128, packing=True)
    assert shapes.text.segment_ids.shape == (2, 128) and shapes.text.segment_ids.dtype == np.int32
    assert video_batch_shapes(mcfg, 2, 2, 56, 128).text.segment_ids is None
    joined = I.concat([packed, packed])  # shards join along the batch dimension, ids stay per row
    np.testing.assert_array_equal(joined.text.segment_ids, np.concatenate([packed.text.segment_ids] * 2))

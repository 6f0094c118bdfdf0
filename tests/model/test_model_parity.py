"""Whole-model logits parity against Hugging Face Qwen2.5-VL (torch, float32) through ``from_hf``.

Positions: for text and images both M-RoPE rules agree, so HF computes its own positions. For videos whose
temporal span exceeds the spatial one, transformers 5.24 departs from the released rule (docs/design.md, The
M-RoPE position rule), so HF is given positions by the released rule (checked independently in
test_position_ids.py).
"""

import hf_oracle as O
import numpy as np
import pytest

from emoqwen_jax import layout
from emoqwen_jax.convert import from_hf
from emoqwen_jax.model import layout_spec

TOL = 1e-4


# How our model runs (``from_hf(..., **runtime)``): the default ('auto': dense at these lengths), blockwise
# attention with blocks of 8 (so every sequence spans several query and key blocks, frames included), and
# that with scanned layers (the ViT scans its window/full groups; xla + scan: tests/model/test_attention.py).
RUNTIMES = {"auto": {}, "blockwise": dict(attention="blockwise", attention_block=8),
            "scan_blockwise": dict(scan_layers=True, remat="block", attention="blockwise", attention_block=8)}


@pytest.fixture(scope="module", params=sorted(O.CONFIGS))
def hf_saved(request, tmp_path_factory):
    hf = O.build_hf_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, str(path)


@pytest.fixture(scope="module", params=sorted(RUNTIMES))
def pair(request, hf_saved):
    hf, path = hf_saved
    return hf, from_hf(path, dtype="float32", **RUNTIMES[request.param])


def _released_positions(ours, ids, mask, images=None, videos=None, spt=None):
    return layout.get_rope_index(ids, mask, images, videos, spt, layout_spec(ours.config))[0]


def test_text_only_with_padding(pair):
    hf, ours = pair
    rng = np.random.default_rng(0)
    ids, mask = O.pad_batch([list(rng.integers(0, 500, 11)), list(rng.integers(0, 500, 7))])
    ref = O.hf_logits(hf, ids, mask)
    got = ours(ids, attention_mask=mask).logits
    assert got.shape == (2, 11, 512)
    assert O.rel_err(got, ref, mask) <= TOL


def test_one_image_window_not_dividing_grid(pair):
    hf, ours = pair
    grid = (1, 6, 10)  # 3 x 5 merged units: neither window size (2 or 4 units) divides it
    ids, mask = O.pad_batch([[7, 8] + O.image_tokens(grid) + [9, 10, 11]])
    vision = dict(pixel_values=O.pixels(grid, 1), image_grid_thw=np.array([grid]))
    ref = O.hf_logits(hf, ids, mask, **vision)
    got = ours(ids, attention_mask=mask, **vision)
    assert O.rel_err(got.logits, ref) <= TOL
    np.testing.assert_allclose(np.asarray(got.gate_weights).sum(-1), 1.0, rtol=1e-6)


def test_one_video_three_temporal_patches(pair):
    hf, ours = pair
    grid = (3, 4, 6)
    ids, mask = O.pad_batch([[7] + O.video_tokens(grid) + [9, 10, 11, 12]])
    vision = dict(pixel_values_videos=O.pixels(grid, 2), video_grid_thw=np.array([grid]),
                  second_per_grid_ts=np.array([1.5], np.float32))
    pos = _released_positions(ours, ids, mask, videos=vision["video_grid_thw"], spt=[1.5])
    ref = O.hf_logits(hf, ids, mask, position_ids=pos, **vision)
    got = ours(ids, attention_mask=mask, **vision).logits
    assert O.rel_err(got, ref) <= TOL


def test_mixed_image_and_video_batch_right_padding(pair):
    hf, ours = pair
    img, vid = (1, 4, 8), (4, 6, 4)
    rows = [[5] + O.image_tokens(img) + [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17],
            [5, 6] + O.video_tokens(vid) + [7, 8]]
    ids, mask = O.pad_batch(rows)
    assert mask.min() == 0  # one row is right-padded
    vision = dict(pixel_values=O.pixels(img, 3), image_grid_thw=np.array([img]),
                  pixel_values_videos=O.pixels(vid, 4), video_grid_thw=np.array([vid]),
                  second_per_grid_ts=np.array([0.5], np.float32))
    pos = _released_positions(ours, ids, mask, images=vision["image_grid_thw"], videos=vision["video_grid_thw"],
                              spt=[0.5])
    ref = O.hf_logits(hf, ids, mask, position_ids=pos, **vision)
    got = ours(ids, attention_mask=mask, **vision)
    assert O.rel_err(got.logits, ref, mask) <= TOL
    assert got.gate_weights.shape == (2, 2)


def test_padded_shapes_do_not_change_logits(pair):
    """Bucketed padding of patches and items (what the trainer does) leaves real logits unchanged."""
    _, ours = pair
    grid = (2, 4, 6)
    ids, mask = O.pad_batch([[7] + O.video_tokens(grid) + [9]])
    vision = dict(pixel_values_videos=O.pixels(grid, 5), video_grid_thw=np.array([grid]))
    plain = ours(ids, attention_mask=mask, **vision).logits
    padded = ours(ids, attention_mask=mask, pad_patches_to=96, pad_items_to=3, **vision).logits
    # Not bit-identical: XLA:CPU blocks a [48, 1176] and a [96, 1176] matmul differently, so the 1176-term
    # sums of the patch embedding round differently (~1e-6 relative, measured); anything structural (a
    # padding token leaking into attention, the gate mean or the scatter) would show up at >= 1e-3.
    assert O.rel_err(padded, plain) <= 1e-5

"""Host layout (``emoqwen_jax.layout``) against Hugging Face's own index helpers (``transformers.vision_utils``:
``get_vision_window_index``, ``get_vision_cu_seqlens``, ``get_vision_position_ids``) and ``masked_scatter``,
plus the padding rules and the error messages."""

import dataclasses

import hf_oracle as O
import numpy as np
import pytest
import torch
from transformers import vision_utils as VU

from emoqwen_jax import layout

SPEC = layout.LayoutSpec(image_token_id=O.IMAGE, video_token_id=O.VIDEO, vision_start_token_id=O.VSTART)
GRID_SETS = [
    [(1, 2, 2)],
    [(1, 6, 10)],
    [(3, 4, 6)],
    [(1, 16, 16)],  # divided exactly by 112 and 56 px windows (HF pads a whole empty window, then drops it)
    [(2, 18, 14), (1, 4, 8), (4, 6, 2)],
    [(1, 8, 8), (1, 8, 8)],  # identical items: ids must still be distinct
]
WINDOWS = [28, 56, 112, 224]  # 1, 2, 4, 8 merged units per window side


def _segments_from_cu(cu) -> np.ndarray:
    cu = np.asarray(cu)
    return np.repeat(np.arange(len(cu) - 1), np.diff(cu))


@pytest.mark.parametrize("window_size", WINDOWS)
@pytest.mark.parametrize("grids", GRID_SETS, ids=str)
def test_vision_layout_matches_hf(grids, window_size):
    spec = dataclasses.replace(SPEC, window_size=window_size)
    g = torch.tensor(grids)
    window_index, cu_window = VU.get_vision_window_index(g, 2, window_size, 14)
    lay = layout.vision_layout(np.array(grids), spec)
    np.testing.assert_array_equal(lay["vision_window_index"], window_index.numpy())
    # HF's segments apply to the window-ordered sequence; the per-frame ones come from cu_seqlens per frame.
    np.testing.assert_array_equal(lay["vision_window_segment"], _segments_from_cu(cu_window))
    np.testing.assert_array_equal(lay["vision_frame_segment"], _segments_from_cu(VU.get_vision_cu_seqlens(g)))
    np.testing.assert_array_equal(lay["vision_pos_hw"], VU.get_vision_position_ids(g, 2).numpy())
    sizes = [t * h * w for t, h, w in grids]
    np.testing.assert_array_equal(lay["vision_patch_item"], np.repeat(np.arange(len(grids)), sizes))
    np.testing.assert_array_equal(lay["vision_item_valid"], np.ones(len(grids), bool))
    for key, value in lay.items():
        assert value.dtype in (np.int32, np.bool_), key


def test_window_segments_refine_frame_segments():
    """Every window lies inside one frame, and every frame is split into its windows (window order)."""
    grids = np.array([(2, 18, 14), (3, 4, 6)])
    lay = layout.vision_layout(grids, SPEC)
    win, frame = lay["vision_window_segment"], lay["vision_frame_segment"]
    for w in np.unique(win):
        assert len(np.unique(frame[win == w])) == 1
    assert len(np.unique(win)) > len(np.unique(frame)) == 2 + 3


def test_padding_rules():
    grids = np.array([(1, 4, 6), (2, 2, 2)])  # 24 + 8 = 32 patches, 8 units
    lay = layout.vision_layout(grids, SPEC, pad_patches_to=44, pad_items_to=4)
    ref = layout.vision_layout(grids, SPEC)
    assert lay["vision_pos_hw"].shape == (44, 2) and lay["vision_window_index"].shape == (11,)
    for key in ("vision_frame_segment", "vision_window_segment", "vision_patch_item"):
        np.testing.assert_array_equal(lay[key][:32], ref[key])
        assert np.all(lay[key][32:] == -1), key  # padding patches attend only among themselves
    np.testing.assert_array_equal(lay["vision_window_index"][:8], ref["vision_window_index"])
    np.testing.assert_array_equal(lay["vision_window_index"][8:], [8, 9, 10])  # padding units stay in place
    np.testing.assert_array_equal(lay["vision_pos_hw"][32:], 0)
    np.testing.assert_array_equal(lay["vision_item_valid"], [True, True, False, False])
    with pytest.raises(ValueError, match=r"pad_patches_to=42 must be >= 32 patches and a multiple of 4"):
        layout.vision_layout(grids, SPEC, pad_patches_to=42)
    with pytest.raises(ValueError, match=r"pad_patches_to=28 must be >= 32"):
        layout.vision_layout(grids, SPEC, pad_patches_to=28)
    with pytest.raises(ValueError, match=r"pad_items_to=1 is smaller than the 2 visual items"):
        layout.vision_layout(grids, SPEC, pad_items_to=1)
    with pytest.raises(ValueError, match=r"grid \(1, 3, 4\) of item 0"):
        layout.vision_layout(np.array([(1, 3, 4)]), SPEC)
    empty = layout.vision_layout(np.zeros((0, 3), np.int64), SPEC, pad_patches_to=8, pad_items_to=1)
    assert np.all(empty["vision_patch_item"] == -1) and not empty["vision_item_valid"].any()


def test_visual_token_index_matches_masked_scatter():
    """Images first, then videos, each in row-major batch order: what HF's ``masked_scatter`` does."""
    images, videos = np.array([(1, 4, 2), (1, 2, 2)]), np.array([(2, 2, 4), (1, 2, 2)])
    rows = [[7] + O.video_tokens((2, 2, 4)) + O.image_tokens((1, 4, 2)) + [8],
            [9] + O.image_tokens((1, 2, 2)) + O.video_tokens((1, 2, 2))]
    ids, _ = O.pad_batch(rows)
    index = layout.visual_token_index(ids, SPEC, images, videos)
    n_image, n_video = 2 + 1, 4 + 1
    ref = torch.full(ids.shape, -1, dtype=torch.int64)
    t_ids = torch.as_tensor(ids)
    ref = ref.masked_scatter(t_ids == O.IMAGE, torch.arange(n_image))
    ref = ref.masked_scatter(t_ids == O.VIDEO, n_image + torch.arange(n_video))
    np.testing.assert_array_equal(index, ref.numpy())


def test_visual_token_index_count_mismatch_names_the_counts():
    ids, _ = O.pad_batch([[7] + O.image_tokens((1, 4, 2)) + [8]])  # 2 image tokens
    with pytest.raises(ValueError, match=r"image.*2 <\|image_pad\|> tokens.*give 6 merged tokens"):
        layout.visual_token_index(ids, SPEC, np.array([(1, 4, 6)]), np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match=r"video.*0 <\|video_pad\|> tokens.*give 2 merged tokens"):
        layout.visual_token_index(ids, SPEC, np.array([(1, 4, 2)]), np.array([(2, 2, 2)]))


def test_build_model_inputs_shapes_and_errors():
    grid = (2, 4, 2)
    ids, mask = O.pad_batch([[7] + O.video_tokens(grid) + [8], [9, 10]])
    pixels = O.pixels(grid, 0)
    out = layout.build_model_inputs(ids, mask, pixel_values_videos=pixels, video_grid_thw=[grid],
                                    second_per_grid_ts=[1.0], spec=SPEC, pad_patches_to=24, pad_items_to=2)
    assert out.vision.pixel_values.shape == (24, 1176) and np.all(out.vision.pixel_values[16:] == 0)
    np.testing.assert_array_equal(out.vision.pixel_values[:16], pixels)
    assert out.text.position_ids.shape == (3, 2, ids.shape[1]) and out.text.rope_deltas.shape == (2,)
    assert out.text.visual_token_index.shape == ids.shape and out.text.input_ids.dtype == np.int32
    # Explicit position ids are taken as given; rope deltas follow HF's definition (max + 1 - L).
    given = np.broadcast_to(np.arange(ids.shape[1]), (3, *ids.shape)) + 5
    out = layout.build_model_inputs(ids, mask, pixel_values_videos=pixels, video_grid_thw=[grid], spec=SPEC,
                                    position_ids=given)
    np.testing.assert_array_equal(out.text.position_ids, given)
    np.testing.assert_array_equal(out.text.rope_deltas, [5, 5])

    with pytest.raises(ValueError, match=r"input_ids must be int\[B, L\], got shape \(7,\)"):
        layout.build_model_inputs(ids[0, :7], spec=SPEC)
    with pytest.raises(ValueError, match=r"pixel_values_videos has shape \(15, 1176\); its grids \[\[2, 4, 2\]\] "
                                         r"need \(16, 1176\)"):
        layout.build_model_inputs(ids, mask, pixel_values_videos=pixels[:15], video_grid_thw=[grid], spec=SPEC)
    with pytest.raises(ValueError, match=r"pixel_values_videos has shape \(16, 588\)"):
        layout.build_model_inputs(ids, mask, pixel_values_videos=pixels[:, :588], video_grid_thw=[grid], spec=SPEC)
    with pytest.raises(ValueError, match=r"pixel_values_videos is missing but 1 grids were given"):
        layout.build_model_inputs(ids, mask, video_grid_thw=[grid], spec=SPEC)
    with pytest.raises(ValueError, match=r"second_per_grid_ts has 2 entries for 1 videos"):
        layout.build_model_inputs(ids, mask, pixel_values_videos=pixels, video_grid_thw=[grid],
                                  second_per_grid_ts=[1.0, 2.0], spec=SPEC)


def test_packed_segments_restart_positions_per_sample():
    """A row of two samples (segment ids 1, 2; 0 padding) gets each sample's own positions, as alone in a row."""
    image, video = (1, 4, 4), (2, 4, 2)
    first = [7] + O.image_tokens(image) + [8, 11]
    second = [9] + O.video_tokens(video) + [10]
    ids, mask = O.pad_batch([first, second])
    alone = layout.get_rope_index(ids, mask, [image], [video], [2.0], SPEC)[0]
    row = np.array(first + second + [0, 0])[None]
    seg = np.array([1] * len(first) + [2] * len(second) + [0, 0])[None]
    packed, deltas = layout.get_rope_index(row, (seg > 0).astype(np.int32), [image], [video], [2.0], SPEC, seg)
    np.testing.assert_array_equal(packed[:, 0, : len(first)], alone[:, 0, : len(first)])
    np.testing.assert_array_equal(packed[:, 0, len(first): -2], alone[:, 1, : len(second)])
    assert (packed[:, 0, -2:] == 1).all()  # padding, as HF
    assert deltas[0] == packed.max() + 1 - row.shape[1]
    out = layout.build_model_inputs(row, (seg > 0).astype(np.int32), O.pixels(image, 0), [image], O.pixels(video, 1),
                                    [video], [2.0], spec=SPEC, segment_ids=seg)
    np.testing.assert_array_equal(out.text.segment_ids, seg)
    np.testing.assert_array_equal(out.text.position_ids, packed)
    with pytest.raises(ValueError, match=r"segment_ids has shape \(1, 3\)"):
        layout.build_model_inputs(row, spec=SPEC, segment_ids=seg[:, :3])

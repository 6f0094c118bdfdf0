"""Facial Emotion Capture on a real portrait (scikit-image's astronaut, public domain)."""

import numpy as np
import pytest
from data_helpers import conv
from PIL import Image
from skimage import data as skdata
from tolerance import assert_close_rel

from emoqwen_jax.data import faces, manifests, video_io, vision
from emoqwen_jax.data.process import SampleProcessor


@pytest.fixture(scope="module")
def astronaut():
    return skdata.astronaut()  # uint8[512, 512, 3]


def test_haar_finds_the_astronaut_face(astronaut):
    boxes = faces.make_detector("haar", 1.1, 5, 24)(astronaut)
    assert boxes.tolist() == [[177, 66, 95, 95]]
    # Detecting on a downscaled copy finds the same face, boxes in original pixels.
    fast = faces.make_detector("haar", 1.1, 5, 24, max_side=320)(astronaut)
    assert fast.shape == (1, 4) and np.abs(fast[0] - [177, 66, 95, 95]).max() <= 4


def test_canvas_keeps_faces_at_their_place_and_blanks_the_rest(astronaut):
    box = np.array([[177, 66, 95, 95]])
    canvas = faces.face_canvas(astronaut, box, margin=0.0)
    np.testing.assert_array_equal(canvas[66:161, 177:272], astronaut[66:161, 177:272])
    mask = np.ones(astronaut.shape[:2], bool)
    mask[66:161, 177:272] = False
    assert not canvas[mask].any()
    grown = faces.face_canvas(astronaut, box, margin=0.1)
    d = round(95 * 0.1)  # the crop grows by 10 % of the box on each side
    np.testing.assert_array_equal(grown[66 - d:161 + d, 177 - d:272 + d], astronaut[66 - d:161 + d, 177 - d:272 + d])
    assert not grown[:66 - d].any() and not grown[:, 272 + d:].any()


def test_frames_without_faces_pass_through(astronaut):
    blank = np.full_like(astronaut, 128)
    frames = np.stack([astronaut, blank, astronaut])
    canvases, found = faces.capture_faces(frames, faces.make_detector(), margin=0.0)
    assert found.tolist() == [True, False, True]
    np.testing.assert_array_equal(canvases[1], blank)
    assert canvases[0].sum() < astronaut.sum() / 5  # only the face survives


def test_unknown_detector_and_fusion_are_clear_errors(cfg):
    with pytest.raises(ValueError, match="registered"):
        faces.make_detector("retina")
    cfg.faces.fusion = "blend"
    with pytest.raises(ValueError, match="fusion"):
        SampleProcessor(cfg)


def test_extra_fusion_adds_canvas_tokens_after_frame_tokens(astronaut, tmp_path, cfg, tiny_tok):
    _, info = tiny_tok
    small = np.asarray(Image.fromarray(astronaut).resize((168, 168), Image.Resampling.BILINEAR))
    assert len(faces.make_detector("haar", 1.1, 5, 12)(small)) == 1  # the face is still found at this scale
    video_io.write_video(str(tmp_path / "face.mp4"), np.stack([small] * 4), 4.0)
    Image.fromarray(small).save(tmp_path / "face.png")
    cfg.faces.fusion, cfg.faces.min_size, cfg.faces.margin = "extra", 12, 0.0
    proc = SampleProcessor(cfg)
    for kind, rel, grid_key, pix_key, pad in (("video", "face.mp4", "video_grid_thw", "pixel_values_videos",
                                               info.video_pad_id),
                                              ("image", "face.png", "image_grid_thw", "pixel_values",
                                               info.image_pad_id)):
        rec = manifests.conversation_record(conv(kind, rel), str(tmp_path), "m", 0)
        out = proc.map(rec)
        grids = out[grid_key]
        assert len(grids) == 2 and (grids[0] == grids[1]).all()
        n = int(np.prod(grids[0]))
        frames_part, canvas_part = out[pix_key][:n], out[pix_key][n:]
        assert canvas_part.shape == frames_part.shape and not np.allclose(canvas_part, frames_part)
        # Two vision blocks back to back inside the one placeholder: frames first, then the canvas.
        ids = out["input_ids"]
        starts = np.flatnonzero(ids == info.vision_start_id)
        assert len(starts) == 2 and ids[starts[1] - 1] == info.vision_end_id
        assert (ids == pad).sum() == 2 * n // 4
        if kind == "image":  # lossless: the canvas rows are the canvas image through the same resize + patchify
            canvas = faces.face_canvas(small, faces.make_detector("haar", 1.1, 5, 12)(small))
            _, gh, gw = grids[0]
            x = vision.resize_frames(np.stack([canvas] * 2), gh * 14, gw * 14)
            assert_close_rel(canvas_part, vision.to_patches(x)[0], 1e-6, what="face canvas")

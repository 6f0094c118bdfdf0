"""Vision processing: parity with Hugging Face's image processor, HF patch order, qwen-vl-utils sampling."""

import math

import av
import numpy as np
import PIL.Image
import pytest
import torch
from data_helpers import frame_number, numbered_frames
from tolerance import assert_close_rel
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from emoqwen_jax.data import video_io, vision
from emoqwen_jax.data.reasons import Rejected

MIN_PX, MAX_PX = 56 * 56, 28 * 28 * 120


def hf_process(image, min_pixels=MIN_PX, max_pixels=MAX_PX):
    proc = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return proc(images=image, return_tensors="np")


@pytest.mark.parametrize("h,w", [(37, 101), (333, 77), (61, 61), (500, 213), (29, 1000)])
def test_image_matches_hf(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = hf_process(PIL.Image.fromarray(img))
    ours = vision.process_image(img, min_pixels=MIN_PX, max_pixels=MAX_PX)
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape[1] == 1176
    assert_close_rel(ours["pixel_values"], ref["pixel_values"], 1e-6, what="pixels")


def test_rgba_and_grey_images_match_hf():
    rng = np.random.default_rng(1)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), mode="RGBA")
    grey = PIL.Image.fromarray(rng.integers(0, 256, (45, 70), dtype=np.uint8), mode="L")
    for im in (rgba, grey):
        ref = hf_process(im)
        ours = vision.process_image(im, min_pixels=MIN_PX, max_pixels=MAX_PX)
        assert_close_rel(ours["pixel_values"], ref["pixel_values"], 1e-6, what=im.mode)


@pytest.mark.parametrize("h,w,lo,hi", [(37, 101, 56 * 56, 28 * 28 * 120), (1080, 1920, 128 * 784, 768 * 784),
                                       (13, 17, 4 * 784, 16384 * 784), (4000, 30, 4 * 784, 300 * 784)])
def test_smart_resize_matches_hf(h, w, lo, hi):
    assert vision.smart_resize(h, w, min_pixels=lo, max_pixels=hi) == hf_smart_resize(h, w, 28, lo, hi)
    rh, rw = vision.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
    assert rh % 28 == 0 and rw % 28 == 0 and lo <= rh * rw <= max(hi, 28 * 28)


def naive_patchify(frames):
    """Reference straight from the documented order: rows over (t, block_h, block_w, mh, mw), values over
    (c, tp, ph, pw)."""
    t, h, w, c = frames.shape
    rows = []
    for gt in range(t // 2):
        for bh in range(h // 28):
            for bw in range(w // 28):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (2 * bh + mh) * 14, (2 * bw + mw) * 14
                        patch = frames[2 * gt:2 * gt + 2, y:y + 14, x:x + 14, :]  # (tp, ph, pw, c)
                        rows.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    return np.stack(rows)


def test_patchify_follows_documented_order():
    rng = np.random.default_rng(2)
    frames = rng.standard_normal((4, 56, 84, 3)).astype(np.float32)
    ours, grid = vision.patchify(frames)
    assert grid == (2, 4, 6)
    np.testing.assert_array_equal(ours, naive_patchify(frames))


def test_video_equals_per_frame_pipeline_grouped_by_temporal_patch():
    """A clip whose frames come in identical pairs must give, pair by pair, HF's rows for that still image;
    a clip with distinct frames must equal the documented order over resized, normalised frames."""
    rng = np.random.default_rng(3)
    stills = rng.integers(0, 256, (3, 50, 90, 3), dtype=np.uint8)
    pairs = np.repeat(stills, 2, axis=0)  # 6 frames: 0,0,1,1,2,2
    out = vision.process_video(pairs, fps=2.0, video_fps=2.0, min_frames=2, max_frames=6, min_pixels=MIN_PX,
                               max_pixels=MAX_PX)
    np.testing.assert_array_equal(out["frame_indices"], np.arange(6))
    refs = [hf_process(PIL.Image.fromarray(s)) for s in stills]
    np.testing.assert_array_equal(out["video_grid_thw"][0, 1:], refs[0]["image_grid_thw"][0, 1:])
    assert out["video_grid_thw"][0, 0] == 3
    assert_close_rel(out["pixel_values_videos"], np.concatenate([r["pixel_values"] for r in refs]), 1e-6,
                     what="still video")

    distinct = rng.integers(0, 256, (4, 50, 90, 3), dtype=np.uint8)
    out = vision.process_video(distinct, fps=2.0, video_fps=2.0, min_frames=2, max_frames=4, min_pixels=MIN_PX,
                               max_pixels=MAX_PX)
    _, gh, gw = out["video_grid_thw"][0]
    per_frame = np.stack([
        (np.asarray(PIL.Image.fromarray(f).resize((gw * 14, gh * 14), PIL.Image.Resampling.BICUBIC),
                    np.float32) / 255 - vision.CLIP_MEAN) / vision.CLIP_STD for f in distinct])
    assert_close_rel(out["pixel_values_videos"], naive_patchify(per_frame), 1e-6, what="distinct frames")
    # second_per_grid_ts: 2 frames per grid step at the sampling rate achieved (4 of 4 frames at 2 fps).
    np.testing.assert_allclose(out["second_per_grid_ts"], [1.0])


def qwen_vl_utils_indices(total, video_fps, fps, min_frames, max_frames):
    """The qwen-vl-utils rule, written out independently (torch.linspace + round, as fetch_video)."""
    lo = math.ceil(min_frames / 2) * 2
    hi = math.floor(min(max_frames, total) / 2) * 2
    n = min(min(max(total / video_fps * fps, lo), hi), total)
    n = math.floor(n / 2) * 2
    return torch.linspace(0, total - 1, n).round().long().numpy()


@pytest.mark.parametrize("total,video_fps,fps", [(10, 25.0, 2.0), (300, 30.0, 2.0), (301, 29.97, 3.0),
                                                 (7, 5.0, 2.0), (3, 10.0, 2.0), (5000, 25.0, 2.0), (90, 30.0, 1.0),
                                                 (2, 30.0, 2.0)])
def test_sample_indices_match_qwen_vl_utils(total, video_fps, fps):
    ours = vision.sample_indices(total, video_fps, fps=fps, min_frames=4, max_frames=768)
    np.testing.assert_array_equal(ours, qwen_vl_utils_indices(total, video_fps, fps, 4, 768))
    assert len(ours) % 2 == 0 and 2 <= len(ours) <= min(total, 768)


@pytest.mark.parametrize("h,w", [(48, 64), (368, 640)])  # single-threaded and threaded decoding
def test_decoded_frames_equal_pyav_full_decode(tmp_path, h, w):
    """Seeking, the decoder's thread setting and the clip's one RGB converter give exactly the pixels of
    PyAV's plain decode of every frame with ``to_ndarray(format="rgb24")``."""
    rng = np.random.default_rng(h)
    path = str(tmp_path / "noise.mp4")
    video_io.write_video(path, rng.integers(0, 256, (30, h, w, 3), dtype=np.uint8), 10.0, gop=5)
    with av.open(path) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    indices = np.asarray([0, 3, 3, 11, 12, 28, 29])
    frames, got, _ = video_io.read_video(path, lambda n, fps: indices)
    np.testing.assert_array_equal(got, indices)
    np.testing.assert_array_equal(frames, every[indices])


@pytest.mark.parametrize("name,total,video_fps", [("c10_25", 10, 25.0), ("c29_30", 29, 30.0), ("c24_12", 24, 12.0),
                                                  ("c7_5", 7, 5.0), ("c3_10", 3, 10.0)])
def test_decoded_clip_frames_are_the_sampled_ones(clip_dir, name, total, video_fps):
    fps = 4.0
    out = vision.process_video(str(clip_dir / f"{name}.mp4"), fps=fps, min_frames=4, max_frames=16,
                               min_pixels=MIN_PX, max_pixels=MAX_PX, return_frames=True)
    want = qwen_vl_utils_indices(total, video_fps, fps, 4, 16)
    np.testing.assert_array_equal(out["frame_indices"], want)
    assert [frame_number(f) for f in out["frames"]] == list(want)  # seeking decoded the right frames
    assert out["video_grid_thw"][0, 0] == len(want) // 2
    np.testing.assert_allclose(out["second_per_grid_ts"], [2 / (len(want) / total * video_fps)], rtol=1e-6)


def test_seeking_decode_equals_sequential_decode(clip_dir):
    """Frames picked by seeking (keyframe every 4) equal the same frames from a plain sequential decode."""
    path = str(clip_dir / "c29_30.mp4")
    with av.open(path) as c:
        sequential = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    idx = [0, 3, 9, 10, 27, 28]
    from emoqwen_jax.data import video_io

    frames, got_idx, fps = video_io.read_video(path, lambda n, f: np.asarray(idx))
    assert fps == pytest.approx(30.0) and list(got_idx) == idx
    np.testing.assert_array_equal(frames, sequential[idx])
    assert [frame_number(f) for f in frames] == idx


@pytest.mark.parametrize("name,reason", [("truncated.mp4", "corrupt_video"),
                                         ("truncated_faststart.mp4", "corrupt_video"), ("garbage.mp4", "corrupt_video"),
                                         ("empty.mp4", "corrupt_video"), ("missing.mp4", "missing_file"),
                                         ("one_frame.mp4", "too_few_frames"), ("zero_frames.mp4", "zero_frames")])
def test_bad_videos_are_rejected_with_reason(clip_dir, name, reason):
    with pytest.raises(Rejected) as e:
        vision.process_video(str(clip_dir / name), fps=2.0, min_frames=4, max_frames=16, min_pixels=MIN_PX,
                             max_pixels=MAX_PX)
    assert e.value.reason == reason


def test_min_video_frames_is_configurable(clip_dir):
    kw = dict(fps=2.0, min_frames=4, max_frames=16, min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert len(vision.process_video(str(clip_dir / "c7_5.mp4"), **kw)["frame_indices"]) == 4
    with pytest.raises(Rejected) as e:
        vision.process_video(str(clip_dir / "c7_5.mp4"), cfg={"min_video_frames": 8}, **kw)
    assert e.value.reason == "too_few_frames"


def test_zero_frame_video_is_rejected():
    with pytest.raises(Rejected) as e:
        vision.process_video(np.zeros((0, 8, 8, 3), np.uint8), fps=2.0, min_frames=4, max_frames=16,
                             min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert e.value.reason == "zero_frames"


@pytest.mark.parametrize("name,reason", [("broken.jpg", "unreadable_image"), ("nope.png", "missing_file"),
                                         ("sliver.png", "bad_aspect_ratio")])
def test_bad_images_are_rejected_with_reason(clip_dir, name, reason):
    with pytest.raises(Rejected) as e:
        vision.process_image(str(clip_dir / name), min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert e.value.reason == reason


def test_absurd_resolution_is_rejected():
    with pytest.raises(Rejected) as e:
        vision.process_image(np.zeros((1, 1, 3), np.uint8), min_pixels=MIN_PX, max_pixels=MAX_PX)
    assert e.value.reason == "bad_resolution"
    with pytest.raises(Rejected) as e:
        vision.process_image(np.zeros((300, 300, 3), np.uint8), min_pixels=MIN_PX, max_pixels=MAX_PX,
                             cfg={"max_input_pixels": 200 * 200})
    assert e.value.reason == "bad_resolution"


def test_total_pixels_budget_shrinks_long_clips():
    frames = numbered_frames(24, 112, 112)
    few = vision.process_video(frames, fps=2.0, video_fps=2.0, min_frames=4, max_frames=24, min_pixels=784,
                               max_pixels=112 * 112, total_pixels=None)
    capped = vision.process_video(frames, fps=2.0, video_fps=2.0, min_frames=4, max_frames=24, min_pixels=784,
                                  max_pixels=112 * 112, total_pixels=24 * 56 * 56 // 2)
    assert tuple(few["video_grid_thw"][0]) == (12, 8, 8)
    assert tuple(capped["video_grid_thw"][0]) == (12, 4, 4)

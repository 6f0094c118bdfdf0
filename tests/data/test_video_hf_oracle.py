"""Distinct-frame video patches against Hugging Face itself (the other video tests compare with a
patchify written in the test).

HF's video processor needs torchvision, which cannot be installed beside our torch pin, so two HF oracles
stand in for it:
1. the image processor (``Qwen2VLImageProcessorPil``) applied to each frame of a temporal pair: its rows are
   [units, C, temporal_patch, 14, 14] with the frame broadcast over the temporal slot, so the video row of the
   pair (f0, f1) takes slot 0 from f0's rows and slot 1 from f1's;
2. the video processor's own ``patchify`` method, its source read from transformers' file and run on the
   frames HF's image processor resized and normalised (no torchvision is imported).
"""

import ast
import inspect

import numpy as np
import PIL.Image
import pytest
import torch
import transformers.models.qwen2_vl as qwen2_vl_pkg
from tolerance import assert_close_rel
from transformers import Qwen2VLImageProcessorPil

from emoqwen_jax.data import vision

MIN_PX, MAX_PX = 56 * 56, 28 * 28 * 120


def _processor():
    return Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PX, "longest_edge": MAX_PX})


def hf_video_patchify():
    """``Qwen2VLVideoProcessor.patchify`` from transformers' source, compiled without importing its module
    (which imports torchvision at the top)."""
    path = inspect.getfile(qwen2_vl_pkg).replace("__init__.py", "video_processing_qwen2_vl.py")
    tree = ast.parse(open(path).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "patchify")
    fn.returns = None
    for a in fn.args.args:
        a.annotation = None
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), namespace)
    return namespace["patchify"]


class _FrameCapture(Qwen2VLImageProcessorPil):
    """HF's image pipeline (resize, rescale, normalise) up to, not including, its single-image patchify."""

    def patchify(self, image, patch_size, merge_size, temporal_patch_size):
        self.frames.append(np.asarray(image, np.float32))  # float32[C, H, W]
        return super().patchify(image, patch_size, merge_size, temporal_patch_size)


def _clip(seed, t=6, h=50, w=90):
    frames = np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    assert all((frames[i] != frames[i + 1]).any() for i in range(t - 1))  # every frame distinct
    return frames


def _ours(frames):
    t = len(frames)
    return vision.process_video(frames, fps=2.0, video_fps=2.0, min_frames=2, max_frames=t, min_pixels=MIN_PX,
                                max_pixels=MAX_PX)


@pytest.mark.parametrize("seed,shape", [(0, (4, 50, 90)), (1, (6, 61, 37))])
def test_distinct_frames_equal_image_processor_on_temporal_pairs(seed, shape):
    frames = _clip(seed, *shape)
    out = _ours(frames)
    np.testing.assert_array_equal(out["frame_indices"], np.arange(len(frames)))
    proc = _processor()
    refs = [proc(images=PIL.Image.fromarray(f), return_tensors="np") for f in frames]
    units = refs[0]["pixel_values"].shape[0]
    per_frame = [r["pixel_values"].reshape(units, 3, 2, 14, 14) for r in refs]
    expected = []
    for g in range(len(frames) // 2):
        row = np.empty_like(per_frame[0])
        row[:, :, 0] = per_frame[2 * g][:, :, 0]
        row[:, :, 1] = per_frame[2 * g + 1][:, :, 1]
        expected.append(row.reshape(units, -1))
    expected = np.concatenate(expected)
    np.testing.assert_array_equal(out["video_grid_thw"][0], [len(frames) // 2, *refs[0]["image_grid_thw"][0, 1:]])
    assert_close_rel(out["pixel_values_videos"], expected, 1e-6, what="frame pairs")


def test_distinct_frames_equal_hf_video_patchify():
    frames = _clip(2, t=6, h=47, w=103)
    out = _ours(frames)
    capture = _FrameCapture(size={"shortest_edge": MIN_PX, "longest_edge": MAX_PX})
    capture.frames = []
    capture(images=[PIL.Image.fromarray(f) for f in frames], return_tensors="np")
    video = torch.from_numpy(np.stack(capture.frames))[None]  # float32[1, T, C, H, W]
    patches, gt, gh, gw = hf_video_patchify()(None, video, patch_size=14, merge_size=2, temporal_patch_size=2)
    np.testing.assert_array_equal(out["video_grid_thw"][0], [gt, gh, gw])
    assert_close_rel(out["pixel_values_videos"], patches[0].numpy(), 1e-6, what="HF video patchify")
    # A frame swapped inside a temporal pair must change the rows: the check sees the temporal order.
    swapped = _ours(frames[[1, 0, 2, 3, 4, 5]])["pixel_values_videos"]
    assert np.abs(swapped - out["pixel_values_videos"]).max() > 0.1

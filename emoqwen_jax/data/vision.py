"""Images and clips → Qwen2.5-VL patch rows, exactly as Hugging Face's processor lays them out.

Shapes: T sampled frames, H×W resized size (multiples of 28), C=3, gt=T/2, gh=H/14, gw=W/14,
P = gt·gh·gw patch rows of D = C·2·14·14 = 1176 values.

Order of the D values and of the P rows (HF ``Qwen2VLImageProcessor``): the frames are viewed as
(gt, 2, C, gh/2, 2, 14, gw/2, 2, 14) and transposed (0, 3, 6, 4, 7, 2, 1, 5, 8), so rows run over the
merged 2×2 blocks in raster order with the 4 patches of a block contiguous, and each row is (C, 2, 14, 14).
A still image is repeated to 2 frames (gt = 1). Pixels are resized with PIL bicubic, scaled to [0, 1] and
normalised with the CLIP mean/std.

Frame sampling follows qwen-vl-utils: n = clip_frames / clip_fps · fps, clamped to [min_frames, max_frames]
(both made even) and to the clip length, rounded down to even; indices = round(linspace(0, N−1, n)).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image

from emoqwen_jax.data import video_io
from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.runtime import storage

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: resized sides are multiples of this
PATCH_DIM = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE  # 1176
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _round_by(x: float, f: int) -> int:
    return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def smart_resize(height: int, width: int, *, min_pixels: int, max_pixels: int, factor: int = FACTOR,
                 max_aspect_ratio: float = 200.0) -> tuple[int, int]:
    """(height, width) → nearest (h, w), multiples of ``factor``, h·w within [min_pixels, max_pixels].

    Raises Rejected('bad_aspect_ratio') past ``max_aspect_ratio`` (HF and qwen-vl-utils raise ValueError).
    """
    if min(height, width) <= 0:
        raise Rejected("bad_resolution", f"{height}x{width}")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise Rejected("bad_aspect_ratio", f"{height}x{width} (limit {max_aspect_ratio})")
    h_bar = max(factor, _round_by(height, factor))
    w_bar = max(factor, _round_by(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, _floor_by(height / beta, factor))
        w_bar = max(factor, _floor_by(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = _ceil_by(height * beta, factor)
        w_bar = _ceil_by(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float, *, fps: float, min_frames: int, max_frames: int) -> int:
    """Number of frames to sample (qwen-vl-utils ``smart_nframes`` with ``fps``): even, in [2, total_frames].

    Raises Rejected('too_few_frames') for clips shorter than 2 frames.
    """
    if total_frames < TEMPORAL_PATCH_SIZE:
        raise Rejected("too_few_frames", f"{total_frames} frame(s)")
    lo = _ceil_by(min_frames, TEMPORAL_PATCH_SIZE)
    hi = _floor_by(min(max_frames, total_frames), TEMPORAL_PATCH_SIZE)
    n = total_frames / video_fps * fps
    n = min(max(n, lo), hi, total_frames)
    return max(TEMPORAL_PATCH_SIZE, _floor_by(n, TEMPORAL_PATCH_SIZE))


def sample_indices(total_frames: int, video_fps: float, *, fps: float, min_frames: int,
                   max_frames: int) -> np.ndarray:
    """Uniform frame indices int64[n]: round(linspace(0, total_frames − 1, n)) (round half to even, as torch)."""
    n = smart_nframes(total_frames, video_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)
    return np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB copy; transparent pixels composite over white (as HF ``convert_to_rgb`` and qwen-vl-utils)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: Any) -> PIL.Image.Image:
    """PIL image, uint8[H, W, 3|4] or [H, W] array, path or encoded bytes → RGB PIL image.

    Raises Rejected('missing_file'|'unreadable_image').
    """
    if isinstance(source, PIL.Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim not in (2, 3):
            raise Rejected("unreadable_image", f"array {source.dtype}{list(source.shape)} is not uint8 HxW[xC]")
        return to_rgb(PIL.Image.fromarray(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(bytes(source))
    else:
        if not storage.isfile(source):
            raise Rejected("missing_file", str(source))
        fp = source
        if storage.is_uri(source):  # remote image (gs://…): read its bytes
            with storage.open(source, "rb") as f:
                fp = io.BytesIO(f.read())
    try:
        with PIL.Image.open(fp) as im:
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise Rejected("unreadable_image", f"{type(e).__name__}: {e}") from None


def check_size(height: int, width: int, cfg: Any) -> None:
    """Rejects absurd decoded sizes before any work is spent on them."""
    if min(height, width) < cfg.get("min_input_side", 2) or height * width > cfg.get("max_input_pixels", 1 << 26):
        raise Rejected("bad_resolution", f"{height}x{width}")
    if max(height, width) / min(height, width) > cfg.get("max_aspect_ratio", 200.0):
        raise Rejected("bad_aspect_ratio", f"{height}x{width}")


def resize_frames(frames: Sequence[np.ndarray] | np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8[T, h, w, 3] → uint8[T, height, width, 3] with PIL bicubic (frames already that size are kept)."""
    frames = [np.asarray(f) for f in frames]
    if all(f.shape[:2] == (height, width) for f in frames):
        return np.stack(frames).astype(np.uint8, copy=False)
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(PIL.Image.fromarray(frame).resize((width, height), resample=PIL.Image.Resampling.BICUBIC))
    return out


# Normalisation per value of a patch row, whose layout is (C, 2, 14, 14): x/255 − mean)/std as one multiply-add.
_ROW_SCALE = np.repeat(1.0 / (255.0 * CLIP_STD.astype(np.float64)), PATCH_DIM // 3).astype(np.float32)
_ROW_SHIFT = np.repeat(-CLIP_MEAN.astype(np.float64) / CLIP_STD, PATCH_DIM // 3).astype(np.float32)


def to_patches(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resized uint8[T, H, W, 3] → (normalised float32[P, 1176], grid). T = 1 (an image) is repeated to 2.

    Patchifying the uint8 frames and normalising the rows afterwards does the big transpose on a quarter of
    the bytes; the values equal normalise-then-patchify.
    """
    if frames.shape[0] == 1:
        frames = np.repeat(frames, TEMPORAL_PATCH_SIZE, axis=0)  # a still image is a 2-frame clip
    rows, grid = patchify(frames)
    out = rows.astype(np.float32)
    out *= _ROW_SCALE
    out += _ROW_SHIFT
    return out, grid


def patchify(frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """[T, H, W, C] (T even, H, W multiples of 28; any dtype) → ([P, 1176], (gt, gh, gw)) in HF order."""
    t, h, w, c = frames.shape
    tp, ps, m = TEMPORAL_PATCH_SIZE, PATCH_SIZE, MERGE_SIZE
    if t % tp or h % (ps * m) or w % (ps * m):
        raise ValueError(f"patchify needs T%{tp}==0 and H, W multiples of {ps * m}; got {frames.shape}")
    gt, gh, gw = t // tp, h // ps, w // ps
    x = frames.reshape(gt, tp, gh // m, m, ps, gw // m, m, ps, c)
    # axes: 0 gt, 1 tp, 2 gh/m, 3 mh, 4 ph, 5 gw/m, 6 mw, 7 pw, 8 C → (gt, gh/m, gw/m, mh, mw, C, tp, ph, pw)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * ps * ps), (gt, gh, gw)


def process_image(image: Any, *, min_pixels: int, max_pixels: int, cfg: Any = None) -> dict[str, np.ndarray]:
    """One image → ``{"pixel_values": float32[P, 1176], "image_grid_thw": int32[1, 3]}`` (gt = 1).

    ``image``: PIL image, uint8 array, path or encoded bytes. ``cfg`` (optional dict-like) holds the bad-input
    limits (``max_aspect_ratio``, ``max_input_pixels``, ``min_input_side``).
    """
    cfg = cfg or {}
    im = load_image(image)
    w0, h0 = im.size
    check_size(h0, w0, cfg)
    h, w = smart_resize(h0, w0, min_pixels=min_pixels, max_pixels=max_pixels,
                        max_aspect_ratio=cfg.get("max_aspect_ratio", 200.0))
    pixel_values, grid = to_patches(resize_frames([np.asarray(im)], h, w))
    return {"pixel_values": pixel_values, "image_grid_thw": np.asarray([grid], np.int32)}


def video_max_pixels(nframes: int, *, min_pixels: int, max_pixels: int, total_pixels: int | None) -> int:
    """Per-frame pixel cap: qwen-vl-utils shrinks it so nframes frames fit ``total_pixels``."""
    if not total_pixels:
        return max_pixels
    return int(max(min(max_pixels, total_pixels / nframes * TEMPORAL_PATCH_SIZE), int(min_pixels * 1.05)))


def process_video(video: Any, *, fps: float, min_frames: int, max_frames: int, min_pixels: int, max_pixels: int,
                  total_pixels: int | None = None, video_fps: float | None = None, cfg: Any = None,
                  return_frames: bool = False) -> dict[str, np.ndarray]:
    """A clip → patch rows and grid, sampled and resized by the qwen-vl-utils rules.

    ``video``: path, encoded bytes, an open ``video_io.MediaFile``, or decoded frames (uint8[N, H, W, 3] or a
    list of them / PIL images), for which ``video_fps`` (default ``fps``) is the rate they were taken at.
    Returns ``{"pixel_values_videos": float32[P, 1176], "video_grid_thw": int32[1, 3],
    "second_per_grid_ts": float32[1], "frame_indices": int64[T]}``; with ``return_frames`` also
    ``"frames": uint8[T, h0, w0, 3]``, the sampled frames before resizing (the faces module reuses them).
    """
    cfg = cfg or {}

    def choose(total: int, clip_fps: float) -> np.ndarray:
        if total < int(cfg.get("min_video_frames", TEMPORAL_PATCH_SIZE)):
            raise Rejected("too_few_frames", f"{total} frame(s) < min_video_frames {cfg.get('min_video_frames')}")
        return sample_indices(total, clip_fps, fps=fps, min_frames=min_frames, max_frames=max_frames)

    if isinstance(video, (str, bytes, bytearray, memoryview, os.PathLike, video_io.MediaFile)):
        frames, indices, clip_fps = video_io.read_video(video, choose)
    else:
        decoded = [np.asarray(to_rgb(f)) if isinstance(f, PIL.Image.Image) else np.asarray(f) for f in video]
        if not decoded:
            raise Rejected("zero_frames", "empty frame list")
        clip_fps = float(video_fps or fps)
        indices = choose(len(decoded), clip_fps)
        if len({f.shape for f in decoded}) != 1 or decoded[0].ndim != 3 or decoded[0].shape[-1] != 3:
            raise Rejected("corrupt_video", "frames must share one HxWx3 shape")
        frames = np.stack([decoded[i] for i in indices]).astype(np.uint8, copy=False)
    out = frames_to_patches(frames, indices, clip_fps, min_pixels=min_pixels, max_pixels=max_pixels,
                            total_pixels=total_pixels, cfg=cfg)
    if return_frames:
        out["frames"] = frames
    return out


def frames_to_patches(frames: np.ndarray, indices: np.ndarray, clip_fps: float, *, min_pixels: int,
                      max_pixels: int, total_pixels: int | None, cfg: Any) -> dict[str, np.ndarray]:
    """Sampled uint8[T, h0, w0, 3] frames → the ``process_video`` dict (resize, normalise, patchify)."""
    n, h0, w0 = frames.shape[:3]
    check_size(h0, w0, cfg)
    cap = video_max_pixels(n, min_pixels=min_pixels, max_pixels=max_pixels, total_pixels=total_pixels)
    h, w = smart_resize(h0, w0, min_pixels=min_pixels, max_pixels=cap,
                        max_aspect_ratio=cfg.get("max_aspect_ratio", 200.0))
    pixel_values, grid = to_patches(resize_frames(frames, h, w))
    # qwen-vl-utils: sample_fps = nframes / total_frames · video_fps (uniform sampling ends at frame total − 1);
    # one grid step spans 2 sampled frames.
    sample_fps = n / (int(indices[-1]) + 1) * clip_fps
    return {
        "pixel_values_videos": pixel_values,
        "video_grid_thw": np.asarray([grid], np.int32),
        "second_per_grid_ts": np.asarray([TEMPORAL_PATCH_SIZE / sample_fps], np.float32),
        "frame_indices": np.asarray(indices, np.int64),
    }


"""M-RoPE position ids (t, h, w per token): the rule Qwen2.5-VL was released and trained with (transformers
4.50), and, as an option, the time-aligned audio interleaving rule (``layout.audio``).

Text tokens share one position on all three axes. An image or video block (``<|vision_start|>`` then its
``<|image_pad|>`` / ``<|video_pad|>`` tokens) gets t = floor(frame_group · second_per_grid_t · tokens_per_second)
(0 for images), h and w on the merged grid, all offset by the running position; text after a block resumes at
the block's maximum + 1. (transformers >= 5.3 resumes at start + max(h, w) / merge instead; see docs/design.md,
The M-RoPE position rule.) With an ``AudioSpec`` whose ``position_rule`` is 'interleave', a block
``<|vision_start|><|audio_bos|>`` holds a clip's video and audio tokens chunk by chunk
(``interleaved_positions``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from emoqwen_jax.layout.audio import SECONDS_PER_AUDIO_TOKEN, AudioSpec, interleave_chunks
from emoqwen_jax.layout.vision import LayoutSpec, as_grids


def get_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
                   spec: LayoutSpec, segment_ids=None, *, audio_lengths=None,
                   audio_spec: AudioSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids of a batch (the module docstring gives the rule).

    ``segment_ids`` int[B, L] (packed rows: 1, 2, ... per sample, 0 padding): each sample's positions are
    computed as if it were alone in its row (they restart at 0), then laid side by side. The grids are in row
    order, within a row in token order (the packed samples' items one after another). ``audio_spec`` with
    ``position_rule='interleave'`` turns the interleaved blocks on; ``audio_lengths`` int[n, 2] (windows,
    tokens) per audio, in text order, then gives each block its audio token count.

    Returns position_ids int32[3, B, L] (padding positions hold 1, as in HF) and rope_deltas int32[B]
    (max position + 1 - L, HF's definition, carried into decoding; of a packed row's largest position).
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    videos = as_grids(video_grid_thw)
    items = _Items(as_grids(image_grid_thw), videos,
                   (np.ones(len(videos), np.float32) if second_per_grid_ts is None
                    else np.asarray(second_per_grid_ts, np.float32).reshape(-1)),
                   np.asarray(np.zeros((0, 2)) if audio_lengths is None else audio_lengths, np.int64).reshape(-1, 2))
    interleave = audio_spec if audio_spec is not None and audio_spec.position_rule == "interleave" else None
    position_ids = np.ones((3, b, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        if segment_ids is None:
            samples = [mask[row] == 1]
        else:
            seg = np.asarray(segment_ids)[row]
            real = (seg > 0) & (mask[row] == 1)
            samples = [real & (seg == s) for s in _in_order(seg[real])]
        top = -1
        for where in samples:
            positions = _sample_positions(input_ids[row][where], items, spec, interleave)
            position_ids[:, row, where] = positions
            top = max(top, int(positions.max()) if positions.size else -1)
        deltas[row] = top + 1 - length
    return position_ids.astype(np.int32), deltas.astype(np.int32)


class _Items:
    """The batch's images, videos (with seconds per grid step) and audio lengths, and how many of each the rows
    walked so far used."""

    def __init__(self, images: np.ndarray, videos: np.ndarray, second_per_grid: np.ndarray, audio: np.ndarray):
        self.images, self.videos, self.second_per_grid, self.audio = images, videos, second_per_grid, audio
        self.used = {"image": 0, "video": 0, "audio": 0}

    def take(self, kind: str) -> int:
        index = self.used[kind]
        self.used[kind] += 1
        return index


def _in_order(ids: np.ndarray) -> list[int]:
    """The distinct values of ``ids`` in order of first appearance."""
    _, first = np.unique(ids, return_index=True)
    return [int(ids[i]) for i in sorted(first)]


def _sample_positions(tokens: np.ndarray, items: _Items, spec: LayoutSpec,
                      interleave: AudioSpec | None) -> np.ndarray:
    """int64[3, n]: the M-RoPE positions of one sample's n real tokens, starting at 0; takes the sample's items
    from ``items``. Text runs between blocks get consecutive ids from the previous maximum + 1 (a vision block's
    ``<|vision_start|>``, and an interleaved block's ``<|audio_bos|>``, are text)."""
    m = spec.spatial_merge_size
    parts: list[np.ndarray] = []
    done = 0  # tokens placed so far

    def text_until(end: int) -> None:
        start = int(parts[-1].max()) + 1 if parts else 0
        parts.append(np.broadcast_to(np.arange(end - done, dtype=np.int64) + start, (3, end - done)))

    for s in np.flatnonzero(tokens[:-1] == spec.vision_start_token_id):
        if s < done:
            continue
        kind = tokens[s + 1]
        if interleave is not None:  # audios before this block (text-rule blocks included) come first
            items.used["audio"] += int((tokens[done:s] == interleave.audio_bos_token_id).sum())
        if kind in (spec.image_token_id, spec.video_token_id):
            is_image = kind == spec.image_token_id
            text_until(s + 1)
            if is_image:
                grid, interval = items.images[items.take("image")], np.float32(0.0)
            else:
                v = items.take("video")
                grid, interval = items.videos[v], items.second_per_grid[v]
            parts.append(_grid_positions(grid, interval, int(parts[-1].max()) + 1, spec))
            done = s + 1 + int(np.prod(grid)) // (m * m)
        elif interleave is not None and kind == interleave.audio_bos_token_id:
            text_until(s + 2)
            v, a = items.take("video"), items.take("audio")
            block = interleaved_positions(items.videos[v], items.second_per_grid[v], int(items.audio[a, 1]),
                                          int(parts[-1].max()) + 1, interleave, spec)
            parts.append(block)
            done = s + 2 + block.shape[1]
    if interleave is not None:
        items.used["audio"] += int((tokens[done:] == interleave.audio_bos_token_id).sum())
    if done < len(tokens):
        text_until(len(tokens))
    return np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)


def _grid_positions(grid: Sequence[int], interval, start: int, spec: LayoutSpec) -> np.ndarray:
    """int64[3, t · h/m · w/m]: Qwen2.5-VL's ids of one image/video block, offset by ``start``."""
    t, h, w = (int(x) for x in grid)
    m = spec.spatial_merge_size
    lh, lw = h // m, w // m
    # float32 product, then truncation, as torch does: (index * interval) * tokens_per_second.
    t_ids = (np.arange(t, dtype=np.float32) * np.float32(interval) * np.float32(spec.tokens_per_second)
             ).astype(np.int64)
    return np.stack([np.repeat(t_ids, lh * lw), np.tile(np.repeat(np.arange(lh), lw), t),
                     np.tile(np.arange(lw), t * lh)]) + start


def interleaved_positions(video_grid: Sequence[int], second_per_grid: float, num_audio_tokens: int, start: int,
                          audio_spec: AudioSpec, spec: LayoutSpec) -> np.ndarray:
    """int64[3, n] M-RoPE ids of an interleaved block's video and audio tokens, in sequence order (chunk by chunk:
    the chunk's video tokens, then its audio tokens), offset by ``start``."""
    video = _grid_positions(video_grid, second_per_grid, 0, spec)
    a_t = np.floor(np.arange(num_audio_tokens) * SECONDS_PER_AUDIO_TOKEN * spec.tokens_per_second + 1e-9)
    audio = np.broadcast_to(a_t.astype(np.int64), (3, num_audio_tokens))
    parts, v0, a0 = [], 0, 0
    for v, a in interleave_chunks(video_grid, second_per_grid, num_audio_tokens, audio_spec.interleave_seconds,
                                  spec.spatial_merge_size):
        parts += [video[:, v0:v0 + v], audio[:, a0:a0 + a]]
        v0, a0 = v0 + v, a0 + a
    return np.concatenate(parts, axis=1) + start

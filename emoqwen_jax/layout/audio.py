"""The audio side of the host layout: where each audio token's features come from, and the token sequence of the
time-aligned interleaving option (its M-RoPE ids are ``layout.positions``').

Audio arrives as W encoder windows (all audios of the batch, in text order, each audio's windows contiguous);
the encoder gives T = window_frames / 4 rows per window, so the features form one flat list of W · T rows.
An audio with ``(windows, tokens)`` = ``audio_lengths[i]`` owns rows [w_i · T, w_i · T + tokens), w_i being
the windows before it (its last window's padding rows are never used).

Position rules (``config.model.audio.position_rule``):
  * 'text' (default): the audio block ``<|audio_bos|> <|AUDIO|> × n <|audio_eos|>`` follows the clip's vision
    block; ``get_rope_index`` gives its tokens text-like ids (t = h = w), continuing after the vision
    block's maximum + 1 — nothing audio-specific to compute.
  * 'interleave' (Qwen2.5-Omni's TMRoPE idea): the clip's block is ``<|vision_start|> <|audio_bos|>`` then, per
    chunk of ``interleave_seconds``, the video tokens of the frames in that chunk followed by the audio tokens
    in it, then ``<|audio_eos|> <|vision_end|>``. Video tokens keep Qwen2.5-VL's ids (t = floor(g · seconds
    per grid · tokens_per_second), h, w); audio token j (at j · 40 ms) gets t = h = w = floor(j · 0.04 ·
    tokens_per_second): sound and picture of the same moment share a temporal id. All are offset by the
    position after ``<|audio_bos|>``; text after the block resumes at its maximum + 1 (as after a vision block).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

SECONDS_PER_AUDIO_TOKEN = 0.04  # 25 tokens per second (conv stride 2, pooling 2, 10 ms hop)


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """The audio constants the host needs (from ``ModelConfig.audio``)."""

    audio_token_id: int
    audio_bos_token_id: int
    audio_eos_token_id: int
    window_frames: int = 3000
    position_rule: str = "text"
    interleave_seconds: float = 2.0

    @property
    def tokens_per_window(self) -> int:
        return self.window_frames // 4


def audio_token_index(input_ids, audio_lengths, spec: AudioSpec, *, num_windows: int | None = None) -> np.ndarray:
    """int32[B, L]: for each ``<|AUDIO|>`` token, its row in the flat encoder output (W · T rows); -1 elsewhere.

    Audio items are counted by their ``<|audio_bos|>`` tokens in row-major order (an interleaved block splits
    an item's tokens into runs; the bos still opens it once). ``audio_lengths`` int[n_aud, 2] = (windows,
    tokens) per item. ValueError when the text's audio tokens and the lengths disagree.
    """
    ids = np.asarray(input_ids)
    lengths = np.asarray(audio_lengths, np.int64).reshape(-1, 2)
    index = np.full(ids.shape, -1, np.int32)
    flat = ids.reshape(-1)
    item = np.cumsum(flat == spec.audio_bos_token_id) - 1  # the item each position belongs to (after its bos)
    is_audio = flat == spec.audio_token_id
    n_items = int((flat == spec.audio_bos_token_id).sum())
    if n_items != len(lengths) or (is_audio.any() and item[is_audio].min() < 0):
        raise ValueError(f"{n_items} <|audio_bos|> blocks in input_ids but {len(lengths)} audio lengths were given")
    counts = np.bincount(item[is_audio], minlength=len(lengths)) if len(lengths) else np.zeros(0, np.int64)
    if len(lengths) and not np.array_equal(counts, lengths[:, 1]):
        raise ValueError(f"audio features and audio tokens do not match: <|AUDIO|> tokens per audio "
                         f"{counts.tolist()}, the audio lengths give {lengths[:, 1].tolist()}")
    if len(lengths) and np.any(lengths[:, 1] > lengths[:, 0] * spec.tokens_per_window):
        raise ValueError(f"audio lengths {lengths.tolist()}: more tokens than {spec.tokens_per_window} per window")
    total = int(lengths[:, 0].sum()) if len(lengths) else 0
    if num_windows is not None and total > num_windows:
        raise ValueError(f"the audio lengths need {total} windows but the features hold {num_windows}")
    first_row = (np.concatenate([[0], np.cumsum(lengths[:, 0])[:-1]]) * spec.tokens_per_window if len(lengths)
                 else np.zeros(0, np.int64))
    audio_items = item[is_audio]
    rank = np.arange(audio_items.size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[audio_items]
    index.reshape(-1)[is_audio] = (first_row[audio_items] + rank).astype(np.int32)
    return index


# ---- 'interleave': the sequence and its positions -----------------------------------------------------------
def interleave_chunks(video_grid: Sequence[int], second_per_grid: float, num_audio_tokens: int,
                      chunk_seconds: float, merge_size: int = 2) -> list[tuple[int, int]]:
    """(video tokens, audio tokens) per chunk of ``chunk_seconds``: video grid step g (time g · second_per_grid)
    and audio token j (time j · 0.04 s) fall in chunk floor(time / chunk_seconds). Every chunk up to the last
    non-empty one is listed (possibly (0, k) or (k, 0))."""
    t, h, w = (int(x) for x in video_grid)
    per_step = (h // merge_size) * (w // merge_size)
    v_chunk = np.floor(np.arange(t) * float(second_per_grid) / chunk_seconds + 1e-9).astype(np.int64)
    a_chunk = np.floor(np.arange(num_audio_tokens) * SECONDS_PER_AUDIO_TOKEN / chunk_seconds + 1e-9).astype(np.int64)
    n = int(max(v_chunk.max(initial=-1), a_chunk.max(initial=-1))) + 1
    v = np.bincount(v_chunk, minlength=n) * per_step
    a = np.bincount(a_chunk, minlength=n)
    return [(int(x), int(y)) for x, y in zip(v, a, strict=True)]


def interleaved_block(chunks: Sequence[tuple[int, int]], video_pad_id: int, spec: AudioSpec) -> list[int]:
    """The token ids between ``<|vision_start|>`` and ``<|vision_end|>`` of an interleaved clip."""
    out = [spec.audio_bos_token_id]
    for v, a in chunks:
        out += [video_pad_id] * v + [spec.audio_token_id] * a
    return out + [spec.audio_eos_token_id]

"""Audio layout: feature rows of each <|AUDIO|> token, and the M-RoPE ids of both position rules."""

import numpy as np
import pytest

from emoqwen_jax import layout
from emoqwen_jax.layout import AudioSpec

TEXT, VSTART, VEND, IMAGE, VIDEO, BOS, AUD, EOS = 7, 50, 51, 52, 53, 60, 61, 62
VISION = layout.LayoutSpec(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
                           tokens_per_second=2.0)
SPEC = AudioSpec(audio_token_id=AUD, audio_bos_token_id=BOS, audio_eos_token_id=EOS, window_frames=100,
                 position_rule="interleave", interleave_seconds=2.0)


def test_audio_token_index_rows():
    # row 0: an audio of 2 windows / 40 tokens; row 1: one of 1 window / 7 tokens, then one of 3 windows / 60
    row0 = [TEXT, BOS] + [AUD] * 40 + [EOS, TEXT] + [0] * 70
    row1 = [BOS] + [AUD] * 7 + [EOS, TEXT, BOS] + [AUD] * 60 + [EOS, TEXT, TEXT]
    ids = np.array([row0, row1 + [0] * (len(row0) - len(row1))])
    index = layout.audio_token_index(ids, [[2, 40], [1, 7], [3, 60]], SPEC, num_windows=8)
    np.testing.assert_array_equal(index[0, 2:42], np.arange(40))  # windows 0-1: rows 0..49, first 40 used
    np.testing.assert_array_equal(index[1, 1:8], 50 + np.arange(7))  # window 2: rows 50..74
    np.testing.assert_array_equal(index[1, 11:71], 75 + np.arange(60))  # windows 3-5
    assert (index[ids != AUD] == -1).all()


def test_audio_token_index_mismatch_is_a_clear_error():
    ids = np.array([[BOS] + [AUD] * 5 + [EOS]])
    with pytest.raises(ValueError, match="do not match"):
        layout.audio_token_index(ids, [[1, 6]], SPEC)
    with pytest.raises(ValueError, match="audio lengths"):
        layout.audio_token_index(ids, [[1, 5], [1, 2]], SPEC)
    with pytest.raises(ValueError, match="windows"):
        layout.audio_token_index(ids, [[2, 5]], SPEC, num_windows=1)


def test_text_rule_audio_is_text_like_after_the_vision_block():
    """'text': the audio block's ids are t = h = w, continuing after the video block's maximum + 1."""
    grid, n_video = (4, 4, 6), 4 * 2 * 3
    ids = np.array([[TEXT, VSTART] + [VIDEO] * n_video + [VEND, BOS] + [AUD] * 9 + [EOS, TEXT]])
    pos, _ = layout.get_rope_index(ids, None, None, [grid], [1.5], VISION)
    video_max = pos[:, 0, 2:2 + n_video].max()
    audio = pos[:, 0, ids[0] == AUD]
    np.testing.assert_array_equal(audio[0], audio[1])
    np.testing.assert_array_equal(audio[0], audio[2])
    bos = np.flatnonzero(ids[0] == BOS)[0]
    np.testing.assert_array_equal(pos[:, 0, bos], video_max + 2)  # <|vision_end|> at max + 1, then bos
    np.testing.assert_array_equal(audio[0], video_max + 3 + np.arange(9))
    # the interleave option changes nothing on rows without an interleaved block
    pos2, d2 = layout.get_rope_index(ids, None, None, [grid], [1.5], VISION, audio_lengths=[[1, 9]], audio_spec=SPEC)
    np.testing.assert_array_equal(pos2, pos)


def test_interleave_option_equals_the_released_rule_without_interleaved_blocks():
    """Images, videos, text-rule audio and left padding: the interleave option changes nothing."""
    img, vid = (1, 4, 8), (3, 4, 6)
    row0 = [TEXT, VSTART] + [IMAGE] * 8 + [VEND, TEXT, VSTART] + [VIDEO] * 18 + [VEND, BOS] + [AUD] * 5 + [EOS, TEXT]
    row1 = [TEXT, TEXT, BOS] + [AUD] * 3 + [EOS, VSTART] + [VIDEO] * 12 + [VEND, TEXT]
    width = max(len(row0), len(row1))
    ids = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, row in enumerate((row0, row1)):
        ids[r, width - len(row):], mask[r, width - len(row):] = row, 1
    args = (ids, mask, [img], [vid, (2, 4, 6)], [1.5, 0.5])
    want = layout.get_rope_index(*args, VISION)
    got = layout.get_rope_index(*args, VISION, audio_lengths=[[1, 5], [1, 3]], audio_spec=SPEC)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_interleaved_positions_are_time_aligned():
    """4 s of video (grid t=4, 1 s per grid step, 2x2 merged tokens per step) and 100 audio tokens (4 s) in 2 s
    chunks: [v0 v1 | a0..a49 | v2 v3 | a50..a99]; video t = 2·g, audio t = h = w = floor(j · 0.04 · 2)."""
    grid, spt, n_audio = (4, 4, 4), 1.0, 100
    assert layout.interleave_chunks(grid, spt, n_audio, 2.0) == [(8, 50), (8, 50)]
    block = layout.interleaved_block([(8, 50), (8, 50)], VIDEO, SPEC)
    ids = np.array([[TEXT, TEXT, VSTART] + block + [VEND, TEXT]])
    pos, delta = layout.get_rope_index(ids, None, None, [grid], [spt], VISION, audio_lengths=[[1, n_audio]],
                                       audio_spec=SPEC)
    p = pos[:, 0]
    s = 4  # text 0, 1; <|vision_start|> 2; <|audio_bos|> 3; the block starts at 4
    np.testing.assert_array_equal(p[:, :4], np.broadcast_to(np.arange(4), (3, 4)))
    v0 = p[:, 4:8]
    np.testing.assert_array_equal(v0, [[s] * 4, [s, s, s + 1, s + 1], [s, s + 1, s, s + 1]])
    np.testing.assert_array_equal(p[0, 8:12], s + 2)  # grid step 1 at 1 s -> t = 2
    a = p[:, 12:62]
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[0], a[2])
    np.testing.assert_array_equal(a[0], s + np.floor(np.arange(50) * 0.08 + 1e-9))
    np.testing.assert_array_equal(p[0, 62:66], s + 4)  # step 2 at 2 s, same t as audio token 50 (2 s)
    assert p[0, 70] == s + 4 and p[0, 119] == s + 7  # audio tokens 50 and 99
    np.testing.assert_array_equal(p[:, 120], s + 8)  # <|audio_eos|> at the block's max + 1
    np.testing.assert_array_equal(p[:, -1], s + 10)
    assert delta[0] == s + 11 - ids.shape[1]
    index = layout.audio_token_index(ids, [[4, n_audio]], SPEC)
    np.testing.assert_array_equal(index[0][ids[0] == AUD], np.arange(n_audio))  # split runs, one item

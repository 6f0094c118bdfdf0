"""Fixtures for the data tests: tiny clips, images, bad files, a tiny tokenizer in a temporary cache."""

import numpy as np
import pytest
from data_helpers import numbered_frames

from emoqwen_jax.data import defaults, video_io
from emoqwen_jax.data.tokenizer import load_tokenizer

TINY_VOCAB = 1024


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """Clips of several lengths and rates plus bad media, under one data root."""
    root = tmp_path_factory.mktemp("media")
    specs = {"c10_25": (10, 25.0), "c29_30": (29, 30.0), "c24_12": (24, 12.0), "c7_5": (7, 5.0), "c3_10": (3, 10.0)}
    for name, (n, fps) in specs.items():
        video_io.write_video(str(root / f"{name}.mp4"), numbered_frames(n), fps, gop=4)
    video_io.write_video(str(root / "one_frame.mp4"), numbered_frames(1), 10.0)
    video_io.write_video(str(root / "zero_frames.mp4"), numbered_frames(0), 10.0, codec="mpeg4")
    full = (root / "c29_30.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 3])
    video_io.write_video(str(root / "faststart.mp4"), numbered_frames(29), 30.0, gop=4, faststart=True)
    full = (root / "faststart.mp4").read_bytes()  # index first: a cut file opens but misses frames
    (root / "truncated_faststart.mp4").write_bytes(full[: len(full) * 6 // 10])
    (root / "garbage.mp4").write_bytes(b"\x00\x01not a video at all" * 10)
    (root / "empty.mp4").write_bytes(b"")
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (57, 83, 3), dtype=np.uint8)).save(root / "img.png")
    Image.fromarray(rng.integers(0, 256, (40, 9000 // 40, 3), dtype=np.uint8)).save(root / "wide_ok.png")
    Image.fromarray(np.zeros((2, 500, 3), np.uint8)).save(root / "sliver.png")  # aspect 250 > 200
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return root


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="session")
def tiny_tok(tok_cache):
    return load_tokenizer(TINY_VOCAB, tok_cache)


@pytest.fixture
def cfg(tok_cache):
    """A small data config: few frames, small pixels, tiny tokenizer."""
    c = defaults.data_config()
    c.tokenizer_vocab_size = TINY_VOCAB
    c.tokenizer_cache_dir = tok_cache
    c.fps = 4.0
    c.min_frames = 2
    c.max_frames = 6
    c.video_min_pixels = 28 * 28 * 4
    c.video_max_pixels = 28 * 28 * 4
    c.image_min_pixels = 28 * 28 * 4
    c.image_max_pixels = 28 * 28 * 16
    c.max_length = 512
    c.length_buckets = (64, 128, 256, 512)
    c.patch_buckets = (64, 256, 1024)
    c.reject_check_after = 0
    c.max_reject_fraction = 1.0
    return c

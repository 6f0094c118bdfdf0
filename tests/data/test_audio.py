"""Audio features against HF's WhisperFeatureExtractor, and PyAV decoding with reason-coded rejections."""

import struct

import numpy as np
import pytest
from tolerance import assert_close_rel
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import spectrogram, window_function

from emoqwen_jax.data import audio as A
from emoqwen_jax.data import video_io
from emoqwen_jax.data.reasons import Rejected

SR = A.SAMPLING_RATE


def _signal(n: int, seed: int = 0) -> np.ndarray:
    """A tone with vibrato, a noise burst and a silent stretch: every mel band and the floor are exercised."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    x = 0.4 * np.sin(2 * np.pi * (220 + 30 * np.sin(2 * np.pi * 3 * t)) * t)
    x[n // 3: n // 2] += 0.2 * rng.standard_normal(n // 2 - n // 3)
    x[2 * n // 3: 5 * n // 6] = 0.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def extractors():
    return {m: WhisperFeatureExtractor(feature_size=m) for m in (128, 80)}


def whisper_float64(extractor: WhisperFeatureExtractor, x: np.ndarray) -> np.ndarray:
    """The extractor's own steps (transformers' ``spectrogram`` with its window, mel bank and clamp) in float64:
    the extractor computes in float32, whose rounding (up to ~6e-5 of the scale on these signals) would hide
    anything smaller."""
    padded = np.zeros(extractor.n_samples, np.float64)
    padded[:min(len(x), extractor.n_samples)] = x[:extractor.n_samples]
    spec = spectrogram(padded, window_function(extractor.n_fft, "hann"), frame_length=extractor.n_fft,
                       hop_length=extractor.hop_length, power=2.0, mel_filters=extractor.mel_filters,
                       log_mel="log10", dtype=np.float64)[:, :-1]
    return (np.maximum(spec, spec.max() - 8.0) + 4.0) / 4.0


@pytest.mark.parametrize("num_samples", [3 * SR + 37, A.N_SAMPLES, 1000])
@pytest.mark.parametrize("mels", [128, 80])
def test_log_mel_matches_whisper_feature_extractor(extractors, num_samples, mels):
    x = _signal(num_samples)
    ref = extractors[mels](x, sampling_rate=SR, return_tensors="np").input_features[0]
    ours = A.log_mel(x, sampling_rate=SR, num_mel_bins=mels)
    assert ours.dtype == np.float32 and ours.shape == (mels, 3000) == ref.shape
    assert_close_rel(ours, ref, 1e-4, what="log-mel against the float32 extractor")
    assert_close_rel(ours, whisper_float64(extractors[mels], x), 1e-6, what="log-mel")  # one float32 rounding


def test_mel_filters_equal_hf(extractors):
    assert np.abs(A.mel_filters(128) - extractors[128].mel_filters).max() <= 1e-12
    assert np.abs(A.mel_filters(80) - extractors[80].mel_filters).max() <= 1e-12


@pytest.mark.parametrize("num_samples", [1000, 3 * SR + 37, A.N_SAMPLES, A.N_SAMPLES + 1, 65 * SR + 5])
def test_feature_mask_matches_hf_attention_mask(extractors, num_samples):
    mask = A.feature_mask(num_samples)
    assert mask.shape == (A.num_windows(num_samples), 3000)
    first = _signal(min(num_samples, A.N_SAMPLES))
    ref = extractors[128](first, sampling_rate=SR, return_tensors="np", return_attention_mask=True).attention_mask[0]
    np.testing.assert_array_equal(mask[0], ref)
    assert mask.sum() == -(-num_samples // A.HOP_LENGTH)


def test_long_audio_is_cut_into_windows_never_truncated(extractors):
    x = _signal(65 * SR + 5)
    with pytest.raises(ValueError, match="log_mel_windows"):
        A.log_mel(x)
    feats, mask = A.log_mel_windows(x)
    assert feats.shape == (3, 128, 3000) and mask.shape == (3, 3000)
    for w in range(3):  # each window is Whisper's features of its own 30 s of audio
        part = x[w * A.N_SAMPLES:(w + 1) * A.N_SAMPLES]
        ref = extractors[128](part, sampling_rate=SR, return_tensors="np").input_features[0]
        assert_close_rel(feats[w], ref, 1e-4, what=f"window {w} against the float32 extractor")
        assert_close_rel(feats[w], whisper_float64(extractors[128], part), 1e-6, what=f"window {w}")
    assert mask[:2].all() and mask[2].sum() == -(-(5 * SR + 5) // A.HOP_LENGTH)


@pytest.mark.parametrize("bad,match", [(dict(sampling_rate=0), "sampling_rate=0"),
                                       (dict(sampling_rate=44100), "sampling_rate=44100"),
                                       (dict(waveform=np.array([0.0, np.nan, 1.0])), "NaN"),
                                       (dict(waveform=np.zeros((2, 100))), "mono")])
def test_log_mel_bad_input_is_a_clear_error(bad, match):
    args = dict(waveform=np.zeros(1000, np.float32), sampling_rate=SR) | bad
    with pytest.raises(ValueError, match=match):
        A.log_mel(**args)


def test_encoder_output_length_is_25_tokens_per_second():
    import torch
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder

    lengths = [1, 2, 3, 4, 5, 99, 100, 101, 1500, 2999, 3000]
    _, ref = Qwen2AudioEncoder._get_feat_extract_output_lengths(None, torch.tensor(lengths))
    assert [A.encoder_output_length(n) for n in lengths] == ref.tolist()
    assert A.encoder_output_length(3000) == 750


@pytest.mark.parametrize("mels", [128, 80])
def test_mel_power_is_the_filter_bank_product_bit_for_bit(mels):
    """The filters' runs of non-zero bins add the products of the full bank's product in its order."""
    rng = np.random.default_rng(mels)
    for frames, scale in [(1, 1.0), (103, 1e-9), (3000, 1e3)]:
        power = np.abs(rng.standard_normal((frames, A.N_FFT // 2 + 1))) ** 2 * scale
        np.testing.assert_array_equal(A._mel_power(power, mels), np.einsum("fm,tf->mt", A.mel_filters(mels), power))


@pytest.mark.parametrize("num_samples", [0, 400, SR, 29 * SR + 777, A.N_SAMPLES, A.N_SAMPLES + 320,
                                         2 * A.N_SAMPLES + 5 * SR])
@pytest.mark.parametrize("window_frames", [100, 1500, 3000])
def test_encoder_windows_cut_log_mel_windows(num_samples, window_frames):
    """The encoder windows are exactly the leading frames of ``log_mel_windows``' 30 s windows (computed only
    as far as they are kept), cut every ``window_frames``; windows past the audio are dropped."""
    x = _signal(num_samples, seed=num_samples % 7)
    feats, mask = A.log_mel_windows(x, num_mel_bins=80)
    frames, flat_mask = np.concatenate(list(feats), axis=1), mask.reshape(-1)
    got, got_mask, tokens = A.encoder_windows(x, num_mel_bins=80, window_frames=window_frames)
    w = got.shape[0]
    assert got.dtype == np.float32 and got.shape == (w, 80, window_frames) and got_mask.shape == (w, window_frames)
    want = frames[:, :w * window_frames].reshape(80, w, window_frames).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, want)
    assert got_mask[:-1].all() and got_mask[-1].sum() > 0 or num_samples == 0
    assert got_mask.sum() <= flat_mask.sum() < got_mask.sum() + 3  # only a token-less tail (<= 2 frames) is cut
    assert tokens == (w - 1) * window_frames // 4 + A.encoder_output_length(int(got_mask[-1].sum()))


# ---- decoding ---------------------------------------------------------------------------------------------
def _wav_bytes(rate: int, data: np.ndarray, declared_bytes: int | None = None) -> bytes:
    """A float32 mono WAV written by hand, so the header can lie."""
    body = np.asarray(data, np.float32).tobytes()
    size = len(body) if declared_bytes is None else declared_bytes
    fmt = struct.pack("<IHHIIHH", 16, 3, 1, rate, rate * 4, 4, 32)
    return b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt " + fmt + b"data" + struct.pack("<I", size) + body


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    x = _signal(2 * SR)
    for ext in (".wav", ".flac", ".mp3"):
        A.write_audio(root / f"tone{ext}", x)
    frames = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    A.write_clip(str(root / "clip.mp4"), frames, 8.0, x)
    video_io.write_video(str(root / "silent.mp4"), frames, 8.0)
    return root, x


@pytest.mark.parametrize("ext", [".wav", ".flac", ".mp3"])
def test_read_audio_files(audio_dir, ext):
    root, x = audio_dir
    y = A.read_audio(str(root / f"tone{ext}"))
    assert y.dtype == np.float32 and y.shape == x.shape
    if ext == ".mp3":  # lossy (the noise burst least of all): aligned and close in energy terms
        assert np.sqrt(np.mean((y - x) ** 2)) < 0.25 * np.sqrt(np.mean(x**2))
    else:  # 16-bit PCM / lossless FLAC
        assert np.abs(y - x).max() <= 1e-4


def test_read_audio_resamples_to_16k_mono(tmp_path):
    t = np.arange(44100) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    import av

    with av.open(str(tmp_path / "s.wav"), mode="w", format="wav") as c:
        s = c.add_stream("pcm_f32le", rate=44100, layout="stereo")
        frame = av.AudioFrame.from_ndarray(stereo.T.reshape(1, -1).copy(), format="flt", layout="stereo")
        frame.sample_rate = 44100
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    y = A.read_audio(str(tmp_path / "s.wav"))
    assert y.ndim == 1 and abs(y.shape[0] - SR) <= 2
    ref = np.sin(2 * np.pi * 440 * np.arange(y.shape[0]) / SR)
    assert np.abs(y[200:-200] - ref[200:-200]).max() < 0.02  # resampler ripple, away from the edges


def test_clip_audio_covers_the_frames_span(audio_dir):
    root, x = audio_dir
    full = A.read_audio(str(root / "clip.mp4"))
    assert full.shape == x.shape  # AAC's padding past the declared end is dropped
    span = A.read_audio(str(root / "clip.mp4"), start=0.5, end=1.25)
    assert span.shape == (int(0.75 * SR),)
    np.testing.assert_array_equal(span, full[SR // 2: SR // 2 + span.shape[0]])


def test_clip_without_audio(audio_dir):
    root, _ = audio_dir
    assert A.read_audio(str(root / "silent.mp4")) is None
    with pytest.raises(Rejected) as e:
        A.read_audio(str(root / "silent.mp4"), required=True)
    assert e.value.reason == "no_audio"


def _reason(source, **kw) -> str:
    with pytest.raises(Rejected) as e:
        A.read_audio(source, **kw)
    return e.value.reason


def test_bad_audio_gets_a_reason_never_a_crash(audio_dir, tmp_path):
    root, _ = audio_dir
    wav = (root / "tone.wav").read_bytes()
    flac = (root / "tone.flac").read_bytes()
    clip = (root / "clip.mp4").read_bytes()
    zeros = np.zeros(1600, np.float32)
    nan = zeros.copy()
    nan[100] = np.nan
    assert _reason(wav[: len(wav) // 2]) == "corrupt_audio"  # FFmpeg alone would decode 1 s silently
    assert _reason(flac[: len(flac) // 2]) == "corrupt_audio"
    assert _reason(clip[: len(clip) // 2]) == "corrupt_audio"
    assert _reason(b"\x00\x01not audio at all" * 10) == "corrupt_audio"
    assert _reason(_wav_bytes(0, zeros)) == "bad_sample_rate"
    assert _reason(_wav_bytes(SR, nan)) == "bad_audio_samples"
    ten_hours = _wav_bytes(SR, zeros, declared_bytes=SR * 4 * 3600 * 10)
    assert _reason(ten_hours) == "audio_too_long"  # refused from the header, before decoding
    assert _reason(str(root / "tone.flac"), max_seconds=1.0) == "audio_too_long"
    assert _reason(str(tmp_path / "nope.wav")) == "missing_file"
    np.testing.assert_array_equal(A.read_audio(_wav_bytes(SR, zeros)), zeros)


def test_resample_bad_rate():
    with pytest.raises(ValueError, match="sampling_rate=0"):
        A.resample(np.zeros(10, np.float32), 0)
    assert A.resample(np.zeros(44100, np.float32), 44100).shape == (SR,)

"""Audio → Whisper log-mel features (numpy only), and PyAV decoding of a clip's or a file's audio track.

Shapes: S samples at 16 kHz mono, M mel bins (128 for Qwen2-Audio / Whisper-large-v3, 80 for older
Whisper), F = 3000 feature frames per 30 s window (hop 160 samples = 10 ms), W windows.

``log_mel`` reproduces ``WhisperFeatureExtractor(feature_size=M)(x, sampling_rate=16000).input_features[0]``
(the torch path HF takes when torch is installed): zero-pad to 30 s, centred STFT (reflect padding, periodic
Hann window of 400, hop 160), power spectrum, Slaney mel filters up to 8 kHz, drop the last frame,
log10(max(·, 1e-10)), floor at (max − 8), then (x + 4) / 4. We compute in float64 and round once to float32,
which stays within ~1e-5 of HF's float32 arithmetic.

Audio longer than 30 s is never cut silently: ``log_mel`` refuses it, ``log_mel_windows`` cuts it into
consecutive 30 s windows and returns a feature mask (1 = a frame holding real audio, 0 = padding) so
shorter audio and the last window's tail are known to be padding.

``read_audio`` decodes with PyAV, resamples to 16 kHz (``av.AudioResampler``) and averages the channels to
mono float32 (librosa's downmix, which Whisper and Qwen2-Audio use); every bad
input becomes a ``Rejected`` with a reason of its own (``no_audio``, ``corrupt_audio``, ``bad_sample_rate``,
``bad_audio_samples``, ``audio_too_long``). Nothing longer than ``max_seconds`` is ever decoded.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import av
import numpy as np

from emoqwen_jax.data import video_io
from emoqwen_jax.data.reasons import Rejected
from emoqwen_jax.runtime import storage

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLING_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 feature frames per window
# Audio-only media (manifest entries with an "audio" key) must have one of these extensions.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a")
# Longest audio a sample may carry (seconds) unless the data config says otherwise; a 10-hour file is refused
# before it is decoded, and its samples never reach memory.
DEFAULT_MAX_SECONDS = 600.0
# A decoded stream shorter than its header's duration by more than this (seconds, or this fraction) is
# truncated, not merely rounded.
_TRUNCATION_SLACK_S = 0.25
_TRUNCATION_SLACK_FRACTION = 0.02


# ---- features ----------------------------------------------------------------------------------------------
def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale (linear below 1 kHz, logarithmic above), as librosa and HF's ``audio_utils``."""
    freq = np.asarray(freq, np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), freq)


@functools.lru_cache(maxsize=4)
def mel_filters(num_mel_bins: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters, float64[N_FFT/2 + 1, M], 0 Hz to 8 kHz (Whisper's bank)."""
    fft_freqs = np.linspace(0, SAMPLING_RATE // 2, 1 + N_FFT // 2)
    filter_freqs = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(8000.0), num_mel_bins + 2))
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    diff = np.diff(filter_freqs)
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (filter_freqs[2:num_mel_bins + 2] - filter_freqs[:num_mel_bins]))[None, :]


@functools.lru_cache(maxsize=4)
def _mel_runs(num_mel_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Each mel filter's run of frequency bins, from its first non-zero weight to its last (a triangle spans a
    few of the 201 bins): (bins int64[K, M], weights float64[K, M]); K is the longest run, shorter runs end
    in weight-0 padding (an all-zero filter is all padding)."""
    filters = mel_filters(num_mel_bins)  # [F, M]
    nonzero = filters > 0
    first = np.argmax(nonzero, axis=0)
    width = np.where(nonzero.any(axis=0), filters.shape[0] - np.argmax(nonzero[::-1], axis=0) - first, 0)
    step = np.arange(max(int(width.max()), 1))[:, None]
    bins = np.minimum(first[None, :] + step, filters.shape[0] - 1)
    weights = np.where(step < width[None, :], filters[bins, np.arange(num_mel_bins)[None, :]], 0.0)
    return bins, weights


def _mel_power(power: np.ndarray, num_mel_bins: int) -> np.ndarray:
    """float64[T, F] power spectrum → float64[M, T] mel power, ``einsum("fm,tf->mt", mel_filters, power)``
    bit for bit: that sum runs over the bins in order from 0, and this one adds the same products in the same
    order, skipping only the zero-weight ones (adding 0.0 changes no sum) — a few bins per filter, not 201."""
    bins, weights = _mel_runs(num_mel_bins)
    by_bin = power.T  # [F, T]
    mel = np.zeros((num_mel_bins, power.shape[0]))
    for k in range(bins.shape[0]):
        mel += weights[k][:, None] * by_bin[bins[k]]
    return mel


@functools.lru_cache(maxsize=1)
def _hann() -> np.ndarray:
    """Periodic Hann window of N_FFT (torch.hann_window's default)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)


def check_waveform(waveform: Any, sampling_rate: int) -> np.ndarray:
    """float[S] (or [S, 1]) at 16 kHz → float64[S]; ValueError for a wrong rate, shape or non-finite samples."""
    if sampling_rate != SAMPLING_RATE:
        raise ValueError(f"sampling_rate={sampling_rate}; log-mel features need {SAMPLING_RATE} Hz mono audio "
                         f"(decode with emoqwen_jax.data.audio.read_audio or resample first)")
    wave = np.asarray(waveform)
    if wave.ndim == 2 and 1 in wave.shape:
        wave = wave.reshape(-1)
    if wave.ndim != 1:
        raise ValueError(f"waveform of shape {wave.shape}; expected mono audio float[S]")
    if not np.issubdtype(wave.dtype, np.number):
        raise ValueError(f"waveform dtype {wave.dtype} is not numeric")
    wave = wave.astype(np.float64)
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"waveform holds {int(np.sum(~np.isfinite(wave)))} NaN/inf sample(s)")
    return wave


def _live_frames(num_samples: int) -> int:
    """How many leading STFT frames of a window with ``num_samples`` real samples can see one of them: every
    later frame (its reflect-padded end included) holds only zeros. A short clip needs a few, not 3000."""
    if num_samples > N_SAMPLES - N_FFT:
        return N_FRAMES
    return min(N_FRAMES, (num_samples + N_FFT // 2) // HOP_LENGTH + 1)


def _log_mel_live(wave: np.ndarray, num_mel_bins: int) -> tuple[np.ndarray, float]:
    """float64[≤ N_SAMPLES] → (float64[M, live] features of the ``_live_frames`` of its zero-padded 30 s window,
    the feature value of every later frame).

    Only the live frames are transformed: the others have mel power 0, i.e. log10(1e-10) = -10 before
    Whisper's floor, which is what they get (the same numbers as transforming all 3000 frames)."""
    live = _live_frames(wave.shape[0])
    span = N_SAMPLES if live == N_FRAMES else (live - 1) * HOP_LENGTH + N_FFT  # samples the live frames reach
    padded = np.zeros(span, np.float64)
    padded[:min(span, wave.shape[0])] = wave[:span]
    padded = np.pad(padded, N_FFT // 2, mode="reflect")  # torch.stft(center=True, pad_mode='reflect')
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH][:live]
    power = np.abs(np.fft.rfft(frames * _hann(), axis=-1)) ** 2  # [live, N_FFT/2 + 1]
    # Not @: a product this small waits milliseconds for BLAS's threads when the cores are busy (the data
    # workers' case); the filters' runs take a fraction of one.
    mel = _mel_power(power, num_mel_bins)  # [M, live]
    log_spec = np.log10(np.maximum(mel, 1e-10))
    top = log_spec.max() if live == N_FRAMES else max(log_spec.max(), -10.0)
    return (np.maximum(log_spec, top - 8.0) + 4.0) / 4.0, (max(-10.0, top - 8.0) + 4.0) / 4.0


def _log_mel_window(wave: np.ndarray, num_mel_bins: int) -> np.ndarray:
    """float64[≤ N_SAMPLES] → float32[M, N_FRAMES] for one zero-padded 30 s window."""
    live, rest = _log_mel_live(wave, num_mel_bins)
    out = np.full((num_mel_bins, N_FRAMES), rest, np.float32)
    out[:, :live.shape[1]] = live
    return out


def log_mel(waveform: Any, sampling_rate: int = SAMPLING_RATE, num_mel_bins: int = 128) -> np.ndarray:
    """Whisper log-mel features of up to 30 s of 16 kHz mono audio.

    Args:
      waveform: float[S] with S ≤ 480000 (shorter audio is zero-padded to 30 s, as HF does).
      sampling_rate: must be 16000.
      num_mel_bins: 128 (Qwen2-Audio, Whisper-large-v3) or 80 (older Whisper).
    Returns:
      float32[num_mel_bins, 3000].
    Raises:
      ValueError for a wrong rate or shape, NaN samples, or audio longer than 30 s (use ``log_mel_windows``).
    """
    wave = check_waveform(waveform, sampling_rate)
    if wave.shape[0] > N_SAMPLES:
        raise ValueError(f"{wave.shape[0]} samples ({wave.shape[0] / SAMPLING_RATE:.2f} s) exceed one "
                         f"{CHUNK_SECONDS} s window; use log_mel_windows, which cuts long audio into windows")
    return _log_mel_window(wave, num_mel_bins)


def num_windows(num_samples: int) -> int:
    """30 s windows needed for ``num_samples`` samples (at least 1)."""
    return max(1, -(-int(num_samples) // N_SAMPLES))


def feature_mask(num_samples: int) -> np.ndarray:
    """int32[W, 3000]: 1 for feature frames that hold audio (HF's ``attention_mask[::160]``), 0 for padding."""
    w = num_windows(num_samples)
    frames = -(-int(num_samples) // HOP_LENGTH)  # a frame holds audio when its first sample does
    return (np.arange(w * N_FRAMES) < frames).astype(np.int32).reshape(w, N_FRAMES)


def log_mel_windows(waveform: Any, sampling_rate: int = SAMPLING_RATE,
                    num_mel_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Any length of 16 kHz mono audio → consecutive 30 s windows of log-mel features and their mask.

    Returns:
      (features float32[W, M, 3000], mask int32[W, 3000]); W = ceil(S / 480000), at least 1. Each window is
      normalised on its own (Whisper's max − 8 floor is per window, as if each were its own clip).
    """
    wave = check_waveform(waveform, sampling_rate)
    w = num_windows(wave.shape[0])
    feats = np.stack([_log_mel_window(wave[i * N_SAMPLES:(i + 1) * N_SAMPLES], num_mel_bins) for i in range(w)])
    return feats, feature_mask(wave.shape[0])


def encoder_output_length(num_frames: int) -> int:
    """Audio tokens a Qwen2-Audio encoder gives for ``num_frames`` valid feature frames (conv stride 2, then
    average pooling by 2): ``(((F - 1) // 2 + 1) - 2) // 2 + 1``, i.e. 25 tokens per second."""
    conv = (int(num_frames) - 1) // 2 + 1
    return max(0, (conv - 2) // 2 + 1)


def encoder_windows(waveform: Any, *, num_mel_bins: int = 128,
                    window_frames: int = N_FRAMES) -> tuple[np.ndarray, np.ndarray, int]:
    """16 kHz mono audio → the encoder's input windows and the number of audio tokens they give.

    Features are Whisper's 30 s windows (``log_mel_windows``: padding frames hold Whisper's silence values, as
    HF pads the waveform); their frames are cut into encoder windows of ``window_frames`` — 3000 for
    Qwen2-Audio, i.e. exactly HF's windows; a tiny test encoder takes shorter ones, which must divide 3000.
    Windows without a valid frame are dropped, and so is a last one too short to give a token (< 10 ms).

    Returns:
      (features float32[W, M, window_frames], mask int32[W, window_frames], tokens) with ``tokens`` =
      (W − 1) · window_frames / 4 + ``encoder_output_length`` of the last window's valid frames (0 only for
      audio shorter than ~30 ms).
    """
    if window_frames <= 0 or window_frames % 4 or N_FRAMES % window_frames:
        raise ValueError(f"window_frames={window_frames} must be a multiple of 4 that divides {N_FRAMES}")
    wave = check_waveform(waveform, SAMPLING_RATE)
    valid = -(-wave.shape[0] // HOP_LENGTH)  # frames holding audio (``feature_mask``)
    w = max(1, -(-valid // window_frames))
    if w > 1 and encoder_output_length(valid - (w - 1) * window_frames) == 0:
        w -= 1  # a tail of <= 2 frames (20 ms) can give no token; it is what the conv's last tap sees
        valid = w * window_frames
    # The first w · window_frames frames of log_mel_windows' consecutive 30 s windows, filled window by window
    # (only the windows and frames kept are computed: a short clip needs a few of 3000).
    frames = np.empty((num_mel_bins, w * window_frames), np.float32)  # [M, kept frames]
    for start in range(0, frames.shape[1], N_FRAMES):
        live, rest = _log_mel_live(wave[start * HOP_LENGTH:start * HOP_LENGTH + N_SAMPLES], num_mel_bins)
        stop = min(frames.shape[1], start + N_FRAMES)
        cut = min(stop, start + live.shape[1])
        frames[:, start:cut] = live[:, :cut - start]
        frames[:, cut:stop] = rest
    out = frames.reshape(num_mel_bins, w, window_frames).transpose(1, 0, 2)
    out_mask = (np.arange(w * window_frames) < valid).astype(np.int32).reshape(w, window_frames)
    tokens = (w - 1) * (window_frames // 4) + encoder_output_length(int(out_mask[-1].sum()))
    return np.ascontiguousarray(out), out_mask, tokens


# ---- decoding ------------------------------------------------------------------------------------------------
def _head(source: Any) -> tuple[bytes, int]:
    """The first 64 KiB of the file and its total size in bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data[:65536], len(data)
    with storage.open(source, "rb") as f:  # a local path or a remote URI (gs://…)
        head = f.read(65536)
        f.seek(0, os.SEEK_END)
        return head, f.tell()


def check_riff(head: bytes, total: int, max_seconds: float) -> None:
    """WAV (RIFF) header checks FFmpeg does not make: it clamps a WAV's duration to the bytes present, so a
    truncated file would decode short without a word, and it refuses a zero sample rate as mere 'invalid
    data'. Raises Rejected('bad_sample_rate' | 'audio_too_long' | 'corrupt_audio'); a no-op for other formats."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos, rate, block = 12, None, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos:pos + 4], int.from_bytes(head[pos + 4:pos + 8], "little")
        if chunk == b"fmt " and pos + 24 <= len(head):
            rate = int.from_bytes(head[pos + 12:pos + 16], "little")
            block = int.from_bytes(head[pos + 20:pos + 22], "little")
            if rate == 0:
                raise Rejected("bad_sample_rate", "the WAV header declares sample rate 0")
        if chunk == b"data":
            if size == 0xFFFFFFFF or rate is None or block == 0:
                return  # streamed WAV of unknown length, or a layout we leave to FFmpeg
            seconds = size / (rate * block)
            if seconds > max_seconds:
                raise Rejected("audio_too_long", f"{seconds:.1f} s of audio > max_audio_seconds {max_seconds:g}")
            available = total - (pos + 8)
            if available < size:
                raise Rejected("corrupt_audio", f"truncated: the WAV header says {size} data bytes "
                                                f"({seconds:.2f} s), the file holds {available}")
            return
        pos += 8 + size + (size & 1)


def _declared_seconds(container: av.container.InputContainer, stream: av.audio.stream.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def read_audio(source: Any, *, start: float = 0.0, end: float | None = None, required: bool = False,
               max_seconds: float = DEFAULT_MAX_SECONDS) -> np.ndarray | None:
    """Decodes the first audio stream of a clip or audio file, resampled to 16 kHz mono.

    Args:
      source: a path or the file's bytes (mp4/mkv/webm with an audio track, wav, flac, mp3…), or a
        ``video_io.MediaFile`` whose frames were read (its audio packets decode without a second open).
      start, end: the span to keep in seconds from the stream's start (``end=None``: to the end); pass the
        sampled frames' span so audio and frames cover the same time.
      required: a container without an audio stream is rejected ('no_audio') instead of returning None.
      max_seconds: longer streams are rejected ('audio_too_long'), checked from the header and again while
        decoding (a lying header cannot make us decode ten hours).
    Returns:
      float32[S] in [-1, 1], or None when the container has no audio stream and ``required`` is False.
    Raises:
      Rejected('missing_file' | 'no_audio' | 'corrupt_audio' | 'bad_sample_rate' | 'bad_audio_samples' |
      'audio_too_long').
    """
    if end is not None and end < start:
        raise ValueError(f"audio span end={end} < start={start}")
    opened = source if isinstance(source, video_io.MediaFile) else None
    if opened is None:
        if not isinstance(source, (bytes, bytearray, memoryview)) and not storage.isfile(source):
            raise Rejected("missing_file", str(source))
        check_riff(*_head(source), max_seconds)
    elif not opened.container.streams.video:  # a WAV holds no video stream; a clip's head needs no second read
        check_riff(*_head(opened.source), max_seconds)
    if opened:
        wave, declared = _decode_track(opened.container, opened.audio_packets, required, max_seconds)
    else:
        container = video_io._open(source, "corrupt_audio")
        try:
            wave, declared = _decode_track(container, None, required, max_seconds)
        finally:
            container.close()
    if wave is None:
        return None
    if wave.size == 0:
        raise Rejected("corrupt_audio", "the audio stream decodes to no samples")
    if not np.all(np.isfinite(wave)):
        raise Rejected("bad_audio_samples", f"{int(np.sum(~np.isfinite(wave)))} NaN/inf sample(s)")
    decoded = wave.shape[0] / SAMPLING_RATE
    if declared is not None and declared - decoded > max(_TRUNCATION_SLACK_S, _TRUNCATION_SLACK_FRACTION * declared):
        raise Rejected("corrupt_audio", f"truncated: header says {declared:.2f} s, stream holds {decoded:.2f} s")
    if declared is not None and decoded > declared:
        # Codec padding (AAC's last frame, MP3's frame rounding) past the declared end is not audio.
        wave = wave[: int(round(declared * SAMPLING_RATE))]
    lo = int(round(start * SAMPLING_RATE))
    hi = wave.shape[0] if end is None else int(round(end * SAMPLING_RATE))
    return np.ascontiguousarray(wave[lo:hi])


def _decode_track(container: av.container.InputContainer, packets: list | None, required: bool,
                  max_seconds: float) -> tuple[np.ndarray | None, float | None]:
    """The first audio stream → (float32[S] at 16 kHz, its declared seconds or None); (None, None) without an
    audio stream. ``packets``: the stream's packets already demuxed (``video_io.MediaFile``), else None."""
    if not container.streams.audio:
        if required:
            raise Rejected("no_audio", "the manifest requires audio but the file has no audio stream")
        return None, None
    stream = container.streams.audio[0]
    if not stream.sample_rate or stream.sample_rate <= 0:
        raise Rejected("bad_sample_rate", f"the audio stream declares sample rate {stream.sample_rate}")
    declared = _declared_seconds(container, stream)
    if declared is not None and declared > max_seconds:
        raise Rejected("audio_too_long", f"{declared:.1f} s of audio > max_audio_seconds {max_seconds:g}")
    frames = container.decode(stream) if packets is None else (f for p in packets for f in p.decode())
    return _decode(frames, max_seconds), declared


def _decode(frames: Iterator[av.AudioFrame], max_seconds: float) -> np.ndarray:
    # Resample each channel to 16 kHz and average them ourselves: FFmpeg's own stereo → mono downmix scales
    # by 1/sqrt(2) per channel (a correlated stereo pair comes out 1.41× louder); Whisper and Qwen2-Audio
    # load audio with librosa's channel mean.
    resampler = av.AudioResampler(format="fltp", rate=SAMPLING_RATE)
    limit = int(max_seconds * SAMPLING_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        for frame in frames:
            if not frame.sample_rate:
                raise Rejected("bad_sample_rate", "a decoded audio frame has sample rate 0")
            for out in resampler.resample(frame):
                chunk = _channel_mean(out)
                chunks.append(chunk)
                total += chunk.shape[0]
            if total > limit:
                raise Rejected("audio_too_long", f"more than max_audio_seconds {max_seconds:g} s decoded "
                                                 f"(the header understated the length)")
        for out in resampler.resample(None):
            chunks.append(_channel_mean(out))
    except (av.error.FFmpegError, ValueError, MemoryError) as e:
        raise Rejected("corrupt_audio", f"decode failed: {e}") from None
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0,), np.float32)


def _channel_mean(frame: av.AudioFrame) -> np.ndarray:
    """A planar float frame → float32[S], the mean of its channels (a mono frame's one channel as it is: the
    same numbers as averaging one value)."""
    planes = frame.to_ndarray()  # [channels, S]
    return planes[0] if planes.shape[0] == 1 else planes.mean(axis=0)


def resample(waveform: Any, sampling_rate: int) -> np.ndarray:
    """float[S] mono at ``sampling_rate`` → float32 at 16 kHz with FFmpeg's resampler (what ``read_audio`` uses).

    Raises ValueError for a rate ≤ 0 or non-finite samples.
    """
    if not sampling_rate or sampling_rate <= 0:
        raise ValueError(f"sampling_rate={sampling_rate}; must be a positive number of samples per second")
    wave = np.asarray(waveform, np.float32).reshape(-1)
    if not np.all(np.isfinite(wave)):
        raise ValueError(f"waveform holds {int(np.sum(~np.isfinite(wave)))} NaN/inf sample(s)")
    if int(sampling_rate) == SAMPLING_RATE:
        return wave
    frame = av.AudioFrame.from_ndarray(wave[None], format="flt", layout="mono")
    frame.sample_rate = int(sampling_rate)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLING_RATE)
    outs = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([o.to_ndarray().reshape(-1) for o in outs]).astype(np.float32)


def write_audio(path: Any, waveform: np.ndarray, sampling_rate: int = SAMPLING_RATE, *,
                codec: str | None = None) -> None:
    """float32[S] mono → an audio file (wav: pcm_s16le, flac, mp3 by extension). For the demo set and tests."""
    fmt_codec = {".wav": ("wav", "pcm_s16le"), ".flac": ("flac", "flac"), ".mp3": ("mp3", "libmp3lame")}
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in fmt_codec:
        raise ValueError(f"write_audio: extension {ext!r}; valid: {sorted(fmt_codec)}")
    fmt, default_codec = fmt_codec[ext]
    container = av.open(os.fspath(path), mode="w", format=fmt)
    try:
        stream = container.add_stream(codec or default_codec, rate=int(sampling_rate), layout="mono")
        _encode(container, stream, waveform, sampling_rate)
    finally:
        container.close()


def _encode(container, stream, waveform: np.ndarray, sampling_rate: int) -> None:
    """Feeds mono float32 ``waveform`` to ``stream`` in 1024-sample frames (in the stream's sample format)."""
    wave = np.clip(np.asarray(waveform, np.float32).reshape(-1), -1.0, 1.0)
    fmt = stream.format.name
    step = stream.frame_size or 1024
    resampler = av.AudioResampler(format=fmt, layout="mono", rate=int(sampling_rate))
    pts = 0
    for i in range(0, wave.shape[0], step):
        frame = av.AudioFrame.from_ndarray(wave[None, i:i + step], format="flt", layout="mono")
        frame.sample_rate = int(sampling_rate)
        frame.pts = pts
        pts += frame.samples
        for out in resampler.resample(frame):
            for packet in stream.encode(out):
                container.mux(packet)
    for out in resampler.resample(None):
        for packet in stream.encode(out):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_clip(path: Any, frames: np.ndarray, fps: float, waveform: np.ndarray,
               sampling_rate: int = SAMPLING_RATE, *, gop: int = 12) -> None:
    """uint8[T, H, W, 3] RGB + float32[S] mono → an mp4 with an H.264 video and an AAC audio track (the demo
    set's clips, tests)."""
    from fractions import Fraction  # noqa: PLC0415

    container = av.open(path, mode="w", format="mp4")
    try:
        video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height = int(frames.shape[2]), int(frames.shape[1])
        video.pix_fmt = "yuv420p"
        video.gop_size = gop
        video.options = {"preset": "ultrafast", "crf": "18"}
        audio = container.add_stream("aac", rate=int(sampling_rate), layout="mono")
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        _encode(container, audio, waveform, sampling_rate)
    finally:
        container.close()

"""The demo set's synthetic audio track: tones and noise bursts tied to the clip's label (a smoke test).

Each emotion has its own sound, so the audio path has something learnable in the main job's data:
  happy    — a bright rising major arpeggio (523 → 659 → 784 Hz) with light vibrato
  sad      — a low, slow, falling tone (220 → 165 Hz), quiet
  neutral  — a steady mid hum (330 Hz), even loudness
  angry    — loud noise bursts over a low growl (110 Hz square-ish wave)
  surprise — a fast upward chirp (300 → 1500 Hz) after a short silence
Nothing about real vocal emotion can be concluded from these sounds. Seeded by the clip index: deterministic.
"""

from __future__ import annotations

import numpy as np

from emoqwen_jax.data.audio import SAMPLING_RATE, write_clip

SOUNDS = ("happy", "sad", "neutral", "angry", "surprise")


def _tone(freq: np.ndarray, amp: float) -> np.ndarray:
    """A sine whose instantaneous frequency follows ``freq`` (Hz per sample)."""
    return amp * np.sin(2 * np.pi * np.cumsum(freq) / SAMPLING_RATE)


def demo_audio(index: int, emotion: str, seconds: float) -> np.ndarray:
    """float32[seconds · 16000] mono in [-1, 1]: the sound of ``emotion`` (see the module docstring)."""
    if emotion not in SOUNDS:
        raise ValueError(f"demo_audio: emotion {emotion!r}; valid: {SOUNDS}")
    rng = np.random.default_rng(1000 + index)
    n = int(round(seconds * SAMPLING_RATE))
    t = np.arange(n) / SAMPLING_RATE
    frac = t / max(seconds, 1e-9)
    if emotion == "happy":
        steps = np.array([523.25, 659.25, 783.99])[np.minimum((frac * 3).astype(int), 2)]
        x = _tone(steps * (1 + 0.01 * np.sin(2 * np.pi * 6 * t)), 0.35)
    elif emotion == "sad":
        x = _tone(220.0 - 55.0 * frac, 0.12) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t) ** 2)
    elif emotion == "neutral":
        x = _tone(np.full(n, 330.0), 0.2)
    elif emotion == "angry":
        growl = 0.3 * np.tanh(4 * np.sin(2 * np.pi * 110 * t))
        bursts = (np.sin(2 * np.pi * 4 * t) > 0.3).astype(np.float64)
        x = growl + 0.5 * bursts * rng.standard_normal(n)
    else:  # surprise
        start = 0.25 * seconds
        x = np.where(t < start, 0.0, _tone(300.0 + 1200.0 * np.clip((t - start) / (seconds - start), 0, 1), 0.4))
    x = x + 0.005 * rng.standard_normal(n)  # a faint room noise: no frame is digital silence
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def write_demo_clip(path: str, frames: np.ndarray, fps: float, emotion: str, index: int) -> None:
    """Writes a demo clip (``frames`` uint8[T, H, W, 3] at ``fps``) with its label's sound as an AAC track."""
    write_clip(path, frames, fps, demo_audio(index, emotion, frames.shape[0] / fps), gop=8)

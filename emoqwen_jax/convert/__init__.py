"""Conversion between Hugging Face Qwen2.5-VL checkpoints, our orbax model directories and back; audio
encoders from Qwen2-Audio and Whisper checkpoints."""

from emoqwen_jax.convert.audio import audio_encoder_from_hf
from emoqwen_jax.convert.hf_export import to_hf
from emoqwen_jax.convert.hf_import import config_from_hf, from_hf

__all__ = ["audio_encoder_from_hf", "config_from_hf", "from_hf", "to_hf"]

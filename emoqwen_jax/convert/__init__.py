"""Conversion between Hugging Face Qwen2.5-VL checkpoints, our orbax model directories and back."""

from emoqwen_jax.convert.hf_export import to_hf
from emoqwen_jax.convert.hf_import import config_from_hf, from_hf

__all__ = ["config_from_hf", "from_hf", "to_hf"]

"""The network: Qwen2.5-VL ViT, Hybrid Compressor, Qwen2.5 decoder. Imports nothing from data/train/eval."""

from emoqwen_jax.model.config import CompressorConfig, ModelConfig, TextConfig, VisionConfig
from emoqwen_jax.model.emotion_qwen import EmotionQwen, ModelOutput, abstract_model, count_params, layout_spec

__all__ = [
    "CompressorConfig", "EmotionQwen", "ModelConfig", "ModelOutput", "TextConfig", "VisionConfig",
    "abstract_model", "count_params", "layout_spec",
]

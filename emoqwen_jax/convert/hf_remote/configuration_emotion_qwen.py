"""Emotion-Qwen configuration for transformers (shipped in exports of ``emoqwen_jax``; loaded with
``trust_remote_code=True``).

A Qwen2.5-VL config plus one ``compressor`` dict: the Hybrid Compressor's settings as ``emoqwen_jax``'s
``CompressorConfig`` writes them (``routing`` 'sample' | 'token', ``num_experts``, ``expert_names``,
``gate_input``, ``gate_num_heads``, ``gate_hidden_size``, ``top_k``, ``capacity_factor``, ...). Every value
comes from the exported config.json (the export writes all of them); none is repeated here. An ``audio`` dict
(``emoqwen_jax``'s ``AudioConfig``: ``enabled``, the Qwen2AudioEncoder sizes, ``projector``, the audio token ids)
adds the audio tower and projector.
"""

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig


class EmotionQwenConfig(Qwen2_5_VLConfig):
    model_type = "emotion_qwen"

    def __init__(self, compressor: dict | None = None, audio: dict | None = None, **kwargs):
        # Why not a dataclass field: Qwen2_5_VLConfig is a strict dataclass; an explicit attribute set
        # before its __init__ survives to_dict/from_dict without re-decorating the subclass.
        self.compressor = dict(compressor or {})
        self.audio = dict(audio or {})  # emoqwen_jax's AudioConfig; empty or enabled=False: no audio modules
        super().__init__(**kwargs)


__all__ = ["EmotionQwenConfig"]

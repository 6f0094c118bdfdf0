"""Inference: KV-cache generation with the multimodal prompt (prefill + decode loop)."""

from emoqwen_jax.infer.generate import (
                                        GenerationOutput,
                                        SamplingConfig,
                                        batch_vision,
                                        check_left_padded,
                                        decode,
                                        generate,
                                        init_cache,
                                        left_pad,
                                        prefill,
                                        sample_logits,
)

__all__ = [
    "GenerationOutput", "SamplingConfig", "batch_vision", "check_left_padded", "decode", "generate", "init_cache",
    "left_pad", "prefill", "sample_logits",
]

"""Model sizes: the one table of architecture numbers, by preset. ``ModelConfig``'s defaults (the released 7B),
``LayoutSpec``'s and the run configs' presets (``configs/emotion_qwen.py``) all read it; nothing else repeats
a size. Pure data (no imports), so the host layout, the model and the configs can all read it.

``7b`` is the released Emotion-Qwen: the Qwen2.5-VL-7B ViT + Qwen2.5-7B decoder (docs/design.md, The released
model's modules and sizes); every other preset lists only what it changes. Adding a size: one entry here, its
name in ``configs/emotion_qwen.PRESETS``.
"""

from __future__ import annotations

import copy

BASE = "7b"

SIZES: dict[str, dict[str, dict]] = {
    "7b": {
        "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420, "in_channels": 3,
                   "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 112,
                   "fullatt_block_indexes": (7, 15, 23, 31), "tokens_per_second": 2.0},
        "text": {"vocab_size": 152064, "hidden_size": 3584, "num_layers": 28, "num_heads": 28, "num_kv_heads": 4,
                 "intermediate_size": 18944, "mrope_section": (16, 24, 24)},
        "compressor": {"gate_num_heads": 8, "gate_hidden_size": 512},
        # Qwen2-Audio-7B's encoder (Whisper-large-v3 sized; used when model.audio.enabled).
        "audio": {"num_mel_bins": 128, "d_model": 1280, "encoder_layers": 32, "encoder_attention_heads": 20,
                  "encoder_ffn_dim": 5120, "max_source_positions": 1500},
    },
    # Large enough that matmuls dominate on a CPU (benchmarks).
    "small": {
        "vision": {"depth": 8, "hidden_size": 256, "num_heads": 4, "intermediate_size": 512,
                   "fullatt_block_indexes": (3, 7)},
        "text": {"vocab_size": 4096, "hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 2,
                 "intermediate_size": 1408, "mrope_section": (8, 12, 12)},
        "compressor": {"gate_num_heads": 4, "gate_hidden_size": 128},
        "audio": {"d_model": 256, "encoder_layers": 4, "encoder_attention_heads": 4, "encoder_ffn_dim": 512},
    },
    # One GPU's benchmark model (bench/train_step.py --preset gpu): the 7B's ViT + a Qwen2.5-1.5B-sized decoder.
    "gpu": {
        "text": {"vocab_size": 151936, "hidden_size": 1536, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
                 "intermediate_size": 8960, "tie_word_embeddings": True},
    },
    # ~300k parameters: tests and the CPU demo (tiny tokenizer layout).
    "tiny": {
        "vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "window_size": 56,
                   "fullatt_block_indexes": (1,)},
        "text": {"vocab_size": 1024, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 128, "mrope_section": (2, 3, 3)},
        "compressor": {"gate_num_heads": 2, "gate_hidden_size": 16},
        "audio": {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                  "max_source_positions": 50},  # 100-frame (1 s) encoder windows
    },
}


def size(name: str) -> dict[str, dict]:
    """The full numbers of size ``name``: the 7b entry updated with the preset's changes (a fresh copy)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {tuple(SIZES)}")
    out = copy.deepcopy(SIZES[BASE])
    for part, values in SIZES[name].items():
        out[part].update(values)
    return out

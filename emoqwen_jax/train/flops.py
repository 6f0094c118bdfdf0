"""Analytic training FLOPs per sample, for MFU (2 FLOPs per multiply-add; x3 for forward + backward)."""

from __future__ import annotations

from emoqwen_jax.model import ModelConfig


def vision_flops(cfg: ModelConfig, patches: int, window_tokens: int, frame_tokens: int) -> float:
    """Forward FLOPs of the ViT on ``patches`` patches; attention spans ``window_tokens`` in window blocks
    and ``frame_tokens`` in full-attention blocks."""
    v = cfg.vision
    d, f = v.hidden_size, v.intermediate_size
    dense = 2 * patches * (v.patch_dim * d + v.depth * (4 * d * d + 3 * d * f))
    full = len(v.fullatt_block_indexes)
    attn = 2 * 2 * patches * d * (full * frame_tokens + (v.depth - full) * window_tokens)
    return float(dense + attn)


def compressor_flops(cfg: ModelConfig, units: int) -> float:
    """Forward FLOPs of the experts a token visits (all E in paper mode, top_k in scale mode)."""
    v, c = cfg.vision, cfg.compressor
    dm = v.hidden_size * v.merge_unit
    per_expert = 2 * units * (dm * dm + dm * cfg.text.hidden_size)
    visits = c.num_experts if c.routing == "sample" else c.top_k
    return float(per_expert * visits)


def text_flops(cfg: ModelConfig, tokens: int, context: int) -> float:
    """Forward FLOPs of the decoder on ``tokens`` tokens with mean causal context ``context``."""
    t = cfg.text
    d, h = t.hidden_size, t.head_dim
    qkvo = 2 * d * (t.num_heads * h) + 2 * d * (t.num_kv_heads * h)
    dense = 2 * tokens * (t.num_layers * (qkvo + 3 * d * t.intermediate_size) + d * t.vocab_size)
    attn = 2 * 2 * tokens * t.num_layers * t.num_heads * h * context
    return float(dense + attn)


def train_flops(cfg: ModelConfig, *, tokens: int, patches: int, window_tokens: int = 64,
                frame_tokens: int | None = None) -> float:
    """Training FLOPs (3x forward) of one batch: ``tokens`` text tokens, ``patches`` ViT patches."""
    frame_tokens = frame_tokens or max(patches, 1)
    forward = (vision_flops(cfg, patches, min(window_tokens, frame_tokens), frame_tokens)
               + compressor_flops(cfg, patches // cfg.vision.merge_unit) + text_flops(cfg, tokens, tokens / 2))
    return 3.0 * forward

"""Analytic training FLOPs, for MFU: 2 FLOPs per multiply-add of every matmul and attention product.

Counted: every matmul (ViT patch embedding, qkv/proj/MLP, attention logits and values; compressor experts, gate
and router; decoder projections, MLP, attention, LM head). Not counted: softmax, norms, rotary, activations,
masks, the optimizer update — a few percent of XLA's count on small models, negligible at 7B
(``tests/train/test_flops.py`` pins the gap).

Attention is counted in *query-key pairs*: ``4 * width * pairs`` per layer (logits + weighted values, all heads).
Two conventions:
  * model FLOPs (``batch_train_flops(..., implementation=False)``, what MFU uses): the pairs the math needs —
    per window / frame segment len², causal (i + 1) per text query;
  * implementation FLOPs (``implementation=True``): the pairs the ``xla`` attention path computes (what
    ``model.attention='auto'`` runs on CPU below 2048 keys) — 3 blocks of keys per window-layer query (the
    banded path), P² for the dense full-attention layers, and per text row the causal query blocks of
    ``attention.CAUSAL_QUERY_BLOCK`` against the keys up to the block's end, padding included. This is the one
    compared with XLA's ``cost_analysis``.
Training = forward + backward = 3 × forward, except that the patch embedding needs no input gradient (2 ×).
"""

from __future__ import annotations

import numpy as np

from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model.moe import capacity


def segment_pairs(segment_ids) -> int:
    """Sum of len² over the runs of equal ids >= 0 (padding, id < 0, excluded): attention pairs within segments."""
    ids = np.asarray(segment_ids)
    ids = ids[ids >= 0]
    if ids.size == 0:
        return 0
    _, counts = np.unique(ids, return_counts=True)
    return int((counts.astype(np.int64) ** 2).sum())


def causal_block_pairs(length: int, block: int = 128, max_blocks: int = 64) -> int:
    """Query-key pairs of the ``xla`` path's causal attention over one row: query block c meets the keys up to
    its end (``emoqwen_jax.model.attention._xla``; a single block or more than ``max_blocks`` run dense)."""
    blocks = -(-length // block)
    if blocks <= 1 or blocks > max_blocks:
        return length * length
    return sum((min(length, (c + 1) * block) - c * block) * min(length, (c + 1) * block) for c in range(blocks))


def vision_flops(cfg: ModelConfig, patches: int, window_pairs: float, full_pairs: float) -> tuple[float, float]:
    """Forward FLOPs of the ViT on ``patches`` patches -> (patch embedding, blocks). ``window_pairs`` and
    ``full_pairs`` are the attention pairs of ONE window layer and ONE full-attention layer."""
    v = cfg.vision
    d, f = v.hidden_size, v.intermediate_size
    embed = 2.0 * patches * v.patch_dim * d
    dense = 2.0 * patches * v.depth * (3 * d * d + d * d + 3 * d * f)
    full = len(v.fullatt_block_indexes)
    attn = 4.0 * d * (full * full_pairs + (v.depth - full) * window_pairs)
    return embed, dense + attn


def compressor_flops(cfg: ModelConfig, units: int, items: int = 1, gate_tokens: int | None = None,
                     implementation: bool = False) -> float:
    """Forward FLOPs of the compressor on ``units`` merged tokens of ``items`` images/videos.

    Paper mode: every expert on every unit, the gate (pooled: one token per item; ``gate_input='tokens'``:
    attention over the ``gate_tokens`` patches) and the mix. Scale mode: the router and ``top_k`` expert visits
    per unit (× capacity factor for the buffer rows when capacity is bounded); ``implementation``: the buffer rows
    the capacity dispatch really computes (every routing group of ``group_size`` units, padded, E × C rows)."""
    v, c, t = cfg.vision, cfg.compressor, cfg.text
    dm = v.hidden_size * v.merge_unit
    per_visit = 2.0 * (dm * dm + dm * t.hidden_size)
    if c.routing == "token":
        rows = units * c.top_k * (c.capacity_factor if c.capacity_factor > 0 else 1.0)
        if implementation and c.dispatch != "ragged":
            groups = -(-units // c.group_size)
            rows = groups * c.num_experts * capacity(c.group_size, c.num_experts, c.top_k, c.capacity_factor)
        return per_visit * rows + 2.0 * units * dm * c.num_experts
    flops = per_visit * units * c.num_experts
    if c.num_experts > 1:
        dv, hid = v.hidden_size, c.gate_hidden_size
        n = items if c.gate_input == "pooled" else (gate_tokens or units * v.merge_unit)
        pairs = items if c.gate_input == "pooled" else n * n
        flops += 2.0 * n * 4 * dv * dv + 4.0 * dv * pairs + 2.0 * items * (dv * hid + hid * hid + hid * c.num_experts)
        flops += 2.0 * units * t.hidden_size * c.num_experts  # the weighted mix
    return flops


def text_flops(cfg: ModelConfig, tokens: int, pairs: float) -> float:
    """Forward FLOPs of the decoder and LM head on ``tokens`` positions with ``pairs`` attention pairs per layer."""
    t = cfg.text
    d, h = t.hidden_size, t.head_dim
    proj = 2 * d * (t.num_heads * h) + 2 * d * (t.num_kv_heads * h)  # q, o and k, v
    dense = 2.0 * tokens * (t.num_layers * (proj + 3 * d * t.intermediate_size) + d * t.vocab_size)
    return dense + 4.0 * t.num_heads * h * t.num_layers * pairs


def train_flops(cfg: ModelConfig, *, tokens: int, patches: int, window_tokens: int | None = None,
                frame_tokens: int | None = None, sequences: int = 1, items: int = 1) -> float:
    """Training FLOPs of a batch from counts alone (when the layout is not at hand): ``tokens`` text tokens in
    ``sequences`` rows of equal length, ``patches`` ViT patches; windows of ``window_tokens`` patches (default:
    a full window) and frames of ``frame_tokens`` patches (default: all patches one frame, an upper bound)."""
    v = cfg.vision
    window = window_tokens or (v.window_size // v.patch_size) ** 2
    frame = frame_tokens or max(patches, 1)
    per_row = tokens / max(sequences, 1)
    embed, blocks = vision_flops(cfg, patches, patches * min(window, frame), patches * min(frame, patches))
    forward = blocks + compressor_flops(cfg, patches // v.merge_unit, items) + text_flops(
        cfg, tokens, sequences * per_row * (per_row + 1) / 2)
    return 3.0 * forward + 2.0 * embed


def batch_train_flops(cfg: ModelConfig, inputs: ModelInputs, *,
                      implementation: bool = False) -> float:
    """Training FLOPs of one batch of ``ModelInputs`` (``layout.build_model_inputs``, host or device).

    ``implementation=False``: model FLOPs over the real patches and tokens (MFU). ``True``: what our XLA code
    computes, padding and masked-out pairs included (see the module docstring)."""
    v = cfg.vision
    vision = inputs.vision
    mask = np.asarray(inputs.text.attention_mask)
    b, length = mask.shape
    if vision is None or vision.frame_segment.shape[0] == 0:
        embed = blocks = comp = 0.0
    else:
        frame_seg, window_seg = np.asarray(vision.frame_segment), np.asarray(vision.window_segment)
        item_valid = np.asarray(vision.item_valid)
        patches = frame_seg.shape[0] if implementation else int((frame_seg >= 0).sum())
        items = int(item_valid.shape[0] if implementation else item_valid.sum())
        if implementation:
            local = lambda block: -(-patches // block) * block * 3 * block  # noqa: E731
            window_pairs = local((v.window_size // v.patch_size) ** 2)
            full_pairs = patches * patches
        else:
            window_pairs, full_pairs = segment_pairs(window_seg), segment_pairs(frame_seg)
        embed, blocks = vision_flops(cfg, patches, window_pairs, full_pairs)
        comp = compressor_flops(cfg, patches // v.merge_unit, items, gate_tokens=patches,
                                implementation=implementation)
    if implementation:
        tokens, pairs = b * length, b * causal_block_pairs(length)
    else:
        lengths = mask.sum(-1).astype(np.int64)
        if inputs.text.segment_ids is not None:  # packed rows: causal pairs within each sample
            seg = np.asarray(inputs.text.segment_ids)
            lengths = np.concatenate([np.unique(row[row > 0], return_counts=True)[1] for row in seg]).astype(np.int64)
        tokens, pairs = int(lengths.sum()), int((lengths * (lengths + 1) // 2).sum())
    return 3.0 * (blocks + comp + text_flops(cfg, tokens, pairs)) + 2.0 * embed

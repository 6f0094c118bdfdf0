"""The Qwen2.5-VL vision transformer (``visual`` in HF, ``vpm`` in the Emotion-Qwen release), without its
patch merger: the mergers are the Hybrid Compressor's experts (``compressor.py``).

Variable-size images and videos arrive as one flat, padded sequence of P patches plus index arrays
computed on the host (``emoqwen_jax.layout``), so everything here has static shapes:
  * ``window_index`` int[U]: merge-unit permutation into window order (HF ``get_window_index``);
  * ``frame_segment`` int[P]: one id per frame of each item — full-attention layers attend within a frame;
  * ``window_segment`` int[P]: one id per window (window order) — the other layers attend within a window;
  * ``pos_hw`` int[P, 2]: (row, column) of each patch for the 2-D rotary, in HF patch order.
Padding patches carry segment id -1: they attend only to each other and never touch real tokens.

Window layers attend block-locally (``local_segment_attention`` with blocks of one window, (window/patch)^2
patches): a window is contiguous in window order and never longer than that, so each query looks at 3 blocks
of keys instead of all P — exact, and O(P) instead of O(P^2). Full-attention layers keep the dense [P, P]
frame mask by default (a frame's length is data-dependent); ``vision.frame_block = N`` makes them block-local
too, exact for frames of at most N patches (a longer frame turns the output into NaN, never a wrong number).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model import sharding
from emoqwen_jax.model.config import VisionConfig
from emoqwen_jax.model.layers import (GatedMLP, Linear, RMSNorm, as_dtype, dot_product_attention,
                                     local_segment_attention)
from emoqwen_jax.model.rope import apply_rotary, vision_rotary

Array = jax.Array


def to_window_order(x: Array, window_index: Array, merge_unit: int) -> Array:
    """Reorders float[P, ...] patches by merge unit into window order (HF ``permute_input_for_window_attn``)."""
    units = x.reshape(x.shape[0] // merge_unit, merge_unit, *x.shape[1:])
    return units[window_index].reshape(x.shape)


def from_window_order(units: Array, window_index: Array) -> Array:
    """Inverse of the unit permutation for float[U, ...] merged tokens: back to HF (raster) order."""
    inverse = jnp.zeros_like(window_index).at[window_index].set(jnp.arange(window_index.shape[0], dtype=window_index.dtype))
    return units[inverse]


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (2, 14, 14) on pre-flattened patches == a bias-free linear map."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=(None, "embed"), rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: Array) -> Array:
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "qkv"), **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.local_block = 0  # > 0: segments are at most this long (window layers); 0: dense segment mask

    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array) -> Array:
        """x float[P, D]; cos/sin float32[P, H]; segment_ids int[P] -> float[P, D]."""
        p = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim), 1, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.local_block:
            out = local_segment_attention(q, k, v, segment_ids, block=self.local_block, scale=self.head_dim**-0.5)
        else:
            mask = segment_ids[:, None] == segment_ids[None, :]
            out = dot_product_attention(q[None], k[None], v[None], mask[None, None], scale=self.head_dim**-0.5)
        return self.proj(out.reshape(p, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, **norm)
        self.norm2 = RMSNorm(cfg.hidden_size, **norm)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array) -> Array:
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


def _block_call(block: VisionBlock, x, cos, sin, segment_ids):
    return block(x, cos, sin, segment_ids)


class VisionTransformer(nnx.Module):
    """Patch embedding + ``depth`` blocks. Returns features in *window order* (the mergers consume
    contiguous groups of 4 patches, which window order keeps together)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 remat: bool = False):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.depth)])
        window_patches = (cfg.window_size // cfg.patch_size) ** 2
        for i, block in enumerate(self.blocks):
            block.attn.local_block = cfg.frame_block if i in cfg.fullatt_block_indexes else window_patches
        self.remat = remat
        self.dtype = dtype

    def __call__(self, pixel_values: Array, *, pos_hw: Array, window_index: Array, frame_segment: Array,
                 window_segment: Array) -> Array:
        """pixel_values float[P, C*2*14*14] in HF order -> float[P, D] in window order."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.dtype))
        # Keep the flat patch axis sharded like the batch (the index gather alone would let GSPMD replicate it).
        x = sharding.constrain(to_window_order(x, window_index, cfg.merge_unit), ("units", "act_embed"))
        cos, sin = vision_rotary(to_window_order(pos_hw, window_index, cfg.merge_unit), cfg.head_dim, cfg.rope_theta)
        call = nnx.remat(_block_call) if self.remat else _block_call
        full = set(cfg.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            x = sharding.constrain(call(block, x, cos, sin, frame_segment if i in full else window_segment),
                                   ("units", "act_embed"))
        if cfg.frame_block and full:
            x = jnp.where(longest_run(frame_segment) > cfg.frame_block, jnp.nan, x)
        return x


def longest_run(segment_ids: Array) -> Array:
    """int32[]: the longest run of equal consecutive ids >= 0 in int[P] (padding, id < 0, is not a segment)."""
    idx = jnp.arange(segment_ids.shape[0], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]])
    run_start = jax.lax.cummax(jnp.where(starts, idx, 0))
    return jnp.max(jnp.where(segment_ids >= 0, idx - run_start + 1, 0))

"""Rotary position embeddings: the ViT's 2-D (h, w) rotary and the decoder's M-RoPE (t, h, w).

Angles, cos/sin and the rotation itself are computed in float32 whatever the compute dtype, as HF does for
the ViT; for the decoder HF rotates in the activation dtype, which only matters in bfloat16.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/dim) for i < dim/2, as float32.

    HF forms the exponent in float32 and the power with torch's float32 pow, which is nearly correctly
    rounded; numpy's float32 pow is not (up to 2 ulp off, which grows to ~1e-3 in cos at 32k positions).
    Rounding a float64 power of the float32 exponent to float32, then dividing in float32, matches torch on
    every entry of the vision tables and all but one of the 7B text table (1 ulp)."""
    exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return np.float32(1.0) / (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x float[..., T, N, H] rotated by cos/sin float[..., T, H] (broadcast over heads), in float32."""
    x32 = x.astype(jnp.float32)
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def cos_sin(emb: Array) -> tuple[Array, Array]:
    """cos and sin of the angles float32[..., H], computed once.

    On CPU, XLA would otherwise fuse the sin and cos into every consumer (each layer's rotation of q and k,
    their gradients, every attention block's slice) and evaluate them per element and head again; the
    outputs of a conditional are materialised buffers. The predicate (an angle equals itself) cannot be
    folded, and both branches compute the same tables, so the result does not depend on it. Other backends
    compute the tables directly (their transcendentals are cheap, and a conditional can cost a host sync)."""
    tables = lambda e: (jnp.cos(e), jnp.sin(e))  # noqa: E731
    if jax.default_backend() != "cpu" or emb.size == 0:
        return tables(emb)
    first = emb[(0,) * emb.ndim]
    return jax.lax.cond(first == first, tables, tables, emb)


def vision_rotary(pos_hw: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """2-D rotary tables for the ViT.

    Args:
      pos_hw: int[P, 2] row and column of each patch on its frame's patch grid.
    Returns:
      cos, sin: float32[P, H]. The first H/4 frequencies rotate with the row, the next H/4 with the column,
      and the half is repeated (rotate_half convention): [f_h, f_w, f_h, f_w].
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim // 2, theta))  # [H/4]
    freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, H/4]
    freqs = freqs.reshape(freqs.shape[0], -1)  # [P, H/2] = [f_h | f_w]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return cos_sin(emb)


def mrope(position_ids: Array, head_dim: int, theta: float, mrope_section: Sequence[int]) -> tuple[Array, Array]:
    """Multimodal rotary tables for the decoder.

    Args:
      position_ids: int[3, B, L] temporal, height and width positions (equal for text tokens).
      mrope_section: 3 chunk sizes summing to H/2; chunk i of the frequencies takes its positions from axis
        i % 3 (t, h, w).
    Returns:
      cos, sin: float32[B, L, H].
    """
    inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))  # [H/2]
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, H/2]
    axis_of_freq = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])  # [H/2]
    # Pick, for every frequency j, the position axis that owns it: result [H/2, B, L] -> [B, L, H/2].
    freqs = jnp.moveaxis(freqs[axis_of_freq, ..., np.arange(axis_of_freq.size)], 0, -1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return cos_sin(emb)

"""The Qwen2.5 decoder (``language_model`` + ``lm_head`` in HF): GQA with q/k/v bias, M-RoPE, RMSNorm,
SwiGLU, tied or untied output head, and an optional static-size KV cache for generation.

Cache layout: one (k, v) pair per layer, each float[B, S, K, H] with S the cache length; ``cache_index``
is where the current T tokens are written. The caller builds the attention mask over the S cache slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model.config import TextConfig
from emoqwen_jax.model.layers import GatedMLP, Linear, RMSNorm, as_dtype, dot_product_attention, param
from emoqwen_jax.model.rope import apply_rotary, mrope
from emoqwen_jax.model.sharding import constrain

Array = jax.Array
KVCache = list[tuple[Array, Array]]
ACT = ("batch", "length", "act_embed")


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, n * h, use_bias=True, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(n * h, d, use_bias=False, axes=("q_heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None):
        """x float[B, T, D]; cos/sin float32[B, T, H]; mask bool[B, 1, T, S].

        Returns float[B, T, D] and the updated (k, v) cache (None without a cache)."""
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            cache = (k, v)
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.head_dim**-0.5)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = TextAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=False, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def _layer_call(layer: DecoderLayer, x, cos, sin, mask):
    return layer(x, cos, sin, mask)[0]


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm and the LM head (``lm_head``; absent when tied)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 remat: bool = False):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.cfg = cfg
        self.embed_tokens = param(rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                                  param_dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=("embed", "vocab"), rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype))
        self.remat = remat
        self.dtype = dtype

    def embed(self, input_ids: Array) -> Array:
        """int[B, L] -> float[B, L, D]."""
        return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

    def logits(self, hidden: Array) -> Array:
        """float[B, L, D] -> float32[B, L, V] (batch-sharded: the largest activation of a training step)."""
        if self.lm_head is None:
            logits = jnp.einsum("bld,vd->blv", hidden, self.embed_tokens[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        return constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, inputs_embeds: Array, position_ids: Array, mask: Array,
                 cache: KVCache | None = None, cache_index: Array | None = None) -> tuple[Array, KVCache | None]:
        """Runs the decoder stack.

        Args:
          inputs_embeds: float[B, T, D]; position_ids: int[3, B, T] (M-RoPE t/h/w positions).
          mask: bool[B, 1, T, S] (S = T without a cache).
        Returns:
          final-normed hidden states float[B, T, D] and the new cache (or None).
        """
        cfg = self.cfg
        cos, sin = mrope(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        x = constrain(inputs_embeds.astype(self.dtype), ACT)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            if cache is None:
                call = nnx.remat(_layer_call) if self.remat else _layer_call
                x = call(layer, x, cos, sin, mask)
            else:
                x, layer_cache = layer(x, cos, sin, mask, cache[i], cache_index)
                new_cache.append(layer_cache)
            x = constrain(x, ACT)  # keep the residual stream batch-sharded between layers
        return self.norm(x), new_cache


def causal_padding_mask(attention_mask: Array, segment_ids: Array | None = None) -> Array:
    """bool[B, 1, L, L]: query i sees key j iff j <= i, key j is a real token (right padding) and, with
    ``segment_ids`` int[B, L] (packed rows), i and j belong to the same sample."""
    length = attention_mask.shape[1]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] & (attention_mask[:, None, None, :] > 0)
    if segment_ids is not None:
        mask &= segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return mask

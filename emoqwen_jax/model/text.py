"""The Qwen2.5 decoder (``language_model`` + ``lm_head`` in HF): GQA with q/k/v bias, M-RoPE, RMSNorm,
SwiGLU, tied or untied output head, and an optional static-size KV cache for generation.

Attention masks are segment ids (``emoqwen_jax.model.attention``): query i sees key j iff their segment ids
are equal and j <= i (+ the cache index). Without packing a row's segment ids are its attention mask (1 real,
0 padding: padding attends only to padding); a packed row numbers its samples 1, 2, ... (0 padding).

Cache layout: one (k, v) pair per layer, each float[B, K, S, H] with S the cache length (KV heads before the
slots: the layout the attention's score and value products read, so a decode step writes its one column and
reads the cache in place instead of relaying all of it out in every layer); ``cache_index``
is where the current T tokens are written (a scalar, or int[B] per row for one token each: the serving
engine's slots each sit at their own length); ``kv_segment_ids`` int[B, S] are the segment ids of the S slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model.attention import attention
from emoqwen_jax.model.config import TextConfig
from emoqwen_jax.model.layers import GatedMLP, Linear, RMSNorm, as_dtype, param
from emoqwen_jax.model.rope import apply_rotary, mrope
from emoqwen_jax.model.sharding import constrain
from emoqwen_jax.model.stack import run_stack

Array = jax.Array
KVCache = list[tuple[Array, Array]]
ACT = ("batch", "length", "act_embed")


class TextAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla",
                 attention_block: int = 512):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, n * h, use_bias=True, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, k * h, use_bias=True, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(n * h, d, use_bias=False, axes=("q_heads", "embed"), **kw)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.attention, self.attention_block = attention, attention_block

    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 kv_segment_ids: Array | None = None):
        """x float[B, T, D]; cos/sin float32[B, T, H]; segment_ids int[B, T] (causal within equal ids);
        with a cache, kv_segment_ids int[B, S] of the S slots (default: ``segment_ids``). ``cache_index`` is a
        scalar (the T tokens of every row go to slots [i, i + T)) or int[B] with T = 1 (row b's token goes to
        slot cache_index[b]; which slots it sees is then ``kv_segment_ids`` alone, no causal offset).

        Returns float[B, T, D] and the updated (k, v) cache (None without a cache)."""
        b, t, _ = x.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        per_row = cache is not None and jnp.ndim(cache_index) == 1
        if per_row:  # one new token per row, each at its own slot (the serving engine's decode step)
            if t != 1:
                raise ValueError(f"a per-row cache_index int[B] writes one token per row, got {t}")
            rows = jnp.arange(b)
            k_cache, v_cache = cache
            # [B, K, H] at column i_b; a column past the cache is dropped (the engine's warm-up steps write there)
            k = k_cache.at[rows, :, cache_index].set(k[:, 0].astype(k_cache.dtype), mode="drop")
            v = v_cache.at[rows, :, cache_index].set(v[:, 0].astype(v_cache.dtype), mode="drop")
            # One query per row: dense logits are only [B, N, S'], read from the cache in place. S' =
            # kv_segment_ids' columns: the keys past them are masked for every row, so they are not read.
            read = kv_segment_ids.shape[1]
            out = attention(q, k[:, :, :read].astype(q.dtype), v[:, :, :read].astype(q.dtype),
                            scale=self.head_dim**-0.5, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                            causal=False, implementation="xla", kv_heads_first=True)
            return self.o_proj(out.reshape(b, t, -1)), (k, v)
        if cache is not None:
            k_cache, v_cache = cache
            start = (0, 0, cache_index, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), start)
            cache = (k, v)
        out = attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=self.head_dim**-0.5, q_segment_ids=segment_ids,
                        kv_segment_ids=segment_ids if kv_segment_ids is None else kv_segment_ids, causal=True,
                        q_offset=0 if cache is None else cache_index, implementation=self.attention,
                        block_size=self.attention_block, kv_heads_first=cache is not None)
        return self.o_proj(out.reshape(b, t, -1)), cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla",
                 attention_block: int = 512):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = TextAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                       attention_block=attention_block)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=False, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x, cos, sin, segment_ids, cache=None, cache_index=None, kv_segment_ids=None):
        attn, cache = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache, cache_index, kv_segment_ids)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class TextModel(nnx.Module):
    """Embedding, decoder layers, final norm and the LM head (``lm_head``; absent when tied)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 remat: str | bool = "none", scan_layers: bool = False, attention: str = "xla",
                 attention_block: int = 512):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.cfg = cfg
        self.embed_tokens = param(rngs, jax.nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size),
                                  param_dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                             attention_block=attention_block) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (None if cfg.tie_word_embeddings else
                        Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, axes=("embed", "vocab"), rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype))
        self.remat = remat  # 'none' | 'block' | 'dots_saveable' (emoqwen_jax.model.stack); True = 'block'
        self.scan_layers = scan_layers
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

    def __call__(self, inputs_embeds: Array, position_ids: Array, segment_ids: Array,
                 cache: KVCache | None = None, cache_index: Array | None = None,
                 kv_segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """Runs the decoder stack.

        Args:
          inputs_embeds: float[B, T, D]; position_ids: int[3, B, T] (M-RoPE t/h/w positions).
          segment_ids: int[B, T] (the attention mask, or per-sample ids of a packed row; see the module doc).
          cache, cache_index, kv_segment_ids: the KV cache, where the T tokens go, int[B, S] slot segment ids.
        Returns:
          final-normed hidden states float[B, T, D] and the new cache (or None).
        """
        cfg = self.cfg
        cos, sin = mrope(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        x = constrain(inputs_embeds.astype(self.dtype), ACT)
        if cache is None:
            def call(_, layer, x):  # keep the residual stream batch-sharded between layers
                return constrain(layer(x, cos, sin, segment_ids)[0], ACT)

            return self.norm(run_stack(self.layers, x, call, scan=self.scan_layers, remat=self.remat)), None
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, cos, sin, segment_ids, cache[i], cache_index, kv_segment_ids)
            new_cache.append(layer_cache)
            x = constrain(x, ACT)
        return self.norm(x), new_cache

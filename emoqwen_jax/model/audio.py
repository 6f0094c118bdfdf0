"""The audio path: a Whisper-style encoder equal to Hugging Face's ``Qwen2AudioEncoder``, and the projector.

Legend (besides ``layers.py``'s): M mel bins · F feature frames (3000 per 30 s) · A audio tokens (F/4, 25 per
second) · Da audio width (d_model, 1280 in Qwen2-Audio).

Encoder (HF names, so conversion is a key map): ``conv1`` (kernel 3, pad 1) → GELU → ``conv2`` (kernel 3,
stride 2, pad 1) → GELU → + ``embed_positions`` (fixed sinusoids in Whisper, stored as weights) → pre-LN
layers (``self_attn_layer_norm`` → bidirectional attention with a bias-free ``k_proj`` → residual;
``final_layer_norm`` → ``fc1`` → GELU → ``fc2`` → residual) → average pooling by 2 → ``layer_norm``.

A 1-D convolution is stored like a Linear over its flattened window: ``kernel`` float[C·3, Do] in HF's
(channel, tap) order, i.e. HF ``weight`` [Do, C, 3] reshaped to [Do, C·3] and transposed, and computed as
a matmul over the stacked taps (exact, and the same code path as every other matmul here).

Unlike HF, which insists on F = 2·max_source_positions, any even F ≤ 2·max_source_positions is accepted (the
positions are sliced), and an optional feature mask hides padded frames from the keys, as
``Qwen2AudioForConditionalGeneration`` does for audio shorter than its 30 s window.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model.config import PROJECTORS, AudioConfig
from emoqwen_jax.model.layers import LayerNorm, Linear, as_dtype, dot_product_attention, matmul, param

Array = jax.Array

def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> jax.Array:
    """Whisper's fixed positional table float32[length, channels]: [sin | cos] over log-spaced timescales."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    log_inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = jnp.exp(-log_inc * jnp.arange(channels // 2, dtype=jnp.float32))
    scaled = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
    return jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=1)


class Conv1d(nnx.Module):
    """torch ``nn.Conv1d(C, Do, kernel_size=k, stride=s, padding=k // 2)`` on channels-last input.

    ``kernel`` float[C·k, Do] (HF weight [Do, C, k] → reshape [Do, C·k] → transpose), ``bias`` float[Do].
    """

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, stride: int = 1,
                 rngs: nnx.Rngs | None, dtype=jnp.float32, param_dtype=jnp.float32):
        self.kernel = param(rngs, jax.nn.initializers.normal(0.02), (in_channels * kernel_size, out_channels),
                            param_dtype, (None, "embed"))
        self.bias = param(rngs, jax.nn.initializers.zeros, (out_channels,), param_dtype, ("embed",))
        self.kernel_size, self.stride, self.dtype = kernel_size, stride, dtype

    def __call__(self, x: Array) -> Array:
        """float[B, F, C] → float[B, (F - 1) // stride + 1, Do]."""
        k, s = self.kernel_size, self.stride
        f_out = (x.shape[1] - 1) // s + 1
        padded = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (0, 0)))
        taps = [padded[:, j:j + s * (f_out - 1) + 1:s] for j in range(k)]  # each [B, F', C]
        windows = jnp.stack(taps, axis=-1).reshape(x.shape[0], f_out, -1)  # [B, F', C·k] in (C, tap) order
        return matmul(windows, self.kernel[...].astype(self.dtype)) + self.bias[...].astype(self.dtype)


class AudioAttention(nnx.Module):
    """Whisper attention: q scaled after its projection (HF's order), bias-free ``k_proj``, no rotary."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs | None, dtype, param_dtype):
        d = cfg.d_model
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, d, use_bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, use_bias=False, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(d, d, use_bias=True, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, use_bias=True, axes=("heads", "embed"), **kw)
        self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x float[B, T, Da], mask bool[B, 1, 1, T] (True = a real key) or None → float[B, T, Da]."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = (self.q_proj(x) * self.head_dim**-0.5).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        out = dot_product_attention(q, k, v, mask, scale=1.0)
        return self.out_proj(out.reshape(b, t, -1))


class AudioEncoderLayer(nnx.Module):
    """Pre-LN Whisper encoder layer (HF ``Qwen2AudioEncoderLayer``)."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs | None, dtype, param_dtype):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = AudioAttention(cfg, rngs=rngs, **kw)
        self.self_attn_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, axis_name="embed", **kw)
        self.fc1 = Linear(cfg.d_model, cfg.encoder_ffn_dim, use_bias=True, axes=("embed", "mlp"), rngs=rngs, **kw)
        self.fc2 = Linear(cfg.encoder_ffn_dim, cfg.d_model, use_bias=True, axes=("mlp", "embed"), rngs=rngs, **kw)
        self.final_layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, axis_name="embed", **kw)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.final_layer_norm(x)), approximate=False))


def conv_lengths(feature_lengths: Array) -> Array:
    """Valid frames after conv2 for valid feature frames ``feature_lengths`` (HF
    ``_get_feat_extract_output_lengths``)."""
    return (feature_lengths - 1) // 2 + 1


def output_lengths(feature_lengths: Array) -> Array:
    """Valid audio tokens (after pooling) for valid feature frames: 25 per second, 750 per full window."""
    return (conv_lengths(feature_lengths) - 2) // 2 + 1


class AudioEncoder(nnx.Module):
    """HF ``Qwen2AudioEncoder``: float[B, M, F] log-mel features → float[B, F // 4, Da] (``last_hidden_state``)."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs | None, dtype="float32", param_dtype="float32"):
        cfg.validate()
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.config = cfg
        self.conv1 = Conv1d(cfg.num_mel_bins, cfg.d_model, kernel_size=3, stride=1, rngs=rngs, **kw)
        self.conv2 = Conv1d(cfg.d_model, cfg.d_model, kernel_size=3, stride=2, rngs=rngs, **kw)
        # Whisper's positions are fixed sinusoids; they are stored (and loaded) like any weight, and the
        # optimiser never trains them (see emoqwen_jax.train.optim's frozen names).
        self.embed_positions = nnx.Param(sinusoids(cfg.max_source_positions, cfg.d_model).astype(param_dtype),
                                         logical_axes=(None, "embed"))
        self.layers = nnx.List([AudioEncoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.encoder_layers)])
        self.layer_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, axis_name="embed", **kw)
        self.dtype = dtype

    def stem(self, features: Array) -> Array:
        """float[B, M, F] → conv stem + positions float[B, ceil(F / 2), Da] (before the layers)."""
        cfg = self.config
        if features.ndim != 3 or features.shape[1] != cfg.num_mel_bins:
            raise ValueError(f"audio features of shape {features.shape}; expected [B, num_mel_bins="
                             f"{cfg.num_mel_bins}, frames]")
        if features.shape[2] % 2 or features.shape[2] > cfg.max_frames:
            raise ValueError(f"{features.shape[2]} feature frames; need an even count <= 2 * max_source_positions"
                             f" = {cfg.max_frames}")
        x = jnp.swapaxes(features, 1, 2)  # [B, F, M]
        x = jax.nn.gelu(self.conv1(x), approximate=False)
        x = jax.nn.gelu(self.conv2(x), approximate=False)
        if cfg.scale_embedding:
            x = x * math.sqrt(cfg.d_model)
        return x + self.embed_positions[...][: x.shape[1]].astype(x.dtype)

    def pool(self, x: Array) -> Array:
        """``AvgPool1d(2, 2)`` over time + the final layer norm: float[B, T, Da] → float[B, T // 2, Da]."""
        b, t, d = x.shape
        pooled = x[:, : t // 2 * 2].reshape(b, t // 2, 2, d).mean(axis=2)
        return self.layer_norm(pooled)

    def __call__(self, features: Array, feature_mask: Array | None = None) -> Array:
        """Args:
          features: float[B, M, F] (F even, at most 2·max_source_positions; 3000 for a 30 s window).
          feature_mask: optional int/bool[B, F], 1 for frames holding audio (``data.audio.feature_mask``);
            keys past each row's valid length are then masked, as Qwen2-Audio does for short audio.
        Returns:
          float[B, F // 4, Da]; with a mask, rows past ``output_lengths(mask.sum(-1))`` are padding.
        """
        x = self.stem(features)
        mask = None
        if feature_mask is not None:
            valid = conv_lengths(jnp.sum(feature_mask.astype(jnp.int32), axis=-1))  # [B]
            mask = (jnp.arange(x.shape[1])[None, :] < valid[:, None])[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.pool(x)


class AudioProjector(nnx.Module):
    """Audio features float[..., Da] → the LLM width float[..., D].

    'linear': Qwen2-Audio's ``multi_modal_projector.linear`` (one Linear with bias); 'mlp': ``linear_1`` →
    GELU → ``linear_2`` (LLaVA-style, an option)."""

    def __init__(self, cfg: AudioConfig, out_features: int, *, rngs: nnx.Rngs | None, dtype="float32",
                 param_dtype="float32"):
        kw = dict(use_bias=True, rngs=rngs, dtype=as_dtype(dtype), param_dtype=as_dtype(param_dtype))
        if cfg.projector not in PROJECTORS:
            raise ValueError(f"audio.projector={cfg.projector!r}; choose one of {PROJECTORS}")
        self.kind = cfg.projector
        if cfg.projector == "linear":
            self.linear = Linear(cfg.d_model, out_features, axes=("embed", "embed_out"), **kw)
        else:
            hidden = cfg.projector_hidden_size or out_features
            self.linear_1 = Linear(cfg.d_model, hidden, axes=("embed", "mlp"), **kw)
            self.linear_2 = Linear(hidden, out_features, axes=("mlp", "embed_out"), **kw)

    def __call__(self, x: Array) -> Array:
        if self.kind == "linear":
            return self.linear(x)
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


def pooled_audio_per_item(audio: Array, audio_token_index: Array, visual_token_index: Array, unit_item: Array,
                          num_items: int) -> Array:
    """Each visual item's sample's mean audio feature (``audio.gate_audio``): float[G, Da], zeros for an item
    whose sample has no audio.

    Args:
      audio: float[R, Da] encoder features, one row per audio-token slot (``audio_token_index`` values).
      audio_token_index, visual_token_index: int[B, L] rows of the audio / merged visual tokens, -1 elsewhere.
      unit_item: int[U] item of each merged visual token, in ``visual_token_index``'s order (-1 padding).
    """
    b, r = audio_token_index.shape[0], audio.shape[0]
    row_ids = jnp.broadcast_to(jnp.arange(b)[:, None], audio_token_index.shape).astype(jnp.int32)
    # The row each audio slot belongs to (slots no token uses go to segment B), then per-row sums: O(R · Da).
    slots = jnp.where(audio_token_index >= 0, audio_token_index, r).reshape(-1)
    slot_row = jnp.full((r + 1,), b, jnp.int32).at[slots].set(row_ids.reshape(-1))[:r]
    sums = jax.ops.segment_sum(audio.astype(jnp.float32), slot_row, num_segments=b + 1)[:b]
    counts = jax.ops.segment_sum(jnp.ones((r,), jnp.float32), slot_row, num_segments=b + 1)[:b]
    per_row = sums / jnp.maximum(counts, 1.0)[:, None]  # [B, Da]
    item = jnp.where(visual_token_index >= 0, unit_item[jnp.maximum(visual_token_index, 0)], -1)  # [B, L]
    # The row of each item: scatter-max of the row ids over the item's tokens (slot G collects the -1s).
    slot = jnp.where(item >= 0, item, num_items).reshape(-1)
    item_row = jnp.full((num_items + 1,), -1, jnp.int32).at[slot].max(row_ids.reshape(-1).astype(jnp.int32))
    item_row = item_row[:num_items]
    return jnp.where((item_row >= 0)[:, None], per_row[jnp.maximum(item_row, 0)], 0.0).astype(audio.dtype)

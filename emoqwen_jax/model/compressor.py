"""The Hybrid Compressor (the paper's MoE between the ViT and the LLM).

Paper mode (``routing='sample'``): E patch-merger experts (default 2: general, emotion), each exactly a
Qwen2.5-VL patch merger — RMSNorm -> 2x2 merge -> Linear -> GELU -> Linear to the LLM width — and a gating
network that turns each image/video into one softmax weight vector over the experts:

    gate input (mean ViT feature of the item, or all its tokens) -> multi-head self-attention
    -> [Linear -> ReLU -> LayerNorm] x 2 -> Linear -> softmax            (weights float32[G, E])
    tokens = sum_e weight[item(token), e] * expert_e(features)

Scale mode (``routing='token'``): a float32 router sends each merged token to its top-k experts
(``emoqwen_jax.model.moe``: capacity per routing group, load-balancing and z losses, einsum / shard_map /
ragged dispatch).

Expert weights are stored stacked on a leading ``expert`` axis (float[E, ...]) so that the expert dimension
can be sharded over an ``expert`` mesh axis; the HF merger maps onto every slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model import moe, moe_dispatch, sharding
from emoqwen_jax.model.config import CompressorConfig, VisionConfig
from emoqwen_jax.model.layers import LayerNorm, Linear, as_dtype, dot_product_attention, param

Array = jax.Array


class ExpertMergers(nnx.Module):
    """E Qwen2.5-VL patch mergers with stacked weights: ln_q.weight [E, Dv], mlp_0 [E, 4Dv, 4Dv] (+bias),
    mlp_2 [E, 4Dv, Dout] (+bias) — the HF names ``ln_q``, ``mlp.0``, ``mlp.2``."""

    def __init__(self, num_experts: int, vision_hidden: int, out_hidden: int, merge_unit: int, *,
                 rngs: nnx.Rngs, dtype, param_dtype, eps: float = 1e-6):
        e, dv, dm = num_experts, vision_hidden, vision_hidden * merge_unit
        init = jax.nn.initializers.normal(0.02)
        zeros = jax.nn.initializers.zeros
        self.ln_q_weight = nnx.Param(jnp.ones((e, dv), param_dtype), logical_axes=("expert", "embed"))
        self.mlp_0_kernel = param(rngs, init, (e, dm, dm), param_dtype, ("expert", "merge", "mlp"))
        self.mlp_0_bias = param(rngs, zeros, (e, dm), param_dtype, ("expert", "mlp"))
        self.mlp_2_kernel = param(rngs, init, (e, dm, out_hidden), param_dtype, ("expert", "mlp", "embed_out"))
        self.mlp_2_bias = param(rngs, zeros, (e, out_hidden), param_dtype, ("expert", "embed_out"))
        self.merge_unit = merge_unit
        self.eps = eps
        self.dtype = dtype

    def params(self) -> tuple[Array, ...]:
        """(ln_q weight, mlp_0 kernel, mlp_0 bias, mlp_2 kernel, mlp_2 bias), each stacked on axis 0 (E)."""
        return (self.ln_q_weight[...], self.mlp_0_kernel[...], self.mlp_0_bias[...], self.mlp_2_kernel[...],
                self.mlp_2_bias[...])

    def apply(self, units: Array, params: tuple[Array, ...], rows: tuple | None = None) -> Array:
        """Expert e on its rows: units float[E', C, 4Dv] with ``params`` sliced to the same E' experts
        -> float[E', C, Dout]. Pure in ``params`` so shard_map can hand each device its local experts.
        ``rows``: only each expert's first rows are real (``moe.run_compact``); the matmuls skip the rest,
        whose outputs are then not the MLP's (the caller never reads them)."""
        ln_w, w0, b0, w2, b2 = params
        e, c, _ = units.shape
        x32 = units.reshape(e, c, self.merge_unit, -1).astype(jnp.float32)  # RMSNorm is per patch (Dv)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(units.dtype)
        h = ln_w.astype(jnp.float32)[:, None, None, :] * normed.astype(jnp.float32)
        h = h.astype(self.dtype).reshape(e, c, -1)
        h = moe.expert_matmul(h, w0.astype(self.dtype), rows) + b0.astype(self.dtype)[:, None]
        h = jax.nn.gelu(h, approximate=False)
        return moe.expert_matmul(h, w2.astype(self.dtype), rows) + b2.astype(self.dtype)[:, None]

    def apply_ragged(self, rows: Array, group_sizes: Array, params: tuple[Array, ...]) -> Array:
        """Dropless form of ``apply``: rows float[M, 4Dv] sorted by expert, ``group_sizes`` int32[E'] rows per
        expert (rows past their sum are padding) -> float[M, Dout]; the matmuls are ``jax.lax.ragged_dot``."""
        ln_w, w0, b0, w2, b2 = params
        m = rows.shape[0]
        expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")
        expert = jnp.minimum(expert, group_sizes.shape[0] - 1)  # padding rows borrow the last expert's norm/bias
        x32 = rows.reshape(m, self.merge_unit, -1).astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(rows.dtype)
        h = (ln_w.astype(jnp.float32)[expert][:, None, :] * normed.astype(jnp.float32)).astype(self.dtype)
        h = h.reshape(m, -1)
        h = jax.lax.ragged_dot(h, w0.astype(self.dtype), group_sizes) + b0.astype(self.dtype)[expert]
        h = jax.nn.gelu(h, approximate=False)
        return jax.lax.ragged_dot(h, w2.astype(self.dtype), group_sizes) + b2.astype(self.dtype)[expert]

    def __call__(self, x: Array) -> Array:
        """Every expert on every token: x float[P, Dv] (groups of ``merge_unit`` consecutive patches form one
        token) -> float[E, U, Dout]."""
        units = x.reshape(-1, self.merge_unit * x.shape[-1])
        e = self.ln_q_weight.shape[0]
        return self.apply(jnp.broadcast_to(units[None], (e, *units.shape)), self.params())


class GateAttention(nnx.Module):
    """torch ``nn.MultiheadAttention``-style self-attention (separate q/k/v projections with bias)."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(dim, dim, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(dim, dim, axes=("embed", "heads"), **kw)
        self.v_proj = Linear(dim, dim, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(dim, dim, axes=("heads", "embed"), **kw)
        self.num_heads = num_heads

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """x float[B, T, D]; mask bool[B, 1, T, T] or None -> float[B, T, D]."""
        b, t, d = x.shape
        h = d // self.num_heads
        split = lambda y: y.reshape(b, t, self.num_heads, h)  # noqa: E731
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask,
                                    scale=h**-0.5)
        return self.out_proj(out.reshape(b, t, d))


class GateNetwork(nnx.Module):
    """Per-item expert weights from the item's ViT features (structure as published; sizes configurable)."""

    def __init__(self, vision_hidden: int, cfg: CompressorConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        hid = cfg.gate_hidden_size
        self.attention = GateAttention(vision_hidden, cfg.gate_num_heads, **kw)
        self.fc1 = Linear(vision_hidden, hid, use_bias=True, axes=("embed", "gate"), **kw)
        self.norm1 = LayerNorm(hid, axis_name="gate", dtype=dtype, param_dtype=param_dtype)
        self.fc2 = Linear(hid, hid, use_bias=True, axes=("gate", "gate"), **kw)
        self.norm2 = LayerNorm(hid, axis_name="gate", dtype=dtype, param_dtype=param_dtype)
        self.head = Linear(hid, cfg.num_experts, use_bias=True, axes=("gate", None), **kw)
        self.gate_input = cfg.gate_input

    def __call__(self, features: Array, patch_item: Array, num_items: int, extra: Array | None = None) -> Array:
        """features float[P, Dv]; patch_item int[P] (-1 = padding) -> weights float32[G, E]. ``extra``
        float[G, Dv] (the items' projected pooled audio, ``model.audio.gate_audio``) is added to each item's
        gate feature before the MLP."""
        valid = patch_item >= 0
        onehot = (patch_item[:, None] == jnp.arange(num_items)[None, :]) & valid[:, None]  # [P, G]
        counts = jnp.maximum(onehot.sum(0), 1).astype(jnp.float32)
        if self.gate_input == "pooled":
            pooled = jnp.einsum("pg,pd->gd", onehot.astype(jnp.float32), features.astype(jnp.float32))
            pooled = (pooled / counts[:, None]).astype(features.dtype)
            x = self.attention(pooled[:, None, :], None)[:, 0]  # self-attention over the single pooled token
        else:
            same = (patch_item[:, None] == patch_item[None, :])[None, None]
            attended = self.attention(features[None], same)[0]  # [P, Dv], attention within each item
            x = jnp.einsum("pg,pd->gd", onehot.astype(jnp.float32), attended.astype(jnp.float32))
            x = (x / counts[:, None]).astype(features.dtype)
        if extra is not None:
            x = x + extra.astype(x.dtype)
        x = self.norm1(jax.nn.relu(self.fc1(x)))
        x = self.norm2(jax.nn.relu(self.fc2(x)))
        return jax.nn.softmax(self.head(x).astype(jnp.float32), axis=-1)


def empty_aux() -> dict[str, Array]:
    """The compressor's aux dict with nothing to report (paper mode, or no visual input)."""
    zero = jnp.zeros((), jnp.float32)
    return {"aux_loss": zero, "lb_loss": zero, "z_loss": zero, "dropped_tokens": zero, "dropped_assignments": zero}


class HybridCompressor(nnx.Module):
    """Experts + (paper mode) the gating network or (scale mode) a float32 token router."""

    def __init__(self, cfg: CompressorConfig, vision: VisionConfig, out_hidden: int, *, rngs: nnx.Rngs,
                 dtype="float32", param_dtype="float32"):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.cfg = cfg
        self.experts = ExpertMergers(cfg.num_experts, vision.hidden_size, out_hidden, vision.merge_unit, rngs=rngs,
                                     dtype=dtype, param_dtype=param_dtype)
        paper = cfg.routing == "sample" and cfg.num_experts > 1
        self.gate = (GateNetwork(vision.hidden_size, cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype) if paper
                     else None)
        self.router = (Linear(vision.hidden_size * vision.merge_unit, cfg.num_experts, use_bias=False,
                              axes=("merge", None), rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
                       if cfg.routing == "token" else None)
        self.merge_unit = vision.merge_unit

    def __call__(self, features: Array, patch_item: Array, num_items: int,
                 gate_extra: Array | None = None) -> tuple[Array, Array, dict]:
        """Compresses ViT features into LLM tokens.

        Args:
          features: float[P, Dv] ViT output (any order in which merge groups are contiguous).
          patch_item: int[P] item id of each patch in the same order (-1 = padding).
          num_items: G, the static number of item slots.
          gate_extra: optional float[G, Dv] added to the gate's per-item feature (paper mode; pooled audio).
        Returns:
          tokens float[U, Dout] in the same unit order; per-item expert weights float32[G, E] (the gate's in
          paper mode, the mean router probability in scale mode); aux dict with ``aux_loss`` (to add to the
          training loss), ``lb_loss``, ``z_loss``, ``dropped_tokens``, ``dropped_assignments``.
        """
        unit_item = patch_item.reshape(-1, self.merge_unit)[:, 0]
        aux = empty_aux()
        if self.router is not None:
            return self._token_mode(features, unit_item, num_items, aux)
        # Paper mode: each expert on all tokens (sharded over the expert mesh axis), mixed per item.
        expert_out = sharding.constrain(self.experts(features), ("expert", "units", "act_embed"))  # [E, U, Dout]
        if self.gate is None:
            return expert_out[0], jnp.ones((num_items, 1), jnp.float32), aux
        weights = self.gate(features, patch_item, num_items, gate_extra)  # [G, E]
        unit_weights = jnp.where((unit_item >= 0)[:, None], weights[jnp.maximum(unit_item, 0)], 0.0)
        tokens = jnp.einsum("eud,ue->ud", expert_out.astype(jnp.float32), unit_weights)
        return tokens.astype(expert_out.dtype), weights, aux

    def _token_mode(self, features, unit_item, num_items, aux):
        cfg = self.cfg
        units = features.reshape(-1, self.merge_unit * features.shape[-1])  # [U, 4Dv]
        valid = unit_item >= 0
        logits = self.router(units.astype(jnp.float32))  # router in float32
        tokens, sums, counts = moe_dispatch.token_moe(units, logits, valid, self.experts.params(), self.experts,
                                                      top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                                                      group_size=cfg.group_size, dispatch=cfg.dispatch)
        lb, z = moe.aux_losses(sums, cfg.top_k)
        aux.update(lb_loss=lb, z_loss=z, aux_loss=cfg.lb_loss_weight * lb + cfg.z_loss_weight * z, **counts)
        probs = jax.nn.softmax(logits, axis=-1)
        onehot = ((unit_item[:, None] == jnp.arange(num_items)[None]) & valid[:, None]).astype(jnp.float32)
        per_item = jnp.einsum("ug,ue->ge", onehot, probs) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
        return tokens, per_item, aux

"""The Qwen2.5-VL vision transformer (``visual`` in HF, ``vpm`` in the Emotion-Qwen release), without its
patch merger: the mergers are the Hybrid Compressor's experts (``compressor.py``).

Variable-size images and videos arrive as one flat, padded sequence of P patches plus index arrays
computed on the host (``emoqwen_jax.layout``), so everything here has static shapes:
  * ``window_index`` int[U]: merge-unit permutation into window order (HF ``get_window_index``);
  * ``frame_segment`` int[P]: one id per frame of each item — full-attention layers attend within a frame;
  * ``window_segment`` int[P]: one id per window (window order) — the other layers attend within a window;
  * ``pos_hw`` int[P, 2]: (row, column) of each patch for the 2-D rotary, in HF patch order.
Padding patches carry segment id -1: they attend only to each other and never touch real tokens.

Attention (``emoqwen_jax.model.attention``, chosen by ``model.attention``) runs per layer on the flat sequence
with the layer's segment ids, so frames of any size are exact. Window layers pass ``band`` = one window's
patches ((window/patch)^2): a window is contiguous in window order and never longer, so a query block only
meets its neighbouring key blocks (``xla``: 3 blocks of one window; ``blockwise``: the blocks its windows
touch). Full-attention layers attend over the whole frame; ``vision.frame_block`` is their block size for
``blockwise`` (0 = the model's ``attention_block``). Frames may be as large as the data allows (Qwen2.5-VL's
video budget is 768·28·28 pixels, 3072 patches per frame).

``local_blocks`` (window layers' block, full layers' block; ``layout.local_blocks`` finds them on the host) says
that every window (frame) lies whole within aligned blocks of that many patches: those layers then attend block
by block (``attention``'s ``local_block``: one dense [block, block] attention per block, no logits between
blocks, no loop), as Hugging Face attends per window and per image. 0 = no such promise (the paths above).

On a mesh whose batch devices split the flat patch axis, the trainer may promise a device-by-device layout
(``sharding.axis_rules(units_local=True)``: whole data shards per device); the window permutation and the
attention then run on each device's own patches (``sharding.map_units``), with no all-gather of the patch axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from emoqwen_jax.model import sharding
from emoqwen_jax.model.attention import attention
from emoqwen_jax.model.config import VisionConfig
from emoqwen_jax.model.layers import GatedMLP, Linear, RMSNorm, as_dtype
from emoqwen_jax.model.rope import apply_rotary, vision_rotary
from emoqwen_jax.model.stack import run_stack

Array = jax.Array


def to_window_order(x: Array, window_index: Array, merge_unit: int) -> Array:
    """Reorders float[P, ...] patches by merge unit into window order (HF ``permute_input_for_window_attn``).

    Under ``sharding.map_units`` (a device-by-device layout) each device permutes its own slice: there its
    ``window_index`` is a permutation of the slice's own units, so their smallest index is the slice's first."""
    def permute(x, window_index):
        units = x.reshape(x.shape[0] // merge_unit, merge_unit, *x.shape[1:])
        first = window_index.min() if window_index.size else 0  # 0 for a whole batch's permutation
        return units[window_index - first].reshape(x.shape)

    names = ("units",) + (None,) * (x.ndim - 1)
    return sharding.map_units(permute, x, window_index, in_names=(names, ("units",)), out_names=names)


def from_window_order(units: Array, window_index: Array) -> Array:
    """Inverse of the unit permutation for float[U, ...] merged tokens: back to HF (raster) order."""
    inverse = jnp.zeros_like(window_index).at[window_index].set(
        jnp.arange(window_index.shape[0], dtype=window_index.dtype))
    return units[inverse]


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (2, 14, 14) on pre-flattened patches == a bias-free linear map."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, use_bias=False, axes=(None, "embed"), rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: Array) -> Array:
        return self.proj(pixel_values)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attention: str = "xla",
                 block: int = 512, band: int | None = None):
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Linear(cfg.hidden_size, 3 * cfg.hidden_size, axes=("embed", "qkv"), **kw)
        self.proj = Linear(cfg.hidden_size, cfg.hidden_size, axes=("heads", "embed"), **kw)
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.attention = attention
        self.block = block  # blockwise block size
        self.band = band  # window layers: segments are at most this many patches; None: whole frames

    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array, local_block: int = 0) -> Array:
        """x float[P, D]; cos/sin float32[P, H]; segment_ids int[P] -> float[P, D]. ``local_block``: every
        segment lies whole within aligned blocks of this many patches (0 = no promise)."""
        p = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(p, 3, self.num_heads, self.head_dim), 1, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        def core(q, k, v, segment_ids):  # within frames (windows): on each device's own patches when laid out so
            seg = segment_ids[None]
            # Blocks aligned on the whole axis stay whole on a device's slice when they divide it.
            local = local_block if local_block and q.shape[0] % local_block == 0 else 0
            return attention(q[None], k[None], v[None], scale=self.head_dim**-0.5, q_segment_ids=seg,
                             kv_segment_ids=seg, implementation=self.attention, block_size=self.block,
                             band=self.band, local_block=local)[0]

        heads = ("units", "act_heads", None)
        out = sharding.map_units(core, q, k, v, segment_ids, in_names=(heads, heads, heads, ("units",)),
                                 out_names=heads)
        return self.proj(out.reshape(p, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, **attention):
        norm = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(cfg.hidden_size, **norm)
        self.norm2 = RMSNorm(cfg.hidden_size, **norm)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, **attention)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

    def __call__(self, x: Array, cos: Array, sin: Array, segment_ids: Array, local_block: int = 0) -> Array:
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids, local_block)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
    """Patch embedding + ``depth`` blocks. Returns features in *window order* (the mergers consume
    contiguous groups of 4 patches, which window order keeps together)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype="float32", param_dtype="float32",
                 remat: str | bool = "none", scan_layers: bool = False, attention: str = "xla",
                 attention_block: int = 512):
        dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        window = (cfg.window_size // cfg.patch_size) ** 2
        full = set(cfg.fullatt_block_indexes)
        self.blocks = nnx.List([
            VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention,
                        block=(cfg.frame_block or attention_block) if i in full else window,
                        band=None if i in full else window)
            for i in range(cfg.depth)])
        self.remat = remat  # 'none' | 'block' | 'dots_saveable' (emoqwen_jax.model.stack); True = 'block'
        self.scan_layers = scan_layers
        self.dtype = dtype

    def __call__(self, pixel_values: Array, *, pos_hw: Array, window_index: Array, frame_segment: Array,
                 window_segment: Array, local_blocks: tuple[int, int] = (0, 0)) -> Array:
        """pixel_values float[P, C*2*14*14] in HF order -> float[P, D] in window order. ``local_blocks``: (window
        layers', full layers') block sizes that hold their segments whole (module docstring; static)."""
        cfg = self.cfg
        x = self.patch_embed(pixel_values.astype(self.dtype))
        # Keep the flat patch axis sharded like the batch (the index gather alone would let GSPMD replicate it).
        x = sharding.constrain(to_window_order(x, window_index, cfg.merge_unit), ("units", "act_embed"))
        cos, sin = vision_rotary(to_window_order(pos_hw, window_index, cfg.merge_unit), cfg.head_dim, cfg.rope_theta)
        full = set(cfg.fullatt_block_indexes)
        period = _period(cfg.depth, full)

        def call(i, block, x):  # i: the layer's index within its period (the same kind of layer in every group)
            segment, local = (frame_segment, local_blocks[1]) if i in full else (window_segment, local_blocks[0])
            return sharding.constrain(block(x, cos, sin, segment, local), ("units", "act_embed"))

        return run_stack(self.blocks, x, call, scan=self.scan_layers, remat=self.remat, period=period)


def _period(depth: int, full: set[int]) -> int:
    """The smallest p dividing ``depth`` with layer i full iff layer i + p is (7, 15, 23, 31 of 32: 8)."""
    for p in range(1, depth + 1):
        if depth % p == 0 and all((i in full) == ((i % p) in full) for i in range(depth)):
            return p
    return depth

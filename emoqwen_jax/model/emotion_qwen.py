"""EmotionQwen: ViT -> Hybrid Compressor -> Qwen2.5 decoder.

Two entry points:
  * ``model.forward(inputs)`` — the jittable core. ``inputs`` is the ``ModelInputs`` pytree of fixed-shape
    arrays built on the host by ``emoqwen_jax.layout.build_model_inputs`` (the trainer builds the same in its
    data pipeline with bucketed shapes); a flat dict of the same names is accepted too.
  * ``model(input_ids=..., pixel_values=..., image_grid_thw=..., ...)`` — a Hugging Face-style call taking
    numpy or jax arrays: it builds the layout on the host and runs a jitted ``forward``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emoqwen_jax import layout
from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.model import sharding
from emoqwen_jax.model.compressor import HybridCompressor, empty_aux
from emoqwen_jax.model.config import ModelConfig
from emoqwen_jax.model.text import TextModel, causal_padding_mask
from emoqwen_jax.model.vision import VisionTransformer, from_window_order

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: Array  # float32[B, L, V]
    gate_weights: Array  # float32[G, E], one row per visual item (images first, then videos)
    aux_loss: Array  # float32[] weighted auxiliary losses of the compressor, to add to the LM loss
    aux: dict = dataclasses.field(default_factory=dict)  # lb_loss, z_loss, dropped_tokens, ... (for logging)
    rope_deltas: Array | None = None  # int32[B], HF's M-RoPE delta for decoding


def layout_spec(config: ModelConfig) -> layout.LayoutSpec:
    v = config.vision
    return layout.LayoutSpec(
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
        tokens_per_second=v.tokens_per_second, patch_dim=v.patch_dim)


class EmotionQwen(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        remat = config.remat == "block"
        dt = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.visual = VisionTransformer(config.vision, rngs=rngs, remat=remat, **dt)
        self.compressor = HybridCompressor(config.compressor, config.vision, config.text.hidden_size, rngs=rngs, **dt)
        self.language_model = TextModel(config.text, rngs=rngs, remat=remat, **dt)

    # ---- jittable core -------------------------------------------------------------------------------
    def encode_vision(self, vision) -> tuple[Array, Array, dict]:
        """``VisionInputs`` (pixel_values float[P, 1176] + layout) -> merged visual tokens float[U, D] (HF
        order), per-item expert weights float32[G, E] and the compressor's aux dict."""
        features = self.visual(vision.pixel_values, pos_hw=vision.pos_hw, window_index=vision.window_index,
                               frame_segment=vision.frame_segment, window_segment=vision.window_segment)
        tokens, gate_weights, aux = self.compressor(features, vision.patch_item, vision.item_valid.shape[0])
        return from_window_order(tokens, vision.window_index), gate_weights, aux

    def embed(self, inputs: ModelInputs) -> tuple[Array, Array, dict]:
        """Token embeddings float[B, L, D] with the visual tokens scattered into the placeholder positions,
        plus the per-item expert weights float32[G, E] and the compressor's aux dict."""
        inputs = ModelInputs.coerce(inputs)
        text, vision = inputs.text, inputs.vision
        embeds = sharding.constrain(self.language_model.embed(text.input_ids), ("batch", "length", "act_embed"))
        num_items = 0 if vision is None else vision.item_valid.shape[0]
        if vision is None or vision.pixel_values.shape[0] == 0:
            return embeds, jnp.zeros((num_items, self.config.compressor.num_experts), jnp.float32), empty_aux()
        visual, gate_weights, aux = self.encode_vision(vision)
        index = text.visual_token_index
        gathered = visual[jnp.maximum(index, 0)].astype(embeds.dtype)
        return jnp.where((index >= 0)[..., None], gathered, embeds), gate_weights, aux

    def hidden_states(self, inputs: ModelInputs) -> tuple[Array, Array, dict]:
        """Final-normed decoder states float[B, L, D] (before the LM head), gate weights, aux."""
        inputs = ModelInputs.coerce(inputs)
        embeds, gate_weights, aux = self.embed(inputs)
        mask = causal_padding_mask(inputs.text.attention_mask, inputs.text.segment_ids)
        hidden, _ = self.language_model(embeds, inputs.text.position_ids, mask)
        return hidden, gate_weights, aux

    def forward(self, inputs: ModelInputs) -> ModelOutput:
        """``ModelInputs`` (or the flat dict of its names) -> logits float32[B, L, V], gate weights, aux."""
        inputs = ModelInputs.coerce(inputs)
        hidden, gate_weights, aux = self.hidden_states(inputs)
        return ModelOutput(logits=self.language_model.logits(hidden), gate_weights=gate_weights,
                           aux_loss=aux["aux_loss"], aux=aux, rope_deltas=inputs.text.rope_deltas)

    # ---- Hugging Face-style call ---------------------------------------------------------------------
    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                       **layout_kwargs) -> ModelInputs:
        as_np = lambda x: None if x is None else np.asarray(x)  # noqa: E731
        return layout.build_model_inputs(
            as_np(input_ids), as_np(attention_mask), as_np(pixel_values), as_np(image_grid_thw),
            as_np(pixel_values_videos), as_np(video_grid_thw), as_np(second_per_grid_ts),
            spec=layout_spec(self.config), position_ids=as_np(position_ids), **layout_kwargs)

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                 **layout_kwargs: Any) -> ModelOutput:
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                     video_grid_thw, second_per_grid_ts, position_ids, **layout_kwargs)
        return _jit_forward(self, inputs)


@nnx.jit
def _jit_forward(model: EmotionQwen, inputs: ModelInputs) -> ModelOutput:
    return model.forward(inputs)


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(config: ModelConfig) -> EmotionQwen:
    """The model with ShapeDtypeStruct leaves (no memory): ``jax.eval_shape`` of the constructor."""
    return nnx.eval_shape(lambda: EmotionQwen(config, rngs=nnx.Rngs(0)))

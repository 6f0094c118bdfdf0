"""EmotionQwen: ViT -> Hybrid Compressor -> Qwen2.5 decoder.

Two entry points:
  * ``model.forward(inputs)`` — the jittable core. ``inputs`` is the ``ModelInputs`` pytree of fixed-shape
    arrays built on the host by ``emoqwen_jax.layout.build_model_inputs`` (the trainer builds the same in its
    data pipeline with bucketed shapes); a flat dict of the same names is accepted too.
  * ``model(input_ids=..., pixel_values=..., image_grid_thw=..., ..., labels=...)`` — a Hugging Face-style call
    taking numpy or jax arrays: it builds the layout on the host and runs a jitted ``forward``. With ``labels``
    the output carries ``.loss`` as transformers' models compute it (``model.cross_entropy``).
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
from emoqwen_jax.model.audio import AudioEncoder, AudioProjector, pooled_audio_per_item
from emoqwen_jax.model.compressor import HybridCompressor, empty_aux
from emoqwen_jax.model.config import ModelConfig
from emoqwen_jax.model.cross_entropy import cross_entropy_sums, packed_targets, token_mean
from emoqwen_jax.model.layers import Linear, as_dtype
from emoqwen_jax.model.text import TextModel
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
    # float32[]: with labels, the mean next-token cross-entropy over labelled targets (shifted, -100 ignored, as
    # transformers' ``ForCausalLMLoss``) + ``aux_loss`` (as transformers' MoE models add their router loss);
    # the value the trainer's ``loss_fn`` optimises. None without labels.
    loss: Array | None = None


def layout_spec(config: ModelConfig) -> layout.LayoutSpec:
    v = config.vision
    return layout.LayoutSpec(
        image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id, patch_size=v.patch_size,
        spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
        tokens_per_second=v.tokens_per_second, patch_dim=v.patch_dim)


def audio_spec(config: ModelConfig) -> layout.AudioSpec | None:
    """The host's audio constants (None without audio)."""
    a = config.audio
    if not a.enabled:
        return None
    return layout.AudioSpec(audio_token_id=a.audio_token_id, audio_bos_token_id=a.audio_bos_token_id,
                                  audio_eos_token_id=a.audio_eos_token_id, window_frames=a.max_frames,
                                  position_rule=a.position_rule, interleave_seconds=a.interleave_seconds)


class EmotionQwen(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        stack = dict(remat=config.remat, scan_layers=config.scan_layers, attention=config.attention,
                     attention_block=config.attention_block)
        self.visual = VisionTransformer(config.vision, rngs=rngs, **stack, **dt)
        self.compressor = HybridCompressor(config.compressor, config.vision, config.text.hidden_size, rngs=rngs, **dt)
        self.language_model = TextModel(config.text, rngs=rngs, **stack, **dt)
        if config.audio.enabled:  # Qwen2-Audio's encoder and projector (model/audio.py)
            self.audio_tower = AudioEncoder(config.audio, rngs=rngs, **dt)
            self.audio_projector = AudioProjector(config.audio, config.text.hidden_size, rngs=rngs, **dt)
            if config.audio.gate_audio and self.compressor.gate is not None:
                # Zero-initialised: the gate starts exactly as without audio (a released checkpoint is unchanged).
                self.audio_gate_proj = Linear(config.audio.d_model, config.vision.hidden_size, use_bias=True,
                                              axes=("embed", None), rngs=rngs, init_std=0.0, dtype=as_dtype(
                                                  config.dtype), param_dtype=as_dtype(config.param_dtype))

    # ---- jittable core -------------------------------------------------------------------------------
    def encode_vision(self, vision, gate_extra: Array | None = None, vision_blocks: tuple[int, int] = (0, 0)
                      ) -> tuple[Array, Array, dict]:
        """``VisionInputs`` (pixel_values float[P, 1176] + layout) -> merged visual tokens float[U, D] (HF
        order), per-item expert weights float32[G, E] and the compressor's aux dict. ``gate_extra``
        float[G, Dv]: added to the gate's per-item feature (``audio.gate_audio``). ``vision_blocks``: the ViT's
        ``local_blocks`` (``layout.local_blocks`` of this layout; static)."""
        features = self.visual(vision.pixel_values, pos_hw=vision.pos_hw, window_index=vision.window_index,
                               frame_segment=vision.frame_segment, window_segment=vision.window_segment,
                               local_blocks=vision_blocks)
        tokens, gate_weights, aux = self.compressor(features, vision.patch_item, vision.item_valid.shape[0],
                                                    gate_extra)
        return from_window_order(tokens, vision.window_index), gate_weights, aux

    def encode_audio(self, audio) -> tuple[Array, Array]:
        """``AudioInputs`` (encoder windows float[W, M, F] + mask) -> (LLM-width audio tokens float[W·F/4, D], the
        encoder's features float[W·F/4, Da]). A frozen encoder (``audio.freeze_encoder``) is cut from the
        backward pass: no gradient is computed through it at all."""
        feats = self.audio_tower(audio.input_features, audio.feature_mask)  # [W, T, Da]
        if self.config.audio.freeze_encoder:
            feats = jax.lax.stop_gradient(feats)
        feats = feats.reshape(-1, feats.shape[-1])
        return self.audio_projector(feats), feats

    def embed(self, inputs: ModelInputs, vision_blocks: tuple[int, int] = (0, 0)) -> tuple[Array, Array, dict]:
        """Token embeddings float[B, L, D] with the audio and visual tokens scattered into their placeholder
        positions, plus the per-item expert weights float32[G, E] and the compressor's aux dict
        (``vision_blocks``: see ``encode_vision``)."""
        text, vision, audio = inputs.text, inputs.vision, inputs.audio
        embeds = sharding.constrain(self.language_model.embed(text.input_ids), ("batch", "length", "act_embed"))
        audio_feats = None
        if self.config.audio.enabled and audio is not None and audio.input_features.shape[0] > 0:
            tokens, audio_feats = self.encode_audio(audio)
            gathered = tokens[jnp.maximum(audio.token_index, 0)].astype(embeds.dtype)
            embeds = jnp.where((audio.token_index >= 0)[..., None], gathered, embeds)
        num_items = 0 if vision is None else vision.item_valid.shape[0]
        if vision is None or vision.pixel_values.shape[0] == 0:
            return embeds, jnp.zeros((num_items, self.config.compressor.num_experts), jnp.float32), empty_aux()
        gate_extra = None
        if audio_feats is not None and getattr(self, "audio_gate_proj", None) is not None:
            unit_item = from_window_order(vision.patch_item.reshape(-1, self.config.vision.merge_unit)[:, 0],
                                          vision.window_index)
            pooled = pooled_audio_per_item(audio_feats, audio.token_index, text.visual_token_index, unit_item,
                                           num_items)
            gate_extra = self.audio_gate_proj(pooled)
        visual, gate_weights, aux = self.encode_vision(vision, gate_extra, vision_blocks)
        index = text.visual_token_index
        gathered = visual[jnp.maximum(index, 0)].astype(embeds.dtype)
        return jnp.where((index >= 0)[..., None], gathered, embeds), gate_weights, aux

    def hidden_states(self, inputs: ModelInputs) -> tuple[Array, Array, dict]:
        """Final-normed decoder states float[B, L, D] (before the LM head), gate weights, aux."""
        embeds, gate_weights, aux = self.embed(inputs)
        # Decoder segment ids (emoqwen_jax.model.attention): a packed row's per-sample ids, else one segment;
        # padding gets -1, so it attends only to padding and no real token sees it.
        text = inputs.text
        ids = jnp.ones_like(text.attention_mask) if text.segment_ids is None else text.segment_ids
        segment_ids = jnp.where(text.attention_mask > 0, ids, -1)
        hidden, _ = self.language_model(embeds, text.position_ids, segment_ids)
        return hidden, gate_weights, aux

    def forward(self, inputs: ModelInputs) -> ModelOutput:
        """``ModelInputs`` -> logits float32[B, L, V], gate weights, aux; and
        ``loss`` when ``inputs`` carry labels (packed samples never predict the next sample's first token)."""
        hidden, gate_weights, aux = self.hidden_states(inputs)
        logits = self.language_model.logits(hidden)
        loss = None
        if inputs.text.labels is not None:
            total, count = cross_entropy_sums(logits, packed_targets(inputs.text.labels, inputs.text.segment_ids))
            loss = token_mean(total, count) + aux["aux_loss"]
        return ModelOutput(logits=logits, gate_weights=gate_weights, aux_loss=aux["aux_loss"], aux=aux,
                           rope_deltas=inputs.text.rope_deltas, loss=loss)

    # ---- Hugging Face-style call ---------------------------------------------------------------------
    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                       input_features=None, feature_attention_mask=None, audio_lengths=None, labels=None,
                       **layout_kwargs) -> ModelInputs:
        """The host layout of a Hugging Face-style call. ``labels`` int[B, L] (aligned with ``input_ids``, -100
        where nothing is learned) travel with the text."""
        as_np = lambda x: None if x is None else np.asarray(x)  # noqa: E731
        if input_features is not None and not self.config.audio.enabled:
            raise ValueError("input_features given but this model has no audio encoder (model.audio.enabled=False)")
        if labels is not None and np.shape(labels) != np.shape(input_ids):
            raise ValueError(f"labels has shape {np.shape(labels)}; it must match input_ids {np.shape(input_ids)}")
        inputs = layout.build_model_inputs(
            as_np(input_ids), as_np(attention_mask), as_np(pixel_values), as_np(image_grid_thw),
            as_np(pixel_values_videos), as_np(video_grid_thw), as_np(second_per_grid_ts),
            spec=layout_spec(self.config), position_ids=as_np(position_ids), input_features=as_np(input_features),
            feature_attention_mask=as_np(feature_attention_mask), audio_lengths=as_np(audio_lengths),
            audio_spec=audio_spec(self.config), **layout_kwargs)
        return inputs if labels is None else inputs.replace(labels=np.asarray(labels, np.int32))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, position_ids=None,
                 input_features=None, feature_attention_mask=None, audio_lengths=None, labels=None,
                 **layout_kwargs: Any) -> ModelOutput:
        """Hugging Face-named inputs -> ``ModelOutput`` (``.logits``; ``.loss`` when ``labels`` int[B, L] are
        given, as ``Qwen2_5_VLForConditionalGeneration(..., labels=labels).loss``)."""
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                     video_grid_thw, second_per_grid_ts, position_ids, input_features,
                                     feature_attention_mask, audio_lengths, labels, **layout_kwargs)
        return _jit_forward(self, inputs)


@nnx.jit
def _jit_forward(model: EmotionQwen, inputs: ModelInputs) -> ModelOutput:
    return model.forward(inputs)


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def abstract_model(config: ModelConfig) -> EmotionQwen:
    """The model with ShapeDtypeStruct leaves (no memory): ``jax.eval_shape`` of the constructor."""
    return nnx.eval_shape(lambda: EmotionQwen(config, rngs=nnx.Rngs(0)))

"""``build_model_inputs``: Hugging Face-named arrays -> the fixed-shape ``ModelInputs`` the model takes."""

from __future__ import annotations

import numpy as np

from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.layout.audio import audio_token_index
from emoqwen_jax.layout.positions import get_rope_index
from emoqwen_jax.layout.vision import LayoutSpec, as_grids, vision_layout, visual_token_index


def build_model_inputs(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
                       spec: LayoutSpec, position_ids=None, pad_patches_to: int | None = None,
                       pad_items_to: int | None = None, segment_ids=None, input_features=None,
                       feature_attention_mask=None, audio_lengths=None, audio_spec=None) -> ModelInputs:
    """Hugging Face-named inputs -> the fixed-shape ``ModelInputs`` ``EmotionQwen.forward`` takes (host numpy).

    Images and videos share one ViT pass (attention never crosses a frame), images first. ``segment_ids``
    int[B, L] (packed rows, see ``get_rope_index``) restart the positions per sample and travel with the text
    so the decoder never attends across samples. Audio (encoder windows ``input_features`` float[W, M, Fw],
    their ``feature_attention_mask``, ``audio_lengths`` int[n, 2] and ``audio_spec``, an ``AudioSpec``) adds
    ``audio_token_index``; its ``position_rule`` is passed on to ``get_rope_index``.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, L], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if segment_ids is not None and np.shape(segment_ids) != input_ids.shape:
        raise ValueError(f"segment_ids has shape {np.shape(segment_ids)}; it must match input_ids {input_ids.shape}")
    images, videos = as_grids(image_grid_thw), as_grids(video_grid_thw)
    pix = []
    for name, values, grids in (("pixel_values", pixel_values, images), ("pixel_values_videos",
                                                                          pixel_values_videos, videos)):
        if values is None:
            if len(grids):
                raise ValueError(f"{name} is missing but {len(grids)} grids were given")
            continue
        values = np.asarray(values, np.float32)
        expected = int(grids.prod(-1).sum())
        if values.ndim != 2 or values.shape != (expected, spec.patch_dim):
            raise ValueError(f"{name} has shape {values.shape}; its grids {grids.tolist()} need "
                             f"({expected}, {spec.patch_dim})")
        pix.append(values)
    if second_per_grid_ts is not None and len(np.asarray(second_per_grid_ts).reshape(-1)) != len(videos):
        raise ValueError(f"second_per_grid_ts has {len(np.asarray(second_per_grid_ts).reshape(-1))} entries "
                         f"for {len(videos)} videos")
    grids = np.concatenate([images, videos])
    out = vision_layout(grids, spec, pad_patches_to=pad_patches_to, pad_items_to=pad_items_to)
    p = out["vision_pos_hw"].shape[0]
    pixels = np.zeros((p, spec.patch_dim), np.float32)
    if pix:
        joined = np.concatenate(pix)
        pixels[: len(joined)] = joined
    interleave = audio_spec is not None and audio_spec.position_rule == "interleave"
    if interleave and segment_ids is not None:
        raise ValueError("packed rows (segment_ids) with audio.position_rule='interleave' are not supported; "
                         "use data.packing=False or position_rule='text'")
    if position_ids is None:
        position_ids, rope_deltas = get_rope_index(input_ids, mask, images, videos, second_per_grid_ts, spec,
                                                   segment_ids, audio_lengths=audio_lengths, audio_spec=audio_spec)
    else:
        position_ids = np.asarray(position_ids, np.int32)
        rope_deltas = (position_ids.max(axis=(0, 2)) + 1 - input_ids.shape[1]).astype(np.int32)
    out.update(
        input_ids=input_ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        position_ids=position_ids,
        rope_deltas=rope_deltas,
        visual_token_index=visual_token_index(input_ids, spec, images, videos),
        pixel_values=pixels,
    )
    if segment_ids is not None:
        out["segment_ids"] = np.where(mask == 1, segment_ids, 0).astype(np.int32)
    if audio_spec is not None and input_features is not None:
        features = np.asarray(input_features, np.float32)
        out.update(input_features=features,
                   feature_attention_mask=np.asarray(feature_attention_mask, np.int32),
                   audio_token_index=audio_token_index(
                       input_ids, np.zeros((0, 2)) if audio_lengths is None else audio_lengths, audio_spec,
                       num_windows=features.shape[0]))
    return ModelInputs.from_dict(out)

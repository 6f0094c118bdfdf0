"""Data batches (``emoqwen_jax.data.pipeline``) -> the model's fixed-shape inputs, per data shard and globally.

A global step's batch is made of ``num_shards`` equal shards (one grain iterator each; a host owns a
contiguous range of shards). Every shard is laid out with the same padded sizes — text length L, patches P,
items G, agreed over all shards of the step — and its index arrays are offset by the shard's index, so the
global arrays are the plain concatenation of the shards in shard order (each field's ``batch_dim`` and
``offset`` metadata in ``emoqwen_jax.inputs`` say how). That makes a 2-process run and a
1-process run that reads the same two shards feed the model identical arrays.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from emoqwen_jax import inputs as model_inputs
from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.layout import LayoutSpec, build_model_inputs
from emoqwen_jax.tokens import IGNORE


def needs(batch: dict) -> tuple[int, int, int]:
    """(text length, patch rows, visual items) the shard needs, before agreement with the other shards."""
    n_items = len(batch["image_grid_thw"]) + len(batch["video_grid_thw"])
    return (int(batch["input_ids"].shape[1]),
            int(batch["pixel_values"].shape[0] + batch["pixel_values_videos"].shape[0]), n_items)


def agreed_sizes(all_needs: Sequence[tuple[int, int, int]], batch_size: int) -> tuple[int, int, int]:
    """Common (L, P, G) for a step: the maxima; G rounded up to a multiple of the shard batch (few shapes)."""
    length = max(n[0] for n in all_needs)
    patches = max(n[1] for n in all_needs)
    items = max(n[2] for n in all_needs)
    items = max(batch_size, -(-items // batch_size) * batch_size)
    return length, patches, items


def shard_inputs(batch: dict, spec: LayoutSpec, sizes: tuple[int, int, int], *, shard_index: int = 0,
                 pad_id: int = 0) -> ModelInputs:
    """One data shard's batch -> model inputs padded to ``sizes`` and offset for position ``shard_index``."""
    length, patches, items = sizes
    n_img = int(np.prod(batch["image_grid_thw"], axis=-1).sum()) if len(batch["image_grid_thw"]) else 0
    n_vid = int(np.prod(batch["video_grid_thw"], axis=-1).sum()) if len(batch["video_grid_thw"]) else 0
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    segments = batch.get("segment_ids")  # packed rows (data.packing)
    if ids.shape[1] < length:  # right-pad the text to the agreed length
        extra = length - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id)
        mask = np.pad(mask, ((0, 0), (0, extra)))
        labels = np.pad(labels, ((0, 0), (0, extra)), constant_values=IGNORE)
        segments = None if segments is None else np.pad(segments, ((0, 0), (0, extra)))
    out = build_model_inputs(
        ids, mask, batch["pixel_values"][:n_img] if n_img else None,
        batch["image_grid_thw"] if n_img else None, batch["pixel_values_videos"][:n_vid] if n_vid else None,
        batch["video_grid_thw"] if n_vid else None, batch["second_per_grid_ts"] if n_vid else None,
        spec=spec, pad_patches_to=patches, pad_items_to=items, segment_ids=segments)
    out.text.labels = labels.astype(np.int32)
    scale = {"units": patches // spec.merge_unit, "patches": patches, "items": items}
    return model_inputs.offset_indices(out, shard_index, scale)


def concat_shards(shards: Sequence[ModelInputs]) -> ModelInputs:
    """Concatenates equally-sized, already offset shards into the global (or this host's) arrays."""
    return model_inputs.concat(list(shards))

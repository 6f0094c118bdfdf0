"""Data batches (``emoqwen_jax.data.pipeline``) -> the model's fixed-shape inputs, per data shard and globally.

A global step's batch is made of ``num_shards`` equal shards (one grain iterator each; a host owns a
contiguous range of shards). Every shard is laid out with the same padded sizes — text length L, patches P,
items G, agreed over all shards of the step — and its index arrays are offset by the shard's index, so the
global arrays are the plain concatenation of the shards in shard order (each field's ``batch_dim`` and
``offset`` metadata in ``emoqwen_jax.inputs`` say how). That makes a 2-process run and a
1-process run that reads the same two shards feed the model identical arrays.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from emoqwen_jax import inputs as model_inputs
from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.layout import AudioSpec, LayoutSpec, build_model_inputs
from emoqwen_jax.tokens import IGNORE


def needs(batch: dict) -> tuple[int, int, int, int]:
    """(text length, patch rows, visual items, audio windows) the shard needs, before agreement with the other
    shards. Patch rows are the real ones (image and video rows are padded separately by the pipeline; their
    sum would give a batch with a still a second, larger shape)."""
    rows = sum(int(np.prod(batch[k], axis=-1).sum()) for k in ("image_grid_thw", "video_grid_thw") if len(batch[k]))
    n_items = len(batch["image_grid_thw"]) + len(batch["video_grid_thw"])
    windows = int(batch["audio_lengths"][:, 0].sum()) if len(batch.get("audio_lengths", ())) else 0
    return int(batch["input_ids"].shape[1]), rows, n_items, windows


def agreed_sizes(all_needs: Sequence[tuple[int, ...]], batch_size: int,
                 patch_buckets: Sequence[int] = (), patch_multiple: int = 1,
                 row_multiple: int = 1) -> tuple[int, int, int, int]:
    """Common (L, P, G, W) for a step: the maxima; P rounded up to the smallest of ``patch_buckets`` that holds
    it (past the largest bucket: to a multiple of the largest, so long batches still compile few shapes; no
    buckets: the maximum itself) and then to a multiple of ``patch_multiple``; G and (when any shard has audio)
    W to a multiple of the shard's rows (``batch_size`` rounded up to ``row_multiple``), so the joined items and
    windows split evenly over the batch devices (few shapes). ``layout_multiples`` gives the two multiples."""
    rows = _round_up(batch_size, row_multiple)
    length = max(n[0] for n in all_needs)
    patches = max(n[1] for n in all_needs)
    buckets = sorted(int(b) for b in patch_buckets)
    if buckets:
        patches = next((b for b in buckets if b >= patches), _round_up(patches, buckets[-1]))
    patches = _round_up(patches, patch_multiple)
    items = max(n[2] for n in all_needs)
    items = max(rows, _round_up(items, rows))
    windows = max((n[3] if len(n) > 3 else 0) for n in all_needs)
    windows = _round_up(windows, rows)
    return length, patches, items, windows


def layout_multiples(merge_unit: int, num_shards: int, batch_devices: int) -> tuple[int, int]:
    """(patch multiple, row multiple) of one shard, so that the joined arrays split evenly over the batch
    devices. The global arrays hold ``num_shards`` shards of P patches, P / ``merge_unit`` units and R rows
    (text rows, audio windows); the mesh cuts each axis into ``batch_devices`` equal slices, so ``num_shards``
    · k must be a multiple of ``batch_devices`` for k = R and k = P / ``merge_unit``: both are multiples of
    ``batch_devices`` / gcd(``batch_devices``, ``num_shards``). A shard with fewer rows than that is padded with
    empty rows (attention mask 0, no labels: they change no loss or gradient)."""
    rows = batch_devices // math.gcd(batch_devices, num_shards)
    return merge_unit * rows, rows


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shard_inputs(batch: dict, spec: LayoutSpec, sizes: tuple[int, ...], *, shard_index: int = 0,
                 pad_id: int = 0, audio_spec: AudioSpec | None = None, rows: int | None = None) -> ModelInputs:
    """One data shard's batch -> model inputs padded to ``sizes`` and offset for position ``shard_index``.
    With ``audio_spec`` and W = ``sizes[3]`` > 0 the audio group holds W encoder windows (zeros after the
    shard's own). ``rows``: text rows of the shard (empty rows appended; see ``layout_multiples``)."""
    length, patches, items = sizes[:3]
    windows = sizes[3] if len(sizes) > 3 and audio_spec is not None else 0
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
    if rows is not None and ids.shape[0] < rows:  # empty rows: no attention, no labels
        extra = rows - ids.shape[0]
        ids = np.pad(ids, ((0, extra), (0, 0)), constant_values=pad_id)
        mask = np.pad(mask, ((0, extra), (0, 0)))
        labels = np.pad(labels, ((0, extra), (0, 0)), constant_values=IGNORE)
        segments = None if segments is None else np.pad(segments, ((0, extra), (0, 0)))
    out = build_model_inputs(
        ids, mask, batch["pixel_values"][:n_img] if n_img else None,
        batch["image_grid_thw"] if n_img else None, batch["pixel_values_videos"][:n_vid] if n_vid else None,
        batch["video_grid_thw"] if n_vid else None, batch["second_per_grid_ts"] if n_vid else None,
        spec=spec, pad_patches_to=patches, pad_items_to=items, segment_ids=segments,
        **_audio(batch, windows, audio_spec))
    out.text.labels = labels.astype(np.int32)
    scale = {"units": patches // spec.merge_unit, "patches": patches, "items": items,
             "audio_rows": windows * (audio_spec.tokens_per_window if audio_spec is not None else 0)}
    return model_inputs.offset_indices(out, shard_index, scale)


def _audio(batch: dict, windows: int, audio_spec: AudioSpec | None) -> dict:
    """``build_model_inputs``' audio arguments: the shard's windows zero-padded to ``windows`` (none at 0)."""
    if not windows:
        return {}
    feats, mask = batch["input_features"], batch["feature_attention_mask"]
    n = int(batch["audio_lengths"][:, 0].sum()) if len(batch["audio_lengths"]) else 0
    out_f = np.zeros((windows,) + feats.shape[1:], np.float32)
    out_m = np.zeros((windows, feats.shape[-1]), np.int32)
    out_f[:n], out_m[:n] = feats[:n], mask[:n]
    return dict(input_features=out_f, feature_attention_mask=out_m, audio_lengths=batch["audio_lengths"],
                audio_spec=audio_spec)


def concat_shards(shards: Sequence[ModelInputs]) -> ModelInputs:
    """Concatenates equally-sized, already offset shards into the global (or this host's) arrays."""
    return model_inputs.concat(list(shards))


def resolve_num_shards(setting: int, processes: int, batch_devices: int) -> int:
    """``config.data.num_shards``: 0 = one per process, -1 = one per batch device (the mesh's data × fsdp ×
    expert devices), N = N. It must be a multiple of ``processes``."""
    if setting == -1:
        return batch_devices
    if setting < -1:
        raise ValueError(f"data.num_shards={setting}; use -1 (one per batch device), 0 (one per process) or N > 0")
    return setting or processes


def units_local(num_shards: int, batch_devices: int) -> bool:
    """Whether the global vision arrays are laid out device by device (``sharding.axis_rules(units_local=...)``).

    The global flat vision arrays are the shards' equally-sized arrays in shard order, and the mesh splits them
    into ``batch_devices`` equal contiguous slices; with ``num_shards`` a multiple of ``batch_devices`` every
    slice is one or more whole shards, whose items and index arrays stay inside it."""
    return num_shards % batch_devices == 0

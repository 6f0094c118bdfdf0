"""Host-side index bookkeeping (pure numpy): grids and token ids -> the fixed-shape arrays the jitted model
takes. Shared by the data pipeline (for training batches) and the model's Hugging Face-style call, so both
exercise one code path; imports no model and no data code.

Everything Hugging Face's Qwen2.5-VL computes with Python loops and ``cu_seqlens`` (window index, per-frame
attention segments, 2-D rotary ids, M-RoPE position ids, where each visual token lands in the text) is
computed here once per batch. Shapes: B batch, L text length, P patches (padded), U = P/4 merged units,
G visual items (images + videos, padded).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emoqwen_jax import layout_audio
from emoqwen_jax.inputs import ModelInputs
from emoqwen_jax.sizes import BASE, SIZES
from emoqwen_jax.tokens import REAL_VOCAB_SIZE, tokenizer_info

_V = SIZES[BASE]["vision"]  # defaults: the released 7B
_IDS = tokenizer_info(REAL_VOCAB_SIZE)


@dataclasses.dataclass(frozen=True)
class LayoutSpec:
    """The few model constants the host needs (``emoqwen_jax.model.layout_spec(config)`` builds it)."""

    image_token_id: int = _IDS.image_pad_id
    video_token_id: int = _IDS.video_pad_id
    vision_start_token_id: int = _IDS.vision_start_id
    patch_size: int = _V["patch_size"]
    spatial_merge_size: int = _V["spatial_merge_size"]
    window_size: int = _V["window_size"]
    tokens_per_second: float = _V["tokens_per_second"]
    patch_dim: int = _V["in_channels"] * _V["temporal_patch_size"] * _V["patch_size"] ** 2  # 1176

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


def _grids(grid_thw) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return g


def vision_layout(grids: np.ndarray, spec: LayoutSpec, *, pad_patches_to: int | None = None,
                  pad_items_to: int | None = None) -> dict[str, np.ndarray]:
    """Index arrays for the ViT and the compressor for items with grids int[G, 3] (t, h, w in patches).

    Returns (P = padded patch count, U = P / merge_unit):
      vision_pos_hw int32[P, 2]: (row, col) of each patch, HF patch order (rotary ids);
      vision_window_index int32[U]: unit permutation into window order (HF ``window_index``);
      vision_frame_segment int32[P]: frame id of each patch, window order (-1 padding);
      vision_window_segment int32[P]: window id of each patch, window order (-1 padding);
      vision_patch_item int32[P]: item id of each patch, window order (-1 padding).
    """
    m, mu = spec.spatial_merge_size, spec.merge_unit
    ws = spec.window_size // m // spec.patch_size  # window side in merged units
    pos, win_index, frame_seg, win_seg, item_of = [], [], [], [], []
    unit0 = frame0 = window0 = 0
    for item, (t, h, w) in enumerate(grids.tolist()):
        if h % m or w % m or t < 1:
            raise ValueError(f"grid {(t, h, w)} of item {item}: h and w must be multiples of {m}, t >= 1")
        lh, lw = h // m, w // m
        # Rotary ids in HF's block-major patch order: (t, h/m, w/m, m, m).
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = lambda a, lh=lh, lw=lw: a.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        pos.append(np.tile(np.stack([block(hh), block(ww)], -1), (t, 1)))
        # Window order exactly as HF: pad the unit grid to whole windows (a full extra window when it already
        # divides, then dropped because it is empty), walk windows row-major, skip the padding.
        pad_h, pad_w = ws - lh % ws, ws - lw % ws
        nwh, nww = (lh + pad_h) // ws, (lw + pad_w) // ws
        padded = np.full((t, lh + pad_h, lw + pad_w), -1, np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        padded = padded.reshape(t, nwh, ws, nww, ws).transpose(0, 1, 3, 2, 4).reshape(t * nwh * nww, ws * ws)
        sizes = (padded >= 0).sum(-1)
        local = padded[padded >= 0]
        win_index.append(local + unit0)
        sizes = sizes[sizes > 0]
        win_seg.append(np.repeat(np.arange(sizes.size) + window0, sizes * mu))
        frame_seg.append(np.repeat(local // (lh * lw) + frame0, mu))
        item_of.append(np.full(t * h * w, item))
        unit0 += t * lh * lw
        frame0 += t
        window0 += sizes.size
    num_patches = unit0 * mu
    p = num_patches if pad_patches_to is None else int(pad_patches_to)
    if p < num_patches or p % mu:
        raise ValueError(f"pad_patches_to={pad_patches_to} must be >= {num_patches} patches and a multiple of {mu}")
    g = len(grids) if pad_items_to is None else int(pad_items_to)
    if g < len(grids):
        raise ValueError(f"pad_items_to={pad_items_to} is smaller than the {len(grids)} visual items")

    def cat(parts, fill, width=None):
        shape = (p,) if width is None else (p, width)
        out = np.full(shape, fill, np.int32)
        if parts:
            joined = np.concatenate(parts)
            out[: len(joined)] = joined
        return out

    window_index = np.arange(p // mu, dtype=np.int32)  # padding units stay in place
    if win_index:
        window_index[:unit0] = np.concatenate(win_index)
    return {
        "vision_pos_hw": cat(pos, 0, 2),
        "vision_window_index": window_index,
        "vision_frame_segment": cat(frame_seg, -1),
        "vision_window_segment": cat(win_seg, -1),
        "vision_patch_item": cat(item_of, -1),
        "vision_item_valid": (np.arange(g) < len(grids)),
    }


def get_rope_index(input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts,
                   spec: LayoutSpec, segment_ids=None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids by the rule Qwen2.5-VL was released and trained with (transformers 4.50).

    Text tokens share one position on all three axes; vision tokens get
    t = floor(frame_group * second_per_grid_t * tokens_per_second) (0 for images), h and w on the merged grid,
    all offset by the running position; text after a vision block resumes at the block's maximum + 1.
    (transformers >= 5.3 resumes at start + max(h, w) / merge instead; see docs/design.md, The M-RoPE position rule.)

    ``segment_ids`` int[B, L] (packed rows: 1, 2, ... per sample, 0 padding): each sample's positions are
    computed as if it were alone in its row (they restart at 0), then laid side by side. The grids are in row
    order, within a row in token order (the packed samples' items one after another).

    Returns position_ids int32[3, B, L] (padding positions hold 1, as in HF) and rope_deltas int32[B]
    (max position + 1 - L, HF's definition, carried into decoding; of a packed row's largest position).
    """
    input_ids = np.asarray(input_ids)
    b, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    images, videos = _grids(image_grid_thw), _grids(video_grid_thw)
    spt = (np.ones(len(videos), np.float32) if second_per_grid_ts is None
           else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
    position_ids = np.ones((3, b, length), np.int64)
    deltas = np.zeros((b,), np.int64)
    counters = {"image": 0, "video": 0}  # items used so far (rows and samples in order)
    for row in range(b):
        if segment_ids is None:
            samples = [mask[row] == 1]
        else:
            seg = np.asarray(segment_ids)[row]
            real = (seg > 0) & (mask[row] == 1)
            samples = [real & (seg == s) for s in _in_order(seg[real])]
        top = -1
        for where in samples:
            positions = _sample_positions(input_ids[row][where], images, videos, spt, counters, spec)
            position_ids[:, row, where] = positions
            top = max(top, int(positions.max()) if positions.size else -1)
        deltas[row] = top + 1 - length
    return position_ids.astype(np.int32), deltas.astype(np.int32)


def _in_order(ids: np.ndarray) -> list[int]:
    """The distinct values of ``ids`` in order of first appearance."""
    _, first = np.unique(ids, return_index=True)
    return [int(ids[i]) for i in sorted(first)]


def _sample_positions(tokens: np.ndarray, images: np.ndarray, videos: np.ndarray, spt: np.ndarray,
                      counters: dict[str, int], spec: LayoutSpec) -> np.ndarray:
    """int64[3, n]: the M-RoPE positions of one sample's n real tokens, starting at 0; advances ``counters``
    past the sample's images and videos."""
    m = spec.spatial_merge_size
    starts = np.flatnonzero(tokens[:-1] == spec.vision_start_token_id)
    kinds = tokens[starts + 1]
    remaining = {"image": int((kinds == spec.image_token_id).sum()), "video": int((kinds == spec.video_token_id).sum())}
    parts, st = [], 0
    next_start = lambda: parts[-1].max() + 1 if parts else 0  # noqa: E731
    for _ in range(remaining["image"] + remaining["video"]):
        ed_image = _find(tokens, spec.image_token_id, st) if remaining["image"] > 0 else len(tokens) + 1
        ed_video = _find(tokens, spec.video_token_id, st) if remaining["video"] > 0 else len(tokens) + 1
        if ed_image < ed_video:
            (t, h, w), interval, ed = images[counters["image"]], np.float32(0.0), ed_image
            counters["image"], remaining["image"] = counters["image"] + 1, remaining["image"] - 1
        else:
            (t, h, w), interval, ed = videos[counters["video"]], spt[counters["video"]], ed_video
            counters["video"], remaining["video"] = counters["video"] + 1, remaining["video"] - 1
        lh, lw = h // m, w // m
        st_idx = next_start()
        text_len = ed - st
        parts.append(np.broadcast_to(np.arange(text_len) + st_idx, (3, text_len)))
        # float32 product, then truncation, as torch does: (index * interval) * tokens_per_second.
        t_ids = (np.arange(t, dtype=np.float32) * interval * np.float32(spec.tokens_per_second)).astype(np.int64)
        grid = np.stack([np.repeat(t_ids, lh * lw), np.tile(np.repeat(np.arange(lh), lw), t),
                         np.tile(np.arange(lw), t * lh)])
        parts.append(grid + text_len + st_idx)
        st = ed + t * lh * lw
    if st < len(tokens):
        st_idx = next_start()
        parts.append(np.broadcast_to(np.arange(len(tokens) - st) + st_idx, (3, len(tokens) - st)))
    return np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)


def _find(tokens: np.ndarray, token_id: int, start: int) -> int:
    hits = np.flatnonzero(tokens[start:] == token_id)
    return int(hits[0]) + start if hits.size else len(tokens) + 1


def visual_token_index(input_ids, spec: LayoutSpec, image_grids: np.ndarray, video_grids: np.ndarray) -> np.ndarray:
    """int32[B, L]: for each placeholder token, the row of the merged visual tokens (images first, then
    videos, each in row-major batch order like HF's ``masked_scatter``) that replaces it; -1 elsewhere."""
    input_ids = np.asarray(input_ids)
    index = np.full(input_ids.shape, -1, np.int32)
    n_image = int(image_grids.prod(-1).sum()) // spec.merge_unit if len(image_grids) else 0
    n_video = int(video_grids.prod(-1).sum()) // spec.merge_unit if len(video_grids) else 0
    for name, token, n, offset in (("image", spec.image_token_id, n_image, 0),
                                   ("video", spec.video_token_id, n_video, n_image)):
        where = input_ids == token
        if int(where.sum()) != n:
            raise ValueError(f"{name} features and {name} tokens do not match: {int(where.sum())} "
                             f"<|{name}_pad|> tokens in input_ids but the {name} grids give {n} merged tokens")
        index[where] = offset + np.arange(n, dtype=np.int32)
    return index


def build_model_inputs(input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None, *,
                       spec: LayoutSpec, position_ids=None, pad_patches_to: int | None = None,
                       pad_items_to: int | None = None, segment_ids=None, input_features=None,
                       feature_attention_mask=None, audio_lengths=None, audio_spec=None) -> ModelInputs:
    """Hugging Face-named inputs -> the fixed-shape ``ModelInputs`` ``EmotionQwen.forward`` takes (host numpy).

    Images and videos share one ViT pass (attention never crosses a frame), images first. ``segment_ids``
    int[B, L] (packed rows, see ``get_rope_index``) restart the positions per sample and travel with the text
    so the decoder never attends across samples. Audio (encoder windows ``input_features`` float[W, M, Fw],
    their ``feature_attention_mask``, ``audio_lengths`` int[n, 2] and ``audio_spec``, a
    ``layout_audio.AudioSpec``) adds ``audio_token_index``; with the 'interleave' rule the positions come from
    ``layout_audio.get_rope_index``.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be int[B, L], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    if segment_ids is not None and np.shape(segment_ids) != input_ids.shape:
        raise ValueError(f"segment_ids has shape {np.shape(segment_ids)}; it must match input_ids {input_ids.shape}")
    images, videos = _grids(image_grid_thw), _grids(video_grid_thw)
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
    if position_ids is None and interleave:
        position_ids, rope_deltas = layout_audio.get_rope_index(input_ids, mask, images, videos, second_per_grid_ts,
                                                                audio_lengths, spec, audio_spec)
    elif position_ids is None:
        position_ids, rope_deltas = get_rope_index(input_ids, mask, images, videos, second_per_grid_ts, spec,
                                                   segment_ids)
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
                   audio_token_index=layout_audio.audio_token_index(
                       input_ids, np.zeros((0, 2)) if audio_lengths is None else audio_lengths, audio_spec,
                       num_windows=features.shape[0]))
    return ModelInputs.from_dict(out)

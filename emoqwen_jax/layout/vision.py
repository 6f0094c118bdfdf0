"""The vision side of the host layout: the constants the host needs (``LayoutSpec``), the ViT's and the
compressor's index arrays (window order, per-frame and per-window segments, 2-D rotary ids), and where each
merged visual token lands in the text. Shapes: P patches (padded), U = P / merge_unit merged units, G visual
items (images + videos, padded).
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


def as_grids(grid_thw) -> np.ndarray:
    """int64[n, 3] (t, h, w) of ``grid_thw`` (None: no items)."""
    return np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw, np.int64).reshape(-1, 3)


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


def local_blocks(frame_segment: np.ndarray, window_segment: np.ndarray, spec: LayoutSpec) -> tuple[int, int]:
    """(window layers' block, full layers' block) for the ViT attention's ``local_block``: the smallest of one
    window's patches (window layers) or 4 and 16 windows' patches (full layers: a 224x224 image is 4) whose
    aligned blocks each hold their segments whole, given int[P] segment ids (``vision_layout``'s); 0 where
    none does."""
    window = (spec.window_size // spec.patch_size) ** 2
    return (_whole_blocks(window_segment, (window,)), _whole_blocks(frame_segment, (4 * window, 16 * window)))


def _whole_blocks(segment: np.ndarray, sizes: tuple[int, ...]) -> int:
    """The first size in ``sizes`` dividing P whose blocks of int[P] ids never split an id, else 0."""
    segment = np.asarray(segment).reshape(-1)
    _, ids = np.unique(segment, return_inverse=True)
    position = np.arange(segment.size)
    first = np.full(ids.max(initial=-1) + 1, segment.size)
    last = np.full_like(first, -1)
    np.minimum.at(first, ids, position)
    np.maximum.at(last, ids, position)
    for size in sizes:
        if segment.size % size == 0 and np.all(first // size == last // size):
            return size
    return 0


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



"""``ModelInputs``: the one typed batch the model takes, grouped by modality (a dataclass pytree).

Every field declares, in its metadata, the few facts the rest of the code base derives from it:
  * ``shape``: its symbolic shape (B batch, L text length, P patches (padded), U = P / merge_unit merged units,
    G visual items, ``patch_dim``, W audio encoder windows, F mel frames per window, ``num_mel_bins``; literals
    as ints) and ``dtype`` — the plan's abstract shapes;
  * ``batch_dim``: the dimension sharded over the batch-like mesh axes and along which shards are joined
    (None: replicated, joined along 0) — sharding (``parallel.rules.shard_batch``) and batching;
  * ``offset``: how an index array moves when shards are joined (``"units"``, ``"patches"``, ``"items"``,
    ``"audio_rows"`` = W · F / 4; None: a plain value); ``permutation=True``: every entry moves (not only the
    non-negative ones);
  * ``key``: its flat Hugging Face-style name (``vision_pos_hw``), which ``from_dict`` and ``replace`` take.

Groups are optional (None = absent), and so are fields marked ``optional`` (labels, rope_deltas, and the text
``segment_ids`` of packed rows): ``jit``, sharding, batching and the shapes all skip a None. Adding a modality
means one group here (with its ``KEY_PREFIX``), its producer in ``data``/``layout`` and its consumer in
``model``. Code reads the fields as attributes (``inputs.text.input_ids``, ``inputs.vision.pos_hw``); it is not
a mapping.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

Array = Any  # numpy array, jax.Array or jax.ShapeDtypeStruct


def array_field(shape: tuple, dtype=np.int32, *, batch_dim: int | None = 0, offset: str | None = None,
                permutation: bool = False, key: str | None = None, optional: bool = False):
    """A ModelInputs field with its metadata (see the module docstring)."""
    meta = dict(shape=shape, dtype=np.dtype(dtype), batch_dim=batch_dim, offset=offset, permutation=permutation,
                key=key, optional=optional)
    return dataclasses.field(default=None, metadata=meta)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One field's metadata, with its group and flat key resolved."""

    group: str
    name: str
    key: str
    shape: tuple
    dtype: np.dtype
    batch_dim: int | None
    offset: str | None
    permutation: bool
    optional: bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TextInputs:
    """The decoder's inputs (rows of equal length L)."""

    KEY_PREFIX = ""
    input_ids: Array = array_field(("B", "L"))
    attention_mask: Array = array_field(("B", "L"))
    position_ids: Array = array_field((3, "B", "L"), batch_dim=1)  # M-RoPE (t, h, w) ids
    rope_deltas: Array = array_field(("B",), optional=True)  # HF's max position + 1 - L, for decoding
    visual_token_index: Array = array_field(("B", "L"), offset="units")  # merged-token row per placeholder, -1
    labels: Array = array_field(("B", "L"), optional=True)  # tokens.IGNORE (-100) where nothing is learned
    # Packed rows (``config.data.packing``): 1, 2, ... per sample of the row, 0 on padding; attention never
    # crosses samples and M-RoPE positions restart per sample. None = one sample per row (the attention mask).
    segment_ids: Array = array_field(("B", "L"), optional=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class VisionInputs:
    """The ViT's and the compressor's inputs: all images and videos of the batch as one flat patch list."""

    KEY_PREFIX = "vision_"
    pixel_values: Array = array_field(("P", "patch_dim"), np.float32, key="pixel_values")
    pos_hw: Array = array_field(("P", 2))  # (row, col) of each patch, HF order (rotary ids)
    window_index: Array = array_field(("U",), offset="units", permutation=True)  # units -> window order
    frame_segment: Array = array_field(("P",), offset="patches")  # frame id per patch, window order, -1 pad
    window_segment: Array = array_field(("P",), offset="patches")  # window id per patch, window order, -1 pad
    patch_item: Array = array_field(("P",), offset="items")  # item id per patch, window order, -1 pad
    item_valid: Array = array_field(("G",), np.bool_, batch_dim=None)  # real (not padding) items


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AudioInputs:
    """The audio encoder's inputs: every audio of the batch as W encoder windows of F mel frames (text order,
    each audio's windows contiguous), and where each ``<|AUDIO|>`` token takes its row of the encoder output
    (W · F/4 rows; ``emoqwen_jax.layout.audio``). Produced by ``data`` (``input_features``,
    ``feature_attention_mask``, ``audio_lengths``), consumed by ``EmotionQwen.embed``."""

    KEY_PREFIX = "audio_"
    input_features: Array = array_field(("W", "num_mel_bins", "F"), np.float32, key="input_features")
    feature_mask: Array = array_field(("W", "F"), key="feature_attention_mask")  # 1 = a frame of real audio
    token_index: Array = array_field(("B", "L"), offset="audio_rows")  # encoder row per <|AUDIO|>, -1 elsewhere


GROUPS: dict[str, type] = {"text": TextInputs, "vision": VisionInputs, "audio": AudioInputs}


def _specs() -> tuple[FieldSpec, ...]:
    out = []
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            m = f.metadata
            out.append(FieldSpec(group, f.name, m["key"] or cls.KEY_PREFIX + f.name, m["shape"], m["dtype"],
                                 m["batch_dim"], m["offset"], m["permutation"], m["optional"]))
    return tuple(out)


FIELDS: tuple[FieldSpec, ...] = _specs()
BY_KEY: dict[str, FieldSpec] = {s.key: s for s in FIELDS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
    """The model's batch: ``text`` always, ``vision`` / ``audio`` when the batch has that group (None = absent)."""

    text: TextInputs
    vision: VisionInputs | None = None
    audio: AudioInputs | None = None

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, flat: Mapping[str, Array]) -> "ModelInputs":
        """From the flat Hugging Face-style names (``input_ids``, ``vision_pos_hw``, ...)."""
        if not any(key in BY_KEY and BY_KEY[key].group == "text" for key in flat):
            raise ValueError(f"model inputs need the text group (input_ids, ...); got {sorted(flat)}")
        return cls(text=TextInputs()).replace(**flat)

    # ---- per-field views (what sharding, batching and shapes derive from) --------------------------------
    def fields(self) -> Iterator[tuple[FieldSpec, Array]]:
        """(spec, value) of every present field."""
        for spec in FIELDS:
            value = self.field(spec)
            if value is not None:
                yield spec, value

    def field(self, spec: FieldSpec) -> Array | None:
        """The value of field ``spec`` (None when absent)."""
        group = getattr(self, spec.group)
        return None if group is None else getattr(group, spec.name)

    def map_fields(self, fn: Callable[[FieldSpec, Array], Array]) -> "ModelInputs":
        """A ModelInputs of ``fn(spec, value)`` over the present fields (absent ones stay None)."""
        return self.replace(**{spec.key: fn(spec, value) for spec, value in self.fields()})

    def replace(self, **flat: Array) -> "ModelInputs":
        """A copy with fields replaced by flat name (None removes a field)."""
        unknown = sorted(set(flat) - set(BY_KEY))
        if unknown:
            raise ValueError(f"unknown model input(s) {unknown}; valid names: {sorted(BY_KEY)}")
        changes: dict[str, dict] = {}
        for key, value in flat.items():
            changes.setdefault(BY_KEY[key].group, {})[BY_KEY[key].name] = value
        groups = {}
        for g, fields in changes.items():
            old = getattr(self, g)
            groups[g] = GROUPS[g](**fields) if old is None else dataclasses.replace(old, **fields)
        return dataclasses.replace(self, **groups)


def concat(shards: "list[ModelInputs]") -> ModelInputs:
    """Joins equally-shaped, already offset shards along each field's batch dimension (0 when replicated)."""
    if len(shards) == 1:
        return shards[0]
    first = shards[0]
    return first.map_fields(lambda spec, _: np.concatenate([s.field(spec) for s in shards],
                                                           axis=spec.batch_dim or 0))


def offset_indices(inputs: ModelInputs, shard_index: int, scale: Mapping[str, int]) -> ModelInputs:
    """Moves the index fields of shard ``shard_index`` so the joined arrays index the joined batch:
    ``scale[kind]`` is one shard's count of units / patches / items; negative (padding) entries stay."""
    if not shard_index:
        return inputs

    def move(spec: FieldSpec, value):
        if spec.offset is None:
            return value
        offset = shard_index * scale[spec.offset]
        if spec.permutation:
            return value + offset
        return np.where(value >= 0, value + offset, value).astype(value.dtype)

    return inputs.map_fields(move)


def abstract_inputs(sizes: Mapping[str, int], *, groups: tuple[str, ...] = ("text", "vision"),
                    optional: tuple[str, ...] = ("labels", "rope_deltas")) -> ModelInputs:
    """``jax.ShapeDtypeStruct`` (no sharding) of every field of ``groups``, from the symbolic shapes: ``sizes``
    maps the symbols (B, L, P, U, G, patch_dim, ...) to numbers. Optional fields only when named."""
    flat = {}
    for spec in FIELDS:
        if spec.group not in groups or (spec.optional and spec.key not in optional):
            continue
        try:
            shape = tuple(d if isinstance(d, int) else int(sizes[d]) for d in spec.shape)
        except KeyError as e:
            raise ValueError(f"abstract_inputs: size {e} of {spec.key} {spec.shape} missing from {dict(sizes)}") from e
        flat[spec.key] = jax.ShapeDtypeStruct(shape, spec.dtype)
    return ModelInputs.from_dict(flat)

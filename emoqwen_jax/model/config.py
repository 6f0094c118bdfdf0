"""Architecture configs: frozen, validated once, built from the run config's ``config.model``.

The run config (``configs/emotion_qwen.py``) is an ml_collections ConfigDict that users override from the
command line; the model only ever sees these frozen dataclasses, so a bad value fails at start-up with a
message that names the numbers, never deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from emoqwen_jax.sizes import BASE, SIZES
from emoqwen_jax.tokens import REAL_VOCAB_SIZE, tokenizer_info

_V, _T, _C = (SIZES[BASE][part] for part in ("vision", "text", "compressor"))  # defaults: the released 7B
_IDS = tokenizer_info(REAL_VOCAB_SIZE)  # special-token ids at the full vocabulary
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision transformer (HF ``Qwen2_5_VLVisionConfig`` minus the merger, which lives in
    the compressor)."""

    depth: int = _V["depth"]
    hidden_size: int = _V["hidden_size"]
    num_heads: int = _V["num_heads"]
    intermediate_size: int = _V["intermediate_size"]
    in_channels: int = _V["in_channels"]
    patch_size: int = _V["patch_size"]
    temporal_patch_size: int = _V["temporal_patch_size"]
    spatial_merge_size: int = _V["spatial_merge_size"]
    window_size: int = _V["window_size"]
    fullatt_block_indexes: tuple[int, ...] = _V["fullatt_block_indexes"]
    tokens_per_second: float = _V["tokens_per_second"]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Full-attention layers: 0 = dense [P, P] frame mask (exact for any input); N > 0 = block-local attention
    # over blocks of N patches (O(P * 3N)), exact when no frame has more than N patches — a longer frame makes
    # the ViT output NaN rather than a silently wrong result. Not part of the HF config.
    frame_block: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * temporal_patch * patch * patch (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim={self.head_dim} must be divisible by 4 (2-D rotary splits h and w)")
        unit = self.spatial_merge_size * self.patch_size
        if self.window_size % unit:
            raise ValueError(
                f"vision.window_size={self.window_size} must be a multiple of spatial_merge_size*patch_size={unit}"
            )
        if self.frame_block < 0:
            raise ValueError(f"vision.frame_block={self.frame_block} must be >= 0 (0 = dense frame attention)")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"vision.fullatt_block_indexes {bad} outside [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2.5 decoder (HF ``Qwen2_5_VLTextConfig``)."""

    vocab_size: int = _T["vocab_size"]
    hidden_size: int = _T["hidden_size"]
    num_layers: int = _T["num_layers"]
    num_heads: int = _T["num_heads"]
    num_kv_heads: int = _T["num_kv_heads"]
    intermediate_size: int = _T["intermediate_size"]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = _T["mrope_section"]
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text.hidden_size={self.hidden_size} not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"text.num_heads={self.num_heads} not divisible by num_kv_heads={self.num_kv_heads}")
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"text.mrope_section={tuple(self.mrope_section)} must have 3 entries summing to head_dim/2="
                f"{self.head_dim // 2}"
            )


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """The Hybrid Compressor: patch-merger experts mixed by a gate.

    ``routing='sample'`` is the paper's mode (one softmax weight vector per image/video from the gating
    network); ``'token'`` (scale mode: per-token top-k routing) is configured by the remaining fields.
    """

    routing: str = "sample"
    num_experts: int = 2
    expert_names: tuple[str, ...] = ("general", "emotion")
    gate_input: str = "pooled"  # 'pooled': one mean ViT vector per item (as released) | 'tokens': all tokens
    gate_num_heads: int = _C["gate_num_heads"]
    gate_hidden_size: int = _C["gate_hidden_size"]
    top_k: int = 2
    capacity_factor: float = 1.25
    dispatch: str = "einsum"
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    init_noise_std: float = 0.0

    def validate(self, vision_hidden: int) -> None:
        if self.routing not in ("sample", "token"):
            raise ValueError(f"compressor.routing={self.routing!r}; choose 'sample' or 'token'")
        if self.num_experts < 1:
            raise ValueError(f"compressor.num_experts={self.num_experts} must be >= 1")
        if self.expert_names and len(self.expert_names) != self.num_experts:
            raise ValueError(
                f"compressor.expert_names={tuple(self.expert_names)} has {len(self.expert_names)} names for "
                f"num_experts={self.num_experts} (leave it empty for generic names)"
            )
        if self.gate_input not in ("pooled", "tokens"):
            raise ValueError(f"compressor.gate_input={self.gate_input!r}; choose 'pooled' or 'tokens'")
        if vision_hidden % self.gate_num_heads:
            raise ValueError(
                f"vision.hidden_size={vision_hidden} not divisible by compressor.gate_num_heads={self.gate_num_heads}"
            )
        if self.dispatch not in ("einsum", "shard_map", "ragged"):
            raise ValueError(f"compressor.dispatch={self.dispatch!r}; choose 'einsum', 'shard_map' or 'ragged'")
        if self.routing == "token" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"compressor.top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    compressor: CompressorConfig = dataclasses.field(default_factory=CompressorConfig)
    image_token_id: int = _IDS.image_pad_id
    video_token_id: int = _IDS.video_pad_id
    vision_start_token_id: int = _IDS.vision_start_id
    vision_end_token_id: int = _IDS.vision_end_id
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the weights (master weights stay float32 in training)
    remat: str = "none"  # 'none' | 'block': recompute each ViT/decoder block in the backward pass

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        self.compressor.validate(self.vision.hidden_size)
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {_DTYPES}")
        if self.remat not in ("none", "block"):
            raise ValueError(f"model.remat={self.remat!r}; choose 'none' or 'block'")
        ids = [self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id]
        if max(ids) >= self.text.vocab_size:
            raise ValueError(f"special token ids {ids} must be < text.vocab_size={self.text.vocab_size}")

    @property
    def expert_names(self) -> tuple[str, ...]:
        names = tuple(self.compressor.expert_names)
        return names if names else tuple(f"expert_{i}" for i in range(self.compressor.num_experts))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_run_config(cls, config: Any) -> "ModelConfig":
        """The frozen, validated architecture config from a run config's ``config.model`` (a ConfigDict)."""
        model = config.model
        return cls.from_dict(model.to_dict() if hasattr(model, "to_dict") else model)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a (possibly nested ConfigDict-like) mapping; unknown keys are an error."""
        d = dict(d)
        sub = {"vision": VisionConfig, "text": TextConfig, "compressor": CompressorConfig}
        kwargs = {}
        for key, value in d.items():
            if key in sub:
                kwargs[key] = _build(sub[key], value, prefix=f"model.{key}")
            else:
                kwargs[key] = value
        return _build(cls, kwargs, prefix="model", already_built=True)


def _build(cls, values, *, prefix: str, already_built: bool = False):
    if isinstance(values, cls):
        return values
    values = dict(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} in {prefix}; valid: {sorted(fields)}")
    out = {}
    for key, value in values.items():
        default = fields[key].default
        if isinstance(value, (list, tuple)) or (default is not dataclasses.MISSING and isinstance(default, tuple)):
            value = tuple(value)
        out[key] = value
    return cls(**out)

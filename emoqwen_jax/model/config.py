"""Architecture configs: frozen, validated once, built from the run config's ``config.model``.

The run config (``configs/emotion_qwen.py``) is an ml_collections ConfigDict that users override from the
command line; the model only ever sees these frozen dataclasses, so a bad value fails at start-up with a
message that names the numbers, never deep inside a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so np.dtype("bfloat16") works)
import numpy as np

from emoqwen_jax.sizes import BASE, SIZES
from emoqwen_jax.tokens import REAL_VOCAB_SIZE, tokenizer_info

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def dtype_name(value: Any, field: str = "dtype") -> str:
    """The canonical name ('float32', 'bfloat16', 'float16') of any dtype spelling.

    Accepts the names themselves and everything JAX/numpy users pass as a dtype: ``jnp.bfloat16``,
    ``jnp.float32``, ``np.float32``, ``np.dtype('bfloat16')``, ``jnp.dtype('float16')``. Configs store the
    name, so they stay JSON-serialisable and comparable. Anything else is a ValueError naming the choices.
    """
    if isinstance(value, str):
        name = value
    else:
        try:
            name = np.dtype(value).name
        except TypeError:
            name = None
    if name not in DTYPE_NAMES:
        raise ValueError(f"{field}={value!r}; choose one of {DTYPE_NAMES} (or the matching jnp/np dtype)")
    return name


_V, _T, _C, _A = (SIZES[BASE][part] for part in ("vision", "text", "compressor", "audio"))  # the released 7B
_IDS = tokenizer_info(REAL_VOCAB_SIZE)  # special-token ids at the full vocabulary
# Kept here (not imported from attention.py / stack.py, which import jax) so configs validate without JAX.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
REMAT_POLICIES = ("none", "block", "dots_saveable")


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
    # Block size hint (patches) of the full-attention layers for model.attention='blockwise' (query and key
    # blocks; any frame size is exact); 0 = ModelConfig.attention_block. Not part of the HF config.
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
            raise ValueError(f"vision.frame_block={self.frame_block} must be >= 0 (0 = model.attention_block)")
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
    expert_names: tuple[str, ...] = ()  # () = generated from the roles (see ``ModelConfig.expert_names``)
    gate_input: str = "pooled"  # 'pooled': one mean ViT vector per item (as released) | 'tokens': all tokens
    gate_num_heads: int = _C["gate_num_heads"]
    gate_hidden_size: int = _C["gate_hidden_size"]
    top_k: int = 2
    capacity_factor: float = 1.25
    dispatch: str = "einsum"
    group_size: int = 128  # scale mode: tokens per routing group (capacity and drops are per group, any mesh)
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    init_noise_std: float = 0.0

    def __post_init__(self):
        # top_k is capped at E, so `num_experts` alone works for any E (E = 1: every token to the one expert).
        if self.num_experts >= 1 and self.top_k > self.num_experts:
            object.__setattr__(self, "top_k", self.num_experts)

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
        if self.group_size < 1:
            raise ValueError(f"compressor.group_size={self.group_size} must be >= 1")
        if self.routing == "token" and self.top_k < 1:
            raise ValueError(f"compressor.top_k={self.top_k} must be >= 1 (values above num_experts are capped)")


PROJECTORS = ("linear", "mlp")
POSITION_RULES = ("text", "interleave")


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    """``config.model.audio``: the encoder's sizes (HF ``Qwen2AudioEncoderConfig`` names), the projector and
    how audio tokens sit in the sequence. Defaults are Qwen2-Audio-7B's encoder (Whisper-large-v3 sized)."""

    enabled: bool = False
    num_mel_bins: int = _A["num_mel_bins"]
    d_model: int = _A["d_model"]
    encoder_layers: int = _A["encoder_layers"]
    encoder_attention_heads: int = _A["encoder_attention_heads"]
    encoder_ffn_dim: int = _A["encoder_ffn_dim"]
    max_source_positions: int = _A["max_source_positions"]  # after conv2; 30 s windows = 2 * 1500 = 3000 frames
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    projector: str = "linear"  # 'linear' (Qwen2-Audio: one Linear with bias) | 'mlp' (Linear, GELU, Linear)
    projector_hidden_size: int = 0  # hidden width of the 'mlp' projector; 0 = the LLM width
    position_rule: str = "text"  # 'text': audio block after the vision block, positions text-like |
    #                              'interleave': time-aligned audio/video chunks (Qwen2.5-Omni TMRoPE idea)
    interleave_seconds: float = 2.0  # chunk length of the 'interleave' rule
    freeze_encoder: bool = True  # the encoder is frozen by default (stages may still train it)
    gate_audio: bool = False  # the Hybrid Compressor's gate also sees the sample's pooled audio features
    # Qwen2-Audio's token names in unused embedding rows above the Qwen2.5 tokenizer's last id (151664) and our
    # pad (151665): 151666-151668 (emoqwen_jax/tokens.py; configs take them from tokenizer_info).
    audio_bos_token_id: int = _IDS.audio_bos_id  # <|audio_bos|>
    audio_token_id: int = _IDS.audio_id  # <|AUDIO|>
    audio_eos_token_id: int = _IDS.audio_eos_id  # <|audio_eos|>

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_frames(self) -> int:
        return 2 * self.max_source_positions

    def validate(self) -> None:
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"audio.d_model={self.d_model} not divisible by encoder_attention_heads="
                             f"{self.encoder_attention_heads}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"audio.projector={self.projector!r}; choose one of {PROJECTORS}")
        if self.position_rule not in POSITION_RULES:
            raise ValueError(f"audio.position_rule={self.position_rule!r}; choose one of {POSITION_RULES}")
        if self.interleave_seconds <= 0:
            raise ValueError(f"audio.interleave_seconds={self.interleave_seconds} must be > 0")
        for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_ffn_dim", "max_source_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"audio.{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    compressor: CompressorConfig = dataclasses.field(default_factory=CompressorConfig)
    audio: AudioConfig = dataclasses.field(default_factory=AudioConfig)  # off unless audio.enabled
    image_token_id: int = _IDS.image_pad_id
    video_token_id: int = _IDS.video_pad_id
    vision_start_token_id: int = _IDS.vision_start_id
    vision_end_token_id: int = _IDS.vision_end_id
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the weights (master weights stay float32 in training)
    remat: str = "none"  # 'none' | 'block' (recompute each ViT/decoder block) | 'dots_saveable' (keep matmuls)
    scan_layers: bool = False  # one lax.scan over the decoder's layers and the ViT's groups (faster compiles)
    attention: str = "auto"  # 'auto' | 'xla' | 'blockwise' | 'splash' | 'cudnn' (emoqwen_jax.model.attention)
    attention_block: int = 512  # query/key block of 'blockwise' attention in the decoder (and the ViT default)

    def __post_init__(self):
        # jnp.bfloat16, np.dtype('float32')... are normalised to their name (frozen: object.__setattr__).
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name), f"model.{name}"))
        self.validate()

    def validate(self) -> None:
        self.vision.validate()
        self.text.validate()
        self.compressor.validate(self.vision.hidden_size)
        self.audio.validate()
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPE_NAMES:
                raise ValueError(f"model.{name}={getattr(self, name)!r}; choose one of {DTYPE_NAMES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; choose one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")
        if self.attention_block < 1:
            raise ValueError(f"model.attention_block={self.attention_block} must be >= 1")
        if not isinstance(self.scan_layers, bool):
            raise ValueError(f"model.scan_layers={self.scan_layers!r}; choose True or False")
        ids = [self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id]
        if self.audio.enabled:
            ids += [self.audio.audio_bos_token_id, self.audio.audio_token_id, self.audio.audio_eos_token_id]
        if max(ids) >= self.text.vocab_size:
            raise ValueError(f"special token ids {ids} must be < text.vocab_size={self.text.vocab_size}")

    RUNTIME_FIELDS = ("attention", "attention_block", "scan_layers", "remat")

    def with_runtime(self, **runtime: Any) -> "ModelConfig":
        """This config with execution settings (``RUNTIME_FIELDS``: how the model runs, not what it is)
        replaced; None values are left alone, other keys are a ValueError."""
        bad = sorted(set(runtime) - set(self.RUNTIME_FIELDS))
        if bad:
            raise ValueError(f"unknown runtime setting(s) {bad}; valid: {self.RUNTIME_FIELDS}")
        return dataclasses.replace(self, **{k: v for k, v in runtime.items() if v is not None})

    @property
    def expert_roles(self) -> tuple[str, ...]:
        """The role of each expert: paper mode — expert 0 'general', the others 'emotion'; scale mode — every
        expert 'routed'. Stage presets freeze and train experts by role, whatever E is."""
        e = self.compressor.num_experts
        if self.compressor.routing == "token":
            return ("routed",) * e
        return ("general",) + ("emotion",) * (e - 1)

    @property
    def expert_names(self) -> tuple[str, ...]:
        """``compressor.expert_names`` if given, else generated: paper mode ('general', 'emotion') for E = 2,
        ('general', 'emotion_1', …, 'emotion_{E-1}') otherwise; scale mode ('expert_0', …)."""
        names = tuple(self.compressor.expert_names)
        if names:
            return names
        e = self.compressor.num_experts
        if self.compressor.routing == "token":
            return tuple(f"expert_{i}" for i in range(e))
        return ("general",) + (("emotion",) if e == 2 else tuple(f"emotion_{i}" for i in range(1, e)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_run_config(cls, config: Any) -> "ModelConfig":
        """The frozen, validated architecture config from a run config's ``config.model`` (a ConfigDict)."""
        return cls.from_dict(config.model.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a (possibly nested ConfigDict-like) mapping; unknown keys are an error."""
        d = dict(d)
        sub = {"vision": VisionConfig, "text": TextConfig, "compressor": CompressorConfig, "audio": AudioConfig}
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

"""The one table that ties our parameter paths to Hugging Face Qwen2.5-VL safetensors names.

Import and export both walk this table, so a name is written once. Our exports (``emoqwen-convert to-hf``)
keep Qwen2.5-VL's names for the ViT and the decoder and put the Hybrid Compressor under the visual module:

    visual.compressor.experts.{e}.ln_q.weight / mlp.0.{weight,bias} / mlp.2.{weight,bias}   (HF merger layout)
    visual.compressor.gate.attention.{q,k,v,out}_proj.{weight,bias}                        (paper mode, E > 1)
    visual.compressor.gate.{fc1,fc2,head}.{weight,bias}, gate.{norm1,norm2}.{weight,bias}
    visual.compressor.router.weight                                                        (scale mode, [E, 4Dv])

A single-expert model in paper mode exported as plain Qwen2.5-VL puts its expert at ``visual.merger``. Each
entry says how the HF tensor becomes ours: ``copy`` (same layout), ``linear`` (HF [out, in] -> our kernel
[in, out]), ``patch_embed`` (Conv3d [D, C, 2, 14, 14] -> kernel [C*2*14*14, D]), ``conv1d`` (the audio encoder's
Conv1d [Do, C, 3] -> [C*3, Do]). With audio, exports also hold ``audio_tower.*`` (Qwen2AudioEncoder names) and
``audio_projector.*``. Expert entries carry one HF name per expert (stacked on axis 0).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from emoqwen_jax.model.config import AudioConfig, ModelConfig

# HF's own merger, copied into every expert of a fresh import.
HF_MERGER_PREFIX = "visual.merger"
# Our exports' compressor.
COMPRESSOR_PREFIX = "visual.compressor"
# Our exports' audio modules, at the top level of the files as Qwen2-Audio saves its tower.
AUDIO_TOWER_PREFIX = "audio_tower"
AUDIO_PROJECTOR_PREFIX = "audio_projector"


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple  # path in our nnx state (strings and list indices)
    hf_keys: tuple[str, ...]  # one key; or one per expert for stacked expert weights
    kind: str  # 'copy' | 'linear' | 'patch_embed'


def _linear(path: tuple, hf: str, bias: bool) -> list[Entry]:
    out = [Entry(path + ("kernel",), (hf + ".weight",), "linear")]
    if bias:
        out.append(Entry(path + ("bias",), (hf + ".bias",), "copy"))
    return out


def backbone_entries(config: ModelConfig) -> list[Entry]:
    """ViT and decoder parameters (everything except the compressor)."""
    e: list[Entry] = [Entry(("visual", "patch_embed", "proj", "kernel"), ("visual.patch_embed.proj.weight",),
                            "patch_embed")]
    for i in range(config.vision.depth):
        ours, hf = ("visual", "blocks", i), f"visual.blocks.{i}"
        e += [Entry(ours + ("norm1", "weight"), (f"{hf}.norm1.weight",), "copy"),
              Entry(ours + ("norm2", "weight"), (f"{hf}.norm2.weight",), "copy")]
        e += _linear(ours + ("attn", "qkv"), f"{hf}.attn.qkv", True)
        e += _linear(ours + ("attn", "proj"), f"{hf}.attn.proj", True)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            e += _linear(ours + ("mlp", proj), f"{hf}.mlp.{proj}", True)
    lm = ("language_model",)
    e.append(Entry(lm + ("embed_tokens",), ("model.embed_tokens.weight",), "copy"))
    for i in range(config.text.num_layers):
        ours, hf = lm + ("layers", i), f"model.layers.{i}"
        e += [Entry(ours + ("input_layernorm", "weight"), (f"{hf}.input_layernorm.weight",), "copy"),
              Entry(ours + ("post_attention_layernorm", "weight"), (f"{hf}.post_attention_layernorm.weight",), "copy")]
        for proj in ("q_proj", "k_proj", "v_proj"):
            e += _linear(ours + ("self_attn", proj), f"{hf}.self_attn.{proj}", True)
        e += _linear(ours + ("self_attn", "o_proj"), f"{hf}.self_attn.o_proj", False)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            e += _linear(ours + ("mlp", proj), f"{hf}.mlp.{proj}", False)
    e.append(Entry(lm + ("norm", "weight"), ("model.norm.weight",), "copy"))
    if not config.text.tie_word_embeddings:
        e += _linear(lm + ("lm_head",), "lm_head", False)
    return e


def expert_entries(config: ModelConfig, merger_prefixes: list[str]) -> list[Entry]:
    """Stacked expert mergers; ``merger_prefixes[e]`` is the HF prefix of expert e's merger."""
    ex = ("compressor", "experts")
    pick = lambda suffix: tuple(f"{p}.{suffix}" for p in merger_prefixes)  # noqa: E731
    return [Entry(ex + ("ln_q_weight",), pick("ln_q.weight"), "copy"),
            Entry(ex + ("mlp_0_kernel",), pick("mlp.0.weight"), "linear"),
            Entry(ex + ("mlp_0_bias",), pick("mlp.0.bias"), "copy"),
            Entry(ex + ("mlp_2_kernel",), pick("mlp.2.weight"), "linear"),
            Entry(ex + ("mlp_2_bias",), pick("mlp.2.bias"), "copy")]


def compressor_expert_prefixes(config: ModelConfig) -> list[str]:
    """HF prefix of each expert in our exports: ``visual.compressor.experts.{e}``."""
    return [f"{COMPRESSOR_PREFIX}.experts.{e}" for e in range(config.compressor.num_experts)]


def routing_entries(config: ModelConfig) -> list[Entry]:
    """The gate (paper mode with several experts) or the router (scale mode); none for a single paper expert."""
    comp = ("compressor",)
    if config.compressor.routing == "token":
        return _linear(comp + ("router",), f"{COMPRESSOR_PREFIX}.router", False)
    if config.compressor.num_experts == 1:
        return []
    gate, hf = comp + ("gate",), f"{COMPRESSOR_PREFIX}.gate"
    e: list[Entry] = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        e += _linear(gate + ("attention", proj), f"{hf}.attention.{proj}", True)
    for layer in ("fc1", "fc2", "head"):
        e += _linear(gate + (layer,), f"{hf}.{layer}", True)
    for norm in ("norm1", "norm2"):
        e += [Entry(gate + (norm, p), (f"{hf}.{norm}.{p}",), "copy") for p in ("weight", "bias")]
    return e


def export_entries(config: ModelConfig) -> list[Entry]:
    """Every parameter of an Emotion-Qwen export (the layout of ``emoqwen-convert to-hf``)."""
    audio = []
    if config.audio.enabled:
        audio = (audio_entries(config.audio, f"{AUDIO_TOWER_PREFIX}.", ("audio_tower",))
                 + projector_entries(config.audio, f"{AUDIO_PROJECTOR_PREFIX}.", ("audio_projector",)))
    return (backbone_entries(config) + expert_entries(config, compressor_expert_prefixes(config))
            + routing_entries(config) + audio)


def _norm(ours: tuple, hf: str) -> list[Entry]:
    return [Entry(ours + ("weight",), (hf + ".weight",), "copy"), Entry(ours + ("bias",), (hf + ".bias",), "copy")]


def audio_entries(cfg: AudioConfig, prefix: str = "", path: tuple = ()) -> list[Entry]:
    """Audio encoder parameters (HF ``Qwen2AudioEncoder`` / Whisper encoder names): our path (under ``path``) ↔
    HF name (under ``prefix``)."""
    e: list[Entry] = []
    for conv in ("conv1", "conv2"):
        e += [Entry(path + (conv, "kernel"), (f"{prefix}{conv}.weight",), "conv1d"),
              Entry(path + (conv, "bias"), (f"{prefix}{conv}.bias",), "copy")]
    e.append(Entry(path + ("embed_positions",), (f"{prefix}embed_positions.weight",), "copy"))
    for i in range(cfg.encoder_layers):
        ours, hf = path + ("layers", i), f"{prefix}layers.{i}"
        for proj, bias in (("q_proj", True), ("k_proj", False), ("v_proj", True), ("out_proj", True)):
            e += _linear(ours + ("self_attn", proj), f"{hf}.self_attn.{proj}", bias)
        e += _norm(ours + ("self_attn_layer_norm",), f"{hf}.self_attn_layer_norm")
        e += _linear(ours + ("fc1",), f"{hf}.fc1", True) + _linear(ours + ("fc2",), f"{hf}.fc2", True)
        e += _norm(ours + ("final_layer_norm",), f"{hf}.final_layer_norm")
    e += _norm(path + ("layer_norm",), f"{prefix}layer_norm")
    return e


def projector_entries(cfg: AudioConfig, prefix: str = "multi_modal_projector.", path: tuple = ()) -> list[Entry]:
    if cfg.projector == "linear":
        return _linear(path + ("linear",), f"{prefix}linear", True)
    return _linear(path + ("linear_1",), f"{prefix}linear_1", True) + _linear(path + ("linear_2",),
                                                                              f"{prefix}linear_2", True)


def hf_to_ours(tensor: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return tensor
    if kind == "linear":
        return tensor.T
    if kind in ("patch_embed", "conv1d"):
        return tensor.reshape(tensor.shape[0], -1).T
    raise ValueError(f"unknown conversion kind {kind!r}")


def ours_to_hf(array: np.ndarray, kind: str, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if kind == "copy":
        return array
    if kind == "linear":
        return array.T
    if kind == "patch_embed":
        return array.T.reshape(hf_shape)
    if kind == "conv1d":  # kernel [C·3, Do] -> HF Conv1d weight [Do, C, 3]
        return array.T.reshape(array.shape[1], -1, 3)
    raise ValueError(f"unknown conversion kind {kind!r}")

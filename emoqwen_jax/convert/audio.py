"""Audio encoder (and projector) from Hugging Face checkpoints: Qwen2-Audio or a Whisper model's encoder.

Reads config.json and safetensors only (no torch). Supported directories:
  * ``qwen2_audio`` (``Qwen2AudioForConditionalGeneration.save_pretrained``): weights under ``audio_tower.``
    (or ``model.audio_tower.``), the projector under ``multi_modal_projector.linear``;
  * ``qwen2_audio_encoder`` (a bare ``Qwen2AudioEncoder``): weights at the top level;
  * ``whisper`` (``WhisperModel`` / ``WhisperForConditionalGeneration``): the encoder under ``encoder.`` or
    ``model.encoder.``. Whisper's encoder has no pooling; ours runs it the way Qwen2-Audio (initialised from
    Whisper-large-v3) does — average pooling by 2 before the final layer norm — so a Whisper checkpoint gives
    the encoder a fresh Qwen2-Audio-style model would start from.

Names are HF's own (``conv1``, ``layers.{i}.self_attn.q_proj``…); ``audio_entries`` is the one table that
import and export walk.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from emoqwen_jax.convert.hf_import import TensorReader, load_entries, read_hf_config
from emoqwen_jax.convert.hf_names import audio_entries, projector_entries
from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.audio import AudioConfig, AudioEncoder, AudioProjector
from emoqwen_jax.model.layers import as_dtype

AUDIO_MODEL_TYPES = ("qwen2_audio", "qwen2_audio_encoder", "whisper")
# Where the encoder's weights may live, by checkpoint kind (first match wins).
_ENCODER_PREFIXES = ("audio_tower.", "model.audio_tower.", "encoder.", "model.encoder.", "")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_ENCODER_FIELDS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                   "max_source_positions", "scale_embedding")


def audio_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> AudioConfig:
    """``AudioConfig`` from a Qwen2-Audio, bare encoder or Whisper config.json dict (plus field overrides)."""
    model_type = hf.get("model_type")
    if model_type not in AUDIO_MODEL_TYPES:
        raise ValueError(f"unknown audio architecture model_type={model_type!r}; supported: {AUDIO_MODEL_TYPES}")
    enc = dict(hf.get("audio_config") or {}) if model_type == "qwen2_audio" else dict(hf)
    act = enc.get("activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"audio encoder activation_function={act!r}; only 'gelu' (Whisper, Qwen2-Audio) is "
                         f"supported")
    # Token ids stay ours (Qwen2-Audio's <|AUDIO|> is 151646 in its own vocabulary, a real token in Qwen2.5's).
    fields = {k: enc[k] for k in _ENCODER_FIELDS if k in enc}
    fields.update(overrides)
    cfg = AudioConfig(**fields)
    cfg.validate()
    return cfg


def _find_prefix(keys: set[str], prefixes: tuple[str, ...], probe: str, path: str) -> str:
    for prefix in prefixes:
        if prefix + probe in keys:
            return prefix
    raise ValueError(f"{path!r}: no {probe!r} under any of the prefixes {prefixes} — not an audio encoder "
                     f"checkpoint")


def _load(module_ctor, entries_fn, reader: TensorReader, dtype) -> nnx.Module:
    abstract = nnx.eval_shape(module_ctor)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    load_entries(reader, entries_fn(), pure, np.dtype(dtype))
    unfilled = [p for p, v in _flat(pure) if isinstance(v, jax.ShapeDtypeStruct)]
    if unfilled:
        raise ValueError(f"parameters not provided by the checkpoint: {unfilled[:5]}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, prefix + (k,))
    else:
        yield prefix, tree


def audio_encoder_from_hf(path: str, dtype: Any = "float32", param_dtype: Any = None,
                          **overrides: Any) -> AudioEncoder:
    """Our ``AudioEncoder`` from a Qwen2-Audio directory, a bare Qwen2-Audio encoder, or a Whisper checkpoint.

    Args:
      path: a ``save_pretrained`` directory (config.json + safetensors, sharded or not).
      dtype: compute dtype ('float32' for parity, 'bfloat16' for training; a string or a jnp dtype);
        ``param_dtype`` (storage) defaults to it.
      overrides: ``AudioConfig`` fields to set besides the encoder sizes (e.g. ``projector='mlp'``).
    Returns:
      the encoder: float[B, num_mel_bins, F] → float[B, F // 4, d_model], equal to HF's ``last_hidden_state``.
    """
    hf = read_hf_config(path)
    cfg = audio_config_from_hf(hf, **overrides)
    reader = TensorReader(path)
    prefix = _find_prefix(set(reader.keys()), _ENCODER_PREFIXES, "conv1.weight", path)
    dt, pdt = as_dtype(dtype), as_dtype(param_dtype if param_dtype is not None else dtype)
    return _load(lambda: AudioEncoder(cfg, rngs=nnx.Rngs(0), dtype=dt, param_dtype=pdt),
                 lambda: audio_entries(cfg, prefix), reader, pdt)


def audio_projector_from_hf(path: str, dtype: Any = "float32", param_dtype: Any = None) -> AudioProjector:
    """Qwen2-Audio's ``multi_modal_projector`` (a Linear from d_model to the LLM width) as our projector."""
    hf = read_hf_config(path)
    if hf.get("model_type") != "qwen2_audio":
        raise ValueError(f"{path!r} is model_type={hf.get('model_type')!r}; only a qwen2_audio checkpoint has a "
                         f"projector")
    cfg = dataclasses.replace(audio_config_from_hf(hf), projector="linear")
    text = hf.get("text_config") or {}
    reader = TensorReader(path)
    prefix = _find_prefix(set(reader.keys()), _PROJECTOR_PREFIXES, "linear.weight", path)
    out = int(text.get("hidden_size") or reader.get(prefix + "linear.weight").shape[0])
    dt, pdt = as_dtype(dtype), as_dtype(param_dtype if param_dtype is not None else dtype)
    return _load(lambda: AudioProjector(cfg, out, rngs=nnx.Rngs(0), dtype=dt, param_dtype=pdt),
                 lambda: projector_entries(cfg, prefix), reader, pdt)




def attach_audio(model: EmotionQwen, path: str, *, projector: str = "linear", seed: int = 0,
                 **audio_overrides: Any) -> EmotionQwen:
    """``model`` plus an audio encoder from ``path`` (Qwen2-Audio, a bare encoder or Whisper): a new EmotionQwen
    with ``model.audio.enabled``, every existing weight carried over unchanged.

    The projector is Qwen2-Audio's when ``path`` is a qwen2_audio checkpoint whose LLM width equals the model's
    and ``projector='linear'``; otherwise it starts fresh (seeded) and a stage such as ``stage_audio_align``
    trains it. The audio token ids are the tokenizer's for the model's vocabulary (``<|audio_bos|>``,
    ``<|AUDIO|>``, ``<|audio_eos|>`` right after the pad).
    """
    from emoqwen_jax.data.tokenizer import tokenizer_info  # noqa: PLC0415

    hf = read_hf_config(path)
    info = tokenizer_info(model.config.text.vocab_size)
    audio = audio_config_from_hf(hf, enabled=True, projector=projector, audio_bos_token_id=info.audio_bos_id,
                                 audio_token_id=info.audio_id, audio_eos_token_id=info.audio_eos_id,
                                 **audio_overrides)
    config = ModelConfig.from_dict({**model.config.to_dict(), "audio": dataclasses.asdict(audio)})
    dt, pdt = as_dtype(config.dtype), as_dtype(config.param_dtype)
    encoder = audio_encoder_from_hf(path, dtype=dt, param_dtype=pdt, **dataclasses.asdict(audio))
    text = hf.get("text_config") or {}
    if hf.get("model_type") == "qwen2_audio" and projector == "linear" and text.get(
            "hidden_size") == config.text.hidden_size:
        proj = audio_projector_from_hf(path, dtype=dt, param_dtype=pdt)
    else:
        proj = AudioProjector(audio, config.text.hidden_size, rngs=nnx.Rngs(seed), dtype=dt, param_dtype=pdt)
    abstract = nnx.eval_shape(lambda: EmotionQwen(config, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    pure.update(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    pure["audio_tower"] = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    pure["audio_projector"] = nnx.to_pure_dict(nnx.state(proj, nnx.Param))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)

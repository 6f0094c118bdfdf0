"""Helpers shared by the command-line entry points (config -> model)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The frozen, validated architecture config from a run config's ``config.model``."""
    return ModelConfig.from_dict(config.model.to_dict())


def build_model(config: ml_collections.ConfigDict, ckpt: str = "") -> EmotionQwen:
    """A model directory if ``ckpt`` is given (or ``config.init_from`` names one), else random init."""
    from emoqwen_jax.convert import from_hf
    from emoqwen_jax.convert.model_dir import is_model_dir, load_model

    source = ckpt or config.get("init_from", "")
    if not source:
        return EmotionQwen(model_config(config), rngs=nnx.Rngs(config.seed))
    runtime = {k: config.model.get(k) for k in ("attention", "attention_block", "scan_layers", "remat")}
    if is_model_dir(source):
        return load_model(source, dtype=config.model.dtype, **runtime)
    return from_hf(source, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                   compressor=config.model.compressor.to_dict(), seed=config.seed, **runtime)

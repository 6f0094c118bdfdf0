"""Helpers shared by the command-line entry points (config -> model)."""

from __future__ import annotations

import ml_collections
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig


def build_model(config: ml_collections.ConfigDict, ckpt: str = "") -> EmotionQwen:
    """A model directory if ``ckpt`` is given (or ``config.init_from`` names one), else random init."""
    from emoqwen_jax.checkpoint import load_weights

    source = ckpt or config.get("init_from", "")
    if not source:
        return EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(config.seed))
    return load_weights(source, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                        compressor=config.model.compressor.to_dict(), seed=config.seed)

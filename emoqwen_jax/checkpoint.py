"""The documented path of the model-directory functions (``emoqwen_jax.checkpoint.load_weights`` in docs/model.md
and docs/long_context.md): they live in ``emoqwen_jax.model_dir``."""

from emoqwen_jax.model_dir import build_model, is_model_dir, load_model, load_weights, read_model_config, save_model

__all__ = ["build_model", "is_model_dir", "load_model", "load_weights", "read_model_config", "save_model"]

"""A tiny random model directory for end-to-end tests (commands, the server), saved the way the trainer saves
one: ``config.json`` carries the data settings the commands read (tokenizer vocabulary and cache, frames,
buckets)."""

import sys
from pathlib import Path

from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model_dir import save_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
import emotion_qwen  # noqa: E402


def save_tiny_checkpoint(tmp_path_factory, data: dict) -> str:
    """The ``tiny`` preset with random weights (seed 0) and ``data`` over its tokenizer settings; its path."""
    config = emotion_qwen.get_config("tiny")
    model = EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(0))
    data = {"tokenizer_vocab_size": config.model.text.vocab_size,
            "tokenizer_cache_dir": str(tmp_path_factory.mktemp("tokcache")), **data}
    return save_model(model, str(tmp_path_factory.mktemp("ckpt") / "tiny"), meta={"data": data})

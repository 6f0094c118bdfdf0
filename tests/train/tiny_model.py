"""The tiny preset's model split for train-step tests (a module of its own: see train_configs.py)."""

import sys
from pathlib import Path

from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.train.optim import Trainable, select_trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402


def tiny_model(patterns: tuple[str, ...]) -> tuple[EmotionQwen, nnx.GraphDef, dict, Trainable]:
    """The tiny preset's model (paper mode, random weights from seed 0), its graphdef and pure params, and
    the selection that trains the leaves ``patterns`` match."""
    mc = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))
    model = EmotionQwen(mc, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    trainable = select_trainable(params, patterns, expert_names=mc.expert_names, expert_roles=mc.expert_roles)
    return model, graphdef, params, trainable

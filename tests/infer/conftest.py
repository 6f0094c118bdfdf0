"""A tiny random EmotionQwen from the shipped ``tiny`` preset (vocab 1024, tiny tokenizer layout)."""

import sys
from pathlib import Path

import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    return EmotionQwen(ModelConfig.from_run_config(emotion_qwen.get_config("tiny")), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def model():
    """The engine tests' sharpened ``demo``-preset model (audio on; decisive greedy margins)."""
    import engine_helpers

    return engine_helpers.sharp_model()


@pytest.fixture(scope="session")
def session(model, tmp_path_factory):
    """A ``Session`` over ``model`` with its own tokenizer cache."""
    import engine_helpers

    return engine_helpers.session_of(model, str(tmp_path_factory.mktemp("tok")))

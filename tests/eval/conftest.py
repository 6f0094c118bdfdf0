"""Fixtures for the end-to-end command tests: the synthetic demo set and a tiny random model directory whose
config.json stores its data settings (tokenizer cache, small buckets) the way the commands read them."""

import sys
from pathlib import Path

import pytest
from flax import nnx

from emoqwen_jax.checkpoint import save_model
from emoqwen_jax.data.demo import build_demo
from emoqwen_jax.model import EmotionQwen, ModelConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
import emotion_qwen  # noqa: E402
from eval_settings import SMALL_PIXELS  # noqa: E402,F401


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(str(root), num_clips=4, num_images=1, num_heldout=4)
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    config = emotion_qwen.get_config("tiny")
    model = EmotionQwen(ModelConfig.from_run_config(config), rngs=nnx.Rngs(0))
    data = {"tokenizer_vocab_size": config.model.text.vocab_size,
            "tokenizer_cache_dir": str(tmp_path_factory.mktemp("tokcache")),
            "length_buckets": [128, 256], "patch_buckets": [64, 256], "max_length": 256}
    return save_model(model, str(tmp_path_factory.mktemp("ckpt") / "tiny"), meta={"data": data})

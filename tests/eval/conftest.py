"""Fixtures for the end-to-end command tests: the synthetic demo set and a tiny random model directory whose
config.json stores its data settings (tokenizer cache, small buckets) the way the commands read them."""

import pytest
from eval_settings import SMALL_PIXELS  # noqa: F401
from tiny_checkpoint import save_tiny_checkpoint

from emoqwen_jax.data.demo import build_demo


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(str(root), num_clips=4, num_images=1, num_heldout=4)
    return root


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory, {"length_buckets": [128, 256], "patch_buckets": [64, 256],
                                                   "max_length": 256})

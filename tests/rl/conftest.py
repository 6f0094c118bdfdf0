"""Fixtures for the RL tests: a small demo data set per session (config helpers: ``rl_configs``)."""

import pytest


@pytest.fixture(scope="session")
def rl_demo_dir(tmp_path_factory):
    from emoqwen_jax.data import demo

    out = tmp_path_factory.mktemp("rl_demo_data")
    demo.build_demo(str(out), num_clips=10, num_images=2, num_heldout=2)
    return out

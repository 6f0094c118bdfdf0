"""Fixtures for trainer tests: one demo data set per session (config helpers: ``train_configs``)."""

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from emoqwen_jax.data import demo

    out = tmp_path_factory.mktemp("demo_data")
    demo.build_demo(str(out))
    return out

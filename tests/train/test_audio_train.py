"""Training with audio on the demo set: stage_audio_align trains the audio projector only; stage 3 trains it
with the LLM; the encoder (frozen by default) and Whisper's positions never change."""

import jax
import numpy as np
import pytest
from config_files import load_config
from flax import nnx
from train_configs import write_config

from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model_dir import load_model
from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import init_params, train_and_evaluate

pytestmark = pytest.mark.slow  # trains the audio stages


def _params(path):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(str(path)), nnx.Param)))


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_audio_stages_train_what_they_say(tmp_path, demo_dir):
    config = load_config(write_config(tmp_path / "cfg.py", demo_dir, stages=("stage_audio_align", "stage3_video"),
                                      steps=2, every=10, extra="c.model.audio.enabled = True\n"))
    config.workdir = str(tmp_path / "run")
    train_and_evaluate(config)
    # the trainer's own start (its jitted init may differ from an eager EmotionQwen in the last bit)
    init = jax.tree.map(np.asarray, init_params(ModelConfig.from_run_config(config), config.seed))
    align, s3 = _params(tmp_path / "run/stages/stage_audio_align"), _params(tmp_path / "run/stages/stage3_video")
    assert not _same(align["audio_projector"], init["audio_projector"])
    for part in ("audio_tower", "language_model", "visual", "compressor"):
        assert _same(align[part], init[part]), part
    assert not _same(s3["audio_projector"], align["audio_projector"])  # stage 3 trains the projector too
    assert not _same(s3["language_model"], align["language_model"])
    assert _same(s3["audio_tower"], init["audio_tower"])  # frozen encoder, positions included
    rows = read_metrics(str(tmp_path / "run"))
    assert rows and all(r["data_rejected"] == 0 for r in rows)

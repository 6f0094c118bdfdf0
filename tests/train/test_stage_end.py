"""Every stage ends with a checkpoint of its final step: a restart after it retrains nothing."""

import json

import jax
import numpy as np
import pytest
from config_files import load_config
from flax import nnx
from train_configs import write_config

from emoqwen_jax.model_dir import load_model
from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import train_and_evaluate


def _params(path):
    return jax.tree.leaves(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_model(str(path)), nnx.Param))))


@pytest.mark.slow
def test_restart_after_a_stages_last_step_goes_on_with_the_next_stage(tmp_path, demo_dir):
    first = load_config(write_config(tmp_path / "one.py", demo_dir, stages=("stage1_align",), steps=2, every=100))
    train_and_evaluate(first, str(tmp_path / "run"))
    checkpoints = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    meta = json.loads((tmp_path / "run" / "checkpoints" / str(checkpoints[-1]) / "meta" / "metadata").read_text())
    assert meta == {"stage": "stage1_align", "stage_step": 2, "global_step": 2,  # the final step, not every=100
                    "data_layout": {"num_shards": 1, "process_count": 1, "shard_ids": [[0]]}}
    stage1 = tmp_path / "run" / "stages" / "stage1_align"
    weights = _params(stage1)
    # As if killed after the final checkpoint but before the stage's weights were complete.
    (stage1 / "config.json").unlink()
    both = load_config(write_config(tmp_path / "two.py", demo_dir, stages=("stage1_align", "stage2_emotion"),
                                    steps=2, every=100))
    summary = train_and_evaluate(both, str(tmp_path / "run"))
    steps = [(r["stage"], r["step"]) for r in read_metrics(str(tmp_path / "run"))]
    assert steps == [("stage1_align", 1), ("stage1_align", 2), ("stage2_emotion", 1), ("stage2_emotion", 2)]
    for a, b in zip(_params(stage1), weights, strict=True):  # stage 1's weights rewritten from its final checkpoint
        np.testing.assert_array_equal(a, b)
    assert summary["stages"]["stage2_emotion"]["step"] == 2
    # A third start finds both stages finished and trains nothing.
    again = train_and_evaluate(both, str(tmp_path / "run"))
    assert len(read_metrics(str(tmp_path / "run"))) == 4 and again["stages"] == {}

"""One process, eight devices: every common mesh trains the tiny preset with its defaults (a global batch of 2,
one data shard per process), and a layout that cannot work stops before any compute, naming the setting."""

import numpy as np
import pytest
from config_files import load_config
from train_configs import write_config

from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import train_and_evaluate

TOKEN_ROUTING = """
c.model.compressor.routing = "token"
c.model.compressor.num_experts = 8
c.model.compressor.top_k = 2
"""


def run(tmp_path, demo_dir, name: str, mesh: str, extra: str = "") -> list[dict]:
    """Two steps of stage 1 on ``mesh`` (python assignments to ``c.mesh``); its metrics rows."""
    config = load_config(write_config(tmp_path / f"{name}.py", demo_dir, stages=("stage1_align",), steps=2, every=2,
                                      extra=f"c.mesh.num_devices = 0\n{mesh}\n{extra}"))
    config.workdir = str(tmp_path / name)
    assert config.stages.stage1_align.batch_size == 2 and config.data.num_shards == 0  # the preset's defaults
    train_and_evaluate(config)
    return read_metrics(config.workdir)


def losses(rows):
    return np.array([r["loss"] for r in rows], np.float64)


@pytest.mark.slow
def test_data_parallel_and_expert_parallel_meshes_train_with_the_same_losses(tmp_path, demo_dir):
    data = run(tmp_path, demo_dir, "data8", "c.mesh.data = 8", TOKEN_ROUTING)
    expert = run(tmp_path, demo_dir, "data2_expert4", "c.mesh.data = 2\nc.mesh.expert = 4", TOKEN_ROUTING)
    one = run(tmp_path, demo_dir, "one", "c.mesh.num_devices = 1", TOKEN_ROUTING)
    assert len(losses(data)) == 2 and np.all(np.isfinite(losses(data)))
    # the same arrays (padded to the same 8 batch devices), another split: the same losses at every step
    np.testing.assert_allclose(losses(expert), losses(data), rtol=1e-5)
    # the empty rows that pad the batch of 2 to 8 devices change no loss (one device pads nothing)
    np.testing.assert_allclose(losses(one), losses(data), rtol=1e-5)
    assert [r["grad_norm"] for r in expert] == pytest.approx([r["grad_norm"] for r in data], rel=1e-4)


@pytest.mark.slow
def test_an_fsdp_mesh_trains_the_paper_mode_defaults(tmp_path, demo_dir):
    rows = run(tmp_path, demo_dir, "fsdp8", "c.mesh.data = 1\nc.mesh.fsdp = 8")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)


def test_a_shard_count_that_cannot_split_the_batch_stops_before_any_compute(tmp_path, demo_dir):
    config = load_config(write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=2,
                                      extra="c.mesh.num_devices = 0\nc.mesh.data = 8\nc.data.num_shards = -1"))
    config.workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"data\.num_shards=-1 .*stages\.stage1_align\.batch_size=2"):
        train_and_evaluate(config)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())

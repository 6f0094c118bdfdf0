"""One full RL round on fsdp=2 x data=2 (4 CPU devices) equals the same round on one device: the rollouts,
rewards and metrics, and the updated weights within 1e-5 of their magnitude. A round of a LoRA stage runs and
saves its adapters."""

import os

import jax
import numpy as np
import pytest
from config_files import load_config
from flax import nnx
from rl_configs import write_rl_config
from test_rl_stage import PER_STEP

from emoqwen_jax.model_dir import load_model
from emoqwen_jax.rl.stage import run_rl_stage
from emoqwen_jax.train.metrics import read_metrics
from emoqwen_jax.train.trainer import train_and_evaluate

pytestmark = pytest.mark.slow  # trains RL rounds on 4 devices

# Adam divides by sqrt(v) + eps: with eps = 1e-8 a weight whose gradient is ~1e-8 (a sum that cancels, whose
# last bits depend on the reduction order of the mesh) moves by about +-lr either way. A larger eps keeps the
# update a smooth function of the gradient, so the weights compare as well as the gradients do.
ADAM_EPS = "c.stages.stage4_rl.optimizer.eps = 1e-3\n"


def _run(tmp_path, demo_dir, name, mesh_lines):
    config = load_config(write_rl_config(tmp_path / f"{name}.py", demo_dir, steps=1, extra=mesh_lines + ADAM_EPS))
    workdir = str(tmp_path / name)
    train_and_evaluate(config, workdir, stage_runners={"rl": run_rl_stage})
    params = nnx.to_pure_dict(nnx.state(load_model(os.path.join(workdir, "stages", "stage4_rl")), nnx.Param))
    return read_metrics(workdir)[-1], jax.tree.map(np.asarray, params)


def test_one_round_on_fsdp2_data2_equals_one_device(tmp_path, rl_demo_dir):
    one, one_params = _run(tmp_path, rl_demo_dir, "one", "c.mesh.num_devices = 1\n")
    four, four_params = _run(tmp_path, rl_demo_dir, "four", "c.mesh.num_devices = 4\nc.mesh.fsdp = 2\n"
                                                            "c.mesh.data = 2\n")
    for key in PER_STEP:
        assert abs(four[key] - one[key]) <= 1e-5 * max(abs(one[key]), 1e-6), (key, four[key], one[key])
    assert one["grad_norm"] > 0 and one["reward_std"] > 0
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(one_params))
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(four_params), jax.tree.leaves(one_params),
                                                                  strict=True))
    assert worst <= 1e-5 * scale, worst


def test_an_rl_round_with_lora_runs_and_saves_the_adapters(tmp_path, rl_demo_dir):
    from emoqwen_jax.model_dir import read_model_config

    lora = ("s.lora.enabled = True\ns.lora.rank = 4\ns.lora.dropout = 0.0\ns.trainable = ()\n"
            "s.trainable_roles = ()\nc.mesh.num_devices = 1\n")
    config = load_config(write_rl_config(tmp_path / "lora.py", rl_demo_dir, steps=1, extra=lora))
    workdir = str(tmp_path / "lora")
    summary = train_and_evaluate(config, workdir, stage_runners={"rl": run_rl_stage})
    row = read_metrics(workdir)[-1]
    assert row["grad_norm"] > 0 and row["skipped"] == 0
    _, meta = read_model_config(os.path.join(workdir, "stages", "stage4_rl"))
    assert meta.get("lora"), meta  # the stage saved its adapters, as a supervised LoRA stage does
    assert summary["stages"]["stage4_rl"]["step"] == 1

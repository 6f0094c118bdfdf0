"""The RL stage across processes: 2 jax.distributed CPU processes x 2 devices (fsdp=2 x data=2 over all 4),
started through launch/local_multiprocess.sh, against the same run in ONE process with 4 devices. Each process
samples its own data shard's prompts on its own devices; the metrics of every round (rewards gathered over both
processes) and the final weights agree with the one-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from config_files import ROOT
from flax import nnx
from rl_configs import write_rl_config
from test_rl_sharded import ADAM_EPS
from test_rl_stage import PER_STEP, metric_rows

from emoqwen_jax.checkpoint import load_model

STEPS = 3
MESH = """c.mesh.num_devices = 0
c.mesh.update(data=2, fsdp=2)  # parameters sharded across both processes' devices
c.data.num_shards = 2  # one prompt shard per process (the one-process run reads the same two shards)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final_params(workdir) -> list[np.ndarray]:
    model = load_model(os.path.join(workdir, "stages", "stage4_rl"))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, rl_demo_dir):
    cfg = write_rl_config(tmp_path / "cfg.py", rl_demo_dir, steps=STEPS, extra=MESH + ADAM_EPS)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    two, logs = tmp_path / "two", tmp_path / "logs"
    launched = subprocess.run([str(ROOT / "launch" / "local_multiprocess.sh"), "--num_processes", "2",
                               "--devices_per_process", "2", "--port", str(_free_port()), "--log_dir", str(logs),
                               "--", f"--config={cfg}", f"--config.workdir={two}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert launched.returncode == 0, (logs / "process_1.log").read_text()[-3000:]
    summaries = [json.loads([line for line in (logs / f"process_{i}.log").read_text().splitlines()
                             if line.startswith("{")][-1]) for i in range(2)]
    assert [(s["process_index"], s["process_count"], s["device_count"]) for s in summaries] == [(0, 2, 4), (1, 2, 4)]

    one = tmp_path / "one"
    done = subprocess.run([sys.executable, "-m", "emoqwen_jax.cli.train", f"--config={cfg}", f"--config.workdir={one}",
                           "--config.distributed.local_device_count=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]

    got, want = metric_rows(two), metric_rows(one)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    for g, w in zip(got, want, strict=True):
        for key in PER_STEP:
            assert abs(g[key] - w[key]) <= 1e-5 * max(abs(w[key]), 1e-6), (g["step"], key, g[key], w[key])
    assert all(w["reward_std"] > 0 and w["grad_norm"] > 0 for w in want)  # the rounds had signal and moved
    two_params, one_params = _final_params(two), _final_params(one)
    scale = max(float(np.max(np.abs(x))) for x in one_params)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(two_params, one_params, strict=True)) <= 1e-5 * scale

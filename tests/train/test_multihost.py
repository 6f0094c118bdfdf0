"""Two jax.distributed CPU processes (2 devices each) train like one process with 4 devices on the same
global batch (the same two data shards)."""

import os
import socket
import subprocess
import sys

import pytest

from train_configs import ROOT, write_config
from emoqwen_jax.train.metrics import read_metrics

EXTRA = """
c.stages["stage1_align"].batch_size = 4
c.data.num_shards = 2
c.mesh.num_devices = 0
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(cfg, workdir, devices):
    return [sys.executable, "-m", "emoqwen_jax.cli.train", f"--config={cfg}", f"--config.workdir={workdir}",
            f"--config.distributed.local_device_count={devices}"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, demo_dir):
    cfg = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=3, every=100, extra=EXTRA)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    single = subprocess.run(_cmd(cfg, tmp_path / "one", 4), cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(_cmd(cfg, tmp_path / "two", 2), cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = [r["loss"] for r in read_metrics(str(tmp_path / "one"))]
    two = [r["loss"] for r in read_metrics(str(tmp_path / "two"))]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a), (one, two)

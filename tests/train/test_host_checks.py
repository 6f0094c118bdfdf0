"""Bad multi-host input stops before any compute, with the same clear error on every host."""

import os
import socket
import subprocess
import sys

import pytest
from config_files import ROOT
from train_configs import write_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(per_process_flags, timeout=600):
    """Starts 2 jax.distributed CPU processes with their own extra flags; returns [(returncode, stderr)]."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "emoqwen_jax.cli.train", *flags,
                               "--config.distributed.local_device_count=1"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
             for i, flags in enumerate(per_process_flags)]
    return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]


@pytest.mark.slow
def test_workdir_not_shared_and_init_from_missing_on_one_host(tmp_path, demo_dir):
    cfg = write_config(tmp_path / "cfg.py", demo_dir, stages=("stage1_align",), steps=1,
                       extra="c.mesh.num_devices = 0\nc.data.num_shards = 2")
    # Each host given its own local folder: process 0 cannot see process 1's marker.
    results = two_processes([[f"--config={cfg}", f"--config.workdir={tmp_path / f'host{i}'}"] for i in range(2)])
    for rc, err in results:
        assert rc != 0 and "is not shared across hosts" in err and "processes [1]" in err, err[-2000:]
        assert "stage1_align" not in err  # stopped before any training step
    # init_from present on process 0 only (a per-host local copy that one host lacks).
    (tmp_path / "weights").mkdir()
    results = two_processes([[f"--config={cfg}", f"--config.workdir={tmp_path / 'shared'}",
                              f"--config.init_from={tmp_path / ('weights' if i == 0 else 'missing')}"]
                             for i in range(2)])
    for rc, err in results:
        assert rc != 0 and "does not exist on processes [1]" in err, err[-2000:]

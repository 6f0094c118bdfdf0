"""emoqwen-plan compiles the tiny preset's train step for a few simulated devices and reports memory and FLOPs."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plan_tiny_four_devices():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
           "--num_devices=4", "--config.mesh.fsdp=2", "--frames=4", "--frame_size=112", "--device_memory_gb=1"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}
    assert report["num_devices"] == 4 and report["global_batch"] == 4  # 1 per batch-sharding device (data 2 x fsdp 2)
    assert report["per_device_bytes"] == (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                                          - report["alias_bytes"]) > 0
    assert report["flops_per_step"] > 0 and report["xla_flops_per_device"] > 0
    assert any(line.startswith("headroom of 1 GB") for line in lines)


def test_plan_two_slices_multislice_mesh():
    """--num_slices 2 with mesh.dcn_data=2: the mesh is built per slice (fsdp -1 fills one slice) and the step
    compiles on it."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
           "--num_devices=4", "--num_slices=2", "--config.mesh.dcn_data=2", "--config.mesh.fsdp=-1",
           "--config.mesh.data=1", "--frames=4", "--frame_size=112"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["num_slices"] == 2
    assert report["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1}  # data across slices, fsdp within
    assert report["per_device_bytes"] > 0

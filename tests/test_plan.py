"""emoqwen-plan compiles the tiny preset's train step for a few simulated devices and reports memory and FLOPs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.train import flops
from emoqwen_jax.train.plan import patch_all_gathers, video_batch_shapes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
import emotion_qwen  # noqa: E402

pytestmark = pytest.mark.slow  # compiles plans on simulated meshes

TINY = ModelConfig.from_run_config(emotion_qwen.get_config("tiny"))


def video_batch(mc: ModelConfig, *, rows: int, frames: int, size: int, length: int):
    """Host ``ModelInputs`` of ``rows`` conversations of ``length`` real tokens (no padding), each with one video
    of ``frames`` frames of ``size``² pixels (random pixels and words)."""
    rng = np.random.default_rng(0)
    grid = (frames // mc.vision.temporal_patch_size, size // mc.vision.patch_size, size // mc.vision.patch_size)
    video = [mc.vision_start_token_id, *[mc.video_token_id] * (int(np.prod(grid)) // mc.vision.merge_unit),
             mc.vision_end_token_id]
    ids = np.array([[*rng.integers(0, 900, 5), *video, *rng.integers(0, 900, length - 5 - len(video))]
                    for _ in range(rows)], np.int32)
    pixels = rng.standard_normal((rows * int(np.prod(grid)), mc.vision.patch_dim)).astype(np.float32)
    model = nnx.eval_shape(lambda: EmotionQwen(mc, rngs=nnx.Rngs(0)))
    return model.prepare_inputs(ids, np.ones_like(ids), pixel_values_videos=pixels,
                                video_grid_thw=np.array([grid] * rows), second_per_grid_ts=[1.0] * rows)


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
    assert report["xla_flops_per_device"] > 0
    assert any(line.startswith("headroom of 1 GB") for line in lines)
    # The plan's FLOPs from counts alone equal those of a real batch of that shape (4 rows of 512 real tokens,
    # each with one 4-frame 112-px video), counted from its layout by flops.batch_train_flops (which
    # tests/train/test_flops.py checks against XLA's count).
    want = flops.batch_train_flops(TINY, video_batch(TINY, rows=4, frames=4, size=112, length=report["length"]))
    assert abs(report["flops_per_step"] - want) <= 1e-9 * want, (report["flops_per_step"], want)


def test_plan_with_an_audio_track():
    """--audio_seconds turns audio on: 2.5 s per sample on the tiny encoder's 1 s windows = 3 windows per sample,
    62 audio tokens in the text."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
           "--num_devices=2", "--frames=4", "--frame_size=56", "--audio_seconds=2.5"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["global_batch"] == 2 and report["audio_windows"] == 6
    assert report["per_device_bytes"] > 0 and report["xla_flops_per_device"] > 0


def test_audio_batch_shapes():
    c = emotion_qwen.get_config("7b")
    c.model.audio.enabled = True
    shapes = video_batch_shapes(ModelConfig.from_run_config(c), 2, 16, 448, audio_seconds=30)
    assert shapes.audio.input_features.shape == (2, 128, 3000)  # one 30 s window per sample
    # 16 frames of 448^2: 2048 video tokens; 30 s: 750 audio tokens + bos/eos; + 256, to a multiple of 256
    assert shapes.text.input_ids.shape == (2, 3072) and shapes.audio.token_index.shape == (2, 3072)


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


def test_plan_counts_patch_gathers_and_keeps_the_vit_local():
    """One data shard per batch device (data.num_shards=-1): the ViT runs on each device's own patches and the
    compiled step gathers no vision activations; one shard for 4 batch devices: blockwise full layers gather."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    reports = {}
    for shards in (-1, 0):
        cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
               "--num_devices=4", "--frames=4", "--frame_size=112", "--config.model.attention=blockwise",
               f"--config.data.num_shards={shards}"]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        reports[shards] = json.loads(out.stdout.strip().splitlines()[-1])
    assert reports[-1]["data_shards"] == 4 and reports[-1]["vision_local"] and reports[-1]["patch_all_gathers"] == 0
    assert reports[0]["data_shards"] == 1 and not reports[0]["vision_local"] and reports[0]["patch_all_gathers"] > 0


def test_patch_all_gathers_counts_async_and_tuple_shaped_gathers():
    """Gathers of vision activations (float, a dimension of the global patch or merge-unit count) however XLA
    writes them: synchronous, asynchronous (``all-gather-start``, whose result tuple holds operand and result)
    and tuple-shaped (several operands gathered at once); not int32 index gathers, other sizes, the ``-done``
    half or an instruction that only reads a gather."""
    hlo = "\n".join([
        "  %all-gather.1 = f32[512,32]{1,0} all-gather(f32[128,32]{1,0} %p), channel_id=1, dimensions={0}",
        "  %ags = (bf16[32,16]{1,0}, bf16[128,16]{1,0}) all-gather-start(bf16[32,16]{1,0} %u), dimensions={0}",
        "  %agd = bf16[128,16]{1,0} all-gather-done((bf16[32,16]{1,0}, bf16[128,16]{1,0}) %ags)",
        "  all-gather.3 = (f32[2,512]{1,0}, f32[512]{0}) all-gather(f32[2,128]{1,0} %a, f32[128]{0} %b), "
        "dimensions={1,0}",
        "  %all-gather.4 = s32[512]{0} all-gather(s32[128]{0} %index), dimensions={0}",
        "  %all-gather.5 = f32[64,32]{1,0} all-gather(f32[16,32]{1,0} %w), dimensions={0}",
        "  %fusion = f32[512,32]{1,0} fusion(f32[512,32]{1,0} %all-gather.1), kind=kLoop",
    ])
    assert patch_all_gathers(hlo, 512, 128) == 3
    assert patch_all_gathers(hlo, 0, 0) == 0  # no vision input


def test_serve_plan_tiny():
    """--serve: weights and KV cache bytes are the arrays' sizes (bfloat16: 2 bytes), activations come from the
    compiled decode step and prefill; two devices split the KV heads."""
    sys.path.insert(0, str(ROOT / "configs"))
    import emotion_qwen

    from emoqwen_jax.model import ModelConfig

    text = ModelConfig.from_run_config(emotion_qwen.get_config("tiny")).text
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    reports = []
    for devices in ([], ["--num_devices=2"]):
        cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
               "--serve", "--max_batch=4", "--max_len=512", "--frames=4", "--frame_size=112", *devices]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert any(line.startswith("fits 80 GB with 10% to spare") and "yes" in line for line in lines)
        reports.append(json.loads(lines[-1]))
    one, two = reports
    kv = text.num_layers * 2 * 4 * 512 * text.num_kv_heads * text.head_dim * 2
    assert one["kv_cache_bytes"] == kv and two["kv_cache_bytes"] == kv // 2
    assert one["weight_bytes"] == 2 * one["model_params"] and two["weight_bytes"] < one["weight_bytes"]
    assert one["per_device_bytes"] == one["weight_bytes"] + kv + one["activation_bytes"]
    assert one["decode_activation_bytes"] > 0 and one["prefill_activation_bytes"] > 0 and one["fits"]


def test_plan_shards_by_the_configs_mesh_rules():
    """config.mesh.rules is what shards the parameters: with FSDP over 2 devices the default rules put half of
    every parameter byte on a device; rules that name only the batch axes leave every parameter whole on each."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    batch_only = "--config.mesh.rules=(('batch', ('data', 'fsdp', 'expert')), ('units', ('data', 'fsdp', 'expert')))"
    reports = []
    for rules in ([], [batch_only]):
        cmd = [sys.executable, "-m", "emoqwen_jax.cli.plan", f"--config={ROOT}/configs/emotion_qwen.py:tiny",
               "--num_devices=2", "--config.mesh.fsdp=2", "--config.mesh.data=1", "--frames=4", "--frame_size=56",
               *rules]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        reports.append(json.loads(out.stdout.strip().splitlines()[-1]))
    sharded, whole = reports
    param_bytes = 4 * sharded["params"]  # float32 master weights
    assert whole["param_bytes_per_device"] == param_bytes
    assert sharded["param_bytes_per_device"] < 0.51 * param_bytes
    assert sharded["trainable_params"] == whole["trainable_params"] > 0

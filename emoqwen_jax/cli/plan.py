r"""emoqwen-plan: compile a stage's full train step ahead of time for N (simulated) devices, without weights,
and print its per-device memory and FLOPs.

  emoqwen-plan --config=configs/emotion_qwen.py:7b --num_devices 64 --length 8192 --frames 16 --frame_size 448
  emoqwen-plan --config=configs/emotion_qwen.py:tiny --num_devices=4 --batch_per_device=1 --frames=4 --frame_size=112
  emoqwen-plan --config=configs/emotion_qwen.py:7b --num_devices=8 --audio_seconds=30 --device_memory_gb=80
  emoqwen-plan --config=configs/emotion_qwen.py:tiny --num_devices=8 --num_slices=2 --config.mesh.dcn_data=2 \
      --config.mesh.fsdp=-1 --config.mesh.data=1 --frames=4 --frame_size=112
  emoqwen-plan --config=configs/emotion_qwen.py:7b --serve --max_batch 32 --max_len 8192
  emoqwen-plan --config=configs/emotion_qwen.py:7b --stage stage4_rl --num_devices 64 --device_memory_gb 80

``--stage stage4_rl`` (a stage of kind 'rl') plans the RL stage instead (``rl.plan.rl_plan``): policy, optimiser
state, reference and the rollouts' KV cache per device, from abstract shapes.

``--serve`` plans the generation engine instead (``train.plan.serve_plan``): weights, KV cache and
activation bytes per device, and whether they fit ``--device_memory_gb`` (default 80) with 10 % to spare.

The step is the trainer's (``make_train_step``: loss, gradients, AdamW with the stage's frozen leaves,
non-finite skipping), lowered on abstract arrays (``jax.ShapeDtypeStruct`` with the trainer's shardings) over a
mesh of ``num_devices`` CPU devices (``jax_num_cpu_devices``, set before the backend starts), then compiled by
XLA's SPMD partitioner. Nothing is allocated: the figures come from ``compiled.memory_analysis()`` (one
device's partition) and ``compiled.cost_analysis()``. The CPU compiler's buffer assignment stands in for the
accelerator's; treat the result as an estimate to keep ≥ 40 % headroom against.

The batch: ``batch_per_device`` × (batch-sharding devices) samples, each one video of ``frames`` frames of
``frame_size``² pixels (grid frames/2 × side/14 × side/14) in a conversation padded to ``length`` tokens.
Prints a table and, last, a JSON line with ``per_device_bytes`` (arguments + outputs + temporaries − donated
aliases), ``flops_per_step`` and the mesh.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from emoqwen_jax.train.plan import (  # noqa: F401
    build_train_step,
    format_serve_table,
    format_table,
    plan,
    serve_plan,
    video_batch_shapes,
)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/emotion_qwen.py:tiny", "Run config (file:preset).")
_DEVICES = flags.DEFINE_integer("num_devices", 8, "Simulated devices (the mesh spans all of them).")
_STAGE = flags.DEFINE_string("stage", "stage3_video", "Stage whose trainable set and optimiser are compiled.")
_PER_DEVICE = flags.DEFINE_integer("batch_per_device", 1, "Samples per batch-sharding device (data*fsdp*expert).")
_FRAMES = flags.DEFINE_integer("frames", 16, "Video frames per sample (even: temporal patch 2).")
_SIZE = flags.DEFINE_integer("frame_size", 448, "Frame side in pixels (multiple of 28).")
_LENGTH = flags.DEFINE_integer("length", 0, "Text length per sample (0: the video's tokens + 256, to a multiple "
                               "of 256).")
_FRAME_BLOCK = flags.DEFINE_integer("frame_block", -1, "Sets model.vision.frame_block (the ViT full layers' block "
                                    "for blockwise attention; -1 = leave the config's value, 0 = attention_block).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Simulated slices the devices form (multislice; set "
                               "--config.mesh.dcn_data or --config.mesh.dcn_fsdp so their product matches).")
_MEMORY = flags.DEFINE_float("device_memory_gb", 0.0, "If set, print the headroom against this per-device memory.")
_SERVE = flags.DEFINE_bool("serve", False, "Plan the generation engine instead of a train step: weights, KV cache "
                           "and activations per device in --dtype (one device unless --num_devices is given).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 32, "--serve: decode slots.")
_MAX_LEN = flags.DEFINE_integer("max_len", 8192, "--serve: tokens per slot (prompt + generation).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "--serve: weight and compute dtype.")
_AUDIO = flags.DEFINE_float("audio_seconds", 0.0, "Seconds of each sample's audio track (> 0 turns "
                            "model.audio on: encoder windows and 25 audio tokens per second join the batch).")


def main_(argv) -> None:
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before the backend starts
    config = _CONFIG.value
    if _SERVE.value:
        devices = _DEVICES.value if flags.FLAGS["num_devices"].present else 1
        jax.config.update("jax_num_cpu_devices", devices)
        report = serve_plan(config, max_batch=_MAX_BATCH.value, max_len=_MAX_LEN.value, num_devices=devices,
                            dtype=_DTYPE.value, frames=_FRAMES.value, frame_size=_SIZE.value, length=_LENGTH.value,
                            device_memory_gb=_MEMORY.value or 80.0)
        print(format_serve_table(report))
        print(json.dumps(report))
        return
    if config.stages[_STAGE.value].get("kind") == "rl":  # per-device parts of an RL stage (emoqwen_jax.rl.plan)
        from emoqwen_jax.rl.plan import format_rl_table, rl_plan  # noqa: PLC0415

        report = rl_plan(config, num_devices=_DEVICES.value, stage=_STAGE.value, device_memory_gb=_MEMORY.value)
        print(format_rl_table(report))
        print(json.dumps(report))
        return
    if _FRAME_BLOCK.value >= 0:
        with config.unlocked():  # the preset may not list the key yet
            config.model.vision.frame_block = _FRAME_BLOCK.value
    if _AUDIO.value > 0:
        config.model.audio.enabled = True
    report = plan(config, num_devices=_DEVICES.value, stage=_STAGE.value, batch_per_device=_PER_DEVICE.value,
                  frames=_FRAMES.value, frame_size=_SIZE.value, length=_LENGTH.value, audio_seconds=_AUDIO.value,
                  num_slices=_SLICES.value)
    print(format_table(report, _MEMORY.value))
    print(json.dumps(report))


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main_, argv=sys.argv)


if __name__ == "__main__":
    main()

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

The step is the trainer's (``train.step.build_stage_step``: loss, gradients, AdamW with the stage's frozen
leaves and its LoRA adapters, non-finite skipping), lowered on abstract arrays (``jax.ShapeDtypeStruct`` with the
trainer's shardings) over a mesh of ``num_devices`` CPU devices (``jax_num_cpu_devices``, set before the backend
starts), then compiled by XLA's SPMD partitioner. Nothing is allocated: the figures come from
``compiled.memory_analysis()`` (one device's partition) and ``compiled.cost_analysis()``. The CPU compiler's
buffer assignment stands in for the accelerator's; treat the result as an estimate to keep ≥ 40 % headroom
against.

The batch: ``batch_per_device`` × (batch-sharding devices) samples, each one video of ``frames`` frames of
``frame_size``² pixels (grid frames/2 × side/14 × side/14) in a conversation padded to ``length`` tokens.
Prints a table and, last, a JSON line with ``per_device_bytes`` (arguments + outputs + temporaries − donated
aliases), ``flops_per_step`` and the mesh.
"""

from __future__ import annotations

import argparse
import json
import os

from emoqwen_jax.cli.args import add_config_arg, parse_config_args
from emoqwen_jax.runtime.commands import command_parser


def build_parser():
    parser = command_parser(__doc__)
    add_config_arg(parser, "configs/emotion_qwen.py:tiny")
    arg = parser.add_argument
    arg("--num_devices", type=int, default=None,
        help="simulated devices; the mesh spans all of them (default 8; --serve: 1)")
    arg("--stage", default="stage3_video", help="stage whose trainable set and optimiser are compiled")
    arg("--batch_per_device", type=int, default=1, help="samples per batch-sharding device (data*fsdp*expert)")
    arg("--frames", type=int, default=16, help="video frames per sample (even: temporal patch 2)")
    arg("--frame_size", type=int, default=448, help="frame side in pixels (multiple of 28)")
    arg("--length", type=int, default=0, help="text length per sample (0: the video's tokens + 256, to a multiple "
                                              "of 256)")
    arg("--frame_block", type=int, default=-1, help="sets model.vision.frame_block (the ViT full layers' block for "
                                                    "blockwise attention; -1 = leave the config's value, "
                                                    "0 = attention_block)")
    arg("--num_slices", type=int, default=1, help="simulated slices the devices form (multislice; set "
                                                  "--config.mesh.dcn_data or --config.mesh.dcn_fsdp so their "
                                                  "product matches)")
    arg("--device_memory_gb", type=float, default=0.0,
        help="if set, print the headroom against this per-device memory")
    arg("--serve", action=argparse.BooleanOptionalAction, default=False,
        help="plan the generation engine instead of a train step: weights, KV cache and activations per device "
             "in --dtype (one device unless --num_devices is given)")
    arg("--max_batch", type=int, default=32, help="--serve: decode slots")
    arg("--max_len", type=int, default=8192, help="--serve: tokens per slot (prompt + generation)")
    arg("--dtype", default="bfloat16", help="--serve: weight and compute dtype")
    arg("--audio_seconds", type=float, default=0.0, help="seconds of each sample's audio track (> 0 turns "
                                                         "model.audio on: encoder windows and 25 audio tokens per "
                                                         "second join the batch)")
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = parse_config_args(build_parser(), argv)
    import jax

    from emoqwen_jax.train.plan import format_serve_table, format_table, plan, serve_plan

    devices = args.num_devices if args.num_devices is not None else (1 if args.serve else 8)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)  # before the backend starts
    config = args.config
    if args.serve:
        report = serve_plan(config, max_batch=args.max_batch, max_len=args.max_len, num_devices=devices,
                            dtype=args.dtype, frames=args.frames, frame_size=args.frame_size, length=args.length,
                            device_memory_gb=args.device_memory_gb or 80.0)
        print(format_serve_table(report))
        print(json.dumps(report))
        return
    if config.stages[args.stage].get("kind") == "rl":  # per-device parts of an RL stage (emoqwen_jax.rl.plan)
        from emoqwen_jax.rl.plan import format_rl_table, rl_plan  # noqa: PLC0415

        report = rl_plan(config, num_devices=devices, stage=args.stage, device_memory_gb=args.device_memory_gb or 0.0)
        print(format_rl_table(report))
        print(json.dumps(report))
        return
    if args.frame_block >= 0:
        with config.unlocked():  # the preset may not list the key yet
            config.model.vision.frame_block = args.frame_block
    if args.audio_seconds > 0:
        config.model.audio.enabled = True
    report = plan(config, num_devices=devices, stage=args.stage, batch_per_device=args.batch_per_device,
                  frames=args.frames, frame_size=args.frame_size, length=args.length,
                  audio_seconds=args.audio_seconds, num_slices=args.num_slices)
    print(format_table(report, args.device_memory_gb))
    print(json.dumps(report))


if __name__ == "__main__":
    main()

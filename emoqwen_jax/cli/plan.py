r"""emoqwen-plan: compile a stage's full train step ahead of time for N (simulated) devices, without weights,
and print its per-device memory and FLOPs.

  emoqwen-plan --config=configs/emotion_qwen.py:7b --num_devices=256 --config.mesh.fsdp=-1 --config.mesh.data=1 \
      --frame_block=1024 --device_memory_gb=95
  emoqwen-plan --config=configs/emotion_qwen.py:tiny --num_devices=4 --batch_per_device=1 --frames=4 --frame_size=112

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
import time
from typing import Any, Sequence

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/emotion_qwen.py:tiny", "Run config (file:preset).")
_DEVICES = flags.DEFINE_integer("num_devices", 8, "Simulated devices (the mesh spans all of them).")
_STAGE = flags.DEFINE_string("stage", "stage3_video", "Stage whose trainable set and optimiser are compiled.")
_PER_DEVICE = flags.DEFINE_integer("batch_per_device", 1, "Samples per batch-sharding device (data*fsdp*expert).")
_FRAMES = flags.DEFINE_integer("frames", 16, "Video frames per sample (even: temporal patch 2).")
_SIZE = flags.DEFINE_integer("frame_size", 448, "Frame side in pixels (multiple of 28).")
_LENGTH = flags.DEFINE_integer("length", 0, "Text length per sample (0: the video's tokens + 256, to a multiple of 256).")
_FRAME_BLOCK = flags.DEFINE_integer("frame_block", -1, "Sets model.vision.frame_block (the ViT full layers' block "
                                    "for blockwise attention; -1 = leave the config's value, 0 = attention_block).")
_MEMORY = flags.DEFINE_float("device_memory_gb", 0.0, "If set, print the headroom against this per-device memory.")


def build_train_step(config, stage: str, trainable: Sequence[str] | None = None):
    """(model config, pure ``train_step(state, batch)``, optax transform, ``init(params) -> state``) for a stage,
    exactly as the trainer builds them (``trainable`` overrides the stage's regexes)."""
    import jax
    from flax import nnx

    from emoqwen_jax.cli.common import model_config
    from emoqwen_jax.model import EmotionQwen
    from emoqwen_jax.train.optim import make_optimizer, to_opt_view, trainable_labels
    from emoqwen_jax.train.step import init_state, make_train_step

    mcfg = model_config(config)
    sc = config.stages[stage]
    abstract = nnx.eval_shape(lambda: EmotionQwen(mcfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    names = mcfg.expert_names
    view = jax.eval_shape(lambda p: to_opt_view(p, names), params)
    labels = trainable_labels(view, tuple(trainable) if trainable is not None else tuple(sc.trainable))
    tx, schedule = make_optimizer(sc.optimizer, sc.num_steps, labels)
    step = make_train_step(nnx.graphdef(abstract), tx, labels, names, schedule, int(sc.optimizer.get("grad_accum", 1)))
    return mcfg, step, tx, lambda p: init_state(p, tx, names, config.seed)


def video_batch_shapes(mcfg, batch: int, frames: int, size: int, length: int = 0) -> dict[str, Any]:
    """ShapeDtypeStructs (no sharding) of the model inputs + labels for ``batch`` one-video samples."""
    import jax
    import numpy as np

    v = mcfg.vision
    if frames % v.temporal_patch_size or size % (v.patch_size * v.spatial_merge_size):
        raise ValueError(f"frames={frames} must be a multiple of {v.temporal_patch_size} and frame_size={size} of "
                         f"{v.patch_size * v.spatial_merge_size}")
    side = size // v.patch_size
    patches = frames // v.temporal_patch_size * side * side
    tokens = patches // v.merge_unit
    length = length or -(-(tokens + 256) // 256) * 256
    if length < tokens + 2:
        raise ValueError(f"length={length} cannot hold the video's {tokens} tokens")
    p = batch * patches
    s = lambda shape, dtype=np.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    return {"input_ids": s((batch, length)), "attention_mask": s((batch, length)), "labels": s((batch, length)),
            "position_ids": s((3, batch, length)), "rope_deltas": s((batch,)),
            "visual_token_index": s((batch, length)), "pixel_values": s((p, v.patch_dim), np.float32),
            "vision_pos_hw": s((p, 2)), "vision_window_index": s((p // v.merge_unit,)),
            "vision_frame_segment": s((p,)), "vision_window_segment": s((p,)), "vision_patch_item": s((p,)),
            "vision_item_valid": s((batch,), np.bool_)}


def _sharded(shapes: dict, mesh) -> dict:
    import jax

    from emoqwen_jax.parallel.rules import _BATCH_DIM, batch_sharding
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for k, x in shapes.items():
        dim = _BATCH_DIM.get(k, 0)
        sh = NamedSharding(mesh, PartitionSpec()) if dim is None else batch_sharding(mesh, len(x.shape), dim)
        out[k] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
    return out


def plan(config, *, num_devices: int, stage: str = "stage3_video", batch: dict | None = None,
         batch_per_device: int = 1, frames: int = 16, frame_size: int = 448, length: int = 0) -> dict[str, Any]:
    """Lowers and compiles the stage's train step for a mesh over the first ``num_devices`` devices; returns
    the report (also the JSON line of the CLI). ``batch``: host arrays to take shapes from instead of a video."""
    import jax
    import numpy as np
    from flax import nnx

    from emoqwen_jax.model import EmotionQwen
    from emoqwen_jax.model.sharding import axis_rules
    from emoqwen_jax.parallel import DEFAULT_RULES, check_divisibility, make_mesh, pure_param_shardings
    from emoqwen_jax.parallel.rules import BATCH_AXES
    from emoqwen_jax.train import flops
    from emoqwen_jax.train import step as step_lib

    devices = jax.devices()
    if len(devices) < num_devices:
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist; set "
                         f"jax_num_cpu_devices before JAX starts (the CLI does)")
    mesh_cfg = dict(config.mesh)
    mesh_cfg["num_devices"] = num_devices
    mesh = make_mesh(mesh_cfg, devices[:num_devices])
    mcfg, step, tx, init = build_train_step(config, stage)
    batch_shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if batch is None:
        shapes = video_batch_shapes(mcfg, batch_per_device * batch_shards, frames, frame_size, length)
    else:
        shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    check_divisibility(mcfg, mesh, shapes["input_ids"].shape[0])
    abstract = nnx.eval_shape(lambda: EmotionQwen(mcfg, rngs=nnx.Rngs(0)))
    pshard = pure_param_shardings(abstract, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), pshard)
    timings = {}
    t0 = time.perf_counter()
    with axis_rules(mesh, DEFAULT_RULES):
        state_shapes = jax.eval_shape(init, params)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                             step_lib.state_shardings(state_shapes, pshard, mcfg.expert_names, mesh))
        batch_abs = _sharded(shapes, mesh)
        lowered = jax.jit(step, donate_argnums=0).lower(state, batch_abs)
        timings["lower_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        compiled = lowered.compile()
        timings["compile_s"] = time.perf_counter() - t1
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    b, length_ = shapes["input_ids"].shape
    analytic = flops.train_flops(mcfg, tokens=b * length_, patches=shapes["pixel_values"].shape[0],
                                 frame_tokens=(frame_size // mcfg.vision.patch_size) ** 2 if batch is None else None,
                                 sequences=b, items=shapes["vision_item_valid"].shape[0])
    return {
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "num_devices": num_devices, "stage": stage,
        "remat": mcfg.remat, "scan_layers": mcfg.scan_layers, "attention": mcfg.attention, "dtype": mcfg.dtype, "params": n_params, "global_batch": int(b), "length": int(length_),
        "patches": int(shapes["pixel_values"].shape[0]),
        "argument_bytes": args_b, "output_bytes": out_b, "temp_bytes": temp_b, "alias_bytes": alias_b,
        "per_device_bytes": args_b + out_b + temp_b - alias_b,
        "xla_flops_per_device": float(cost.get("flops", 0.0)),
        "flops_per_step": analytic,
        **{k: round(v, 1) for k, v in timings.items()},
    }


def format_table(report: dict, device_memory_gb: float = 0.0) -> str:
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    rows = [("mesh", " × ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("stage / remat / dtype", f"{report['stage']} / {report['remat']} / {report['dtype']}"),
            ("attention / scan_layers", f"{report.get('attention')} / {report.get('scan_layers')}"),
            ("parameters", f"{report['params'] / 1e6:,.1f} M"),
            ("global batch × length", f"{report['global_batch']} × {report['length']} (patches {report['patches']})"),
            ("arguments (params + opt state + batch)", gib(report["argument_bytes"])),
            ("outputs", gib(report["output_bytes"])), ("temporaries", gib(report["temp_bytes"])),
            ("donated (aliased)", gib(report["alias_bytes"])),
            ("per device", gib(report["per_device_bytes"])),
            ("analytic train FLOPs per step", f"{report['flops_per_step']:.3e}"),
            ("XLA FLOPs per device", f"{report['xla_flops_per_device']:.3e}"),
            ("lower / compile", f"{report['lower_s']} s / {report['compile_s']} s")]
    if device_memory_gb:
        used = report["per_device_bytes"] / 1e9
        rows.append((f"headroom of {device_memory_gb:g} GB", f"{100 * (1 - used / device_memory_gb):.1f} %"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main_(argv) -> None:
    del argv
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)  # before the backend starts
    config = _CONFIG.value
    if _FRAME_BLOCK.value >= 0:
        with config.unlocked():  # the preset may not list the key yet
            config.model.vision.frame_block = _FRAME_BLOCK.value
    report = plan(config, num_devices=_DEVICES.value, stage=_STAGE.value, batch_per_device=_PER_DEVICE.value,
                  frames=_FRAMES.value, frame_size=_SIZE.value, length=_LENGTH.value)
    print(format_table(report, _MEMORY.value))
    print(json.dumps(report))


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main_, argv=sys.argv)


if __name__ == "__main__":
    main()

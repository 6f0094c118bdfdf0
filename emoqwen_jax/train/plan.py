"""Ahead-of-time plan of a stage's train step: compile it for N devices on abstract arrays, without weights,
and report its per-device memory and FLOPs (``emoqwen-plan`` is the command line over ``plan``).

The step is the trainer's (``train.step.build_stage_step``: loss, gradients, AdamW with the stage's frozen
leaves and its LoRA adapters, non-finite skipping), lowered on abstract arrays (``jax.ShapeDtypeStruct`` with the
trainer's shardings) over a mesh of ``num_devices`` devices, then compiled by XLA's SPMD partitioner. Nothing is
allocated: the figures come from ``compiled.memory_analysis()`` (one device's partition) and
``compiled.cost_analysis()``. The CPU compiler's buffer assignment stands in for the accelerator's; treat the
result as an estimate to keep ≥ 40 % headroom against.

The batch: ``batch_per_device`` × (batch-sharding devices) samples, each one video of ``frames`` frames of
``frame_size``² pixels (grid frames/2 × side/14 × side/14) in a conversation padded to ``length`` tokens, and
with ``audio_seconds`` its audio track (encoder windows, 25 tokens per second); its abstract shapes and
shardings come from the ``ModelInputs`` field declarations. The analytic FLOPs leave the audio encoder out.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from emoqwen_jax.inputs import ModelInputs, abstract_inputs
from emoqwen_jax.model import EmotionQwen, ModelConfig
from emoqwen_jax.model.sharding import axis_rules
from emoqwen_jax.parallel import DEFAULT_RULES, check_divisibility, make_mesh, pure_param_shardings
from emoqwen_jax.parallel.rules import batch_devices, input_sharding
from emoqwen_jax.train import batching, flops
from emoqwen_jax.train import step as step_lib
from emoqwen_jax.train.step import build_stage_step, with_stage_adapters


def build_train_step(config, stage: str, trainable: Sequence[str] | None = None):
    """(model config, the stage's abstract model, its ``StageStep``): the step the trainer runs for ``stage``
    (``train.step.build_stage_step``, on the model with the stage's LoRA adapters swapped in when it has them);
    ``trainable`` regexes replace the stage's regexes and roles."""
    mcfg = ModelConfig.from_run_config(config)
    abstract = nnx.eval_shape(lambda: with_stage_adapters(EmotionQwen(mcfg, rngs=nnx.Rngs(0)), config, stage))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    built = build_stage_step(config, stage, nnx.graphdef(abstract), params, mcfg,
                             trainable=None if trainable is None else tuple(trainable))
    return mcfg, abstract, built


def video_batch_shapes(mcfg: ModelConfig, batch: int, frames: int, size: int, length: int = 0,
                       audio_seconds: float = 0.0, *, packing: bool = False) -> ModelInputs:
    """``ModelInputs`` of ShapeDtypeStructs (no sharding), labels included, for ``batch`` one-video samples of
    ``frames`` frames of ``size``² pixels in a conversation of ``length`` tokens (0: the video's + 256, rounded
    up to a multiple of 256). Shapes come from the fields' declarations (``inputs.abstract_inputs``).
    ``audio_seconds`` > 0 adds each sample's audio track: ceil(seconds / window) encoder windows and 25 tokens
    per second in the text (the model needs ``audio.enabled``); ``packing`` adds the packed rows'
    ``segment_ids`` (``config.data.packing``)."""
    v = mcfg.vision
    if frames % v.temporal_patch_size or size % (v.patch_size * v.spatial_merge_size):
        raise ValueError(f"frames={frames} must be a multiple of {v.temporal_patch_size} and frame_size={size} of "
                         f"{v.patch_size * v.spatial_merge_size}")
    side = size // v.patch_size
    patches = frames // v.temporal_patch_size * side * side
    tokens = patches // v.merge_unit
    windows = audio_tokens = 0
    if audio_seconds > 0:
        a = mcfg.audio
        if not a.enabled:
            raise ValueError("audio_seconds > 0 needs config.model.audio.enabled=True")
        frames_100hz = int(round(audio_seconds * 100))  # 10 ms mel frames
        windows = -(-frames_100hz // a.max_frames)
        last = frames_100hz - (windows - 1) * a.max_frames
        audio_tokens = (windows - 1) * (a.max_frames // 4) + ((last - 1) // 2 + 1 - 2) // 2 + 1
        tokens += audio_tokens + 2  # <|audio_bos|> ... <|audio_eos|>
    length = length or -(-(tokens + 256) // 256) * 256
    if length < tokens + 2:
        raise ValueError(f"length={length} cannot hold the sample's {tokens} video and audio tokens")
    p = batch * patches
    sizes = {"B": batch, "L": length, "P": p, "U": p // v.merge_unit, "G": batch, "patch_dim": v.patch_dim}
    optional = ("labels", "rope_deltas") + (("segment_ids",) if packing else ())
    if not windows:
        return abstract_inputs(sizes, optional=optional)
    sizes.update(W=batch * windows, F=mcfg.audio.max_frames, num_mel_bins=mcfg.audio.num_mel_bins)
    return abstract_inputs(sizes, groups=("text", "vision", "audio"), optional=optional)


def sharded_shapes(shapes: ModelInputs, mesh) -> ModelInputs:
    """``shapes`` with each field's batch sharding attached (``parallel.rules.input_sharding``)."""
    return shapes.map_fields(lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                  sharding=input_sharding(spec, len(x.shape), mesh)))


def plan(config, *, num_devices: int, stage: str = "stage3_video", batch: dict | None = None,
         batch_per_device: int = 1, frames: int = 16, frame_size: int = 448, length: int = 0,
         audio_seconds: float = 0.0, num_slices: int = 1) -> dict[str, Any]:
    """Lowers and compiles the stage's train step for a mesh over the first ``num_devices`` devices; returns
    the report (also the JSON line of the CLI). ``batch``: host ``ModelInputs`` (labels included)
    to take shapes from instead of a video. ``num_slices``: the devices stand for that many slices
    (multislice: ``mesh.dcn_data`` / ``mesh.dcn_fsdp`` split data / FSDP across them)."""
    devices = jax.devices()
    if len(devices) < num_devices:
        raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist; set "
                         f"jax_num_cpu_devices before JAX starts (the CLI does)")
    mesh_cfg = dict(config.mesh)
    mesh_cfg["num_devices"] = num_devices
    mesh = make_mesh(mesh_cfg, devices[:num_devices], num_slices=num_slices)
    mcfg, abstract, built = build_train_step(config, stage)
    rules = tuple(config.mesh.rules)
    batch_shards = batch_devices(mesh)
    if batch is None:
        shapes = video_batch_shapes(mcfg, batch_per_device * batch_shards, frames, frame_size, length,
                                    audio_seconds, packing=bool(config.data.packing))
    else:
        shapes = batch.map_fields(
            lambda _, v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype))
    check_divisibility(mcfg, mesh, shapes.text.input_ids.shape[0])
    pshard = pure_param_shardings(abstract, mesh, rules)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), pshard)
    # The trainer's layout: data.num_shards (0: one per process; a plan runs in one) shards in device order.
    num_shards = batching.resolve_num_shards(int(config.data.num_shards), 1, batch_shards)
    local_vision = batching.units_local(num_shards, batch_shards)
    timings = {}
    t0 = time.perf_counter()
    with axis_rules(mesh, rules, units_local=local_vision):
        state_shapes = jax.eval_shape(built.init, params)
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes,
                             step_lib.state_shardings(state_shapes, pshard, mesh))
        batch_abs = sharded_shapes(shapes, mesh)
        lowered = jax.jit(built.train_step, donate_argnums=0).lower(state, batch_abs)
        timings["lower_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        compiled = lowered.compile()
        timings["compile_s"] = time.perf_counter() - t1
    patches_global = 0 if shapes.vision is None else int(shapes.vision.pixel_values.shape[0])
    gathers = patch_all_gathers(compiled.as_text(), patches_global, patches_global // mcfg.vision.merge_unit)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    b, length_ = shapes.text.input_ids.shape
    patches = 0 if shapes.vision is None else shapes.vision.pixel_values.shape[0]
    items = 0 if shapes.vision is None else shapes.vision.item_valid.shape[0]
    analytic = flops.train_flops(mcfg, tokens=b * length_, patches=patches,
                                 frame_tokens=(frame_size // mcfg.vision.patch_size) ** 2 if batch is None else None,
                                 sequences=b, items=items)
    return {
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "num_devices": num_devices, "num_slices": num_slices,
        "stage": stage, "remat": mcfg.remat, "scan_layers": mcfg.scan_layers, "attention": mcfg.attention,
        "data_shards": num_shards, "vision_local": local_vision, "patch_all_gathers": gathers,
        "dtype": mcfg.dtype, "params": n_params, "trainable_params": built.trainable.count(params),
        "global_batch": int(b), "length": int(length_),
        "patches": int(patches),
        "audio_windows": 0 if shapes.audio is None else int(shapes.audio.input_features.shape[0]),
        "argument_bytes": args_b, "output_bytes": out_b, "temp_bytes": temp_b, "alias_bytes": alias_b,
        "per_device_bytes": args_b + out_b + temp_b - alias_b,
        # one device's shards of the parameters and of the optimiser state (Adam moments follow their parameter)
        "param_bytes_per_device": shard_bytes(state.params),
        "optimizer_bytes_per_device": shard_bytes(state.opt_state),
        "xla_flops_per_device": float(cost.get("flops", 0.0)),
        "flops_per_step": analytic,
        **{k: round(v, 1) for k, v in timings.items()},
    }


def patch_all_gathers(hlo: str, patches: int, units: int) -> int:
    """All-gathers in compiled HLO text that gather vision activations: float results with a dimension of the
    global patch count or merge-unit count (0 when the ViT stays on each device's own patches; the inverse
    window permutation's small int32 index gathers are not counted)."""
    if patches <= 0:
        return 0
    sizes = {str(patches), str(units)}
    count = 0
    for line in hlo.splitlines():
        if " all-gather(" not in line and " all-gather-start(" not in line:
            continue
        result = line.split("=", 1)[1].split(" all-gather", 1)[0] if "=" in line else ""
        float_shapes = re.findall(r"(?:f|bf)\d+\[([\d,]*)\]", result)
        count += any(set(dims.split(",")) & sizes for dims in float_shapes)
    return count


def shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf of ``tree`` (ShapeDtypeStructs with shardings)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def format_table(report: dict, device_memory_gb: float = 0.0) -> str:
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    rows = [("mesh", " × ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("stage / remat / dtype", f"{report['stage']} / {report['remat']} / {report['dtype']}"),
            ("attention / scan_layers", f"{report.get('attention')} / {report.get('scan_layers')}"),
            ("data shards / ViT per device", f"{report.get('data_shards')} / {report.get('vision_local')} "
                                             f"({report.get('patch_all_gathers')} all-gathers of patch activations)"),
            ("parameters (trained)", f"{report['params'] / 1e6:,.1f} M ({report['trainable_params'] / 1e6:,.3f} M)"),
            ("global batch × length", f"{report['global_batch']} × {report['length']} (patches {report['patches']}, "
                                      f"audio windows {report.get('audio_windows', 0)})"),
            ("arguments (params + opt state + batch)", gib(report["argument_bytes"])),
            ("  parameters / optimiser state shards", f"{gib(report['param_bytes_per_device'])} / "
                                                     f"{gib(report['optimizer_bytes_per_device'])}"),
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


SERVE_HEADROOM = 0.10  # a serving plan fits when weights + KV cache + activations leave this share free


def serve_plan(config, *, max_batch: int, max_len: int, num_devices: int = 1, dtype: str = "bfloat16",
               frames: int = 16, frame_size: int = 448, length: int = 0,
               device_memory_gb: float = 80.0) -> dict[str, Any]:
    """Per-device memory of the generation engine (``emoqwen_jax.infer.engine``) for ``config``'s model with
    weights and KV cache in ``dtype``, on abstract shapes only (nothing is allocated): the weights, the KV cache
    of ``max_batch`` slots of ``max_len`` tokens, and the activations (temporaries) of the larger of the engine's
    two compiled programs, the decode step and the prefill of one prompt (one video of ``frames`` ×
    ``frame_size``² in ``length`` tokens; 0: ``max_len``, the longest prompt a slot takes), over a mesh of
    tensor=``num_devices`` (weights by the logical rules, KV heads split when they divide). ``fits``: the total
    leaves ``SERVE_HEADROOM`` of ``device_memory_gb`` free.

    The activations come from compiling the programs in float32: the CPU compiler has no bfloat16 matmul and,
    given bfloat16, converts every layer's KV cache to float32 copies that no GPU program makes (a 7B decode
    step then shows 58 GB of temporaries); float32 temporaries bound the bfloat16 ones from above."""
    weights_state, cache, _ = _engine_arrays(config, dtype, max_batch, max_len, num_devices)
    state32, cache32, mesh = _engine_arrays(config, "float32", max_batch, max_len, num_devices)
    graphdef, mcfg = state32[0], state32[2]
    from emoqwen_jax.infer import engine_steps as steps  # noqa: PLC0415

    i32 = lambda n: jax.ShapeDtypeStruct((n,), np.int32)  # noqa: E731

    def rows(n):
        f32 = jax.ShapeDtypeStruct((n,), np.float32)
        return steps.RowSampling(f32, f32, i32(n), jax.ShapeDtypeStruct((n,), np.uint32), i32(n), i32(n),
                                 jax.ShapeDtypeStruct((n, steps.STOP_SLOTS), np.int32))

    prompt = video_batch_shapes(mcfg, 1, frames, frame_size, length or max_len).replace(labels=None,
                                                                                       rope_deltas=None)
    if prompt.text.input_ids.shape[1] > max_len:
        raise ValueError(f"the planned prompt ({prompt.text.input_ids.shape[1]} tokens) exceeds max_len={max_len}")
    jit = lambda fn: jax.jit(fn, static_argnums=(0,), static_argnames=("any_sampled",), donate_argnums=(2,))  # noqa: E731
    t0 = time.perf_counter()
    with axis_rules(mesh, DEFAULT_RULES):
        decode = jit(steps.decode_step).lower(graphdef, state32[1], cache32, i32(max_batch), i32(max_batch),
                                              i32(max_batch), rows(max_batch), any_sampled=True)
        prefill = jit(steps.prefill_into).lower(graphdef, state32[1], cache32, prompt, i32(1), i32(1), rows(1),
                                                any_sampled=True)
        temps = {name: int(lowered.compile().memory_analysis().temp_size_in_bytes)
                 for name, lowered in (("decode", decode), ("prefill", prefill))}
    weights, kv_bytes = shard_bytes(weights_state[1]), shard_bytes(cache)
    activations = max(temps.values())
    total = weights + kv_bytes + activations
    return {"model_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights_state[1])), "dtype": dtype,
            "num_devices": num_devices, "max_batch": max_batch, "max_len": max_len,
            "prefill_tokens": int(prompt.text.input_ids.shape[1]),
            "prefill_patches": int(prompt.vision.pixel_values.shape[0]),
            "weight_bytes": weights, "kv_cache_bytes": kv_bytes, "decode_activation_bytes": temps["decode"],
            "prefill_activation_bytes": temps["prefill"], "activation_bytes": activations,
            "per_device_bytes": total, "device_memory_gb": device_memory_gb, "headroom": SERVE_HEADROOM,
            "fits": total <= (1 - SERVE_HEADROOM) * device_memory_gb * 1e9,
            "compile_s": round(time.perf_counter() - t0, 1)}


def _engine_arrays(config, dtype: str, max_batch: int, max_len: int, num_devices: int):
    """((graphdef, abstract sharded state, model config), abstract sharded KV cache, mesh) of the engine's model
    in ``dtype`` (weights and compute) on a tensor=``num_devices`` mesh."""
    from jax.sharding import NamedSharding  # noqa: PLC0415

    from emoqwen_jax.infer.engine_steps import cache_partition, cache_spec  # noqa: PLC0415
    from emoqwen_jax.parallel.rules import variable_sharding  # noqa: PLC0415

    mcfg = ModelConfig.from_dict({**ModelConfig.from_run_config(config).to_dict(), "dtype": dtype,
                                  "param_dtype": dtype})
    abstract = nnx.eval_shape(lambda: EmotionQwen(mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    mesh = make_mesh({"tensor": num_devices}, jax.devices()[:num_devices])
    place = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(lambda var: var.replace(place(var, variable_sharding(var, mesh))), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    heads = "tensor" if mcfg.text.num_kv_heads % num_devices == 0 else None
    kv = NamedSharding(mesh, cache_partition(None, heads))
    cache = jax.tree.map(lambda s: place(s, kv), cache_spec(abstract, max_batch, max_len))
    return (graphdef, state, mcfg), cache, mesh


def format_serve_table(report: dict) -> str:
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    limit = (1 - report["headroom"]) * report["device_memory_gb"]
    rows = [("model / dtype", f"{report['model_params'] / 1e9:.2f} B parameters / {report['dtype']}"),
            ("devices", str(report["num_devices"])),
            ("slots × length", f"{report['max_batch']} × {report['max_len']}"),
            ("weights per device", gb(report["weight_bytes"])),
            ("KV cache per device", gb(report["kv_cache_bytes"])),
            ("activations (decode / prefill)", f"{gb(report['decode_activation_bytes'])} / "
                                               f"{gb(report['prefill_activation_bytes'])} (prefill of "
                                               f"{report['prefill_tokens']} tokens, {report['prefill_patches']} "
                                               f"patches)"),
            ("per device", gb(report["per_device_bytes"])),
            (f"fits {report['device_memory_gb']:g} GB with {100 * report['headroom']:g}% to spare",
             f"{'yes' if report['fits'] else 'no'} (limit {limit:.1f} GB)")]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


"""``emoqwen-plan`` for an RL stage: what one device holds during ``stage4_rl``, from abstract shapes (nothing is
allocated or compiled, so the 7b preset plans in seconds on a laptop).

Per device, on the run's mesh (``config.mesh`` over ``num_devices``), in one process:

  policy       the parameters, sharded as the trainer shards them (``param_dtype``)
  optimizer    the optimiser state of the stage's trainable set (AdamW: two moments per trainable parameter)
  reference    a second copy of the parameters, the frozen reference, when ``rl.beta`` > 0 (none at beta = 0)
  kv_cache     the rollout engine's KV cache: ``batch_size`` slots (prompts × ``group_size`` completions, all of
               a round at once) × (``max_length`` + ``rl.max_new_tokens``) tokens × layers × (k, v) × KV heads ×
               head_dim in the compute dtype, slots split over the batch axes when they divide, KV heads over
               'tensor' when they divide (as ``emoqwen_jax.infer.engine.Engine`` places it)
  rollout      the round's per-completion arrays: tokens, positions, mask, old (and reference) log-probabilities
               (``batch_size`` × ``max_new_tokens``) and the advantages, split over the batch axes

The engine samples with the policy's own buffers (same shardings), so the weights are not counted twice. Not
included: the update step's activations and the engine's decode/prefill temporaries (``emoqwen-plan --stage
stage3_video --length ...`` compiles a train step of the update's size; ``emoqwen-plan --serve`` the engine's).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from emoqwen_jax.infer.engine_steps import cache_sharding, cache_spec
from emoqwen_jax.parallel import make_mesh
from emoqwen_jax.parallel.rules import batch_sharding, pure_param_shardings
from emoqwen_jax.train import step as step_lib
from emoqwen_jax.train.plan import build_train_step, shard_bytes

PARTS = ("policy", "optimizer", "reference", "kv_cache", "rollout")


def rl_plan(config, *, num_devices: int, stage: str = "stage4_rl", device_memory_gb: float = 0.0
            ) -> dict[str, Any]:
    """The report (module docstring): ``<part>_bytes`` per device for each of ``PARTS``, their sum
    ``per_device_bytes``, the shapes they come from, and ``headroom`` (1 − used / ``device_memory_gb``) when
    that is given."""
    sc = config.stages[stage]
    if sc.get("kind") != "rl":
        raise ValueError(f"stage {stage!r} has kind {sc.get('kind')!r}, not 'rl'")
    rl = sc.rl
    mesh_cfg = dict(config.mesh)
    mesh_cfg["num_devices"] = num_devices
    mesh = make_mesh(mesh_cfg, jax.devices()[:num_devices])
    mcfg, abstract, built = build_train_step(config, stage)  # the model with the stage's LoRA adapters, if any
    pshard = pure_param_shardings(abstract, mesh, tuple(config.mesh.rules))
    params = jax.tree.map(_placed, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)), pshard)
    state_shapes = jax.eval_shape(built.init, params)
    state = jax.tree.map(_placed, state_shapes, step_lib.state_shardings(state_shapes, pshard, mesh))
    slots, new_tokens = int(sc.batch_size), int(rl.max_new_tokens)
    kv_len = int(sc.max_length) + new_tokens
    beta = float(rl.beta)
    policy = shard_bytes(params)
    parts = {"policy": policy, "optimizer": shard_bytes(state.opt_state), "reference": policy if beta else 0,
             "kv_cache": shard_bytes(_rollout_cache(abstract, mesh, slots, kv_len)),
             "rollout": shard_bytes(_rollout_arrays(mesh, slots, new_tokens, beta > 0))}
    used = sum(parts.values())
    report = {"stage": stage, "mesh": {k: int(v) for k, v in mesh.shape.items()}, "num_devices": num_devices,
              "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), "dtype": mcfg.dtype,
              "param_dtype": mcfg.param_dtype, "group_size": int(rl.group_size),
              "prompts_per_round": slots // int(rl.group_size), "completions_per_round": slots,
              "kv_cache_slots": slots, "kv_cache_length": kv_len, "max_new_tokens": new_tokens, "beta": beta,
              **{f"{k}_bytes": v for k, v in parts.items()}, "per_device_bytes": used}
    if device_memory_gb:
        report.update(device_memory_gb=device_memory_gb, headroom=1 - used / (device_memory_gb * 1e9))
    return report


def _placed(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _rollout_cache(abstract, mesh, slots: int, length: int) -> list:
    """The engine's KV cache (``Engine.__init__``'s placement) as sharded ShapeDtypeStructs."""
    spec = cache_spec(abstract, slots, length)
    sharding = cache_sharding(mesh, spec, slots)
    return jax.tree.map(lambda s: _placed(s, sharding), spec)


def _rollout_arrays(mesh, rows: int, new_tokens: int, with_reference: bool) -> dict:
    """The update's rollout arrays (``rl.stage``: tokens, positions, mask, old_logp[, ref_logp], advantages)."""
    per_token = {"tokens": np.int32, "positions": np.int32, "mask": np.bool_, "old_logp": np.float32}
    if with_reference:
        per_token["ref_logp"] = np.float32
    out = {k: _placed(jax.ShapeDtypeStruct((rows, new_tokens), d), batch_sharding(mesh, 2))
           for k, d in per_token.items()}
    out["advantages"] = _placed(jax.ShapeDtypeStruct((rows,), np.float32), batch_sharding(mesh, 1))
    return out


def format_rl_table(report: dict) -> str:
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    rows = [("mesh", " × ".join(f"{k}={v}" for k, v in report["mesh"].items())),
            ("stage / dtype / params", f"{report['stage']} / {report['dtype']} (weights {report['param_dtype']}) / "
                                       f"{report['params'] / 1e9:.2f} B"),
            ("round", f"{report['prompts_per_round']} prompts × {report['group_size']} completions of up to "
                      f"{report['max_new_tokens']} tokens"),
            ("policy weights", gib(report["policy_bytes"])),
            ("optimiser state", gib(report["optimizer_bytes"])),
            ("reference weights", gib(report["reference_bytes"]) + ("" if report["beta"] else " (beta = 0)")),
            ("rollout KV cache", f"{gib(report['kv_cache_bytes'])} ({report['kv_cache_slots']} slots × "
                                 f"{report['kv_cache_length']} tokens)"),
            ("rollout arrays", gib(report["rollout_bytes"])),
            ("per device (no activations)", gib(report["per_device_bytes"]))]
    if "headroom" in report:
        rows.append((f"headroom of {report['device_memory_gb']:g} GB", f"{100 * report['headroom']:.1f} %"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

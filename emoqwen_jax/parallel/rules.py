"""Logical axis rules: how the model's logical axis names map onto mesh axes.

Training and ``emoqwen-plan`` read the run config's ``mesh.rules`` (``configs/emotion_qwen.py``: this table unless
overridden); code without a run config (the inference engine, sharding a loaded model directory) and the
functions below by default use ``DEFAULT_RULES``:

Parameters (``logical_axes`` metadata on every ``nnx.Param``):
  embed / merge / embed_out -> fsdp (+ expert: outside the MoE layer the expert axis is extra FSDP)
  mlp, q_heads, kv_heads, heads, qkv -> tensor (Megatron-style: column-parallel in, row-parallel out)
  vocab -> tensor; expert -> expert; gate -> replicated
Activations (``constrain`` calls in the model):
  batch / units -> data, fsdp, expert (every batch-like axis); act_heads, act_mlp -> tensor; act_embed,
  length -> replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emoqwen_jax.inputs import FieldSpec, ModelInputs
from emoqwen_jax.model import ModelConfig
from emoqwen_jax.model.sharding import Rules, logical_to_spec

BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: Rules = (
    # parameters
    ("expert", "expert"),
    ("embed", ("fsdp", "expert")),
    ("merge", ("fsdp", "expert")),
    ("embed_out", ("fsdp", "expert")),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("gate", None),
    # activations
    ("batch", BATCH_AXES),
    ("units", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def variable_sharding(var: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """NamedSharding of one variable from its ``logical_axes`` metadata (replicated without any)."""
    names = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    shape = var.shape if hasattr(var, "shape") else var[...].shape
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh=mesh, rules=rules) if names else PartitionSpec())


def param_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding for every ``nnx.Variable`` in ``state`` (from its ``logical_axes`` metadata)."""
    return jax.tree.map(lambda var: variable_sharding(var, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def pure_param_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """Like ``param_shardings`` but shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (the trainer
    keeps parameters as a pure dict). ``model`` may be abstract (``nnx.eval_shape``)."""
    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = variable_sharding(var, mesh, rules)
    return out


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Places ``model``'s parameters on ``mesh`` by the rules (in place) and returns it."""
    state = nnx.state(model)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_devices(mesh: Mesh) -> int:
    """How many devices split the batch: the product of the batch-like mesh axes (data × fsdp × expert)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Shards dimension ``batch_dim`` of an ``ndim`` array over every batch-like mesh axis."""
    spec = [None] * ndim
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    spec[batch_dim] = axes or None
    return NamedSharding(mesh, PartitionSpec(*spec))


def input_sharding(spec: FieldSpec, ndim: int, mesh: Mesh) -> NamedSharding:
    """The sharding of one model input: its declared batch dimension over the batch axes (None: replicated)."""
    if spec.batch_dim is None or ndim == 0:
        return NamedSharding(mesh, PartitionSpec())
    return batch_sharding(mesh, ndim, spec.batch_dim)


def batch_shardings(inputs: ModelInputs, mesh: Mesh) -> ModelInputs:
    """``ModelInputs`` of NamedShardings, one per present field (from the fields' ``batch_dim``)."""
    return inputs.map_fields(lambda spec, x: input_sharding(spec, len(x.shape), mesh))


def shard_batch(batch: ModelInputs, mesh: Mesh) -> ModelInputs:
    """Places model inputs (``layout.build_model_inputs``, labels included) on ``mesh``: text arrays by row,
    flat vision arrays (patches, units) by position, over every batch-like axis."""
    return batch.map_fields(
        lambda spec, x: jax.device_put(jax.numpy.asarray(x), input_sharding(spec, np.ndim(x), mesh)))


def check_divisibility(config: ModelConfig, mesh: Mesh, batch_size: int | None = None) -> None:
    """Errors, with the numbers, for splits that would silently replicate or mis-shard."""
    tensor, expert = mesh.shape["tensor"], mesh.shape["expert"]
    batch_shards = batch_devices(mesh)
    problems = []
    for what, n in (("text.num_heads", config.text.num_heads), ("text.num_kv_heads", config.text.num_kv_heads),
                    ("vision.num_heads", config.vision.num_heads)):
        if n % tensor:
            problems.append(f"{what}={n} is not divisible by mesh.tensor={tensor}")
    if config.compressor.num_experts % expert:
        problems.append(f"compressor.num_experts={config.compressor.num_experts} is not divisible by "
                        f"mesh.expert={expert}")
    if batch_size is not None and batch_size % batch_shards:
        problems.append(f"global batch size {batch_size} is not divisible by data*fsdp*expert={batch_shards}")
    if problems:
        raise ValueError("mesh does not fit the model: " + "; ".join(problems))
